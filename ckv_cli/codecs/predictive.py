"""Predictive residual coding (ckv, beyond CollectiveKV, Li et al., ICLR 2026, arXiv 2601.19178): code each token
as a prediction computed from what every cache stores anyway (its item id, its position, and the first layer's
K/V, which the reader recomputes from the item ids) plus one entry of a global pool fitted on the residuals.

    x ~ predict(token) + P[idx],  idx = argmin_j |x - predict(token) - P_j|   (one index per token, as collective)

Predictors (`predictor`), all fitted on the calibration tokens:
- `linear`: [c, 1] @ W, c the token's first-layer K and V concatenated (`context`, (N, c)), W ((c + 1), d) by
  least squares; needs the first layer recomputed from item ids (the plan refuses it otherwise).
- `item`: a per-item mean, shrunk toward the global mean by `shrink` pseudo-tokens.
- `item+pos`: `item`, plus the mean residual of each position in the user's window.
- `linear+item`: `linear`, plus each item's mean residual shrunk toward 0 by `shrink` pseudo-tokens.
With `ema=a` (0 < a < 1; the linear predictors) the context also holds each token's exponential moving average of
the first-layer K/V over its user's window so far, e_j = (1 - a) e_{j-1} + a c_j (`causal_ema`): what the first
layer's attention mixes into a token is recent history, which a token's own K/V do not carry. The prediction then
reads the tokens before it (still nothing the reader does not recompute from the item ids): not token-local, but
causal, so a store's append routes only the new tokens, their prediction read off the whole window (`encode`'s
`tail`, `codes_tail`); the older tokens' codes stay as they are. So does `item+pos` (a token's position).
Items without a row in the table (unseen in calibration, seen fewer than `min_count` times, or past `max_rows`)
fall back to the global mean (`item`, `item+pos`) or to no correction (`linear+item`): the table keeps only rows
with at least `min_count` calibration tokens, stored as (row ids int32, rows) so an unseen item costs nothing.
`max_rows` caps the rows at that many of the most frequent items (ties: the lower id), or at the pool's entries
with "pool" (`ckv compress`'s default: the table then weighs no more than the pool, which is sized to the log).

Every shared tensor (W, tables, pool) is stored at `dtype` (fp16 or fp32) and rounded to it before the pool is
fitted and before any token is encoded, so the encoder sees exactly what the reader will.

`index="item"` (`index_bits`, `escape_tol`; `ckv_cli.codecs.itemindex`) codes each token's pool index given its
item: a position in the item's list of pool entries, or an escape to the full index. The lists are fitted on the
calibration tokens' residuals against the same prediction (first-layer context included) that `encode` uses.

`metric="fisher"` fits the pool and picks each token's entry in the model's Fisher metric (`ckv_cli.codecs.metric`).

`probes=P` (0, exact, by default) makes the pool's k-means and every token's routing approximate: a token is scored
only against the entries of the P cells nearest it (`ckv_cli.codecs.cells`); the artifact records it, so an append
routes as compress did. Decoding does not depend on it.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.codecs.bits import bits_for
from ckv_cli.codecs.cells import CellIndex
from ckv_cli.codecs.itemindex import AUTO, IndexCoding, squared_error
from ckv_cli.codecs.kmeans import nearest
from ckv_cli.codecs.metric import check_factor, check_metric, coords, fit_pool, fitted_factor, pool_coords, router
from ckv_cli.codecs.nearest import linear_argmax, linear_topk, nearest_k
from ckv_cli.errors import CkvError
from ckv_cli.spec import token_index, token_positions

PREDICTORS = ("linear", "item", "item+pos", "linear+item")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
RIDGE = 1e-6  # relative ridge on the least-squares normal equations (rank-deficient contexts stay solvable)
LSQ_ROWS = 1 << 15  # rows per float64 block of the normal equations: memory stays bounded by the block


def positions(user_offsets: np.ndarray) -> torch.Tensor:
    """(N,) position of each token inside its user's cached window, from the users' offsets (U + 1,)."""
    return torch.from_numpy(token_positions(user_offsets))


EMA_CHUNK = 64  # positions per product in `causal_ema`


def _tail_rows(user_offsets: np.ndarray, tail: np.ndarray) -> torch.Tensor:
    """Rows of each user's `tail[u]` newest tokens in the flat windows at `user_offsets`, user after user."""
    ends = np.asarray(user_offsets[1:], np.int64)
    tail = np.asarray(tail, np.int64)
    if (tail < 0).any() or (tail > np.diff(user_offsets)).any():
        raise CkvError("internal: a tail longer than its user's window")
    return torch.from_numpy(token_index(ends - tail, tail))


