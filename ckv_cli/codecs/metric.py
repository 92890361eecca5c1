"""The distance a pool is fitted and routed in (ckv, beyond CollectiveKV): plain squared error, or the model's
Fisher metric.

A cached vector's error does not cost the same in every direction: a key error moves attention logits only
along the queries that read it, a value error reaches the scores only through the layers after it. For a
model p(y | cache) the second-order cost of an error e on a token is e^T F e with F = E_y[g g^T], g = d log p(y) /
d x the gradient of the log-probability of an item y drawn from the model's own next-item distribution (the
Fisher information, the Hessian of KL(p || p_e) at e = 0). `metric=fisher` fits the pool by k-means in the
coordinates z = x L (F ~ L L^T, one (d, d) matrix per stream summed over calibration tokens: `Gram`) and routes
each token to the entry nearest in that metric; the pool is stored back in x's coordinates (decode and
compressed-domain attention are unchanged) and L is a shared tensor (d x d float32), from which the reader
derives the same router. Per-user bytes do not change. (The same idea weights quantisation by second-order
sensitivity in Optimal Brain Compression, Frantar and Alistarh 2022, and GPTQ; here it steers a vector pool.)

F is estimated on the calibration users by `ckv_cli.tasks.fisher`; this module only uses it.
"""
from __future__ import annotations

import torch

from ckv_cli.codecs.kmeans import kmeans
from ckv_cli.errors import CkvError

METRICS = ("l2", "fisher")
RIDGE = 1e-4  # relative to the mean diagonal: keeps L invertible where the Fisher is flat


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise CkvError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def factor(gram: torch.Tensor) -> torch.Tensor:
    """(d, d) symmetric PSD Gram -> (d, d) lower-triangular float32 L with L L^T = gram / its mean diagonal + ridge
    (the scale of a metric does not change a nearest entry)."""
    g = gram.double()
    if g.ndim != 2 or g.shape[0] != g.shape[1] or not torch.isfinite(g).all():
        raise CkvError(f"metric: expected a finite square matrix, got shape {tuple(g.shape)}")
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean())
    if scale <= 0:
        raise CkvError("metric: the Fisher matrix is zero (no calibration token moves the scores)")
    g = g / scale + RIDGE * torch.eye(len(g), dtype=g.dtype)
    return torch.linalg.cholesky(g).float()


def fitted_factor(fisher: torch.Tensor | None, d: int) -> torch.Tensor:
    """The factor a `metric="fisher"` codec fits with: from its stream's Fisher matrix, which must be there and
    d wide."""
    if fisher is None:
        raise CkvError("metric=fisher needs the model's Fisher matrix of this stream (ckv compress computes it on the "
                       "calibration users)")
    L = factor(fisher)
    if L.shape[0] != d:
        raise CkvError(f"metric: a {L.shape[0]}-wide Fisher matrix for {d}-wide vectors")
    return L


def check_factor(L: torch.Tensor, d: int) -> torch.Tensor:
    """A loaded factor: (d, d), finite, lower-triangular with a positive diagonal (else the router is undefined)."""
    L = L.float()
    if tuple(L.shape) != (d, d) or not torch.isfinite(L).all():
        raise CkvError(f"metric factor has shape {tuple(L.shape)}, expected ({d}, {d}) and finite")
    if (L.diagonal() <= 0).any() or torch.triu(L, 1).any():
        raise CkvError("metric factor is not lower-triangular with a positive diagonal")
    return L


def fit_pool(x: torch.Tensor, m: int, seed: int, iters: int, L: torch.Tensor | None, probes: int = 0) -> torch.Tensor:
    """(N, d) -> (m, d) k-means pool in x's coordinates, fitted in the metric (z = x L) when L is given (`probes`:
    approximate assignments, `kmeans`)."""
    if L is None:
        return kmeans(x, m, seed=seed, iters=iters, probes=probes)
    pool_z = kmeans(x.float() @ L, m, seed=seed, iters=iters, probes=probes)  # (m, d) in metric coordinates
    return torch.linalg.solve_triangular(L.double(), pool_z.double(), upper=False, left=False).float()  # z L^-1


def router(pool: torch.Tensor, L: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (m, d), b (m,)) with argmax(x W^T + b) = the entry nearest x in the metric:
    |(x - c) L|^2 = |x L|^2 - 2 x (L L^T) c^T + |c L|^2."""
    if L is None:
        return 2 * pool, -(pool * pool).sum(1)
    pz = pool @ L  # (m, d)
    return 2 * pz @ L.T, -(pz * pz).sum(1)


def coords(x: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """Vectors in the metric's coordinates (squared errors there are the metric's)."""
    return x if L is None else x.float() @ L


def pool_coords(owner, pool: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """`coords(pool, L)`, kept on `owner` (a codec) while its pool and metric are these tensors, unchanged in place
    (their version counters): an append encodes a few tokens at a time, and the pool's (m, d) x (d, d) product
    would otherwise cost more than their routing."""
    key = (pool, L, pool._version, None if L is None else L._version)
    memo = getattr(owner, "_pool_coords", None)
    if memo is None or memo[0] is not pool or memo[1] is not L or memo[2:4] != key[2:]:
        memo = owner._pool_coords = (*key, coords(pool, L))
    return memo[4]
