"""Keep the process's resident memory near what its live tensors use.

glibc's malloc serves a large request with its own mmap and unmaps it when freed, but only above a threshold
that it raises to the size of each large block freed (up to 32 MB): after the first training step every
activation tensor below 32 MB comes from the heap, and freed heap memory stays resident and fragments, so a
training run's RSS climbs well above its live peak (HSTU on ML-100k, one epoch: 1.79 GB peak RSS for about
1.2 GB live). Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops the adjustment) returns
every large tensor's pages when it is freed. Nothing computed changes, only where memory comes from; the
price is the kernel zero-filling fresh pages for each large tensor (see bench/train_memory.py).

Tensors under the threshold (HSTU's and SASRec's (B, L, d) activations, 6.5 MB at batch 128) still come from the
heap, and a step's freed ones stay resident, scattered, into the next step: `trim_heap()` after each next-item
training step hands the heap's free pages back (glibc's `malloc_trim(0)`), so every step starts from the live
tensors alone. Its price is the same kind: the next step faults those pages in again (docs/speed.md). Lowering
the threshold instead pays that for every small tensor, not once per step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_done = False


def release_large_blocks(threshold: int = 8 << 20) -> bool:
    """Have glibc mmap (and unmap on free) every allocation of at least `threshold` bytes, from now on, for the
    whole process. Returns whether it applied (False off glibc: nothing happens)."""
    global _done
    if _done:
        return True
    libc = _glibc()
    _done = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    return _done


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel now (`malloc_trim(0)`); call it between training steps.
    Returns whether it applied (False off glibc: nothing happens)."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) >= 0


@functools.cache
def _glibc():
    """glibc through ctypes, or None (another platform, or a libc without mallopt / malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
