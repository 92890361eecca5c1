"""How many CPU threads a command computes with: torch's intra-op pool (the one its kernels, MKL and OpenMP use;
ckv's nearest-centroid search, k-means, prefill and scoring all run on it)."""
from __future__ import annotations

import os

import torch

from ckv_cli.errors import CkvError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count when none is given: OMP_NUM_THREADS where it is set to a positive integer (the caller
    asked for it), else every available core."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def set_threads(n: int | None = None) -> int:
    """Use `n` CPU threads (None: `default_threads()`); returns the number set. Refuses anything but an integer
    of at least 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CkvError(f"threads must be an integer of at least 1, got {n!r}")
    n = default_threads() if n is None else n
    torch.set_num_threads(n)
    return n
