"""How many CPU threads a command computes with."""
from __future__ import annotations

import torch


def set_threads(n: int | None) -> int:
    """Use `n` threads; 0 or None keeps torch's default (every physical core, or OMP_NUM_THREADS where set).
    Returns the number in use."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
