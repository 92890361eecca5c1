"""Seeded k-means (k-means++ seeding, Lloyd steps) in torch, chunked so memory stays bounded.

Lloyd's steps (Lloyd 1982) assign every point with `nearest` (ckv_cli.codecs.nearest: the argmax of the float32
scores 2 x.c - |c|^2, first index on ties), but a point's scores are not recomputed when its nearest centroid is
certain from bounds carried across steps (in the spirit of Elkan 2003, "Using the triangle inequality to
accelerate k-means", and Hamerly 2010, "Making k-means even faster"): at its last full computation a point
keeps its `candidates` best centroids and a lower bound on its distance to every other centroid; a later step
computes its distances to those candidates and to the `movers` centroids that moved most since then, lowers
the bound by how far any other centroid moved (triangle inequality) and keeps the best candidate when it wins
by more than float32 rounding can explain (`ckv_cli.codecs.nearest.score_rounding`, on both the float32 scores
`nearest` would compute and the distances computed here): `nearest` would return that centroid. Every other
point is recomputed in full. The centroids are therefore those of plain Lloyd, bit for bit.

With `probes` (opt-in) every assignment goes through an approximate cell search instead (`ckv_cli.codecs.cells`):
not plain Lloyd any more, but seeded and deterministic.
"""
from __future__ import annotations

import torch

from ckv_cli.codecs.cells import CellAssign, cell_count
from ckv_cli.codecs.nearest import argmax_rows, chunk_rows, nearest, score_rounding, scores_into

__all__ = ["kmeans", "kmeans_pp", "nearest"]

CANDIDATES = 16  # centroids a point keeps from its last full computation
MOVERS = 512  # centroids that moved most since then, checked directly for every point
_SLACK = 3.0  # certificates ask for a gap of _SLACK x (the reference's rounding + ours)


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


def kmeans(x: torch.Tensor, m: int, seed: int = 0, iters: int = 20, seed_sample: int = 20000,
           return_assign: bool = False, stats: list | None = None, probes: int = 0):
    """Centroids (m, d) of (N, d). Seeding runs on a seeded sample of at most `seed_sample` points. With
    `return_assign`, (centroids, nearest(x, centroids)). `stats`, when given, receives the number of points
    computed in full at each assignment. `probes` > 0: every assignment is approximate, through a `CellIndex` of the
    centroids searching that many cells (ckv_cli.codecs.cells; the returned assignment too)."""
    x = x.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    m = min(m, x.shape[0])
    sample = x[torch.randperm(x.shape[0], generator=gen)[: max(seed_sample, m)]]
    centroids = kmeans_pp(sample, m, gen) if m <= 512 else sample[:m].clone()
    approx = probes and not cell_count(m, probes)[2]  # a cell search of every cell is `nearest`: keep the bounds
    assigner = CellAssign(x, probes, seed) if approx else BoundedAssign(x)
    for _ in range(iters):
        assign = assigner(centroids)  # (N,) == nearest(x, centroids) (with `probes`, mostly)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=m).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed dead entries on the points farthest from their centroid
            err = ((x - centroids[assign]) ** 2).sum(1)
            far = err.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    out = (centroids, assigner(centroids)) if return_assign else centroids
    if stats is not None:
        stats.extend(assigner.computed)
    return out


