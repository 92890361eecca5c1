"""Approximate nearest-entry search over a pool: an inverted file (Sivic and Zisserman 2003, "Video Google"; the
IVF of Jégou, Douze and Schmid 2011, "Product quantization for nearest neighbor search"), opt-in (`probes=P`).

The pool's m entries are grouped into about m / ENTRIES_PER_CELL cells by a small seeded k-means over the entries
themselves; a vector's scores `2 x.e - |e|^2` are computed against the cells' centroids, then against the entries
of its `probes` best cells only, one GEMM per cell over every vector that probes it. With 8,192 entries, 128 cells
and 8 probes a vector is scored against 128 + about 512 vectors instead of 8,192. The answer is the exact
nearest entry whenever that entry lies in a probed cell, another close entry otherwise: an approximation, measured
where it is offered (docs/speed.md), never a default. Deterministic: the cells come from a seed, so the same
entries, vectors and thread count give the same answers.
"""
from __future__ import annotations

import torch

from ckv_cli.codecs.base import check_positive_int
from ckv_cli.codecs.nearest import nearest

ENTRIES_PER_CELL = 64  # entries per cell on average
MIN_CELLS = 4  # fewer cells than this: the search is exact (`nearest`)
CELL_ITERS = 10  # Lloyd steps of the cells' k-means
CHUNK = 1 << 16  # vectors per chunk (its (chunk x probes, d) gathered rows: 128 MB at 8 probes, d 64)


def cell_count(m: int, probes: int, cells: int | None = None) -> tuple[int, int, bool]:
    """(cells, probes, exact) for m entries: `cells` (default about m / ENTRIES_PER_CELL) and `probes` capped at m
    and at the cells; exact when there are fewer than MIN_CELLS cells or every cell is probed (then `search` is
    `nearest`)."""
    n = min(m, check_positive_int("cells", cells) if cells is not None else max(1, m // ENTRIES_PER_CELL))
    p = min(check_positive_int("probes", probes), n)
    return n, p, n < MIN_CELLS or p == n


class CellIndex:
    """The entries (m, d) grouped into cells for `search`; `probes` cells are searched per vector."""

    def __init__(self, entries: torch.Tensor, probes: int, seed: int = 0, cells: int | None = None):
        e = entries.detach().float().contiguous()  # (m, d)
        m = len(e)
        self.cells, self.probes, self.exact = cell_count(m, probes, cells)
        self.entries = e
        if self.exact:
            return
        gen = torch.Generator().manual_seed(seed)
        cent = e[torch.randperm(m, generator=gen)[: self.cells]].clone()  # (cells, d)
        for _ in range(CELL_ITERS):  # plain Lloyd over the entries: m x cells scores per step
            cell = nearest(e, cent)
            counts = torch.bincount(cell, minlength=self.cells)
            sums = torch.zeros_like(cent).index_add_(0, cell, e)
            cent = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None].float(), cent)
        cell = nearest(e, cent)  # (m,)
        self.centroids, self.cent_bias = cent, -(cent * cent).sum(1)
        self.order = torch.sort(cell, stable=True).indices  # (m,) entry ids, cell after cell
        self.bounds = [0] + torch.bincount(cell, minlength=self.cells).cumsum(0).tolist()  # cell c: [b[c], b[c+1])
        self.sorted = e[self.order].contiguous()  # (m, d)
        self.bias = -(self.sorted * self.sorted).sum(1)  # (m,)

    def search(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) index of the nearest entry among the probed cells' entries."""
        x = x.detach().float()
        if self.exact:
            return nearest(x, self.entries)
        out = torch.empty(len(x), dtype=torch.long)
        for a in range(0, len(x), CHUNK):
            out[a : a + CHUNK] = self._search(x[a : a + CHUNK])
        return out

    def _search(self, x: torch.Tensor) -> torch.Tensor:
        n, P = len(x), self.probes
        coarse = torch.addmm(self.cent_bias, x, self.centroids.T, alpha=2)  # (n, cells)
        probe = coarse.topk(P, 1, sorted=False).indices.reshape(-1)  # (n P,) pair (t, j) -> cell
        pairs = torch.sort(probe, stable=True).indices  # pairs grouped by cell
        rows = x.index_select(0, pairs // P)  # (n P, d) each pair's vector, cell after cell
        per_cell = torch.bincount(probe, minlength=self.cells).tolist()
        val = torch.full((n * P,), float("-inf"))  # in the grouped order
        col = torch.zeros(n * P, dtype=torch.long)
        start = 0
        for c, k in enumerate(per_cell):
            lo, hi = self.bounds[c], self.bounds[c + 1]
            if k and hi > lo:
                s = torch.addmm(self.bias[lo:hi], rows[start : start + k], self.sorted[lo:hi].T, alpha=2)  # (k, size)
                torch.max(s, 1, out=(val[start : start + k], col[start : start + k]))
                col[start : start + k] += lo
            start += k
        grouped = torch.empty(n * P, dtype=torch.long)
        grouped[pairs] = torch.arange(n * P)  # pair -> its place in the grouped order
        best = val[grouped].view(n, P).argmax(1, keepdim=True)  # (n, 1) each vector's best probe
        return self.order[col[grouped].view(n, P).gather(1, best).squeeze(1)]


class CellAssign:
    """Lloyd's assignment step (`kmeans(..., probes=P)`) through a `CellIndex` of the current centroids, rebuilt at
    every step: approximate, unlike `BoundedAssign` (which `kmeans` keeps where the cells would be searched whole:
    `cell_count`)."""

    def __init__(self, x: torch.Tensor, probes: int, seed: int = 0):
        self.x, self.probes, self.seed = x.float().contiguous(), probes, seed
        self.computed: list[int] = []

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        self.computed.append(len(self.x))
        return CellIndex(c, self.probes, self.seed).search(self.x)
