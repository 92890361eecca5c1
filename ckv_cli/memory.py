"""Keep the process's resident memory near what its live tensors use.

glibc's malloc serves a large request with its own mmap and unmaps it when freed, but only above a threshold
that it raises to the size of each large block freed (up to 32 MB): after the first training step every
activation tensor below 32 MB comes from the heap, and freed heap memory stays resident and fragments, so a
training run's RSS climbs well above its live peak (HSTU on ML-100k, one epoch: 1.79 GB peak RSS for about
1.2 GB live). Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops the adjustment) returns
every large tensor's pages when it is freed. Nothing computed changes, only where memory comes from; the
price is the kernel zero-filling fresh pages for each large tensor (see bench/train_memory.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_done = False


def release_large_blocks(threshold: int = 8 << 20) -> bool:
    """Have glibc mmap (and unmap on free) every allocation of at least `threshold` bytes, from now on, for the
    whole process. Returns whether it applied (False off glibc: nothing happens)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    return _done
