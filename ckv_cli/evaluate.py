"""Evaluation of next-item models: rank the held-out item against every item (leave-one-out).

Protocol (that of the generative-recommenders ML-1M numbers): the history is the user's events before the
target, truncated to the model's window; all items are ranked, items already in the history are *not*
removed unless `exclude_seen=True`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ckv_cli.data.batching import history_batch
from ckv_cli.data.sequences import SequenceData
from ckv_cli.metrics import ranking_metrics
from ckv_cli.models.base import SequentialRecommender, last_hidden


@torch.no_grad()
def rank_targets(model: SequentialRecommender, data: SequenceData, split: str = "test", exclude_seen: bool = False,
                 batch_size: int = 256, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """0-based rank of each user's held-out item among all items (one number per user)."""
    model.eval()
    hist_items, hist_times, targets = data.split(split)
    ranks = np.empty(len(targets), dtype=np.int64)
    for a in range(0, len(targets), batch_size):
        b = min(a + batch_size, len(targets))
        items, times, lengths = history_batch(hist_items[a:b], hist_times[a:b], model.config.max_len)
        _, h = model.prefill(items, times, lengths)
        scores = model.score_all(last_hidden(h, lengths))  # (B, n_items + 1)
        if exclude_seen:
            seen = torch.zeros_like(scores, dtype=torch.bool)
            for i, hist in enumerate(hist_items[a:b]):
                seen[i, torch.from_numpy(hist)] = True
            scores = scores.masked_fill(seen, float("-inf"))
        tgt = torch.from_numpy(targets[a:b])
        ranks[a:b] = (scores > scores.gather(1, tgt[:, None])).sum(1).numpy()
        if progress:
            progress(b - a)
    return ranks


def evaluate_model(model, data, split="test", exclude_seen=False, progress=None) -> dict[str, float]:
    return ranking_metrics(rank_targets(model, data, split, exclude_seen, progress=progress))
