"""What every next-item model shares: the KV cache, prefill/extend over it, and scoring against all items.

A model is a stack of attention layers. Each layer turns its input into a query-side part and the key/value
of the new tokens; the keys/values of earlier tokens come from the cache. `prefill` is `extend` from an
empty cache, so the training path, the prefill path and the decoding path run the same code.

Positions count from the first token of the cached window, so appending never renumbers a cached token.
A cache holds at most `max_len` tokens: an `extend` that would overflow it re-prefills the most recent
`max_len` events from the item ids and timestamps kept in the cache (a sliding window, as in LLM serving).

Query time. A model whose attention biases each query by the gap to the *next* event's time (HSTU with
`query_time="next"`, as generative-recommenders trains it) cannot finish its newest token until the next event
arrives: the newest cached token is provisional (`provisional_tokens == 1`). Its first layer's K/V are exact
(a function of item and position), its deeper layers' K/V were computed with the request time given as
`query_ts` (or its own time when none is given). `extend` re-opens it: the cache minus that token is extended
by [that token, new events], so it is recomputed with its true next time and prefill + extend equals a full
forward. The cache stores the provisional token like any other (its K/V, item id and timestamp: what the byte
accounting counts); its deeper K/V are never read, since every extend recomputes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.spec import CacheSpec, FlatCache, Stream, TokenId, bits_for


@dataclass
class KVCache:
    """Per-layer keys/values of every cached history token, right-padded: user b's tokens are [0, lengths[b]).

    `keep` (B, L) bool, when set, masks tokens out of attention without removing them (an evicting codec:
    `ckv_cli.codecs.evict`), so every token keeps its position and timestamp; `valid_mask` is where attention
    reads it. `extend` carries it forward (new tokens are kept); a re-prefill recomputes the window from the
    item ids and clears it."""

    keys: list[torch.Tensor]  # per layer (B, L, d_k)
    values: list[torch.Tensor]  # per layer (B, L, d_v)
    lengths: torch.Tensor  # (B,) int64
    items: torch.Tensor  # (B, L) int64 item ids of the cached tokens, 0 = padding
    timestamps: torch.Tensor  # (B, L) int64
    keep: torch.Tensor | None = None  # (B, L) bool; None = every token attended

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @staticmethod
    def empty(batch: int, n_layers: int, d_k: int, d_v: int, device=None) -> "KVCache":
        z = lambda d: torch.zeros(batch, 0, d, device=device)  # noqa: E731
        return KVCache([z(d_k) for _ in range(n_layers)], [z(d_v) for _ in range(n_layers)],
                       torch.zeros(batch, dtype=torch.long, device=device),
                       torch.zeros(batch, 0, dtype=torch.long, device=device),
                       torch.zeros(batch, 0, dtype=torch.long, device=device))

    def length_mask(self) -> torch.Tensor:
        """(B, L) True on each user's cached tokens (evicted ones included)."""
        L = self.items.shape[1]
        return torch.arange(L, device=self.lengths.device)[None, :] < self.lengths[:, None]  # (B, L)

    def valid_mask(self) -> torch.Tensor:
        """(B, L) True on the tokens attention reads: cached and not evicted."""
        m = self.length_mask()
        return m if self.keep is None else m & self.keep


def merge(cached: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, new_lengths: torch.Tensor) -> torch.Tensor:
    """Append each user's first new_lengths[b] new rows after its lengths[b] cached rows, right-padded."""
    B, Lc = cached.shape[:2]
    T = new.shape[1]
    total = lengths + new_lengths
    Lout = int(total.max()) if B else 0
    slot = torch.arange(Lout, device=cached.device)[None, :].expand(B, Lout)  # (B, Lout)
    src = torch.where(slot < lengths[:, None], slot, Lc + slot - lengths[:, None])
    src = src.clamp(max=Lc + T - 1) if Lc + T > 0 else src
    both = torch.cat([cached, new], dim=1)  # (B, Lc + T, ...)
    idx = src.view(B, Lout, *([1] * (both.dim() - 2))).expand(B, Lout, *both.shape[2:])
    out = torch.gather(both, 1, idx)
    keep = (slot < total[:, None]).view(B, Lout, *([1] * (both.dim() - 2)))
    return out * keep.to(out.dtype) if out.is_floating_point() else out * keep


