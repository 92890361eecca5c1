"""Seeded k-means (k-means++ seeding, Lloyd steps) in torch, chunked so memory stays bounded."""
from __future__ import annotations

import torch


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """(N, d), (m, d) -> (N,) index of the nearest centroid: argmax(2 x.c - |c|^2), a linear layer with a bias."""
    bias = (centroids * centroids).sum(1)  # (m,)
    chunk = chunk or max(1, (1 << 22) // len(centroids))  # (chunk, m) scores stay at 16 MB: no mmap churn
    out = torch.empty(x.shape[0], dtype=torch.long)
    for a in range(0, x.shape[0], chunk):
        out[a : a + chunk] = (2 * x[a : a + chunk] @ centroids.T - bias).argmax(1)  # (chunk, m)
    return out


def kmeans_pp(x: torch.Tensor, m: int, gen: torch.Generator, candidates: int = 4) -> torch.Tensor:
    """Greedy k-means++ seeding on (N, d); returns (m, d)."""
    N = x.shape[0]
    first = int(torch.randint(N, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # (N,)
    for _ in range(1, m):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / N)
        cand = torch.multinomial(probs, candidates, replacement=True, generator=gen)  # (c,)
        dc = torch.cdist(x, x[cand]).pow(2)  # (N, c)
        new_d2 = torch.minimum(d2[:, None], dc)
        best = int(new_d2.sum(0).argmin())
        centers.append(x[cand[best]])
        d2 = new_d2[:, best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, m: int, seed: int = 0, iters: int = 20, seed_sample: int = 20000) -> torch.Tensor:
    """Centroids (m, d) of (N, d). Seeding runs on a seeded sample of at most `seed_sample` points."""
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    m = min(m, x.shape[0])
    sample = x[torch.randperm(x.shape[0], generator=gen)[: max(seed_sample, m)]]
    centroids = kmeans_pp(sample, m, gen) if m <= 512 else sample[:m].clone()
    for _ in range(iters):
        assign = nearest(x, centroids)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=m).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed dead entries on the points farthest from their centroid
            err = ((x - centroids[assign]) ** 2).sum(1)
            far = err.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids
