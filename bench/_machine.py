"""The machine a benchmark ran on, for its table and JSON, and the JSON writer (shared by the scripts in `bench/`)."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__}
    if hasattr(os, "getloadavg"):
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine: timings are upper bounds
    if str(device).startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def write_json(path: Path | None, result: dict) -> None:
    """A benchmark's result as indented JSON at `path` (its folder made), or nothing without a path."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_mb() -> float:
    """This process's peak resident set since `reset_peak()` (VmHWM), MB; NaN off Linux."""
    return _status_mb("VmHWM:")


def resident_mb() -> float:
    """This process's resident set now (VmRSS), MB; NaN off Linux."""
    return _status_mb("VmRSS:")


def _status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    return float("nan")