@dataclass(frozen=True)
class AttentionSpec:
    """How a layer's attention reads its cached K/V: `kind` "softmax" (softmax(scale q.k + bias)) or "silu"
    (silu(scale q.k + bias) / norm, no softmax), `heads`, `scale`, `norm`, and `bias`, a module called as
    bias(q_pos, k_pos, q_ts, k_ts) -> (B, T, Lk) or None. Attention over the compressed form reads this."""

    kind: str
    heads: int
    scale: float
    norm: float | None = None
    bias: object = None


def stream_name(layer: int, kind: str) -> str:
    """A next-item model's cached stream: layer `layer`'s keys ("k") or values ("v"), e.g. "L1.k"."""
    return f"L{layer}.{kind}"


def next_item_spec(n_items: int, n_layers: int, d_k: int, d_v: int, reads_time: bool,
                   item_layer: bool = True) -> CacheSpec:
    """What a next-item model caches per token: its item id (always: the ranking excludes the window's items, an
    overflow re-prefills from them) and, for a model whose attention reads event times, its timestamp (int32
    seconds); per layer K and V. With `item_layer` (the model's `first_layer_item_function()`) the first layer's
    K/V are an exact function of (item, position): recomputable from the item ids."""
    ids = [TokenId("items", bits=bits_for(n_items + 1), required=True)]
    if reads_time:
        ids.append(TokenId("timestamps", dtype="int32", required=True))
    streams = [Stream(stream_name(i, kind), d, kind, ("items",) if i == 0 and item_layer else ())
               for i in range(n_layers) for kind, d in (("k", d_k), ("v", d_v))]
    return CacheSpec(tuple(ids), tuple(streams))


class SequentialRecommender(nn.Module):
    """Base class of the next-item models: subclasses define `item_emb`, `pos_emb`, `drop` and `layers`, whose
    layers implement `project(x) -> (q, k, v, extra)`, `attend(...)`, `finish(x, attended, extra)` and
    `attention_spec()` (how their attention reads a cache, for attention over the compressed form)."""

    task = "next-item"
    reads_time = False  # the attention reads event times (HSTU's time-gap bias): timestamps are cached too
    config: object
    layers: nn.ModuleList

    # -- the cache this model declares (ckv_cli.spec) --------------------------------------------------------
    def cache_spec(self) -> CacheSpec:
        return next_item_spec(self.config.n_items, len(self.layers), *self.kv_dims, self.reads_time,
                              self.first_layer_item_function())

    def recompute(self, names: list[str], ids: dict[str, np.ndarray], offsets: np.ndarray):
        """(streams, side fields) of the tokens: the first layer's streams among `names` from the item ids and
        positions (flat, (N, d) each); no side fields."""
        return recompute_item_layer(lambda i, p: item_layer_kv(self, i, p), names, ids, offsets), {}

    def flatten(self, cache: "KVCache") -> FlatCache:
        return flatten(cache)

    def first_layer_tables(self) -> dict | None:
        """Tables that let the first layer be attended from item ids without building its K/V (SASRec's LayerNorm
        fold, `ckv_cli.serve.next_item`), or None where the layer has no such form."""
        return None

    def unflatten(self, flat: FlatCache) -> "KVCache":
        return unflatten(flat)

    def embed(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Item embedding scaled by sqrt(d) (unless `config.emb_scale` is False) plus a learned position (counted
        from the window start), then the embedding LayerNorm where the model has one (`emb_ln`)."""
        cfg = self.config
        item = self.item_emb(items)
        if getattr(cfg, "emb_scale", True):
            item = item * math.sqrt(cfg.d)
        x = item + self.pos_emb(positions.clamp(max=cfg.max_len - 1))
        if getattr(self, "emb_ln", None) is not None:
            x = self.emb_ln(x)
        return self.drop(x)  # (B, T, d)

    @property
    def cosine(self) -> bool:
        """Scores are cosines (`config.score == "cosine"`, ckv's recipe) rather than raw dot products."""
        return getattr(self.config, "score", "cosine") == "cosine"

    @property
    def temperature(self) -> float:
        """softmax(score / temperature) is the model's next-item distribution (`config.temperature`: 0.05 for
        cosine scores, 1 for RecBole's raw dot products)."""
        return float(getattr(self.config, "temperature", 0.05))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) if self.cosine else h

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, d) output embeddings (normalised for cosine scores); row 0 is padding."""
        return F.normalize(self.item_emb.weight, dim=-1) if self.cosine else self.item_emb.weight

    @property
    def provisional_tokens(self) -> int:
        """How many of the newest cached tokens `extend` recomputes (module docstring): 1 with next-event query
        time, else 0."""
        return 1 if getattr(self.config, "query_time", "own") == "next" else 0

    def first_layer_item_function(self) -> bool:
        """Whether the first layer's K/V are an exact function of (item, position) (`item_layer_kv`), so a cache
        may recompute them from item ids instead of storing them (`cache_spec` marks them recomputable). True for
        every SASRec and HSTU variant: time (HSTU's relative bias, own or next-event) enters the attention scores,
        never the K/V."""
        return True

    @property
    def kv_dims(self) -> tuple[int, int]:
        return self.layers[0].d_k, self.layers[0].d_v

    def empty_cache(self, batch: int) -> KVCache:
        d_k, d_v = self.kv_dims
        return KVCache.empty(batch, len(self.layers), d_k, d_v, device=self.item_emb.weight.device)

    def extend(self, cache: KVCache, items: torch.Tensor, timestamps: torch.Tensor,
               new_lengths: torch.Tensor | None = None, layer_inputs: list | None = None,
               query_ts: torch.Tensor | None = None):
        """New events (B, T) attend over the cache and themselves (causally) and are appended.

        Returns (new cache, hidden states of the new events (B, T, d)). With `layer_inputs` a list, each layer's
        input for the new tokens is appended to it (what a codec's router reads; with a provisional token, that
        token re-opened comes first). `query_ts` (B,): the request time, the next-event time of each user's
        newest event (read only with next-event query time; default: that event's own time)."""
        B, T = items.shape
        if new_lengths is None:
            new_lengths = torch.full((B,), T, dtype=torch.long, device=items.device)
        if self.provisional_tokens and B and bool((cache.lengths > 0).any()):
            return self._extend_reopened(cache, items, timestamps, new_lengths, layer_inputs, query_ts)
        return self._extend(cache, items, timestamps, new_lengths, layer_inputs, query_ts)

    def _extend_reopened(self, cache, items, timestamps, new_lengths, layer_inputs, query_ts):
        """`extend` with each user's provisional newest token taken out of the cache and put before the new events."""
        B, T = items.shape
        has = (cache.lengths > 0).long()  # (B,) users with a token to re-open
        last = (cache.lengths - 1).clamp(min=0)[:, None]
        tail_item, tail_ts = cache.items.gather(1, last), cache.timestamps.gather(1, last)  # (B, 1)
        src = (torch.arange(T + 1, device=items.device)[None, :] - has[:, None]).clamp(min=0, max=max(T - 1, 0))
        first = (torch.arange(T + 1, device=items.device)[None, :] == 0) & (has[:, None] > 0)  # (B, T + 1)
        both_items = torch.where(first, tail_item, items.gather(1, src) if T else tail_item.expand(B, 1))
        both_ts = torch.where(first, tail_ts, timestamps.gather(1, src) if T else tail_ts.expand(B, 1))
        opened = KVCache(cache.keys, cache.values, cache.lengths - has, cache.items, cache.timestamps, cache.keep)
        new_cache, h = self._extend(opened, both_items, both_ts, new_lengths + has, layer_inputs, query_ts)
        idx = (has[:, None] + torch.arange(T, device=items.device)[None, :]).clamp(max=h.shape[1] - 1)  # (B, T)
        return new_cache, torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

    def query_times(self, timestamps: torch.Tensor, new_lengths: torch.Tensor,
                    query_ts: torch.Tensor | None) -> torch.Tensor:
        """(B, T) the time each new event's query is asked at: its own time, or with next-event query time the next
        new event's time, and for each user's newest event `query_ts` (default: its own time)."""
        if not self.provisional_tokens:
            return timestamps
        B, T = timestamps.shape
        nxt = torch.cat([timestamps[:, 1:], timestamps[:, -1:]], dim=1)  # (B, T)
        newest = torch.arange(T, device=timestamps.device)[None, :] >= (new_lengths[:, None] - 1)
        req = timestamps.gather(1, (new_lengths - 1).clamp(min=0)[:, None]) if query_ts is None \
            else query_ts.reshape(B, 1).to(timestamps.dtype)
        return torch.where(newest, req.expand(B, T), nxt)

    def _extend(self, cache, items, timestamps, new_lengths, layer_inputs=None, query_ts=None):
        """`extend` without re-opening a provisional token (query times from `query_times`)."""
        B, T = items.shape
        if B and int((cache.lengths + new_lengths).max()) > self.config.max_len:
            return self._reprefill(cache, items, timestamps, new_lengths, layer_inputs, query_ts)
        t = torch.arange(T, device=items.device)[None, :]
        new_valid = t < new_lengths[:, None]  # (B, T)
        positions = cache.lengths[:, None] + t  # (B, T) counted from the window start
        Lc = cache.items.shape[1]
        key_valid = torch.cat([cache.valid_mask()[:, None, :].expand(B, T, Lc),
                               (t.T >= t)[None].expand(B, T, T) & new_valid[:, None, :]], dim=2)  # (B, T, Lc+T)
        key_pos = torch.cat([torch.arange(Lc, device=items.device)[None].expand(B, Lc), positions], dim=1)
        key_ts = torch.cat([cache.timestamps, timestamps], dim=1)
        q_ts = self.query_times(timestamps, new_lengths, query_ts)  # (B, T)
        x = self.embed(items, positions)  # (B, T, d)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            if layer_inputs is not None:
                layer_inputs.append(x)
            q, k, v, extra = layer.project(x)
            K = torch.cat([cache.keys[i], k], dim=1)  # (B, Lc+T, d_k)
            V = torch.cat([cache.values[i], v], dim=1)
            a = layer.attend(q, K, V, key_valid, positions, key_pos, q_ts, key_ts)
            x = layer.finish(x, a, extra)
            keys.append(merge(cache.keys[i], k, cache.lengths, new_lengths))
            values.append(merge(cache.values[i], v, cache.lengths, new_lengths))
        keep = None if cache.keep is None else merge(cache.keep, new_valid, cache.lengths, new_lengths)
        new_cache = KVCache(keys, values, cache.lengths + new_lengths,
                            merge(cache.items, items * new_valid, cache.lengths, new_lengths),
                            merge(cache.timestamps, timestamps * new_valid, cache.lengths, new_lengths), keep)
        return new_cache, self.final(x)

    def _reprefill(self, cache, items, timestamps, new_lengths, layer_inputs, query_ts=None):
        all_items = merge(cache.items, items, cache.lengths, new_lengths)
        all_ts = merge(cache.timestamps, timestamps, cache.lengths, new_lengths)
        total = cache.lengths + new_lengths
        keep = total.clamp(max=self.config.max_len)
        start = total - keep
        idx = (start[:, None] + torch.arange(int(keep.max()), device=items.device)[None]).clamp(max=all_items.shape[1] - 1)
        win_items = torch.gather(all_items, 1, idx)
        win_ts = torch.gather(all_ts, 1, idx)
        new_cache, h = self.prefill(win_items, win_ts, keep, layer_inputs, query_ts)
        # hidden states of the new events are the last new_lengths[b] positions of the window
        T = items.shape[1]
        pos = (keep[:, None] - new_lengths[:, None] + torch.arange(T, device=items.device)[None]).clamp(min=0, max=h.shape[1] - 1)
        return new_cache, torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1]))

    def prefill(self, items: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor | None = None,
                layer_inputs: list | None = None, query_ts: torch.Tensor | None = None):
        """Right-padded histories (B, L) -> (cache of all L tokens, hidden states (B, L, d)). `query_ts`: `extend`."""
        return self.extend(self.empty_cache(items.shape[0]), items, timestamps, lengths, layer_inputs, query_ts)

    def forward(self, items, timestamps, lengths):
        """Training path: hidden states (B, L, d) of every position (the cache is built and dropped)."""
        return self.prefill(items, timestamps, lengths)[1]

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, d) -> scores (cosine, or dot products with `config.score="dot"`) against every
        item (B, n_items + 1); column 0 is -inf."""
        s = self.output(h) @ self.item_table().T  # (B, n_items + 1)
        s[:, 0] = float("-inf")
        return s


def last_hidden(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d) at each user's last valid position."""
    idx = (lengths - 1).clamp(min=0)
    return h[torch.arange(h.shape[0], device=h.device), idx]


def flatten(cache: KVCache) -> FlatCache:
    """A padded cache -> its tokens back to back (streams "L{i}.k"/"L{i}.v"; ids items, timestamps)."""
    valid = cache.length_mask()  # (B, L): evicted tokens stay, with their mask
    offsets = np.zeros(len(cache.lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(cache.lengths.numpy())
    streams = {}
    for i in range(cache.n_layers):
        streams[stream_name(i, "k")] = cache.keys[i][valid]
        streams[stream_name(i, "v")] = cache.values[i][valid]
    return FlatCache(offsets, streams, {"items": cache.items[valid].numpy(), "timestamps": cache.timestamps[valid].numpy()},
                     keep=None if cache.keep is None else cache.keep[valid].numpy())


def unflatten(flat: FlatCache) -> KVCache:
    lengths = torch.from_numpy(np.diff(flat.offsets))
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, L, *x.shape[1:], dtype=x.dtype)
        out[valid] = x
        return out

    n_layers = sum(1 for n in flat.streams if n.endswith(".k"))
    return KVCache([pad(flat.streams[stream_name(i, "k")]) for i in range(n_layers)],
                   [pad(flat.streams[stream_name(i, "v")]) for i in range(n_layers)], lengths,
                   pad(torch.from_numpy(np.asarray(flat.items, np.int64))),
                   pad(torch.from_numpy(np.asarray(flat.timestamps, np.int64))),
                   None if flat.keep is None else pad(torch.from_numpy(np.asarray(flat.keep, dtype=bool))))


def recompute_item_layer(item_kv, names: list[str], ids: dict[str, np.ndarray], offsets: np.ndarray) -> dict:
    """Streams `names` ("L0.k", "L0.v") of flat tokens (users at `offsets`) through `item_kv(items (B, L),
    positions (B, L)) -> (k, v)`: the tokens are padded per user so that each has its position in its user's cache."""
    lengths = np.diff(offsets)
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    pos = torch.arange(L)[None, :].expand(B, L)
    valid = pos < torch.from_numpy(lengths)[:, None]
    padded = torch.zeros(B, L, dtype=torch.long)
    padded[valid] = torch.from_numpy(np.asarray(ids["items"], np.int64))
    k, v = item_kv(padded, pos)
    return {n: (k if n.endswith(".k") else v)[valid] for n in names}


def item_layer_kv(model: SequentialRecommender, items: torch.Tensor, positions: torch.Tensor):
    """K/V of the first layer, an exact function of (item, position): what a cache may recompute instead of
    storing. (B, L) -> ((B, L, d_k), (B, L, d_v)). Deeper layers mix in the history and are user-specific."""
    x = model.embed(items, positions)
    q, k, v, _ = model.layers[0].project(x)
    return k, v
