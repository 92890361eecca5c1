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
