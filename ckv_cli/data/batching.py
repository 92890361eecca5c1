"""Turn variable-length histories into right-padded tensors (the most recent `max_len` events of each)."""
from __future__ import annotations

import numpy as np
import torch


def pad_right(seqs: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `max_len` of each sequence; returns (B, L) int64 and lengths (B,)."""
    tails = [s[-max_len:] if max_len else s[:0] for s in seqs]
    lengths = np.fromiter((len(t) for t in tails), dtype=np.int64, count=len(tails))
    L = max(1, int(lengths.max())) if len(tails) else 1
    out = np.zeros((len(tails), L), dtype=np.int64)
    for i, t in enumerate(tails):
        out[i, : len(t)] = t
    return torch.from_numpy(out), torch.from_numpy(lengths)


def history_batch(items: list[np.ndarray], times: list[np.ndarray], max_len: int):
    """Histories -> (items (B, L), timestamps (B, L), lengths (B,)) for `prefill`."""
    it, lengths = pad_right(items, max_len)
    ts, _ = pad_right(times, max_len)
    return it, ts, lengths
