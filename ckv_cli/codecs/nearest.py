"""Exact argmax of a linear score over m rows, fast on the CPU: the nearest centroid (`2 x.c - |c|^2`) and a
CollectiveKV router (`x @ W.T + b`, tied or not) alike.

The semantics is that of the plain float32 expressions `((2 x) @ c.T - |c|^2).argmax(1)` and
`(x @ W.T + b).argmax(1)`: the same float32 scores, the first index on ties. The scores come from the same
GEMM, chunked by rows (MKL's per-row results do not depend on the chunk, except for a one-row chunk, which is
computed as two rows here), into a buffer reused from chunk to chunk (no page faults); only the argmax is
blocked (block maxima, then the argmax inside the first winning block), which returns torch's index several
times faster than its row argmax.
"""
from __future__ import annotations

import torch

BLOCK = 256  # columns per block of the blocked argmax
CHUNK_ELEMENTS = 1 << 22  # (chunk, m) float32 scores of 16 MB
UNIT_ROUNDOFF = 2.0**-24  # float32


def chunk_rows(m: int, chunk: int | None = None) -> int:
    """Rows per chunk so that (rows, m) scores stay at CHUNK_ELEMENTS (at least 2: see the module docstring)."""
    return max(2, chunk or CHUNK_ELEMENTS // max(m, 1))


def argmax_rows(s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(n, m) -> (n,) index of each row's maximum, the first one on ties (NaN counts as the maximum), exactly as
    `s.argmax(1)`: the maxima of blocks of `block` columns, the first block holding the row maximum, the argmax
    inside it."""
    n, m = s.shape
    nb = m // block
    if nb < 2 or n == 0:
        return s.argmax(1)
    bmax = s[:, : nb * block].unflatten(1, (nb, block)).amax(2)  # (n, nb)
    if nb * block < m:
        bmax = torch.cat([bmax, s[:, nb * block :].amax(1, keepdim=True)], 1)  # (n, nb + 1)
    start = bmax.argmax(1) * block  # (n,) first column of the first block holding the maximum
    cols = (start[:, None] + torch.arange(block)).clamp_(max=m - 1)  # (n, block); a short tail repeats its last
    return start + s.gather(1, cols).argmax(1)  # column after the real ones, so the first maximum is still real


def scores_into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, m) float32 `x @ w.T + b` written into `out` (at least max(n, 2) rows): the plain
    expression's values (a single row is computed as two: a one-row GEMM takes another path in MKL)."""
    n = len(x)
    xs = x.expand(2, -1) if n == 1 else x
    s = out[: len(xs)]
    torch.mm(xs, w.T, out=s)
    return s.add_(b)[:n]


def _chunked_scores(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int | None, x_scale: float):
    """Yields (first row, (rows, m) float32 `(x_scale x) @ w.T + b`) chunk by chunk, into one reused buffer (each
    chunk scaled on its own: no scaled copy of x)."""
    x, w, b = x.detach().float(), w.detach(), b.detach()
    rows = chunk_rows(len(w), chunk)
    buf = torch.empty(max(2, min(rows, x.shape[0])), len(w))  # (rows, m) reused
    for a in range(0, x.shape[0], rows):
        xa = x[a : a + rows] if x_scale == 1.0 else x_scale * x[a : a + rows]
        yield a, scores_into(xa, w, b, buf)


def linear_argmax(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int | None = None,
                  x_scale: float = 1.0) -> torch.Tensor:
    """(N, d), (m, d), (m,) -> (N,) `((x_scale x) @ w.T + b).argmax(1)` (a router's choice), in chunks of rows."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    for a, s in _chunked_scores(x, w, b, chunk, x_scale):
        out[a : a + len(s)] = argmax_rows(s)
    return out


def linear_topk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int, chunk: int | None = None,
                x_scale: float = 1.0) -> torch.Tensor:
    """(N, d), (m, d), (m,) -> (N, k) the rows of the k largest `(x_scale x) @ w.T + b` (largest first), chunked as
    `linear_argmax`: a router's k best entries."""
    out = torch.empty(x.shape[0], min(int(k), len(w)), dtype=torch.long)
    for a, s in _chunked_scores(x, w, b, chunk, x_scale):
        out[a : a + len(s)] = torch.topk(s, out.shape[1], dim=1).indices  # (rows, k)
    return out


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """(N, d), (m, d) -> (N,) index of the nearest centroid: argmax of the float32 scores `(2 x) @ c.T - |c|^2`
    (a linear layer with a bias; first index on ties)."""
    c = centroids.detach()
    return linear_argmax(x, c, -(c * c).sum(1), chunk, x_scale=2.0)


def nearest_k(x: torch.Tensor, centroids: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """(N, d), (m, d) -> (N, k) the k nearest centroids, nearest first (the scores of `nearest`)."""
    c = centroids.detach()
    return linear_topk(x, c, -(c * c).sum(1), k, chunk, x_scale=2.0)


def score_rounding(d: int) -> float:
    """A bound, per unit of (|x| + |c|)^2, on how far a float32 score `2 x.c - |c|^2` (a d-term dot product, a
    d-term sum of squares, a subtraction) or a float32 squared distance can be from the exact value:
    (d + 3) u (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1)."""
    return (d + 3) * UNIT_ROUNDOFF
