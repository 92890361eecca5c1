"""Evaluation of next-item models: rank the held-out item against every item (leave-one-out).

Protocol (that of the generative-recommenders ML-1M numbers, NOTES §5): the history is the user's events before
the target, truncated to the model's window; every item is ranked except the items of that window, which are
removed from the ranking (their `eval_metrics_v2_from_tensors` filters the input ids by default).
`exclude_seen=False` ranks the seen items too.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ckv_cli.data.batching import history_batch
from ckv_cli.data.sequences import SequenceData
from ckv_cli.metrics import ranking_metrics
from ckv_cli.models.base import SequentialRecommender, last_hidden


PROTOCOL = "leave-one-out, all items ranked, the items of the history window removed from the ranking"
TEMPERATURE = 0.05  # the training temperature: softmax(score / T) is the model's next-item distribution


def mask_seen(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, n_items + 1) scores with the columns of each user's window items (B, L), 0 = padding, set to -inf."""
    return scores.scatter(1, items.to(scores.device), float("-inf"))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """0-based rank of each target: the number of items scored strictly higher."""
    return (scores > scores.gather(1, targets[:, None])).sum(1).cpu().numpy()


@torch.no_grad()
def rank_targets(model: SequentialRecommender, data: SequenceData, split: str = "test", exclude_seen: bool = True,
                 batch_size: int = 256, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """0-based rank of each user's held-out item among all items (one number per user)."""
    model.eval()
    hist_items, hist_times, targets = data.split(split)
    ranks = np.empty(len(targets), dtype=np.int64)
    device = model.item_emb.weight.device
    for a in range(0, len(targets), batch_size):
        b = min(a + batch_size, len(targets))
        items, times, lengths = history_batch(hist_items[a:b], hist_times[a:b], model.config.max_len)
        _, h = model.prefill(items.to(device), times.to(device), lengths.to(device))
        scores = model.score_all(last_hidden(h, lengths.to(device))).cpu()  # (B, n_items + 1)
        if exclude_seen:
            scores = mask_seen(scores, items)
        ranks[a:b] = target_ranks(scores, torch.from_numpy(targets[a:b]))
        if progress:
            progress(b - a)
    return ranks


def evaluate_model(model, data, split="test", exclude_seen=True, progress=None) -> dict[str, float]:
    return ranking_metrics(rank_targets(model, data, split, exclude_seen, progress=progress))


@torch.no_grad()
def scores_after_last_event(model, cache, batch, exclude_seen: bool = True) -> torch.Tensor:
    """Append each user's last event (a `CacheBatch`) through `cache` and score every item: (B, n_items + 1),
    the window's items (cached ones and the last event) masked unless `exclude_seen=False`."""
    _, h = model.extend(cache, batch.last_items, batch.last_ts)
    scores = model.score_all(last_hidden(h, torch.ones(len(batch.users), dtype=torch.long)))
    if exclude_seen:
        scores = mask_seen(mask_seen(scores, batch.cache.items), batch.last_items)
    return scores


def score_fidelity(s_ref: torch.Tensor, s_new: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-user comparison of two score matrices (B, n_items + 1; -inf = not ranked): the target's rank under
    each, overlap of the top-10 lists, and KL(reference || new) of the softmax distributions at the training
    temperature over the ranked items."""
    top_r, top_n = s_ref.topk(10).indices, s_new.topk(10).indices  # (B, 10)
    logp_r = torch.log_softmax(s_ref / TEMPERATURE, dim=1)  # -inf columns get probability 0
    logp_n = torch.log_softmax(s_new / TEMPERATURE, dim=1)
    ranked = torch.isfinite(s_ref)
    kl = torch.where(ranked, logp_r.exp() * (logp_r - logp_n), torch.zeros_like(logp_r)).sum(1).clamp(min=0)
    return {"rank_ref": target_ranks(s_ref, targets), "rank_new": target_ranks(s_new, targets),
            "top10_overlap": (top_r[:, :, None] == top_n[:, None, :]).any(2).float().mean(1).numpy(),
            "kl": kl.numpy()}


def fidelity_summary(per_user: dict[str, np.ndarray]) -> dict:
    rr, rn = per_user["rank_ref"], per_user["rank_new"]
    return {"top10_overlap": float(per_user["top10_overlap"].mean()), "kl_mean": float(per_user["kl"].mean()),
            "hit10_flips": int(((rr < 10) != (rn < 10)).sum()),
            "hit10_gained": int(((rr >= 10) & (rn < 10)).sum()), "hit10_lost": int(((rr < 10) & (rn >= 10)).sum())}