class BoundedAssign:
    """`nearest(x, c)` for fixed points x (N, d) and centroids that move from call to call (Lloyd's steps),
    recomputing only the points whose nearest centroid the bounds do not settle (module docstring).

    At its last full computation (every float32 score, as `nearest` computes them) a point kept its best
    centroids `cand` (N, k) and `low` (N,), a float64 lower bound on its distance then to every other centroid.
    A later call computes the candidates' distances, checks the `movers` centroids that moved most since then
    directly, and lowers `low` by the next largest move since then (`snapshots` keeps the centroids of each
    call some point refers to); a certificate asks for a gap wider than the float32 rounding of the
    reference's scores and of the distances computed here. (Hamerly's single second-best bound settles almost
    nothing here: in 64 dimensions with 8,192 centroids the best two are too close for the largest move.)
    `computed` lists the points computed in full at each call."""

    def __init__(self, x: torch.Tensor, candidates: int = CANDIDATES, movers: int = MOVERS, rows: int = 4096):
        self.x = x.float().contiguous()  # (N, d)
        self.xx = self.x.double().pow(2).sum(1)  # (N,)
        self.xnorm = self.xx.sqrt()
        self.k, self.movers, self.rows = candidates, movers, rows
        self.rounding = score_rounding(x.shape[1])
        self.assign = self.cand = self.low = self.since = None
        self.snapshots: dict[int, torch.Tensor] = {}  # call -> (m, d) float64 centroids, while a point uses them
        self.calls = 0
        self.computed: list[int] = []

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        c = c.float().contiguous()
        step, self.calls = self.calls, self.calls + 1
        if len(c) <= 4 * (self.k + 1):  # few centroids: bounds would not pay
            self.computed.append(len(self.x))
            return nearest(self.x, c)
        c64 = c.double()
        cmax = float(c64.norm(dim=1).max())
        err = (_SLACK * 2 * self.rounding) * (self.xnorm + cmax) ** 2  # (N,) rounding, ours and the reference's
        redo = torch.arange(len(self.x)) if self.assign is None else self._settle(c, c64, err)
        self._full(redo, c, cmax, step)
        self.computed.append(len(redo))
        used = set(self.since.unique().tolist())
        self.snapshots = {s: v for s, v in self.snapshots.items() if s in used}
        if step in used:
            self.snapshots[step] = c64
        return self.assign.clone()

    def _settle(self, c: torch.Tensor, c64: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """Keep `assign` for every point whose nearest centroid is certain; return the others' indices."""
        cc = (c * c).sum(1)  # (m,)
        redo = []
        for s, old in self.snapshots.items():
            pts = (self.since == s).nonzero().squeeze(1)
            moved = (c64 - old).norm(dim=1)  # (m,) how far each centroid moved since call s
            top = moved.topk(min(self.movers + 1, len(c)))
            movers, drift = top.indices[:-1], float(top.values[-1])  # drift bounds every other centroid's move
            slot = torch.full((len(c),), -1, dtype=torch.long)
            slot[movers] = torch.arange(len(movers))  # a mover's column in dm
            cm, cmm = c[movers], cc[movers]  # (J, d), (J,)
            for a in range(0, len(pts), self.rows):
                i = pts[a : a + self.rows]
                x, cand, xx, e = self.x[i], self.cand[i], self.xx[i, None].float(), err[i]
                n, k = cand.shape
                dots = (c.index_select(0, cand.view(-1)).view(n, k, -1) * x[:, None, :]).sum(2)  # (n, k)
                dc = cc.index_select(0, cand.view(-1)).view(n, k).add_(xx).sub_(dots, alpha=2)  # squared distances
                r, j = (slot[cand] >= 0).nonzero(as_tuple=True)
                dc[r, j] = float("inf")  # a mover's distance is in dm
                dm = torch.addmm(cmm, x, cm.T, alpha=-2).add_(xx)  # (n, J)
                both = torch.cat([dc, dm], 1)  # (n, k + J)
                two = both.topk(2, 1, largest=False)
                best, nxt = two.values[:, 0].double(), two.values[:, 1].double()
                floor = (self.low[i] - drift).clamp(min=0)  # every other centroid is at least this far
                ok = (nxt - best > 2 * e) & (floor**2 - best > 2 * e)
                pick = two.indices[:, 0]
                winner = torch.where(pick < k, cand.gather(1, pick.clamp(max=k - 1)[:, None]).squeeze(1),
                                     movers[(pick - k).clamp(min=0)])
                self.assign[i[ok]] = winner[ok]
                redo.append(i[~ok])
        return torch.cat(redo) if redo else torch.zeros(0, dtype=torch.long)

    def _full(self, pts: torch.Tensor, c: torch.Tensor, cmax: float, step: int) -> None:
        """Every float32 score of `pts` (as `nearest` computes them): assignment, candidates, bounds."""
        N, m = len(self.x), len(c)
        if self.assign is None:
            self.assign = torch.empty(N, dtype=torch.long)
            self.cand = torch.empty(N, self.k, dtype=torch.long)
            self.low = torch.empty(N, dtype=torch.float64)
            self.since = torch.empty(N, dtype=torch.long)
        bias = -(c * c).sum(1)  # (m,)
        rows = chunk_rows(m)
        buf = torch.empty(max(2, min(rows, len(pts))), m)
        for a in range(0, len(pts), rows):
            i = pts[a : a + rows]
            s = scores_into(2 * self.x[i], c, bias, buf)  # (n, m)
            self.assign[i] = argmax_rows(s)
            v, j = _top(s, self.k + 1)  # (n, k + 1)
            kth = v.min(1)  # the (k+1)-th best score is at least every score outside the other k
            self.cand[i] = _drop(j, kth.indices)  # (n, k)
            err = self.rounding * (self.xnorm[i] + cmax) ** 2  # the float32 score's rounding
            self.low[i] = (self.xx[i] - kth.values.double() - err).clamp(min=0).sqrt()
        self.since[pts] = step


def _top(s: torch.Tensor, k: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m) -> the k largest values and their columns per row, any order among equals: the maxima of strided
    column groups (one vectorised pass) pick the k groups holding the k largest values, then a top-k inside."""
    n, m = s.shape
    if m % group or m // group < 4 * k:
        return s.topk(k, 1, sorted=False)
    nb = m // group
    gmax = s.view(n, group, nb).amax(1)  # (n, nb): group g holds the columns g, g + nb, g + 2 nb, ...
    groups = gmax.topk(k, 1, sorted=False).indices  # (n, k)
    cols = (groups[:, :, None] + nb * torch.arange(group)).flatten(1)  # (n, k * group)
    v, i = s.gather(1, cols).topk(k, 1, sorted=False)
    return v, cols.gather(1, i)


def _drop(j: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(n, k + 1) indices without the one at column `pos` (n,) of each row -> (n, k)."""
    keep = torch.ones_like(j, dtype=torch.bool)
    keep[torch.arange(len(j)), pos] = False
    return j[keep].view(len(j), -1)
