"""Serving next-item models from an artifact: `CacheStore` reads a batch of users' caches, ranks next items or scores
candidates from them (through attention over the compressed form where the model allows), and appends new events
through the model and the codec (`ckv_cli.serve.store.Store` holds what every store shares).

    from ckv_cli import CacheStore
    store = CacheStore.open("sasrec.ckv.safetensors", "sasrec.safetensors")   # checkpoint path: sha256 checked
    store.rank_next(["42", "7"], k=10)              # top 10 next items of two users, seen items excluded
    store.score_items(["42"], [["Heat (1995)", "Fargo (1996)"]])   # scores of given candidates
    store.append("42", ["Fargo (1996)"], [978300760])              # the cache follows the user
    store.save("sasrec.ckv.v2.safetensors")                         # a new artifact with the appends merged

Scoring. The hidden state of the next event comes from `extend` over the cache: with new events, they are
appended (not stored: `append` stores); without, the last cached event is replayed (the cache minus its last
token, extended by that token: hidden states are not cached). `attention="compressed"` (the default) attends
over pooled streams in the compressed domain (`ckv_cli.serve.attention`: one product with the pool or a gather
per token, K/V never built), how each layer reads its cache coming from the layer itself (`attention_spec()`),
and over a first layer recomputed from item ids without building its K/V either where the model gives the tables
for it (`model.first_layer_tables()`, SASRec's LayerNorm fold: `ItemLayer`); from K/V tables where the model gives
those instead (`form` "kv", HSTU's: `tabled_kv`, real tokens only, no LayerNorm or projection per token, read as
pools of their own rows: `first_layer_streams`);
otherwise it is recomputed per token by the layer. `attention="decoded"` decodes the cache and runs the model's
own `extend` (the reference; what `ckv_cli.tasks.next_item.scores_after_last_event` does). A batch whose new
events would overflow a user's window (`max_len`) goes through the decoded path for those users (re-prefill from
item ids, as `extend` does). A model with next-event query time (`model.provisional_tokens`: its newest cached
token is recomputed by every `extend`, `ckv_cli.models.base`) is always served through the decoded path, asked
at `query_timestamps` (the request time; default the newest event's own time).

Appending (`append`): the user's current cache is decoded, the new events are run through `model.extend` over it,
and the new tokens' K/V are encoded by the plan (`Store._merge`). With no overflow the old tokens' fields stay as
they are (token-local codecs, and predictive ones whose prediction reads the window, which code the new tokens
from it) and the new tokens' fields are `plan.encode` of the new tokens' K/V as `model.extend`
computes them over the decoded cache; with the first layer recomputed from item ids (the default) and two layers,
those K/V equal the teacher's (a prefill of the extended history) to float tolerance. On overflow (cached + new >
max_len) the window slides as in `extend`: the most recent `max_len` events are re-prefilled from their item ids
and the user is re-encoded whole; so is a user of a model with a provisional newest token (re-opened and recomputed
by `extend`). A store is not safe to append to from several threads at once; scoring is (each thread keeps its own
buffers for first-layer K/V built from tables, `CacheStore._kv_buffers`).
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ckv_cli.codecs import CachePlan, CollectiveCodec, recomputed
from ckv_cli.codecs.joint import JointCodec, JointPart
from ckv_cli.codecs.predictive import PredictiveCodec, causal_ema
from ckv_cli.codecs.base import dequantize_per_user
from ckv_cli.errors import CkvError
from ckv_cli.models.base import KVCache, item_layer_kv, last_hidden
from ckv_cli.serve.attention import (SCORES, SOFTMAX, VALUES, CompressedStream, choose_form, compressed_scores,
                                     compressed_values, pool_and_basis)
from ckv_cli.serve.store import Store
from ckv_cli.spec import token_positions
from ckv_cli.tasks.next_item import mask_seen, provisional

DECODED, COMPRESSED = "decoded", "compressed"


@dataclass
class Ranking:
    """Top-k next items of a batch of users: item indices (B, k), their raw ids (from the checkpoint's item
    vocabulary, None without one) and scores (B, k) (cosine; -inf where fewer than k items were rankable)."""

    users: list[str]
    items: np.ndarray
    item_ids: list[list[str]] | None
    scores: np.ndarray


@dataclass
class CompressedCache:
    """A batch of users' caches as stored, right-padded to L tokens. Per layer, `keys[l]` / `values[l]` is a
    `CompressedStream` (pool, indices, dequantised user part) for collective streams, a `PredictedStream` for
    predictive ones, a (B, L, d) tensor for streams recomputed from item ids (None when fetched with
    `recompute_items=False`, unless a predictive stream built them: then from the model's K/V tables, a
    `CompressedStream` over the real tokens' own rows, `first_layer_streams`) or stored by another codec (decoded)."""

    keys: list
    values: list
    lengths: torch.Tensor  # (B,)
    items: torch.Tensor  # (B, L) 0 = padding
    timestamps: torch.Tensor  # (B, L)

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.items.shape[1])[None, :] < self.lengths[:, None]  # (B, L)

    def decode(self) -> KVCache:
        """The materialised cache (needs the recomputed layers)."""
        valid = self.valid[..., None]

        def dense(x):
            if x is None:
                raise CkvError("this compressed cache was fetched without its item-id layers (recompute_items=False)")
            out = x.decode() if isinstance(x, (CompressedStream, PredictedStream)) else x
            return out * valid.to(out.dtype)

        return KVCache([dense(k) for k in self.keys], [dense(v) for v in self.values], self.lengths, self.items,
                       self.timestamps)