def causal_ema(x: torch.Tensor, alpha: float, chunk: int = EMA_CHUNK) -> torch.Tensor:
    """(B, L, c) right-padded windows -> (B, L, c): each position's exponential moving average over its window so
    far, e_j = (1 - alpha) e_{j-1} + alpha x_j from e_{-1} = 0 (padding after a window changes nothing before it).
    A chunk of `chunk` positions at a time is one product with the chunk's decay weights plus the carried state;
    the last chunk is zero-padded to full size, so a window's values do not depend on the length of the batch it
    is computed in (an update re-encodes a user in another batch than compress did: the same bits)."""
    B, L, c = x.shape
    k = chunk
    t = torch.arange(k, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    decay = torch.where(lag >= 0, alpha * (1 - alpha) ** lag.clamp(min=0), 0.0).to(x.dtype)  # (k, k)
    carry = ((1 - alpha) ** (t + 1)).to(x.dtype)[:, None]  # (k, 1)
    padded = -L % k
    xp = torch.cat([x, x.new_zeros(B, padded, c)], 1) if padded else x  # (B, L + padded, c)
    out, state = torch.empty_like(xp), x.new_zeros(B, 1, c)
    for a in range(0, L, k):
        out[:, a : a + k] = torch.matmul(decay, xp[:, a : a + k]) + carry * state  # (B, k, c)
        state = out[:, a + k - 1 : a + k]
    return out[:, :L]


def causal_ema_flat(x: torch.Tensor, user_offsets: np.ndarray, alpha: float) -> torch.Tensor:
    """`causal_ema` of tokens stored back to back (N, c), user b's at [offsets[b], offsets[b+1])."""
    offsets = np.asarray(user_offsets, np.int64)
    lengths = np.diff(offsets)
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    L += -L % EMA_CHUNK  # whole chunks: `causal_ema` pads nothing (no copy)
    slot = torch.from_numpy(np.repeat(np.arange(B, dtype=np.int64), lengths) * L + token_positions(offsets))
    padded = x.new_zeros(B * L, x.shape[1]).index_copy_(0, slot, x).view(B, L, -1)
    return causal_ema(padded, alpha).reshape(B * L, -1).index_select(0, slot)


def least_squares(feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(c + 1, d) float64 W minimising |[feats, 1] W - x|^2 (ridge RIDGE): the normal equations summed in float64 over
    blocks of LSQ_ROWS rows, so no (N, c + 1) float64 copy is made."""
    c = feats.shape[1]
    gram = torch.zeros(c + 1, c + 1, dtype=torch.float64)
    rhs = torch.zeros(c + 1, x.shape[1], dtype=torch.float64)
    for a in range(0, len(x), LSQ_ROWS):
        f = feats[a : a + LSQ_ROWS].double()
        block = torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1)  # (B, c + 1)
        gram += block.T @ block
        rhs += block.T @ x[a : a + LSQ_ROWS].double()  # (c + 1, d)
    gram += RIDGE * gram.diagonal().mean() * torch.eye(c + 1, dtype=torch.float64)
    return torch.linalg.solve(gram, rhs)


class PredictiveCodec(IndexCoding, StreamCodec):
    """Prediction from stored ids (and the recomputed first layer) + a k-means pool on the residual."""

    name = "predictive"
    needs_items = True
    needs_context = True  # the plan passes `context=` (the first layer's K and V of each token), None if absent

    def __init__(self, d: int, pool_size: int = 1024, predictor: str = "linear", dtype: str = "fp16",
                 shrink: float = 5.0, min_count: int = 1, iters: int = 20, index: str = "flat", index_bits=AUTO,
                 escape_tol: float = 0.0, metric: str = "l2", max_rows: int | str = 0, ema: float = 0.0,
                 index_lists: str = "count", index_fill: int = 0, probes: int = 0):
        self.d = check_positive_int("d", d)
        self.pool_size = check_positive_int("pool size", pool_size, 2)
        if predictor not in PREDICTORS:
            raise CkvError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
        if dtype not in DTYPES:
            raise CkvError(f"dtype must be fp16 or fp32, got {dtype!r}")
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not shrink >= 0:
            raise CkvError(f"shrink must be a number >= 0, got {shrink!r}")
        self.predictor, self.dtype, self.shrink = predictor, dtype, float(shrink)
        self.min_count = check_positive_int("min count", min_count, 1)
        self.iters = check_positive_int("iters", iters, 1)
        self.probes = check_positive_int("probes", probes, 0)
        if max_rows != "pool" and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise CkvError(f"max_rows must be an integer >= 0 (0: no cap) or 'pool', got {max_rows!r}")
        self.max_rows = max_rows
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
            raise CkvError(f"ema must be a number in [0, 1) (0: no moving average), got {ema!r}")
        if ema and not predictor.startswith("linear"):
            raise CkvError(f"ema extends the linear predictors' context: use predictor linear or linear+item, "
                           f"not {predictor!r}")
        self.ema = float(ema)
        self.bits = bits_for(self.pool_size)
        self.pool = self.weight = self.rows = self.table = self.pos_table = self.base = None
        self.metric = check_metric(metric)
        self.metric_L = self._router = None  # the Fisher metric's factor (`metric="fisher"`), its router
        self._init_index(self.pool_size, index, index_bits, escape_tol, index_lists, index_fill)

    @property
    def uses_context(self) -> bool:
        return self.predictor.startswith("linear")

    @property
    def token_local(self) -> bool:
        """A token's code depends on that token alone (its vector, item, first-layer K/V), not on its position in
        the user's window: a store appends new tokens without re-encoding the user's old ones."""
        return self.predictor != "item+pos" and not self.ema

    @property
    def codes_tail(self) -> bool:
        """`encode` codes a user's newest tokens alone (`tail`) from the whole window's items and context: a
        token's prediction reads only its own and earlier tokens and its position, so an append leaves the older
        tokens' codes as they are and routes only the new ones."""
        return True

    @property
    def uses_items(self) -> bool:
        return "item" in self.predictor

    def params(self) -> dict:
        return {"d": self.d, "pool_size": self.pool_size, "predictor": self.predictor, "dtype": self.dtype,
                "shrink": self.shrink, "min_count": self.min_count, **self.index_params(),
                **({"max_rows": self.max_rows} if self.max_rows else {}), **({"ema": self.ema} if self.ema else {}),
                **({"metric": self.metric} if self.metric != "l2" else {}),
                **({"probes": self.probes} if self.probes else {})}

    @property
    def needs_fisher(self) -> bool:
        """The plan passes `fisher=` (the stream's Fisher matrix, `ckv_cli.tasks.fisher`) to `fit`."""
        return self.metric == "fisher"

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """Rounded to the storage dtype, kept as fp32 for arithmetic."""
        return t.to(DTYPES[self.dtype]).float().contiguous()

    def _check_context(self, context, n: int) -> None:
        if self.uses_context and (context is None or context.shape[0] != n):
            raise CkvError(f"predictor '{self.predictor}' needs the first layer's K/V of every token (recompute the "
                           "first layer from item ids, and use it on a deeper layer), or use predictor item / item+pos")

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, seed: int, items: np.ndarray, context: torch.Tensor | None = None,
            user_offsets: np.ndarray | None = None, fisher: torch.Tensor | None = None) -> None:
        x = x.float()
        if self.needs_fisher:
            self.metric_L = fitted_factor(fisher, self.d)
        if x.shape[0] < self.pool_size:
            raise CkvError(f"a pool of {self.pool_size} entries needs at least as many calibration vectors, got "
                           f"{x.shape[0]} (use more calibration users or a smaller pool)")
        self._check_context(context, x.shape[0])
        ids = torch.from_numpy(np.asarray(items, dtype=np.int64))
        if self.uses_context:
            feats = self.features(context, user_offsets)  # (N, c) or with the moving average (N, 2c)
            self.weight = self._stored(least_squares(feats, x).float())  # (c + 1, d)
            pred = self._linear(feats)
            self.base = self._stored(torch.zeros(self.d))
        else:
            self.weight = None
            self.base = self._stored(x.mean(0))
            pred = self.base.expand_as(x).clone()
        if self.uses_items:
            res = x - pred
            counts = torch.bincount(ids)  # (n_rows,)
            sums = torch.zeros(len(counts), self.d).index_add_(0, ids, res)
            keep = (counts >= self.min_count).nonzero().squeeze(1)
            cap = self.pool_size if self.max_rows == "pool" else self.max_rows
            if cap and len(keep) > cap:  # the most frequent items (stable: ties keep the lower id), in id order
                order = torch.sort(counts[keep], descending=True, stable=True).indices[:cap]
                keep = keep[order].sort().values
            self.rows = keep.to(torch.int32)
            self.table = self._stored(sums[keep] / (counts[keep].float() + self.shrink)[:, None])  # (R, d)
            pred = pred + self._item_rows(ids)
        if self.predictor == "item+pos":
            if user_offsets is None:
                raise CkvError("internal: predictor item+pos needs the users' offsets in fit")
            pos = positions(user_offsets)
            res = x - pred
            n_pos = int(pos.max()) + 1 if len(pos) else 1
            sums = torch.zeros(n_pos, self.d).index_add_(0, pos, res)
            self.pos_table = self._stored(sums / torch.bincount(pos, minlength=n_pos).clamp(min=1).float()[:, None])
            pred = pred + self._pos_rows(pos)
        torch.manual_seed(seed)
        self._set_pool(self._stored(fit_pool(x - pred, self.pool_size, seed, self.iters, self.metric_L,
                                             self.probes)))  # (m, d)
        self.fit_index(x, items, user_offsets, context)  # item-coded: the lists, from the tokens' residual entries

    def index_inputs(self, x: torch.Tensor, items: np.ndarray, user_offsets: np.ndarray | None = None,
                     context: torch.Tensor | None = None, neighbours: int = 0):
        """Each calibration token's pool entry, the error function and (with `neighbours` k) its k nearest entries
        (N, k), on its residual against the prediction `encode` makes (the same first-layer `context` as `fit`)."""
        res = x.float() - self.predict(items, user_offsets, context)  # (N, d)
        near = None
        if neighbours:  # (N, k)
            near = nearest_k(res, self.pool, neighbours) if self._router is None else linear_topk(res, *self._router,
                                                                                                   neighbours)
        return self._nearest(res), self._error(res), near

    def _set_pool(self, pool: torch.Tensor) -> None:
        self.pool = pool
        self._router = None if self.metric_L is None else router(pool, self.metric_L)

    def _nearest(self, res: torch.Tensor) -> torch.Tensor:
        """(N, d) residuals -> (N,) nearest pool entries (in the metric; with `probes`, among the entries of that many
        cells: `ckv_cli.codecs.cells`)."""
        if self.probes:
            return self._cell_index().search(coords(res, self.metric_L))
        return nearest(res, self.pool) if self._router is None else linear_argmax(res, *self._router)

    def _cell_index(self) -> CellIndex:
        """The pool's cells (in the metric's coordinates), kept while the pool is this tensor. Seeded with 0, not the
        fit's seed: an append, which reads only the artifact, searches the cells that compress searched."""
        entries = pool_coords(self, self.pool, self.metric_L)
        memo = getattr(self, "_cells", None)
        if memo is None or memo[0] is not entries:
            memo = self._cells = (entries, CellIndex(entries, self.probes, seed=0))
        return memo[1]

    def _error(self, res: torch.Tensor):
        return squared_error(coords(res, self.metric_L), pool_coords(self, self.pool, self.metric_L))

    def features(self, context: torch.Tensor, user_offsets: np.ndarray | None) -> torch.Tensor:
        """What the linear map reads: the first layer's K/V (N, c), and with `ema` their moving average beside them
        (N, 2c)."""
        if not self.ema:
            return context
        if user_offsets is None:
            raise CkvError("internal: ema needs the users' offsets")
        return torch.cat([context.float(), causal_ema_flat(context.float(), user_offsets, self.ema)], 1)

    def _linear(self, context: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if context.shape[1] + 1 != w.shape[0]:
            raise CkvError(f"the linear predictor reads {w.shape[0] - 1} context columns, got {context.shape[1]} (an "
                           "artifact written with another ema setting, or another first layer)")
        return context.float() @ w[:-1] + w[-1]  # (N, d)

    def _item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) item ids -> (N, d) table correction, zeros for items without a row."""
        out = torch.zeros(len(ids), self.d)
        if len(self.rows):
            rows = self.rows.long()
            slot = torch.searchsorted(rows, ids).clamp(max=len(rows) - 1)
            hit = rows[slot] == ids
            out[hit] = self.table[slot[hit]]
        return out

    def _pos_rows(self, pos: torch.Tensor) -> torch.Tensor:
        return self.pos_table[pos.clamp(max=len(self.pos_table) - 1)]  # positions past calibration: the last row

    def predict(self, items: np.ndarray, user_offsets: np.ndarray, context: torch.Tensor | None) -> torch.Tensor:
        """(N, d) prediction of each token from its item id, position and first-layer K/V (and, with `ema`, the
        earlier tokens' first-layer K/V)."""
        if self.pool is None:
            raise CkvError("codec used before fit or load")
        ids = torch.from_numpy(np.asarray(items, dtype=np.int64))
        self._check_context(context, len(ids))
        pred = (self._linear(self.features(context, user_offsets)) if self.uses_context
                else self.base.expand(len(ids), self.d).clone())
        if self.uses_items:
            pred = pred + self._item_rows(ids)
        if self.predictor == "item+pos":
            pred = pred + self._pos_rows(positions(user_offsets))
        return pred

    # -- storage -------------------------------------------------------------------------------------------
    def fields(self) -> list[Field]:
        return self.index_fields()

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray, items: np.ndarray,
               context: torch.Tensor | None = None, tail: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Fields of the tokens x (N, d) of users at `user_offsets`. With `tail` (U,) the windows (`user_offsets`,
        `items`, `context`: every token) are predicted whole and only each user's `tail[u]` newest tokens are
        coded: x holds those alone, user after user (`codes_tail`; a store's append)."""
        pred = self.predict(items, user_offsets, context)  # (N, d) over the whole windows
        if tail is not None:
            rows = _tail_rows(user_offsets, tail)
            pred, items = pred[rows], np.asarray(items)[rows.numpy()]
            user_offsets = np.concatenate([[0], np.cumsum(tail)]).astype(np.int64)
        res = x.float() - pred  # (n, d)
        return self.index_encode(self._nearest(res), items, user_offsets, self._error(res))[0]

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray, items: np.ndarray,
               context: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.from_numpy(self.index_decode(fields, items, user_offsets))
        return self.predict(items, user_offsets, context) + self.pool[idx]

    def shared(self) -> dict[str, torch.Tensor]:
        dt = DTYPES[self.dtype]
        out = {"pool": self.pool.to(dt)}
        if self.metric_L is not None:
            out["metric"] = self.metric_L
        if self.weight is not None:  # the linear map's last row is its bias: no separate base
            out["weight"] = self.weight.to(dt)
        else:
            out["base"] = self.base.to(dt)
        if self.uses_items:
            out.update(rows=self.rows, table=self.table.to(dt))
        if self.pos_table is not None:
            out["pos_table"] = self.pos_table.to(dt)
        return {**out, **self.index_shared()}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        if self.needs_fisher:
            self.metric_L = check_factor(shared["metric"], self.d)
        self._set_pool(shared["pool"].float())
        self.weight = shared["weight"].float() if self.uses_context else None
        self.base = torch.zeros(self.d) if self.uses_context else shared["base"].float()
        if self.uses_items:
            self.rows, self.table = shared["rows"].to(torch.int32), shared["table"].float()
        if self.predictor == "item+pos":
            self.pos_table = shared["pos_table"].float()
        if self.pool.shape != (self.pool_size, self.d):
            raise CkvError(f"pool has shape {tuple(self.pool.shape)}, the metadata says ({self.pool_size}, {self.d})")
        self.index_load_shared(shared)
