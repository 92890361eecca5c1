"""Ranking metrics (HR@K, NDCG@K, MRR from the rank of the held-out item) and CTR metrics (AUC, gAUC, logloss).

Ranks are 0-based: rank r means r items scored strictly higher than the target (ties go to the target).
"""
from __future__ import annotations

import numpy as np


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, n_items) scores, (N,) target columns -> (N,) 0-based rank of each target."""
    target_scores = scores[np.arange(len(targets)), targets]
    return (scores > target_scores[:, None]).sum(axis=1)


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)  # per user


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)  # one relevant item: IDCG = 1


def mrr(ranks: np.ndarray) -> np.ndarray:
    return 1.0 / (ranks + 1.0)


RANKING_METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")  # what ranking_metrics returns by default


def ranking_metrics(ranks: np.ndarray, ks=(10, 50)) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"HR@{k}"] = float(hit_rate(ranks, k).mean())
        out[f"NDCG@{k}"] = float(ndcg(ranks, k).mean())
    out["MRR"] = float(mrr(ranks).mean())
    return out


def per_user_ranking(ranks: np.ndarray, ks=(10, 50)) -> dict[str, np.ndarray]:
    """Per-user values of every ranking metric (what a paired bootstrap resamples)."""
    out = {}
    for k in ks:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    out["MRR"] = mrr(ranks)
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties counted as one half."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    r = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    r[order] = np.repeat(avg, counts)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, weight) per distinct user (sorted ids); weight = sample count, 0 for single-class users (gAUC skips
    them, their AUC reads 0)."""
    users = np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    u, lab, sc = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(u)) + 1, len(u)]
    vals, weights = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        v = auc(lab[a:b], sc[a:b])
        vals.append(0.0 if np.isnan(v) else v)
        weights.append(0 if np.isnan(v) else b - a)
    return np.array(vals), np.array(weights, dtype=np.float64)


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's sample count; users with only one class are skipped."""
    vals, w = per_user_auc(users, labels, scores)
    return float((vals * w).sum() / w.sum()) if w.sum() else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def paired_bootstrap(ref: dict[str, np.ndarray], new: dict[str, np.ndarray], n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile confidence interval of mean(new) - mean(ref) per metric, resampling users with replacement
    (the same users for both: the comparison is paired). Per-user values in, (low, high) out."""
    names = list(ref)
    if not names or n < 1:
        return {k: (float("nan"), float("nan")) for k in names}
    users = len(ref[names[0]])
    rng = np.random.default_rng(seed)
    diffs = np.stack([new[k] - ref[k] for k in names])  # (M, U)
    means = np.empty((len(names), n))
    for a in range(0, n, 100):  # 100 resamples at a time bounds memory at 100 x U indices
        idx = rng.integers(0, users, size=(min(100, n - a), users))  # (b, U)
        means[:, a : a + len(idx)] = diffs[:, idx].mean(2)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(names)}