# ---------------------------------------------------------------------------------------------- attention


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, L, d = x.shape
    return x.view(B, L, n_heads, d // n_heads).permute(2, 0, 1, 3)  # (H, B, L, dh)


class ItemLayer:
    """A first layer over cached tokens whose K/V are a function of (item, position), attended without building
    K/V, from the tables the model gives (`model.first_layer_tables()`: SASRec's K_j = W_k LN(a_i + p_j) + b_k,
    a = item embedding x sqrt(d), p = position embedding): scores and values go through the item table and the
    position table as two pools. Exact up to float rounding: each (item, position)'s mu_j and r_j are tabulated
    once per model."""

    def __init__(self, tables: dict, model, items: torch.Tensor):
        B, L = items.shape
        pos = torch.arange(L)[None, :].clamp(max=model.config.max_len - 1).expand(B, L)
        i64, p64 = items.long(), pos
        stats = tables["stats"].index_select(0, (i64 * tables["max_len"] + p64).reshape(-1))  # (B*L, 2)
        self.mu, self.r = stats[:, 0].view(B, L), stats[:, 1].view(B, L)
        self.items = CompressedStream(tables["a"], i64)
        self.pos = CompressedStream(tables["p"], p64.contiguous())
        self.h = model.layers[0].attention_spec().heads
        self.ak, self.ck, self.av, self.cv = tables["ak"], tables["ck"], tables["av"], tables["cv"]

    def decode(self) -> torch.Tensor:
        """The materialised vectors (B, L, H dh): r_j (a_i + p_j - mu_j) A^T + c per head (as the K side reads)."""
        x = self.items.decode() + self.pos.decode()  # (B, L, d)
        y = self.r[..., None] * (x - self.mu[..., None])
        B, L = self.r.shape
        return (torch.einsum("bld,hkd->blhk", y, self.ak) + self.ck[None, None]).reshape(B, L, -1)

    def projected(self, ak: torch.Tensor, ck: torch.Tensor) -> "ItemLayer":
        """The same tokens (their gathered statistics shared) through other projections, K and V alike: (H, dh, d)
        and (H, dh) (a predictive stream's linear map composed with this layer's)."""
        out = copy.copy(self)
        out.ak, out.ck, out.av, out.cv = ak, ck, ak, ck
        return out

    def select(self, idx: torch.Tensor) -> "ItemLayer":
        """Users `idx` of the batch."""
        out = copy.copy(self)
        out.mu, out.r = self.mu[idx], self.r[idx]
        out.items = CompressedStream(self.items.pool, self.items.idx[idx])
        out.pos = CompressedStream(self.pos.pool, self.pos.idx[idx])
        return out

    def _fold(self, x: torch.Tensor) -> torch.Tensor:  # (H, B, T, ·) -> (1, B, H*T, ·): heads as more queries
        H, B, T = x.shape[:3]
        return x.permute(1, 0, 2, 3).reshape(1, B, H * T, x.shape[-1])

    def _unfold(self, x: torch.Tensor, H: int) -> torch.Tensor:
        _, B, HT, e = x.shape
        return x.view(B, H, HT // H, e).permute(1, 0, 2, 3)

    def scores(self, qh: torch.Tensor) -> torch.Tensor:
        """Raw q . K_j (H, B, T, L) for head-split queries qh (H, B, T, dh)."""
        H, B, T, _ = qh.shape
        L = self.items.idx.shape[1]
        qt = torch.einsum("hbtk,hkd->hbtd", qh, self.ak)  # (H, B, T, d)
        qf = self._fold(qt)
        s = sum(compressed_scores(qf, st, 1, choose_form(L, st.pool.shape[0], H * T, SCORES, "cpu", B))
                for st in (self.items, self.pos))  # (1, B, H*T, L)
        s = self._unfold(s, H)
        c = torch.einsum("hbtk,hk->hbt", qh, self.ck)
        return self.r[None, :, None, :] * (s - self.mu[None, :, None, :] * qt.sum(-1)[..., None]) + c[..., None]

    def values(self, w: torch.Tensor) -> torch.Tensor:
        """Weights (H, B, T, L) -> sum_j w_j V_j (H, B, T, dh)."""
        H, B, T, L = w.shape
        wr = w * self.r[None, :, None, :]
        wf = self._fold(wr)
        y = sum(compressed_values(wf, st, 1, choose_form(L, st.pool.shape[0], H * T, VALUES, "cpu", B))
                for st in (self.items, self.pos))  # (1, B, H*T, d)
        y = self._unfold(y, H) - (wr * self.mu[None, :, None, :]).sum(-1)[..., None]  # (H, B, T, d)
        return torch.einsum("hbtd,hkd->hbtk", y, self.av) + self.cv[:, None, None, :] * w.sum(-1)[..., None]


def _side_scores(ctx, q: torch.Tensor) -> torch.Tensor:
    """Raw products of per-user queries q (B, Q, c) with each cached vector of a side (B, L, c) -> (B, Q, L): a
    dense side read in place, or a `CompressedStream` (a pool's rows, or the real tokens' own: `first_layer_streams`)."""
    if isinstance(ctx, CompressedStream):
        B, Q, _ = q.shape
        form = choose_form(ctx.idx.shape[1], ctx.pool.shape[0], Q, SCORES, "cpu", B)
        return compressed_scores(q[None], ctx, 1, form)[0]
    return torch.bmm(q, ctx.transpose(1, 2))


def _side_values(ctx, a: torch.Tensor) -> torch.Tensor:
    """sum_j a_j x_j of weights a (B, Q, L) over a side's cached vectors x (B, L, c) -> (B, Q, c), as `_side_scores`."""
    if isinstance(ctx, CompressedStream):
        B, Q, L = a.shape
        form = choose_form(L, ctx.pool.shape[0], Q, VALUES, "cpu", B)
        return compressed_values(a[None], ctx, 1, form)[0]
    return torch.bmm(a, ctx)


@dataclass
class LinearSide:
    """Cached vectors that are a linear map of per-token contexts, x_j = sum_i ctx_i[j] W_i + w (the predictive
    codec's prediction from the first layer's K and V), attended without building x: per head h,
    q . x_j = sum_i (q W_ih^T) . ctx_i[j] + q . w_h and sum_j a_j x_j = sum_i (sum_j a_j ctx_i[j]) W_ih +
    (sum_j a_j) w_h, so the map is applied once per query, not once per cached token. A context is dense
    (B, L, c_i) or a `CompressedStream` (HSTU's first-layer K/V from its tables: the real tokens' rows)."""

    ctx: list  # [(B, L, c_i) contiguous, or CompressedStream]; padding is masked by the attention weights
    weight: list  # [(c_i, d)]
    bias: torch.Tensor  # (d,)

    @staticmethod
    def _head(w: torch.Tensor, H: int) -> torch.Tensor:
        c, d = w.shape
        return w.view(c, H, d // H).permute(1, 0, 2)  # (H, c, dh)

    def scores(self, qh: torch.Tensor) -> torch.Tensor:
        """Raw q . x_j (H, B, T, L) for head-split queries qh (H, B, T, dh)."""
        H, B, T, dh = qh.shape
        q = qh.reshape(H, B * T, dh)
        s = 0
        for ctx, w in zip(self.ctx, self.weight):
            qc = torch.bmm(q, self._head(w, H).transpose(1, 2))  # (H, B T, c): the map applied to the queries
            s = s + _side_scores(ctx, qc.view(H, B, T, -1).transpose(0, 1).reshape(B, H * T, -1))  # (B, H T, L)
        s = s.view(B, H, T, -1).transpose(0, 1)  # (H, B, T, L)
        return s + torch.bmm(q, self.bias.view(H, dh, 1)).view(H, B, T, 1)

    def values(self, a: torch.Tensor) -> torch.Tensor:
        """Weights (H, B, T, L) -> sum_j a_j x_j (H, B, T, dh)."""
        H, B, T, L = a.shape
        af = a.transpose(0, 1).reshape(B, H * T, L)
        out = a.sum(-1)[..., None] * self.bias.view(H, -1)[:, None, None, :]
        for ctx, w in zip(self.ctx, self.weight):
            y = _side_values(ctx, af).view(B, H, T, -1).transpose(0, 1).reshape(H, B * T, -1)  # (H, B T, c)
            out = out + torch.bmm(y, self._head(w, H)).view(H, B, T, -1)  # (H, B, T, dh)
        return out

    def decode(self) -> torch.Tensor:
        return sum((ctx.decode() if isinstance(ctx, CompressedStream) else ctx) @ w
                   for ctx, w in zip(self.ctx, self.weight)) + self.bias  # (B, L, d)

    def select(self, idx: torch.Tensor) -> "LinearSide":
        return LinearSide([_select_side(ctx, idx) for ctx in self.ctx], self.weight, self.bias)


@dataclass
class EmaSide:
    """The moving average over each window (`ckv_cli.codecs.predictive.causal_ema`) of a linear side's vectors,
    e_j = sum_{i <= j} a (1 - a)^(j - i) y_i, attended without building e: it is linear, so q . e_j is the moving
    average of the scores q . y_i, and sum_j w_j e_j = sum_i w~_i y_i with w~ the weights' moving average run
    backwards over the window (padding after a window is masked, so it adds nothing)."""

    inner: object  # ItemLayer | LinearSide | CompressedStream
    alpha: float

    def scores(self, qh: torch.Tensor) -> torch.Tensor:
        return _ema_last(_cached_scores(self.inner, qh, qh.shape[0]), self.alpha)  # (H, B, T, L)

    def values(self, a: torch.Tensor) -> torch.Tensor:
        return _cached_values(self.inner, _ema_last(a, self.alpha, backwards=True), a.shape[0])

    def decode(self) -> torch.Tensor:
        return causal_ema(self.inner.decode(), self.alpha)  # (B, L, d)

    def select(self, idx: torch.Tensor) -> "EmaSide":
        return EmaSide(_select_side(self.inner, idx), self.alpha)


def _ema_last(s: torch.Tensor, alpha: float, backwards: bool = False) -> torch.Tensor:
    """`causal_ema` along the last dimension of s (..., L) (from the window's end with `backwards`)."""
    shape, L = s.shape, s.shape[-1]
    x = s.reshape(-1, L)
    x = x.flip(1) if backwards else x
    e = causal_ema(x.T.contiguous()[None], alpha)[0].T  # (M, L): positions as the rows of one product
    return (e.flip(1) if backwards else e).reshape(shape)


@dataclass
class PredictedStream:
    """A predictive stream (`ckv_cli.codecs.predictive`) of a batch of users as stored: each token's vector is the
    sum of its parts, x_j = pred_j + T[row(item_j)] + P[idx_j], attended part by part and never built where the
    parts allow (`CacheStore._predicted`): the first layer's linear map folded with the first layer itself into an
    `ItemLayer` (SASRec's LayerNorm fold: the item and position tables as two pools), the per-item table and the
    pool as `CompressedStream`s; the linear part as a `LinearSide` over the first layer's K/V where the first
    layer has no fold (HSTU's SiLU: its K/V come from its tables as pools of the real tokens' rows,
    `first_layer_streams`, and serve its own attention too);
    with the codec's `ema`, an `EmaSide` over a second such linear part (the map's rows for the moving average)."""

    parts: list  # ItemLayer | LinearSide | EmaSide | CompressedStream

    def decode(self) -> torch.Tensor:
        """The materialised vectors (B, L, d)."""
        return sum(p.decode() for p in self.parts)

    def select(self, idx: torch.Tensor) -> "PredictedStream":
        """Users `idx` of the batch."""
        return PredictedStream([_select_side(p, idx) for p in self.parts])


def _select_side(x, idx: torch.Tensor):
    """Users `idx` of one layer's cached side, whatever its form (None stays None)."""
    if x is None:
        return None
    if isinstance(x, CompressedStream):
        return CompressedStream(x.pool, x.idx[idx], None if x.user is None else x.user[idx], x.basis)
    if isinstance(x, (ItemLayer, LinearSide, PredictedStream, EmaSide)):
        return x.select(idx)
    return x[idx]


def tables_form(tables: dict | None) -> str | None:
    """How a model's first-layer tables (`first_layer_tables()`) give its K/V: "fold" (attended through them,
    `ItemLayer`), "kv" (built from them, `tabled_kv`), or None without tables."""
    return None if tables is None else tables.get("form", "fold")


def _kv_bags(tables: dict, items: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of N tokens (items, positions: (N,)) as a bag of four rows of `_bag_tables` with weights, so that one
    weighted `embedding_bag` sum gives its pre-activation r (items[i] + pos[j] - mu g1) + c: rows (N * 4,) and
    weights (N * 4,)."""
    n_pos, n_items = tables["max_len"], tables["items"].shape[0]
    i, j = items.long(), positions.long().clamp(max=n_pos - 1)
    mu, r = tables["stats"].index_select(0, i * n_pos + j).unbind(1)  # (N,) each
    g1 = torch.full_like(i, n_items + n_pos)  # the g1 row, then the c row
    rows = torch.stack([i, j + n_items, g1, g1 + 1], 1).reshape(-1)
    weights = torch.stack([r, r, -r * mu, torch.ones_like(r)], 1).reshape(-1)
    return rows, weights


def _bag_tables(tables: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and the V columns of [items; pos; g1; c] ((n + 1 + max_len + 2, d_k), (..., d_v)), each contiguous:
    what a token's bag (`_kv_bags`) sums. Built once per tables dict and kept in it (`bags`): serving reads them
    for every batch."""
    if tables.get("act", "silu") != "silu":
        raise CkvError(f"first-layer tables with activation {tables['act']!r} are not supported")
    if "bags" not in tables:
        table, d_k = torch.cat([tables["items"], tables["pos"], tables["g1"][None], tables["c"][None]]), tables["d_k"]
        tables["bags"] = (table[:, :d_k].contiguous(), table[:, d_k:].contiguous())
    return tables["bags"]


_BAG_CHUNK = 8192  # tokens per `embedding_bag` call: each half's sums (2 MB at d 64) stay in cache for the SiLU


@torch.no_grad()
def tabled_kv(tables: dict, items: torch.Tensor, positions: torch.Tensor,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First-layer K, V of N tokens (items, positions: any shape, N elements) from a model's K/V tables
    (`first_layer_tables()` with `form` "kv": K/V = act(r (items[i] + pos[j] - mu g1) + c), mu and r the token's
    LayerNorm statistics; HSTU's), without running the layer: ((N, d_k), (N, d_v)), flat, in the tokens' order.
    Per chunk of `_BAG_CHUNK` tokens and per half, one weighted `embedding_bag` sum, whose SiLU is written
    straight into the output. `out`: buffers of at least N rows, (·, d_k) and (·, d_v), which a server keeps from
    batch to batch; views of their first N rows are returned. A batch then touches no fresh memory for its K/V:
    fresh pages (50 MB for HSTU's 512 users of ML-1M) cost the kernel more time to zero-fill than the sums take."""
    i, j = items.reshape(-1), positions.reshape(-1)
    N, halves = len(i), _bag_tables(tables)
    if out is None:
        out = tuple(torch.empty(N, t.shape[1]) for t in halves)
    k, v = out[0][:N], out[1][:N]
    for a in range(0, N, _BAG_CHUNK):
        b = min(a + _BAG_CHUNK, N)
        rows, weights = _kv_bags(tables, i[a:b], j[a:b])
        offsets = torch.arange(0, 4 * (b - a), 4)
        for table, dest in zip(halves, (k, v)):
            pre = torch.nn.functional.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
            torch.ops.aten.silu.out(pre, out=dest[a:b])  # (b - a, d): no copy after the SiLU
    return k, v


def token_rows(valid: torch.Tensor) -> torch.Tensor:
    """Each slot's row among the real tokens of a padded batch (valid (B, L) bool; rows in row-major order, as a
    flat cache lists them): (B, L) int64. A padding slot gets the row of the real token before it (a real row,
    which the attention masks), so nothing reads past the rows."""
    return (valid.reshape(-1).cumsum(0) - 1).clamp_(min=0).view(valid.shape)


def first_layer_streams(tables: dict, items: torch.Tensor, valid: torch.Tensor,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None,
                        tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[CompressedStream, CompressedStream]:
    """A padded batch's first-layer K and V built from "kv" tables (items, valid: (B, L)) as two
    `CompressedStream`s over the real tokens' own vectors: the (N, d) rows of `tabled_kv` are the stream's pool
    and each slot's index is its token's row (`token_rows`). Attention reads them as it reads a pool (sampled dot
    products, weighted bags: `ckv_cli.serve.attention`), over the real tokens' rows only, so the K/V are never
    scattered into a (B, L, d) layout, nor its padding zero-filled or multiplied. `out`: `tabled_kv`'s. `tokens`:
    the real tokens' item ids and positions (N,) each, where the caller has them flat already."""
    if tokens is None:
        B, L = items.shape
        tokens = items[valid], torch.arange(L)[None].expand(B, L)[valid]
    k, v = tabled_kv(tables, *tokens, out)  # (N, d_k), (N, d_v)
    rows = token_rows(valid)
    return CompressedStream(k, rows), CompressedStream(v, rows)


@dataclass
class PredictiveHalf:
    """The K or the V half of a joint predictive codec (`joint=kv` over `predictive`) in each stream's own space:
    every shared tensor's columns of that half times the stream's scale, so it is read as a `PredictiveCodec` is
    (the prediction and the pool are linear in them)."""

    d: int
    pool: torch.Tensor  # (m, d)
    weight: torch.Tensor | None  # (c + 1, d): the linear map, its last row the bias
    base: torch.Tensor | None  # (d,)
    rows: torch.Tensor | None  # (R,) item ids with a table row
    table: torch.Tensor | None  # (R, d)
    pos_table: torch.Tensor | None
    uses_context: bool
    uses_items: bool
    ema: float


def predictive_halves(codec) -> tuple[PredictiveHalf, PredictiveHalf]:
    """(K half, V half) of a joint codec whose inner codec is predictive."""
    inner, d = codec.inner, codec.d

    def half(cols: slice, scale: torch.Tensor) -> PredictiveHalf:
        cut = (lambda t: None if t is None else t[..., cols] * scale)
        return PredictiveHalf(scale.shape[0], cut(inner.pool), cut(inner.weight), cut(inner.base), inner.rows,
                              cut(inner.table), cut(inner.pos_table), inner.uses_context, inner.uses_items, inner.ema)

    sk, sv = codec.stream_scales()
    return half(slice(0, d), sk), half(slice(d, None), sv)


_BLOCK_COLUMNS = 64  # several heads: a dense side is read in place while H * T query columns stay this few


def _dense_scores(x: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Raw scores (H, B, T, L) of head-split queries qh (H, B, T, dh) against a dense side x (B, L, d). With
    several heads x is read in place: one bmm against the queries laid block-diagonally (B, d, H T), zero outside
    each head's block; H times the products of a per-head product, but x is never copied into a per-head layout
    (which `qh @ x^T` per head makes of a (B, L, d) cache, its heads interleaved in d; `bench/dense_heads.py`).
    One head, or many query columns: the per-head product."""
    H, B, T, dh = qh.shape
    if H == 1 or H * T > _BLOCK_COLUMNS:
        return qh @ _heads(x, H).transpose(-1, -2)
    z = qh.new_zeros(B, H * T, H, dh)  # row (h, t) holds q_{h,t} in head h's columns
    z.view(B, H, T, H, dh).diagonal(dim1=1, dim2=3).copy_(qh.permute(1, 2, 3, 0))  # (B, T, dh, H)
    return torch.bmm(x, z.view(B, H * T, H * dh).transpose(1, 2)).view(B, -1, H, T).permute(2, 0, 3, 1)


def _dense_values(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w_j x_j (H, B, T, dh) for weights w (H, B, T, L) over a dense side x (B, L, d), x read in place: one
    bmm of every head's weights against all of x's columns (B, H T, d), then each head's own block (several heads;
    `_dense_scores`)."""
    H, B, T, L = w.shape
    if H == 1 or H * T > _BLOCK_COLUMNS:
        return w @ _heads(x, H)
    y = torch.bmm(w.permute(1, 0, 2, 3).reshape(B, H * T, L), x).view(B, H, T, H, -1)  # (B, H, T, H', dh)
    return y.diagonal(dim1=1, dim2=3).permute(3, 0, 1, 2)  # (H, B, T, dh)


def _cached_scores(side, qh: torch.Tensor, n_heads: int) -> torch.Tensor:
    if isinstance(side, PredictedStream):
        return sum(_cached_scores(p, qh, n_heads) for p in side.parts)
    if isinstance(side, (ItemLayer, LinearSide, EmaSide)):
        return side.scores(qh)
    if isinstance(side, CompressedStream):
        H, B, T, _ = qh.shape
        return compressed_scores(qh, side, n_heads, choose_form(side.idx.shape[1], side.pool.shape[0], T, SCORES,
                                                                "cpu", B))
    return _dense_scores(side, qh)  # (H, B, T, L)


def _cached_values(side, w: torch.Tensor, n_heads: int) -> torch.Tensor:
    if isinstance(side, PredictedStream):
        return sum(_cached_values(p, w, n_heads) for p in side.parts)
    if isinstance(side, (ItemLayer, LinearSide, EmaSide)):
        return side.values(w)
    if isinstance(side, CompressedStream):
        H, B, T, _ = w.shape
        return compressed_values(w, side, n_heads, choose_form(side.idx.shape[1], side.pool.shape[0], T, VALUES,
                                                               "cpu", B))
    return _dense_values(side, w)  # (H, B, T, dh)


def item_layer_sides(model, items: torch.Tensor, valid: torch.Tensor, tables: dict | None, kind: str) -> tuple:
    """The cached K and V sides of an item-id layer that a compressed cache left out, for a layer of attention
    `kind`, items and valid (B, L): through the model's fold tables (`ItemLayer`, softmax layers: K/V never
    built), as the real tokens' rows built from its "kv" tables (`first_layer_streams`), else recomputed by the
    layer ((B, L, d_k), (B, L, d_v))."""
    form = tables_form(tables)
    if form == "fold" and kind == SOFTMAX:
        side = ItemLayer(tables, model, items)
        return side, side
    if form == "kv":
        return first_layer_streams(tables, items, valid)
    B, L = items.shape
    return item_layer_kv(model, items, torch.arange(L)[None].expand(B, L))


@torch.no_grad()
def extend_compressed(model, cc: CompressedCache, items: torch.Tensor, timestamps: torch.Tensor,
                      new_lengths: torch.Tensor, item_tables: dict | None = None) -> torch.Tensor:
    """`model.extend` over a compressed cache, returning only the hidden states of the new events (B, T, d): the
    cached side of each layer is attended in its stored form (`CompressedStream`: compressed domain; None for an
    item-id layer: `ItemLayer` where the model gives its fold tables, K/V from its "kv" tables (`tabled_kv`),
    recomputed K/V otherwise; tensors: dense), the new events' own keys apart, so nothing is concatenated to the
    cache (a dense cache is read once, not copied). The caller makes sure no user overflows its window."""
    B, T = items.shape
    t = torch.arange(T)[None, :]
    new_valid = t < new_lengths[:, None]  # (B, T)
    positions = cc.lengths[:, None] + t
    Lc = cc.items.shape[1]
    key_valid = torch.cat([cc.valid[:, None, :].expand(B, T, Lc),
                           (t.T >= t)[None].expand(B, T, T) & new_valid[:, None, :]], dim=2)  # (B, T, Lc + T)
    key_pos = torch.cat([torch.arange(Lc)[None].expand(B, Lc), positions], dim=1)
    key_ts = torch.cat([cc.timestamps, timestamps], dim=1)
    x = model.embed(items, positions)
    d_k, d_v = model.kv_dims
    for i, layer in enumerate(model.layers):
        q, k, v, extra = layer.project(x)
        spec = layer.attention_spec()
        kind, H, scale, norm, bias = spec.kind, spec.heads, spec.scale, spec.norm, spec.bias
        kc, vc = cc.keys[i], cc.values[i]
        if Lc == 0:  # nothing cached: attend over the new events alone
            kc, vc = k.new_zeros(B, 0, d_k), v.new_zeros(B, 0, d_v)
        if kc is None or vc is None:  # an item-id layer, not recomputed yet
            tables = item_tables if kc is None and vc is None and i == 0 else None
            rk, rv = item_layer_sides(model, cc.items, cc.valid, tables, kind)
            kc, vc = (rk if kc is None else kc), (rv if vc is None else vc)
        qh = _heads(q, H)  # (H, B, T, dh): cached keys and new keys scored apart, the cache never copied
        s = torch.cat([_cached_scores(kc, qh, H), qh @ _heads(k, H).transpose(-1, -2)], dim=-1) * scale
        if bias is not None:
            s = s + bias(positions, key_pos, timestamps, key_ts)[None]  # (1, B, T, Lc + T)
        if kind == SOFTMAX:
            w = torch.softmax(s.masked_fill(~key_valid[None], float("-inf")), dim=-1).nan_to_num_()
        else:
            w = torch.nn.functional.silu(s) * key_valid[None].to(s.dtype) / norm
        out = _cached_values(vc, w[..., :Lc], H) + w[..., Lc:] @ _heads(v, H)  # (H, B, T, dh)
        a = out.permute(1, 2, 0, 3).reshape(B, T, -1)
        x = layer.finish(x, a, extra)
    return model.final(x)


# ---------------------------------------------------------------------------------------------- the store


def _select_cache(cache: KVCache, idx: torch.Tensor) -> KVCache:
    """Users `idx` of a batch of caches (their eviction mask too)."""
    return KVCache([k[idx] for k in cache.keys], [v[idx] for v in cache.values], cache.lengths[idx],
                   cache.items[idx], cache.timestamps[idx], None if cache.keep is None else cache.keep[idx])


@torch.no_grad()
def hidden_after(model, cache: KVCache, items: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
                 new_lengths: torch.Tensor | None = None, query_ts: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden state (B, d) of each user's next-event query from a decoded cache: the last of its new events
    appended through `model.extend`, or without new events the last cached event replayed. Users whose new
    events overflow the window are extended apart from the others (`extend` re-prefills the whole batch it is
    given when one user overflows). `query_ts` (B,): the request time of a model with next-event query time."""
    if items is None:
        cache, items, timestamps = rewind(cache)
        new_lengths = torch.ones(len(items), dtype=torch.long)
    if new_lengths is None:
        new_lengths = torch.full((items.shape[0],), items.shape[1], dtype=torch.long)
    over = cache.lengths + new_lengths > model.config.max_len
    if over.any() and not over.all():
        out = None
        for part in (over.nonzero().squeeze(1), (~over).nonzero().squeeze(1)):
            h = hidden_after(model, _select_cache(cache, part), items[part], timestamps[part], new_lengths[part],
                             None if query_ts is None else query_ts[part])
            out = h.new_empty(len(over), h.shape[1]) if out is None else out
            out[part] = h
        return out
    if query_ts is None:
        _, h = model.extend(cache, items, timestamps, new_lengths)
    else:
        _, h = model.extend(cache, items, timestamps, new_lengths, query_ts=query_ts)
    return last_hidden(h, new_lengths)


@torch.no_grad()
def replay_hidden(model, cache, item_tables: dict | None = None) -> torch.Tensor:
    """Hidden state (B, d) of each user's next-event query, the last cached event replayed, by
    `extend_compressed` over a `CompressedCache` or a decoded `KVCache` (attended in place, not copied)."""
    if isinstance(cache, KVCache):
        cache = CompressedCache(list(cache.keys), list(cache.values), cache.lengths, cache.items, cache.timestamps)
    cc, items, ts = rewind(cache)
    ones = torch.ones(len(items), dtype=torch.long)
    return last_hidden(extend_compressed(model, cc, items, ts, ones, item_tables), ones)


def rewind(cache):
    """A cache (KVCache or CompressedCache) without each user's last token, and that token's item and timestamp
    (B, 1): extending the one by the other replays the last cached event."""
    if len(cache.lengths) and int(cache.lengths.min()) < 1:
        raise CkvError("a user has no cached event and no new events: nothing to score from")
    last = (cache.lengths - 1).clamp(min=0)[:, None]
    items, ts = cache.items.gather(1, last), cache.timestamps.gather(1, last)
    if isinstance(cache, KVCache):
        return KVCache(cache.keys, cache.values, cache.lengths - 1, cache.items, cache.timestamps), items, ts
    return CompressedCache(cache.keys, cache.values, cache.lengths - 1, cache.items, cache.timestamps), items, ts


def score_candidates(model, h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Next-item scores (B, C) of candidate items (B, C) from hidden states (B, d): the columns of
    `model.score_all` without scoring every item."""
    table = model.item_table()  # (n_items + 1, d)
    s = torch.einsum("bd,bcd->bc", model.output(h), table[candidates])
    return s.masked_fill(candidates == 0, float("-inf"))


class CacheStore(Store):
    """Next-item users' caches served from an artifact on disk (module docstring). Open with `CacheStore.open`."""

    task = "next-item"

    def __init__(self, artifact, model, item_vocab, user_vocab=None):
        super().__init__(artifact, model, item_vocab, user_vocab)
        self._item_tables = None
        self._pools: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._item_rows: dict = {}  # predictive streams' item tables (`_item_table`)
        self._halves: dict = {}  # joint predictive streams' K and V halves (`predictive_halves`)
        self._local = threading.local()  # per thread: buffers kept from batch to batch (`_kv_buffers`)

    @staticmethod
    def _check_model(artifact, model) -> None:
        Store._check_model(artifact, model)
        longest = int(np.diff(artifact.offsets).max()) if artifact.n_users else 0
        if longest > model.config.max_len:
            raise CkvError(f"{artifact.path}: a user has {longest} cached tokens, the model's window is "
                           f"{model.config.max_len}")

    def fetch(self, user_ids) -> KVCache:
        """Decoded caches of a batch of users (raw ids), right-padded, as the model's `extend` takes them."""
        return self.model.unflatten(self.fetch_flat(user_ids))

    @torch.no_grad()
    def fetch_compressed(self, user_ids, recompute_items: bool = True) -> CompressedCache:
        """A batch of users' caches in stored form (`CompressedCache`): collective streams as `CompressedStream`s
        (for `ckv_cli.serve.attention.compressed_attention`; item-coded indices decoded to pool indices through
        their item's list and the user's escapes), the item-id layers recomputed (None with
        `recompute_items=False`), other codecs' streams decoded."""
        return self._compressed(*self._read(self.index(user_ids)), recompute_items)

    def _kv_buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, d_k) and (rows, d_v) float buffers for the first layer's K/V from its tables (`tabled_kv`'s
        `out`: a batch's real tokens, flat), kept per thread and grown as batches need; every row a batch reads
        is written first. Only for caches that `_hidden` consumes before its next batch."""
        bufs = getattr(self._local, "kv", None)
        if bufs is None or bufs[0].shape[0] < rows:
            d_k, d_v = self.model.kv_dims
            bufs = self._local.kv = (torch.empty(rows, d_k), torch.empty(rows, d_v))
        return bufs

    def _compressed(self, fields, offsets, recompute_items: bool, kept_buffers: bool = False) -> CompressedCache:
        lengths = torch.from_numpy(np.diff(offsets))
        B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
        valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L) real tokens
        slots = valid.view(-1).nonzero().squeeze(1)  # their places in (B*L)

        def pad(flat) -> torch.Tensor:  # (N, ...) -> (B, L, ...), zero padding
            x = flat if isinstance(flat, torch.Tensor) else torch.from_numpy(np.asarray(flat, np.int64))
            return x.new_zeros(B * L, *x.shape[1:]).index_copy_(0, slots, x).view(B, L, *x.shape[1:])

        items = pad(fields["tokens/items"])
        ts = pad(self.plan.timestamps_of(fields, offsets)) if self.plan.timestamps else torch.zeros(B, L, dtype=torch.long)
        rec = None
        keys, values = [], []
        joined = {}  # V streams of joint pairs, made with their K stream
        item_ids = np.asarray(fields["tokens/items"], np.int64)
        memo = {"kept": kept_buffers,  # the first layer's K/V where they are built (`_first_kv`), once
                "tokens": lambda: (torch.from_numpy(item_ids), torch.from_numpy(token_positions(offsets)))}
        for layer in range(self.plan.n_layers):
            for kind, dest in (("k", keys), ("v", values)):
                name = CachePlan.key(layer, kind)
                codec = self.plan.streams[name]
                inner = codec.inner if isinstance(codec, JointCodec) else codec
                if recomputed(codec):
                    if recompute_items and rec is None:
                        rec = item_layer_kv(self.model, items, torch.arange(L)[None].expand(B, L))
                    dest.append(rec[0 if kind == "k" else 1] if recompute_items else None)
                elif isinstance(codec, JointPart):
                    dest.append(joined.pop(name))
                elif isinstance(inner, CollectiveCodec):
                    user = None
                    if inner.user_dim:
                        u = (dequantize_per_user(fields[f"{name}/user"], fields[f"{name}/scale"], offsets)
                             if inner.user_dtype == "int8" else torch.from_numpy(fields[f"{name}/user"].astype(np.float32)))
                        user = pad(u)
                    sub = {f.name: fields[f"{name}/{f.name}"] for f in inner.index_fields()}
                    idx = pad(inner.indices(sub, offsets, item_ids))  # item-coded: list position or escape
                    streams = [CompressedStream(pool, idx, user, basis) for pool, basis in self._pool_forms(name, codec)]
                    dest.append(streams[0])
                    if isinstance(codec, JointCodec):  # one index for K and V
                        joined[codec.partner] = streams[1]
                elif isinstance(inner, PredictiveCodec):
                    sub = {f.name: fields[f"{name}/{f.name}"] for f in inner.fields()}
                    idx = pad(inner.index_decode(sub, item_ids, offsets))
                    if isinstance(codec, JointCodec):  # one index for K and V: each half apart
                        if name not in self._halves:
                            self._halves[name] = predictive_halves(codec)
                        k_half, v_half = self._halves[name]
                        dest.append(self._predicted(name, layer, k_half, idx, items, valid, memo))
                        joined[codec.partner] = self._predicted(codec.partner, layer, v_half, idx, items, valid, memo)
                    else:
                        dest.append(self._predicted(name, layer, codec, idx, items, valid, memo))
                else:
                    sub = {f.name: fields[f"{name}/{f.name}"] for f in codec.fields()}
                    kw = {"items": item_ids} if codec.needs_items else {}
                    if getattr(codec, "needs_context", False):  # predictive: the first layer's K/V per token
                        first = rec if rec is not None else item_layer_kv(self.model, items,
                                                                          torch.arange(L)[None].expand(B, L))
                        kw["context"] = (torch.cat([first[0], first[1]], -1).reshape(B * L, -1)[slots]
                                         if recomputed(self.plan.streams.get(CachePlan.key(0, "k"))) else None)
                    out = pad(codec.decode(sub, offsets, **kw).float())
                    if isinstance(codec, JointCodec):
                        dest.append(out[..., : codec.d])
                        joined[codec.partner] = out[..., codec.d :]
                    else:
                        dest.append(out)
        tabled = kept_buffers and tables_form(self._tables()) == "kv"
        if keys[0] is None and values[0] is None and ("kv" in memo or tabled):
            keys[0], values[0] = self._first_kv(items, valid, memo)  # built for a prediction, or into kept buffers
        return CompressedCache(keys, values, lengths, items, ts)

    def _predicted(self, name: str, layer: int, codec: PredictiveCodec | PredictiveHalf, idx: torch.Tensor,
                   items: torch.Tensor, valid: torch.Tensor, memo: dict) -> PredictedStream:
        """Stream `name` of a batch as a `PredictedStream` (`codec`: its predictive codec, or its half of a joint
        one): its pool `idx` (B, L), the batch's `items` (B, L) and real tokens `valid` (B, L); `memo` keeps the
        first layer's K/V where they are built (`memo["kv"]`), once per batch."""
        B, L = items.shape
        parts = [CompressedStream(codec.pool, idx)]
        if codec.uses_context:  # [c, e] W + w: c the first layer's K/V, e their moving average (`ema`)
            w1, w0 = codec.weight[:-1], codec.weight[-1]  # (c or 2c, d), (d,)
            c = len(w1) // 2 if codec.ema else len(w1)
            parts.append(self._linear_part(layer, w1[:c], w0, items, valid, memo))
            if codec.ema:
                parts.append(EmaSide(self._linear_part(layer, w1[c:], torch.zeros_like(w0), items, valid, memo),
                                     codec.ema))
        if codec.uses_items:  # one row per item with a row, then a row for the others: zeros, or the mean
            table, row_of = self._item_table(name, codec)
            parts.append(CompressedStream(table, row_of[items.long()]))
        elif not codec.uses_context:  # the mean alone: a one-row pool
            parts.append(CompressedStream(codec.base[None], torch.zeros(B, L, dtype=torch.long)))
        if codec.pos_table is not None:
            pos = torch.arange(L).clamp(max=len(codec.pos_table) - 1)[None].expand(B, L).contiguous()
            parts.append(CompressedStream(codec.pos_table, pos))
        return PredictedStream(parts)

    def _item_table(self, name: str, codec: PredictiveCodec) -> tuple[torch.Tensor, torch.Tensor]:
        """(the item table as a pool (R + 1, d): the kept items' rows, then the row of every other item; each item
        id's row (n_items + 1,)), computed once per stream."""
        if name not in self._item_rows:
            rows = codec.rows.long()
            extra = torch.zeros(1, codec.d) if codec.uses_context else codec.base[None]
            table = torch.cat([codec.table + (0 if codec.uses_context else codec.base), extra])  # (R + 1, d)
            row_of = torch.full((self.plan.n_items + 1,), len(rows), dtype=torch.long)
            known = rows <= self.plan.n_items  # (a row id past the vocabulary is never read)
            row_of[rows[known]] = torch.arange(len(rows))[known]
            self._item_rows[name] = (table, row_of)
        return self._item_rows[name]

    def _linear_part(self, layer: int, w1: torch.Tensor, w0: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
                     memo: dict):
        """A linear map of the first layer's K/V, [K0, V0] w1 + w0 ((c, d), (d,)), of a batch, never built: through
        the first layer's LayerNorm fold where the model gives one (the batch's `ItemLayer`, `memo["items"]`, with
        projections w1 composed with the first layer's), else a `LinearSide` over the first layer's K0 and V0
        (`_first_kv`)."""
        tables = self._tables()
        if tables_form(tables) == "fold":
            heads = self.model.layers[layer].attention_spec().heads
            a = torch.cat([tables["ak"].reshape(-1, tables["ak"].shape[-1]),
                           tables["av"].reshape(-1, tables["av"].shape[-1])])  # (c, d_model): [K0; V0] rows
            c = torch.cat([tables["ck"].reshape(-1), tables["cv"].reshape(-1)])  # (c,)
            ak = (w1.T @ a).view(heads, -1, a.shape[1])  # (H, dh, d_model): x -> pred, per head of this layer
            ck = (c @ w1 + w0).view(heads, -1)
            if "items" not in memo:  # the batch's tokens through the fold, once: each linear part reprojects them
                memo["items"] = ItemLayer(tables, self.model, items)
            return memo["items"].projected(ak, ck)
        d_k = self.model.kv_dims[0]
        return LinearSide(list(self._first_kv(items, valid, memo)), [w1[:d_k], w1[d_k:]], w0)

    def _first_kv(self, items: torch.Tensor, valid: torch.Tensor, memo: dict) -> tuple:
        """The batch's first-layer K0, V0, built once (`memo["kv"]`; the first layer reads them too): from the
        model's K/V tables, the real tokens' rows as two `CompressedStream`s (`first_layer_streams`; into this
        thread's kept buffers when `memo["kept"]`, `_kv_buffers`), else recomputed by the layer ((B, L, d_k),
        (B, L, d_v), contiguous)."""
        if "kv" not in memo:
            B, L = items.shape
            tables = self._tables()
            if tables_form(tables) == "kv":
                out = self._kv_buffers(int(valid.sum())) if memo.get("kept") else None
                tokens = memo["tokens"]() if "tokens" in memo else None  # flat already: no masked gathers
                memo["kv"] = first_layer_streams(tables, items, valid, out, tokens)
            else:
                pos = torch.arange(L)[None].expand(B, L)
                memo["kv"] = tuple(x.contiguous() for x in item_layer_kv(self.model, items, pos))
        return memo["kv"]

    def _pool_forms(self, name: str, codec) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(pool, basis)] in the residual form x = pool[idx] + basis u (`concat` folded), computed once per stream:
        one pair, or for a joint codec the K and the V halves, scaled back to each stream."""
        if name not in self._pools:
            if isinstance(codec, JointCodec):
                pool, basis = pool_and_basis(codec.inner)
                (sk, sv), d = codec.stream_scales(), codec.d
                self._pools[name] = [(pool[:, :d] * sk, basis[:d] * sk[:, None]), (pool[:, d:] * sv, basis[d:] * sv[:, None])]
            else:
                self._pools[name] = [pool_and_basis(codec)]
        return self._pools[name]

    # -- scoring ----------------------------------------------------------------------------------------
    def _new_events(self, n_users: int, new_items, new_timestamps):
        """Per-user new events -> (items (B, T), timestamps (B, T), lengths (B,)), or Nones."""
        if new_items is None:
            if new_timestamps is not None:
                raise CkvError("timestamps were given without new items")
            return None, None, None
        if len(new_items) != n_users:
            raise CkvError(f"new items are given for {len(new_items)} users, the batch has {n_users}")
        if new_timestamps is None:
            if self.plan.timestamps:
                raise CkvError("this model's attention reads event times: give the new events' timestamps")
            new_timestamps = [np.zeros(len(x), np.int64) for x in new_items]
        if len(new_timestamps) != n_users:
            raise CkvError(f"new timestamps are given for {len(new_timestamps)} users, the batch has {n_users}")
        idx = [self.item_index(x) for x in new_items]
        ts = [self._timestamps(t, len(i)) for t, i in zip(new_timestamps, idx)]
        lengths = torch.tensor([len(i) for i in idx], dtype=torch.long)
        if n_users and int(lengths.min()) < 1:
            raise CkvError("every user needs at least one new event (pass new_items=None to score from the cache)")
        T = int(lengths.max()) if n_users else 0
        items, times = torch.zeros(n_users, T, dtype=torch.long), torch.zeros(n_users, T, dtype=torch.long)
        for b, (i, t) in enumerate(zip(idx, ts)):
            items[b, : len(i)], times[b, : len(t)] = torch.from_numpy(i), torch.from_numpy(t)
        return items, times, lengths

    @staticmethod
    def _timestamps(ts, n: int) -> np.ndarray:
        arr = np.asarray(ts)
        if arr.shape != (n,) or (n and arr.dtype.kind not in "iu"):
            raise CkvError(f"expected {n} integer timestamps (seconds), got {arr.tolist()!r}"[:200])
        if n and (int(arr.min()) < -(2**31) or int(arr.max()) >= 2**31):
            raise CkvError("timestamps must fit in int32 (seconds)")
        return arr.astype(np.int64)

    @torch.no_grad()
    def _hidden(self, users: np.ndarray, new_items, new_timestamps, attention: str, query_ts=None):
        """(hidden states (B, d), items each user's ranking excludes (B, L')) for the next event. `query_ts` (B,):
        the request time, read by models with next-event query time (`ckv_cli.models.base`), which are always
        served through the decoded path (their newest cached token is recomputed)."""
        if attention not in (COMPRESSED, DECODED):
            raise CkvError(f"attention must be '{COMPRESSED}' or '{DECODED}', got {attention!r}")
        items, ts, new_lengths = self._new_events(len(users), new_items, new_timestamps)
        query_ts = self._query_times(len(users), query_ts)
        fields, offsets = self._read(users)
        if attention == DECODED or provisional(self.model):
            cache = self.model.unflatten(self._decode(fields, offsets))
            h = hidden_after(self.model, cache, items, ts, new_lengths, query_ts)
            seen = cache.items
        else:
            cc = self._compressed(fields, offsets, recompute_items=False, kept_buffers=True)
            seen = cc.items
            if items is None:
                cc, items, ts = rewind(cc)
                new_lengths = torch.ones(len(users), dtype=torch.long)
            over = cc.lengths + new_lengths > self.model.config.max_len
            h = torch.empty(len(users), self.model.config.d)
            ok = (~over).nonzero().squeeze(1)
            if len(ok):
                sub = cc if len(ok) == len(users) else _select_compressed(cc, ok)
                hh = extend_compressed(self.model, sub, items[ok], ts[ok], new_lengths[ok], self._tables())
                h[ok] = last_hidden(hh, new_lengths[ok])
            if over.any():  # the window slides: re-prefill from item ids (the decoded path does it)
                part = over.nonzero().squeeze(1)
                cache = self.model.unflatten(self._decode(*self._read(users[part.numpy()])))
                h[part] = hidden_after(self.model, cache, items[part], ts[part], new_lengths[part])
        if items is not None:
            seen = torch.cat([seen, items], dim=1)
        return h, seen

    def _query_times(self, n_users: int, query_ts) -> torch.Tensor | None:
        """Request times (one per user, seconds) -> (B,) int64, or None."""
        if query_ts is None:
            return None
        arr = np.asarray(query_ts.cpu() if isinstance(query_ts, torch.Tensor) else query_ts).reshape(-1)
        if len(arr) != n_users:
            raise CkvError(f"query_timestamps has {len(arr)} entries, the batch has {n_users} users")
        return torch.from_numpy(self._timestamps(arr, n_users))

    def _tables(self):
        if not all(recomputed(self.plan.streams[CachePlan.key(0, k)]) for k in "kv"):
            return None
        if self._item_tables is None:
            with torch.no_grad():
                self._item_tables = self.model.first_layer_tables() or False
        return self._item_tables or None

    def rank_next(self, user_ids, new_items=None, new_timestamps=None, k: int = 10, exclude_seen: bool = True,
                  attention: str = COMPRESSED, query_timestamps=None) -> Ranking:
        """Top-k next items of each user from its cache (module docstring): `new_items` (one sequence per user,
        raw ids or indices, with `new_timestamps` for models that read event times) are appended first, without
        being stored. Items of the user's window (cached and new) are excluded as in `ckv_cli.evaluate`
        (`exclude_seen=False` ranks them too). `query_timestamps` (one per user): the request time, for models
        with next-event query time (generative-recommenders' HSTU); default the newest event's own time."""
        users = self.index(user_ids)
        n = self.plan.n_items
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise CkvError(f"k must be an integer in 1..{n}, got {k!r}")
        if len(users) == 0:
            empty = np.zeros((0, int(k)))
            return Ranking([], empty.astype(np.int64), self.item_ids_of(empty), empty.astype(np.float32))
        h, seen = self._hidden(users, new_items, new_timestamps, attention, query_timestamps)
        with torch.no_grad():
            scores = self.model.score_all(h)
            if exclude_seen:
                scores = mask_seen(scores, seen)
            top = scores.topk(int(k), dim=1)
        idx = top.indices.numpy()
        return Ranking([self._user_ids[u] for u in users], idx, self.item_ids_of(idx), top.values.numpy())

    def score_items(self, user_ids, candidate_items, new_items=None, new_timestamps=None,
                    attention: str = COMPRESSED, query_timestamps=None) -> np.ndarray:
        """Next-item scores (B, C) of candidate items: one list per user (B lists of C), or one list for all.
        Candidates are raw ids or indices and are scored even if seen. `query_timestamps`: `rank_next`. (CTR
        artifacts: `ckv_cli.serve.ctr.CTRStore.score`.)"""
        users = self.index(user_ids)
        per_user = (candidate_items.ndim == 2 if isinstance(candidate_items, (np.ndarray, torch.Tensor))
                    else len(candidate_items) > 0 and not isinstance(candidate_items[0], (str, int, np.integer)))
        if per_user:
            rows = [self.item_index(c) for c in candidate_items] if isinstance(candidate_items, list) else None
            if rows is not None and len({len(r) for r in rows}) > 1:
                raise CkvError("candidate_items: give one list of the same length per user, or one list for all")
            cand = self.item_index(candidate_items) if rows is None else np.stack(rows)
            if len(cand) != len(users):
                raise CkvError(f"candidate_items has {len(cand)} rows, the batch has {len(users)} users")
            cand = torch.from_numpy(cand.reshape(len(users), -1))
        else:
            cand = torch.from_numpy(self.item_index(candidate_items))[None].expand(len(users), -1)
        if len(users) == 0:
            return np.zeros((0, cand.shape[1]), np.float32)
        h, _ = self._hidden(users, new_items, new_timestamps, attention, query_timestamps)
        with torch.no_grad():
            return score_candidates(self.model, h, cand).numpy()

    # -- appending ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, user_id: str, items, timestamps=None, create: bool = False, window: int | None = None,
               ordered: bool = False) -> None:
        """Append a user's new events (raw item ids or indices, timestamps in seconds) through the model and the
        codec (module docstring for the exact contract). An unknown user is an error unless `create`, which
        starts the user from an empty cache. `window` and `ordered`: as `append_many`."""
        if isinstance(items, str):
            items = [items]
        self.append_many([user_id], [items], None if timestamps is None else [timestamps], create, window, ordered)

    @torch.no_grad()
    def append_many(self, user_ids, items, timestamps=None, create: bool = False, window: int | None = None,
                    ordered: bool = False) -> None:
        """`append` for a batch of users at once (one read, one decode, one `extend` and one prefill for the
        batch): user b gets the events `items[b]` at `timestamps[b]`. `window` (at most the model's `max_len`,
        the default): the most tokens a cache keeps; cached + new > window re-encodes the user from a prefill of
        its last `window` events (`ckv compress --update` passes `max_len - 1`, the cache `ckv compress` keeps:
        the next event is appended at scoring time). `ordered`: refuse new events older than the user's last
        cached one (checked where the artifact keeps event times)."""
        uids = [str(u) for u in user_ids]
        if len(set(uids)) != len(uids):
            raise CkvError("a user appears twice in one append_many: give each user's new events once")
        max_len = self.model.config.max_len
        W = max_len if window is None else window
        if isinstance(W, bool) or not isinstance(W, (int, np.integer)) or not 1 <= W <= max_len:
            raise CkvError(f"window must be an integer in 1..{max_len} (the model's max_len), got {window!r}")
        known = [self._lookup.get(uid) for uid in uids]
        missing = next((uid for uid, u in zip(uids, known) if u is None), None)
        if missing is not None and not create:
            raise CkvError(f"user '{missing}' is not in {self.artifact.path} (create=True adds a new user)")
        new_items, new_ts, new_len = self._new_events(len(uids), list(items), timestamps)
        old = [b for b, u in enumerate(known) if u is not None]
        records: dict[int, dict[str, np.ndarray]] = {}
        windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # user b -> (items, timestamps) to prefill
        for b in range(len(uids)):
            if known[b] is None:
                T = int(new_len[b])
                windows[b] = (new_items[b, :T][-W:], new_ts[b, :T][-W:])
        if old:
            fields, offsets = self._read(np.array([known[b] for b in old]))
            cache = self.model.unflatten(self._decode(fields, offsets))
            n_old = cache.lengths.tolist()
            if ordered and self.plan.timestamps:
                anchors = None if self.plan.time is None else fields["time/anchor"].reshape(-1)  # coded: the exact newest
                for j, b in enumerate(old):
                    if not n_old[j]:
                        continue
                    last = int(cache.timestamps[j, n_old[j] - 1] if anchors is None else anchors[j])
                    first = int(new_ts[b, : int(new_len[b])].min())
                    if first < last:
                        raise CkvError(f"user '{uids[b]}': a new event at {first} is older than its cached history "
                                       f"(last cached event at {last}); --update appends newer events only")
            grow = [j for j, b in enumerate(old) if n_old[j] + int(new_len[b]) <= W]
            recomputed_newest = provisional(self.model)
            for j in sorted(set(range(len(old))) - set(grow)):
                b, T = old[j], int(new_len[old[j]])
                windows[b] = (torch.cat([cache.items[j, : n_old[j]], new_items[b, :T]])[-W:],
                              torch.cat([cache.timestamps[j, : n_old[j]], new_ts[b, :T]])[-W:])
            if grow:
                sel = torch.tensor(grow)
                rows = [old[j] for j in grow]
                ext, _ = self.model.extend(_select_cache(cache, sel), new_items[rows], new_ts[rows], new_len[rows])
                flat = self.model.flatten(ext)
                for i, j in enumerate(grow):
                    whole = flat.users(i, i + 1)
                    n = whole.n_tokens
                    new = whole.rows(np.arange(n_old[j], n), np.array([0, n - n_old[j]]))
                    if recomputed_newest:  # the old newest token was recomputed by extend: re-encode the whole user
                        records[old[j]] = self._encode(whole)
                    else:
                        records[old[j]] = self._merge(self.record(fields, offsets, j), new, lambda w=whole: w)
        if windows:
            order = sorted(windows)
            lengths = torch.tensor([len(windows[b][0]) for b in order], dtype=torch.long)
            L = int(lengths.max())
            items_w, ts_w = torch.zeros(len(order), L, dtype=torch.long), torch.zeros(len(order), L, dtype=torch.long)
            for i, b in enumerate(order):
                items_w[i, : lengths[i]], ts_w[i, : lengths[i]] = windows[b]
            flat = self.model.flatten(self.model.prefill(items_w, ts_w, lengths)[0])
            for i, b in enumerate(order):  # a new user, or the window slid: the whole (re-prefilled) user
                records[b] = self._encode(flat.users(i, i + 1))
        for b, uid in enumerate(uids):
            self._put(uid, known[b], records[b])


def _select_compressed(cc: CompressedCache, idx: torch.Tensor) -> CompressedCache:
    return CompressedCache([_select_side(k, idx) for k in cc.keys], [_select_side(v, idx) for v in cc.values],
                           cc.lengths[idx], cc.items[idx], cc.timestamps[idx])


__all__ = ["CacheStore", "CompressedCache", "EmaSide", "ItemLayer", "LinearSide", "PredictedStream", "PredictiveHalf",
           "Ranking", "extend_compressed", "first_layer_streams", "hidden_after", "item_layer_sides", "predictive_halves",
           "replay_hidden", "rewind", "score_candidates", "tabled_kv", "token_rows"]
