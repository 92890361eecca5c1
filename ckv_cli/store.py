"""Serving from an artifact: `CacheStore` opens one memory-mapped, reads a batch of users' caches with a few
vectorised gathers, ranks next items or scores candidates from them (through compressed-domain attention where
the model allows), and appends new events through the model and the codec.

    from ckv_cli import CacheStore
    store = CacheStore.open("sasrec.ckv.safetensors", "sasrec.safetensors")   # checkpoint path: sha256 checked
    store.rank_next(["42", "7"], k=10)              # top 10 next items of two users, seen items excluded
    store.score_items(["42"], [["Heat (1995)", "Fargo (1996)"]])   # scores of given candidates
    store.append("42", ["Fargo (1996)"], [978300760])              # the cache follows the user
    store.save("sasrec.ckv.v2.safetensors")                         # a new artifact with the appends merged

Reading. `SafetensorsMap` parses the safetensors header itself (8-byte little-endian length, JSON; every span
checked against the file size) and maps the file read-only; the artifact's plan, offsets and checks come from
`ckv_cli.artifact.Artifact.open`. A batch read is one gather per field: token fields at the concatenated token
ranges of the users, bit-packed fields unpacked for all those tokens at once (`unpack_at`), per-user fields by
user index. Nothing is read for users not asked for.

Scoring. The hidden state of the next event comes from `extend` over the cache: with new events, they are
appended (not stored: `append` stores); without, the last cached event is replayed (the cache minus its last
token, extended by that token: hidden states are not cached). `attention="compressed"` (the default) attends
over pooled streams in the compressed domain (`ckv_cli.kv.attention`: one product with the pool or a gather per
token, K/V never built) and, for SASRec, over a first layer recomputed from item ids without building its K/V
either: K_j = W_k LN(a_i + p_j) + b_k with a_i the scaled item embedding and p_j the position embedding, so
q . K_j = r_j (q~ . a_i + q~ . p_j - mu_j sum(q~)) + q . c with q~ = (W_k diag(gamma))^T q, mu_j and r_j the
token's LayerNorm mean and inverse deviation (tabulated once per model for every (item, position) pair, from
the item and position norms and their Gram matrix in float64: 8 bytes a pair, 5.9 MB for ML-1M), and the
values are the attention weights times r_j gathered into item and position rows (`_ItemLayer`). HSTU's first layer (SiLU after the projection) has no such form: it is recomputed per token.
`attention="decoded"` decodes the cache and runs the model's own `extend` (the reference; what
`ckv_cli.evaluate.scores_after_last_event` does). A batch whose new events would overflow a user's window
(`max_len`) goes through the decoded path for those users (re-prefill from item ids, as `extend` does).

Appending (`append`): the user's current cache is decoded, the new events are run through `model.extend`
over it, and the new tokens' K/V are encoded by the plan (the router picks their pool entries). The contract:
- no overflow: the old tokens' fields are kept bit for bit and the new tokens' fields are exactly
  `plan.encode` of the new tokens' K/V as `model.extend` computes them over the decoded cache. With the first
  layer recomputed from item ids (the default) and two layers, those K/V equal the teacher's (a prefill of the
  extended history) to float tolerance, because the first layer's cache is exact. Codecs with per-user state:
  collective's int8 user part keeps the user's scale when the new values fit under it (else the user's part
  is requantised at a new scale); other per-user or per-group codecs (KIVI keys per channel) re-encode the
  user's whole stream from the decoded old vectors and the new ones.
- overflow (cached + new > max_len): the window slides as in `extend`: the most recent `max_len` events are
  re-prefilled from their item ids and the user is re-encoded whole: exactly `plan.encode` of that prefill.
Appends live in an in-memory overlay (the file on disk is immutable); `save(path)` writes a new artifact with
the overlay merged, atomically. A store is not safe to append to from several threads at once.

CTR artifacts (SIM, ETA, SDIM, TWIN) are served by `ckv_cli.store_ctr.CTRStore` (click probabilities of
candidates); for next-item models `score_items` gives the model's scores (cosine against the item table) of given
candidates.
"""
from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckv_cli.artifact import Artifact, write_artifact
from ckv_cli.checkpoint import parse_header
from ckv_cli.codecs import ITEMS, CollectiveCodec
from ckv_cli.codecs.base import dequantize_per_user, quantize_per_user
from ckv_cli.codecs.plan import CachePlan
from ckv_cli.errors import CkvError
from ckv_cli.evaluate import mask_seen
from ckv_cli.kv.attention import (SCORES, SILU, SOFTMAX, VALUES, CompressedStream,
                                  choose_form, compressed_scores, compressed_values, pool_and_basis)
from ckv_cli.kv.extract import FlatCache, flatten, unflatten
from ckv_cli.models.base import KVCache, item_layer_kv, last_hidden
from ckv_cli.shard import ShardedArtifact, is_index, read_by_shard

NP_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
             "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64, "I64": np.int64,
             "F64": np.float64}  # the safetensors dtypes numpy reads
DECODED, COMPRESSED = "decoded", "compressed"
WRITTEN_BY_WRITER = ("format", "format_version", "plan", "fields", "ckv_version", "checksums")


# ---------------------------------------------------------------------------------------------- the file


class SafetensorsMap:
    """A safetensors file mapped read-only: `tensors[name]` is a numpy view into the map (index it to copy out
    what you need; never keep slices of it). The file stays open, so a file renamed over the path later does
    not change what this map reads (ckv always writes by rename); a file truncated in place while mapped would
    crash the reading process (SIGBUS), as with any memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CkvError(f"file not found: {self.path}")
        if self.path.is_dir():
            raise CkvError(f"expected a file, got a directory: {self.path}")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CkvError(f"cannot read {self.path}: {e.strerror or e}") from None
        self._mm = None
        self.tensors: dict[str, np.ndarray] = {}
        try:
            self.stat = os.fstat(self._file.fileno())
            self.header, self.metadata, self.data_start = parse_header(self._file, self.stat.st_size, self.path)
            for name, info in self.header.items():
                if info["dtype"] not in NP_DTYPES:
                    raise CkvError(f"{self.path}: tensor '{name}' has dtype {info['dtype']}, which this reader does not map")
            self._map()
        except OSError as e:
            self._file.close()
            raise CkvError(f"cannot read {self.path}: {e.strerror or e}") from None
        except CkvError:
            self._file.close()
            raise

    def _map(self) -> None:
        try:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CkvError(f"cannot map {self.path}: {e}") from None
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        out = {}
        for name, info in self.header.items():
            a, b = info["data_offsets"]
            out[name] = buf[self.data_start + a : self.data_start + b].view(NP_DTYPES[info["dtype"]]).reshape(info["shape"])
        self.tensors = out

    def same_file(self) -> bool:
        """Whether the path still names the file this map reads."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.stat.st_dev, self.stat.st_ino, self.stat.st_size, self.stat.st_mtime_ns)

    def evict(self) -> bool:
        """Unmap, ask the kernel to drop the file's pages from the page cache (posix_fadvise DONTNEED), map
        again: the next reads come from the disk (cold). False where the map could not be released (a view of
        it is still alive) or the platform lacks posix_fadvise; the kernel may keep pages other processes map."""
        self.tensors = {}
        released = True
        try:
            self._mm.close()
        except BufferError:
            released = False
        if released and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._map()
        return released and hasattr(os, "posix_fadvise")

    def close(self) -> None:
        self.tensors = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
        self._file.close()


def token_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[b], starts[b] + lengths[b]) as one int64 index, without a Python loop."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    out_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(starts - out_start, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def unpack_at(packed: np.ndarray, positions: np.ndarray, bits: int) -> np.ndarray:
    """Values at `positions` of a bit-packed stream (`ckv_cli.codecs.bits.pack`: value i at bits [i*bits,
    (i+1)*bits), most significant bit first) -> int64, all at once: each value's bytes are gathered into one
    integer (at most 5 bytes for 32 bits), shifted and masked."""
    positions = np.asarray(positions, np.int64)
    if positions.size == 0:
        return np.zeros(0, np.int64)
    bit = positions * bits
    lo, off = bit >> 3, (bit & 7).astype(np.uint64)
    g = math.gcd(bits, 8)
    n_bytes = (bits + (8 - g if bits % 8 else 0) + 7) // 8  # bit offsets are multiples of gcd(bits, 8)
    acc = np.zeros(len(positions), np.uint64)
    for j in range(n_bytes):  # bytes past the stream's end are never among a value's bits: clip is harmless
        acc = (acc << np.uint64(8)) | np.take(packed, lo + j, mode="clip").astype(np.uint64)
    shift = np.uint64(8 * n_bytes - bits) - off
    return ((acc >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- results


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
    `CompressedStream` (pool, indices, dequantised user part) for collective streams, a (B, L, d) tensor for
    streams recomputed from item ids (`ITEMS`; None when fetched with `recompute_items=False`) or stored by
    another codec (decoded)."""

    keys: list
    values: list
    lengths: torch.Tensor  # (B,)
    items: torch.Tensor  # (B, L) 0 = padding
    timestamps: torch.Tensor  # (B, L)

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.items.shape[1])[None, :] < self.lengths[:, None]  # (B, L)

    def decode(self) -> KVCache:
        """The materialised cache (needs the ITEMS layers recomputed)."""
        valid = self.valid[..., None]

        def dense(x):
            if x is None:
                raise CkvError("this compressed cache was fetched without its item-id layers (recompute_items=False)")
            out = x.decode() if isinstance(x, CompressedStream) else x
            return out * valid.to(out.dtype)

        return KVCache([dense(k) for k in self.keys], [dense(v) for v in self.values], self.lengths, self.items,
                       self.timestamps)


# ---------------------------------------------------------------------------------------------- attention


def _attention_spec(layer):
    """(kind, heads, scale, silu norm, bias module) of a model layer, or None for an unknown layer type."""
    from ckv_cli.models.hstu import HSTULayer
    from ckv_cli.models.sasrec import SASRecLayer

    if isinstance(layer, SASRecLayer):
        return SOFTMAX, layer.h, 1.0 / math.sqrt(layer.d_k // layer.h), None, None
    if isinstance(layer, HSTULayer):
        return SILU, layer.h, 1.0, float(layer.max_len), layer.bias
    return None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, L, d = x.shape
    return x.view(B, L, n_heads, d // n_heads).permute(2, 0, 1, 3)  # (H, B, L, dh)


class _ItemLayer:
    """SASRec's first layer over cached tokens whose K/V are a function of (item, position), attended without
    building K/V: K_j = W_k LN(a_i + p_j) + b_k (a = item embedding x sqrt(d), p = position embedding), so
    scores and values go through the item table and the position table as two pools (module docstring).
    Exact up to float rounding: each (item, position)'s mu_j and r_j are tabulated once per model."""

    def __init__(self, tables: dict, model, items: torch.Tensor):
        layer = model.layers[0]
        B, L = items.shape
        pos = torch.arange(L)[None, :].clamp(max=model.config.max_len - 1).expand(B, L)
        i64, p64 = items.long(), pos
        stats = tables["stats"].index_select(0, (i64 * tables["max_len"] + p64).reshape(-1))  # (B*L, 2)
        self.mu, self.r = stats[:, 0].view(B, L), stats[:, 1].view(B, L)
        self.items = CompressedStream(tables["a"], i64)
        self.pos = CompressedStream(tables["p"], p64.contiguous())
        self.h = layer.h
        self.ak, self.ck, self.av, self.cv = tables["ak"], tables["ck"], tables["av"], tables["cv"]

    @staticmethod
    def tables(model) -> dict:
        layer = model.layers[0]
        d, H = model.config.d, layer.h
        a = (model.item_emb.weight * math.sqrt(d)).detach().float().contiguous()  # what `embed` adds, in float32
        p = model.pos_emb.weight.detach().float().contiguous()
        a64, p64 = a.double(), p.double()
        g, beta = layer.ln1.weight.detach(), layer.ln1.bias.detach()

        def fold(lin):  # W diag(gamma) per head (H, dh, d) and the constant W beta + b per head (H, dh)
            w = lin.weight.detach()
            return (w * g[None, :]).view(H, -1, d).contiguous(), (w @ beta + lin.bias.detach()).view(H, -1)

        ak, ck = fold(layer.k)
        av, cv = fold(layer.v)
        # each (item, position)'s LayerNorm mean and 1/sqrt(var + eps), from norms and the item x position Gram
        # matrix in float64: (n_items + 1) * max_len pairs, 8 bytes each (shared, like a pool)
        mu = a64.mean(1)[:, None] + p64.mean(1)[None, :]  # (n + 1, max_len)
        ex2 = ((a64 * a64).sum(1)[:, None] + 2 * (a64 @ p64.T) + (p64 * p64).sum(1)[None, :]) / d
        r = 1.0 / torch.sqrt((ex2 - mu * mu).clamp(min=0) + layer.ln1.eps)
        return {"a": a, "p": p, "max_len": p.shape[0], "stats": torch.stack([mu, r], -1).float().view(-1, 2),
                "ak": ak, "ck": ck, "av": av, "cv": cv}

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


def _cached_scores(side, qh: torch.Tensor, n_heads: int) -> torch.Tensor:
    if isinstance(side, _ItemLayer):
        return side.scores(qh)
    if isinstance(side, CompressedStream):
        H, B, T, _ = qh.shape
        return compressed_scores(qh, side, n_heads, choose_form(side.idx.shape[1], side.pool.shape[0], T, SCORES,
                                                                "cpu", B))
    return qh @ _heads(side, n_heads).transpose(-1, -2)  # (H, B, T, L)


def _cached_values(side, w: torch.Tensor, n_heads: int) -> torch.Tensor:
    if isinstance(side, _ItemLayer):
        return side.values(w)
    if isinstance(side, CompressedStream):
        H, B, T, _ = w.shape
        return compressed_values(w, side, n_heads, choose_form(side.idx.shape[1], side.pool.shape[0], T, VALUES,
                                                               "cpu", B))
    return w @ _heads(side, n_heads)  # (H, B, T, dh)


@torch.no_grad()
def extend_compressed(model, cc: CompressedCache, items: torch.Tensor, timestamps: torch.Tensor,
                      new_lengths: torch.Tensor, item_tables: dict | None = None) -> torch.Tensor:
    """`model.extend` over a compressed cache, returning only the hidden states of the new events (B, T, d): the
    cached side of each layer is attended in its stored form (`CompressedStream`: compressed domain; None for an
    item-id layer: `_ItemLayer` for SASRec, recomputed K/V otherwise; tensors: dense), the new events' own keys
    apart, so nothing is concatenated to the cache (a dense cache is read once, not copied). The caller makes
    sure no user overflows its window."""
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
        kind, H, scale, norm, bias = _attention_spec(layer)
        kc, vc = cc.keys[i], cc.values[i]
        if Lc == 0:  # nothing cached: attend over the new events alone
            kc, vc = k.new_zeros(B, 0, d_k), v.new_zeros(B, 0, d_v)
        if kc is None or vc is None:  # an item-id layer, not recomputed yet
            if kc is None and vc is None and i == 0 and kind == SOFTMAX and item_tables is not None:
                kc = vc = _ItemLayer(item_tables, model, cc.items)
            else:
                pos = torch.arange(Lc)[None].expand(B, Lc)
                rk, rv = item_layer_kv(model, cc.items, pos)
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
    return KVCache([k[idx] for k in cache.keys], [v[idx] for v in cache.values], cache.lengths[idx],
                   cache.items[idx], cache.timestamps[idx])


@torch.no_grad()
def hidden_after(model, cache: KVCache, items: torch.Tensor | None = None, timestamps: torch.Tensor | None = None,
                 new_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden state (B, d) of each user's next-event query from a decoded cache: the last of its new events
    appended through `model.extend`, or without new events the last cached event replayed. Users whose new
    events overflow the window are extended apart from the others (`extend` re-prefills the whole batch it is
    given when one user overflows)."""
    if items is None:
        cache, items, timestamps = rewind(cache)
        new_lengths = torch.ones(len(items), dtype=torch.long)
    if new_lengths is None:
        new_lengths = torch.full((items.shape[0],), items.shape[1], dtype=torch.long)
    over = cache.lengths + new_lengths > model.config.max_len
    if over.any() and not over.all():
        out = None
        for part in (over.nonzero().squeeze(1), (~over).nonzero().squeeze(1)):
            h = hidden_after(model, _select_cache(cache, part), items[part], timestamps[part], new_lengths[part])
            out = h.new_empty(len(over), h.shape[1]) if out is None else out
            out[part] = h
        return out
    _, h = model.extend(cache, items, timestamps, new_lengths)
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


class CacheStore:
    """Users' caches served from an artifact on disk (module docstring). Open with `CacheStore.open`."""

    def __init__(self, artifact: Artifact, mapped: SafetensorsMap | list[SafetensorsMap], model,
                 item_vocab: list[str] | None):
        """`mapped`: the artifact's file, or each shard's (a `ckv_cli.shard.ShardedArtifact`)."""
        self.maps = mapped if isinstance(mapped, list) else [mapped]
        self.artifact, self.mapped, self.model = artifact, self.maps[0], model.eval()
        self.plan: CachePlan = artifact.plan
        self.item_vocab = item_vocab
        self._item_lookup = None
        self._user_ids = list(artifact.user_ids)
        self._lookup = {u: i for i, u in enumerate(self._user_ids)}
        self._overlay: dict[int, dict[str, np.ndarray]] = {}  # user index -> every field of that user
        self._item_tables = None
        self._pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._collective = {n: c for n, c in self.plan.streams.items() if isinstance(c, CollectiveCodec)}

    # -- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, model, checkpoint: str | Path | None = None,
             item_vocab: Sequence[str] | None = None) -> "CacheStore":
        """Open an artifact for the given model: a model object (then `checkpoint`, the file it was loaded from,
        is hashed and checked against the artifact's `checkpoint_sha256` when given, and its item vocabulary
        used), or a checkpoint path (loaded and checked the same way). `path` is one artifact file or the index
        of a sharded one (a `.json` path: each shard is mapped). Refuses, with a CkvError, an artifact
        whose architecture, item count, layers, widths, timestamps or window do not fit the model."""
        from ckv_cli.checkpoint import load_checkpoint, read_metadata

        meta = None
        if isinstance(model, (str, Path)):
            checkpoint = Path(model)
            model, meta = load_checkpoint(checkpoint)
        elif checkpoint is not None:
            meta = read_metadata(checkpoint)
            try:
                meta["item_vocab"] = json.loads(meta["item_vocab"])
            except (ValueError, RecursionError):
                raise CkvError(f"{checkpoint}: corrupted checkpoint metadata: 'item_vocab' is not valid JSON") from None
            _check_weights(model, checkpoint)
        maps: list[SafetensorsMap] = []
        try:
            if is_index(path):
                artifact = ShardedArtifact.open(path)
                parts = artifact.shards
            else:
                parts = [None]
            for part in parts:
                file = path if part is None else part.path
                maps.append(SafetensorsMap(file))
                if part is None:
                    artifact = Artifact.open(path)
                if not maps[-1].same_file():
                    raise CkvError(f"{file}: the file changed while it was being opened")
                for name in list(artifact.fields) + ["users/id_bytes", "users/id_offsets"]:
                    if name not in maps[-1].tensors:
                        raise CkvError(f"{file}: inconsistent artifact (tensor '{name}' is missing)")
            cls._check_model(artifact, model)
            _check_student(artifact, model)
            if next(model.parameters()).device.type != "cpu":
                raise CkvError("the store runs on the CPU: pass the model moved there (model.cpu())")
            if checkpoint is not None:
                from ckv_cli.compare import check_source
                from ckv_cli.data.datasets import sha256_file

                try:
                    digest = sha256_file(Path(checkpoint))
                except OSError as e:
                    raise CkvError(f"cannot read {checkpoint}: {e.strerror or e}") from None
                check_source(artifact, digest)
            vocab = list(item_vocab) if item_vocab is not None else (meta or {}).get("item_vocab")
            if vocab is not None and len(vocab) != model.config.n_items + 1:
                raise CkvError(f"the item vocabulary has {len(vocab):,} entries, the model has "
                               f"{model.config.n_items:,} items (+ 1 for padding)")
        except BaseException:
            for m in maps:
                m.close()
            raise
        return cls(artifact, maps, model, [str(v) for v in vocab] if vocab is not None else None)

    @staticmethod
    def _check_model(artifact: Artifact, model) -> None:
        arch = artifact.meta.get("arch")
        if arch is not None and arch != getattr(model, "arch", None):
            raise CkvError(f"{artifact.path}: made from a {arch} checkpoint, the model is {getattr(model, 'arch', '?')}")
        artifact.check_model(model)
        longest = int(np.diff(artifact.offsets).max()) if artifact.n_users else 0
        if longest > model.config.max_len:
            raise CkvError(f"{artifact.path}: a user has {longest} cached tokens, the model's window is "
                           f"{model.config.max_len}")

    def close(self) -> None:
        for m in self.maps:
            m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- users and items ----------------------------------------------------------------------------------
    @property
    def user_ids(self) -> list[str]:
        return list(self._user_ids)

    def __len__(self) -> int:
        return len(self._user_ids)

    def __contains__(self, user_id) -> bool:
        return str(user_id) in self._lookup

    @property
    def appended_users(self) -> list[str]:
        """Users whose cache differs from the file (appended to since opening)."""
        return [self._user_ids[u] for u in sorted(self._overlay)]

    def index(self, user_ids) -> np.ndarray:
        """Raw user ids (a string or a sequence of them) -> user indices; CkvError naming an unknown user."""
        return user_indices(self._lookup, user_ids, self.artifact.path)

    def item_index(self, items) -> np.ndarray:
        """Items -> indices 1..n_items (same shape): strings are raw ids looked up in the checkpoint's vocabulary,
        integers are taken as indices. CkvError naming an unknown or out-of-range item."""
        if isinstance(items, torch.Tensor):
            items = items.cpu().numpy()
        n = self.plan.n_items
        arr = np.asarray(items) if isinstance(items, np.ndarray) or not _has_str(items) else None
        if arr is not None and arr.dtype.kind in "iu" or (arr is not None and arr.size == 0):
            arr = arr.astype(np.int64)
            if arr.size and (int(arr.min()) < 1 or int(arr.max()) > n):
                bad = arr[(arr < 1) | (arr > n)].ravel()[0]
                raise CkvError(f"item index {int(bad)} is not in 1..{n}")
            return arr
        if arr is not None:
            raise CkvError(f"items must be raw item ids (strings) or item indices (integers), got {arr.dtype}")
        if self.item_vocab is None:
            raise CkvError("raw item ids need the checkpoint's item vocabulary: open the store with a checkpoint "
                           "path or item_vocab, or pass item indices")
        if self._item_lookup is None:
            self._item_lookup = {v: i for i, v in enumerate(self.item_vocab) if i > 0}
        out = []
        for x in items:
            if not isinstance(x, str) or x not in self._item_lookup:
                raise CkvError(f"item {x!r} is not in the checkpoint's item vocabulary")
            out.append(self._item_lookup[x])
        return np.asarray(out, np.int64)

    def item_ids_of(self, indices: np.ndarray) -> list[list[str]] | None:
        if self.item_vocab is None:
            return None
        return [[self.item_vocab[int(i)] for i in row] for row in np.atleast_2d(indices)]

    # -- reading ----------------------------------------------------------------------------------------
    def _read_disk(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if len(self.maps) == 1:
            return self._gather(self.mapped.tensors, self.artifact.offsets, users)
        shards = self.artifact.shards
        return read_by_shard(users, self.artifact.starts,
                             lambda s, local: self._gather(self.maps[s].tensors, shards[s].offsets, local),
                             self.artifact.fields)

    def _gather(self, t: dict[str, np.ndarray], offsets: np.ndarray, users: np.ndarray):
        """Fields and offsets of `users` from one mapped file `t` whose users' tokens are at `offsets`."""
        starts = offsets[users]
        lengths = offsets[users + 1] - starts
        tok = token_index(starts, lengths)
        out = {}
        for name, fm in self.artifact.fields.items():
            if name == "users/offsets":
                continue
            if fm["per"] == "user":
                out[name] = t[name][users]
            elif fm["bits"]:
                out[name] = unpack_at(t[name], tok, fm["bits"])
            else:
                out[name] = t[name][tok]
        return out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def read(self, user_ids) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored fields of a batch of users (token fields concatenated in the order given, per-user fields
        one row per user; bit-packed fields unpacked to int64) and their offsets (B + 1,): appends included."""
        return self._read(self.index(user_ids))

    def _read(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        users = np.asarray(users, np.int64)
        mine = np.fromiter((u in self._overlay for u in users), bool, len(users)) if self._overlay else None
        if mine is None or not mine.any():
            fields, offsets = self._read_disk(users)
        else:
            disk, disk_off = self._read_disk(users[~mine])
            recs = [self._overlay[int(u)] for u in users[mine]]
            lengths = np.concatenate([np.diff(disk_off), [len(r["tokens/items"]) for r in recs]]).astype(np.int64)
            joined = {k: np.concatenate([disk[k]] + [r[k] for r in recs]) for k in disk}
            order = np.empty(len(users), np.int64)  # requested position -> position in [disk users, overlay users]
            order[np.flatnonzero(~mine)] = np.arange(int((~mine).sum()))
            order[np.flatnonzero(mine)] = int((~mine).sum()) + np.arange(len(recs))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[order]
            tok = token_index(starts, lengths[order])
            fields = {k: (v[order] if self.artifact.fields[k]["per"] == "user" else v[tok]) for k, v in joined.items()}
            offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
        self._check_ranges(fields)
        return fields, offsets

    def _check_ranges(self, fields: dict[str, np.ndarray]) -> None:
        for stream, codec in self._collective.items():
            idx = fields[f"{stream}/idx"]
            if len(idx) and int(idx.max()) >= codec.pool_size:
                raise CkvError(f"{self.artifact.path}: {stream} pool index {int(idx.max())} out of range "
                               f"(pool {codec.pool_size})")
        items = fields["tokens/items"]
        if len(items) and int(items.max()) > self.plan.n_items:
            raise CkvError(f"{self.artifact.path}: item id {int(items.max())} out of range ({self.plan.n_items} items)")

    def _item_kv(self, items, pos):
        return item_layer_kv(self.model, items, pos)

    @torch.no_grad()
    def fetch_flat(self, user_ids) -> FlatCache:
        """Decoded caches of a batch of users, flat (`ckv_cli.kv.extract.FlatCache`)."""
        fields, offsets = self.read(user_ids)
        return self._decode(fields, offsets)

    def _decode(self, fields, offsets) -> FlatCache:
        try:
            with np.errstate(all="ignore"):
                return self.plan.decode(fields, offsets, self._item_kv)
        except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as e:
            raise CkvError(f"{self.artifact.path}: cannot decode ({type(e).__name__}: {str(e)[:100]})") from None

    def fetch(self, user_ids) -> KVCache:
        """Decoded caches of a batch of users (raw ids), right-padded, as the model's `extend` takes them."""
        return unflatten(self.fetch_flat(user_ids))

    @torch.no_grad()
    def fetch_compressed(self, user_ids, recompute_items: bool = True) -> CompressedCache:
        """A batch of users' caches in stored form (`CompressedCache`): collective streams as `CompressedStream`s
        (for `ckv_cli.kv.attention.compressed_attention`), the item-id layers recomputed (None with
        `recompute_items=False`), other codecs' streams decoded."""
        return self._compressed(*self._read(self.index(user_ids)), recompute_items)

    def _compressed(self, fields, offsets, recompute_items: bool) -> CompressedCache:
        lengths = torch.from_numpy(np.diff(offsets))
        B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
        slots = (torch.arange(L)[None, :] < lengths[:, None]).view(-1).nonzero().squeeze(1)  # real tokens in (B*L)

        def pad(flat) -> torch.Tensor:  # (N, ...) -> (B, L, ...), zero padding
            x = flat if isinstance(flat, torch.Tensor) else torch.from_numpy(np.asarray(flat, np.int64))
            return x.new_zeros(B * L, *x.shape[1:]).index_copy_(0, slots, x).view(B, L, *x.shape[1:])

        items = pad(fields["tokens/items"])
        ts = pad(fields["tokens/timestamps"]) if self.plan.timestamps else torch.zeros(B, L, dtype=torch.long)
        recomputed = None
        keys, values = [], []
        for layer in range(self.plan.n_layers):
            for kind, dest in (("k", keys), ("v", values)):
                name = CachePlan.key(layer, kind)
                codec = self.plan.streams[name]
                if codec == ITEMS:
                    if recompute_items and recomputed is None:
                        recomputed = item_layer_kv(self.model, items, torch.arange(L)[None].expand(B, L))
                    dest.append(recomputed[0 if kind == "k" else 1] if recompute_items else None)
                elif isinstance(codec, CollectiveCodec):
                    if name not in self._pools:  # the residual form of the pool (folds `concat` once)
                        self._pools[name] = pool_and_basis(codec)
                    pool, basis = self._pools[name]
                    user = None
                    if codec.user_dim:
                        u = (dequantize_per_user(fields[f"{name}/user"], fields[f"{name}/scale"], offsets)
                             if codec.user_dtype == "int8" else torch.from_numpy(fields[f"{name}/user"].astype(np.float32)))
                        user = pad(u)
                    dest.append(CompressedStream(pool, pad(fields[f"{name}/idx"]), user, basis))
                else:
                    sub = {f.name: fields[f"{name}/{f.name}"] for f in codec.fields()}
                    kw = {"items": np.asarray(fields["tokens/items"], np.int64)} if codec.needs_items else {}
                    dest.append(pad(codec.decode(sub, offsets, **kw).float()))
        return CompressedCache(keys, values, lengths, items, ts)

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
    def _hidden(self, users: np.ndarray, new_items, new_timestamps, attention: str):
        """(hidden states (B, d), items each user's ranking excludes (B, L')) for the next event."""
        if attention not in (COMPRESSED, DECODED):
            raise CkvError(f"attention must be '{COMPRESSED}' or '{DECODED}', got {attention!r}")
        items, ts, new_lengths = self._new_events(len(users), new_items, new_timestamps)
        fields, offsets = self._read(users)
        if attention == DECODED:
            cache = unflatten(self._decode(fields, offsets))
            h = hidden_after(self.model, cache, items, ts, new_lengths)
            seen = cache.items
        else:
            cc = self._compressed(fields, offsets, recompute_items=False)
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
                cache = unflatten(self._decode(*self._read(users[part.numpy()])))
                h[part] = hidden_after(self.model, cache, items[part], ts[part], new_lengths[part])
        if items is not None:
            seen = torch.cat([seen, items], dim=1)
        return h, seen

    def _tables(self):
        first = [self.plan.streams[CachePlan.key(0, k)] for k in "kv"]
        if first != [ITEMS, ITEMS] or _attention_spec(self.model.layers[0])[0] != SOFTMAX:
            return None
        if self._item_tables is None:
            with torch.no_grad():
                self._item_tables = _ItemLayer.tables(self.model)
        return self._item_tables

    def rank_next(self, user_ids, new_items=None, new_timestamps=None, k: int = 10, exclude_seen: bool = True,
                  attention: str = COMPRESSED) -> Ranking:
        """Top-k next items of each user from its cache (module docstring): `new_items` (one sequence per user,
        raw ids or indices, with `new_timestamps` for models that read event times) are appended first, without
        being stored. Items of the user's window (cached and new) are excluded as in `ckv_cli.evaluate`
        (`exclude_seen=False` ranks them too)."""
        users = self.index(user_ids)
        n = self.plan.n_items
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise CkvError(f"k must be an integer in 1..{n}, got {k!r}")
        if len(users) == 0:
            empty = np.zeros((0, int(k)))
            return Ranking([], empty.astype(np.int64), self.item_ids_of(empty), empty.astype(np.float32))
        h, seen = self._hidden(users, new_items, new_timestamps, attention)
        with torch.no_grad():
            scores = self.model.score_all(h)
            if exclude_seen:
                scores = mask_seen(scores, seen)
            top = scores.topk(int(k), dim=1)
        idx = top.indices.numpy()
        return Ranking([self._user_ids[u] for u in users], idx, self.item_ids_of(idx), top.values.numpy())

    def score_items(self, user_ids, candidate_items, new_items=None, new_timestamps=None,
                    attention: str = COMPRESSED) -> np.ndarray:
        """Next-item scores (B, C) of candidate items: one list per user (B lists of C), or one list for all.
        Candidates are raw ids or indices and are scored even if seen. (CTR artifacts:
        `ckv_cli.store_ctr.CTRStore.score`.)"""
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
        h, _ = self._hidden(users, new_items, new_timestamps, attention)
        with torch.no_grad():
            return score_candidates(self.model, h, cand).numpy()

    # -- appending ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, user_id: str, items, timestamps=None, create: bool = False) -> None:
        """Append a user's new events (raw item ids or indices, timestamps in seconds) through the model and the
        codec (module docstring for the exact contract). An unknown user is an error unless `create`, which
        starts the user from an empty cache."""
        uid = str(user_id)
        if isinstance(items, str):
            items = [items]
        if uid not in self._lookup:
            if not create:
                raise CkvError(f"user '{uid}' is not in {self.artifact.path} (create=True adds a new user)")
            u = None
        else:
            u = self._lookup[uid]
        new_items, new_ts, _ = self._new_events(1, [items], None if timestamps is None else [timestamps])
        if u is None:
            cache = self.model.empty_cache(1)
            old, old_off = None, np.array([0, 0])
        else:
            old, old_off = self._read(np.array([u]))
            cache = unflatten(self._decode(old, old_off))
        n_old, T = int(cache.lengths[0]), new_items.shape[1]
        new_cache, _ = self.model.extend(cache, new_items, new_ts)
        flat = flatten(new_cache)
        if old is None or n_old + T > self.model.config.max_len:
            record = self._encode(flat)  # new user, or the window slid: the whole (re-prefilled) user
        else:
            record = self._merge(old, flat, n_old)
        if u is None:
            u = len(self._user_ids)
            self._user_ids.append(uid)
            self._lookup[uid] = u
        self._overlay[u] = record

    def _encode(self, flat: FlatCache) -> dict[str, np.ndarray]:
        enc = self.plan.encode(flat)
        return {k: self._as_stored(k, v) for k, v in enc.items()}

    def _as_stored(self, name: str, v: np.ndarray) -> np.ndarray:
        """A freshly encoded field in the dtype and shape a read returns (packed fields as int64)."""
        fm = self.artifact.fields[name]
        if fm["bits"]:
            return np.asarray(v, np.int64)
        v = np.asarray(v, dtype=fm["dtype"])
        return v.reshape(-1) if name.startswith("tokens/") else v.reshape(len(v), fm["width"])

    def _merge(self, old: dict[str, np.ndarray], flat: FlatCache, n_old: int) -> dict[str, np.ndarray]:
        """The user's record with the new tokens [n_old, N) of `flat` appended (no overflow)."""
        n = int(flat.offsets[-1])
        new = FlatCache(np.array([0, n - n_old]), [k[n_old:] for k in flat.keys], [v[n_old:] for v in flat.values],
                        flat.items[n_old:], flat.timestamps[n_old:])
        out = {"tokens/items": np.concatenate([old["tokens/items"], new.items.astype(np.int64)])}
        if self.plan.timestamps:
            out["tokens/timestamps"] = np.concatenate([old["tokens/timestamps"], self._checked_timestamps(new.timestamps)])
        for name, codec in self.plan.streams.items():
            if codec == ITEMS:
                continue
            names = [f"{name}/{f.name}" for f in codec.fields()]
            kw = {"items": new.items} if codec.needs_items else {}
            if not any(f.per == "user" for f in codec.fields()) and getattr(codec, "axis", "token") != "channel":
                enc = codec.encode(new.stream(name), new.offsets, **kw)  # token-local: old tokens kept as they are
                for f in codec.fields():
                    out[f"{name}/{f.name}"] = np.concatenate([old[f"{name}/{f.name}"],
                                                              self._as_stored(f"{name}/{f.name}", enc[f.name])])
            elif isinstance(codec, CollectiveCodec) and codec.user_dtype == "int8":
                out.update(self._merge_int8(name, codec, old, new.stream(name)))
            else:  # per-user state: re-encode the user's stream from the decoded old vectors and the new ones
                kw = {"items": flat.items} if codec.needs_items else {}
                enc = codec.encode(flat.stream(name), flat.offsets, **kw)
                out.update({n_: self._as_stored(n_, enc[n_.split("/", 1)[1]]) for n_ in names})
        return out

    @staticmethod
    def _checked_timestamps(ts: np.ndarray) -> np.ndarray:
        if len(ts) and (int(ts.min()) < -(2**31) or int(ts.max()) >= 2**31):
            raise CkvError("timestamps must fit in int32 (seconds)")
        return ts.astype(np.int32)

    def _merge_int8(self, name: str, codec: CollectiveCodec, old: dict, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Collective with an int8 user part: new indices from the router; the new user values at the user's
        stored scale when they fit under it (old tokens unchanged), else the user's part requantised."""
        z = codec._coords(x)
        if codec.layout == "concat":
            idx = codec._route(z[:, codec.pool_coords])
            u = z[:, codec.user_coords]
        else:
            idx = codec._route(z)
            u = (z - codec.pool[idx]) @ codec.basis  # (T, r)
        scale = old[f"{name}/scale"].astype(np.float32)  # (1, 1)
        q = torch.round(u / float(scale[0, 0]))
        if float(q.abs().max()) <= 127:
            user, new_scale = np.concatenate([old[f"{name}/user"], q.to(torch.int8).numpy()]), old[f"{name}/scale"]
        else:
            u_all = torch.cat([torch.from_numpy(old[f"{name}/user"].astype(np.float32) * scale[0, 0]), u])
            user, new_scale = quantize_per_user(u_all, np.array([0, len(u_all)]))
        return {f"{name}/idx": np.concatenate([old[f"{name}/idx"], idx.numpy().astype(np.int64)]),
                f"{name}/user": user, f"{name}/scale": np.asarray(new_scale, np.float16).reshape(1, 1)}

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> dict[str, int]:
        """Write a new artifact: every user (the file's, then those created by `append`) with the appends merged,
        atomically (temporary file, then rename). The metadata is the source's, with the byte accounting redone
        and an `appended` entry (users, the source file); the metrics stay those measured when the source was
        compressed. Returns bytes per tensor."""
        from ckv_cli.compress import accounting

        fields, offsets = self._read(np.arange(len(self._user_ids)))
        meta = {k: v for k, v in self.artifact.meta.items() if k not in WRITTEN_BY_WRITER}
        meta["accounting"] = accounting(self.plan, offsets, self.model.kv_dims, len(self.model.layers))
        meta["appended"] = {"users": self.appended_users, "source": str(self.artifact.path),
                            "source_checksums_sha256": _digest(self.artifact.meta.get("checksums", {}))}
        return write_artifact(path, self.plan, fields, offsets, self._user_ids, meta, force=force)


def _check_student(artifact, model) -> None:
    """Refuse to read an artifact of `ckv compress --finetune` with any model but its fine-tuned student (the
    teacher's weights read it differently from what was measured): the artifact keeps the student's weights
    digest."""
    want = artifact.meta.get("student_weights_sha256")
    if want is None:
        return
    from ckv_cli.compress import weights_sha256

    if weights_sha256(model) != want:
        name = artifact.meta.get("student_checkpoint", "its student checkpoint")
        raise CkvError(f"{artifact.path} is read by the fine-tuned student {name}: open it with that checkpoint's "
                       "model, not the teacher's or another")


def user_indices(lookup: dict[str, int], user_ids, where) -> np.ndarray:
    """Raw user ids (one, or a sequence of them) -> indices through `lookup`; CkvError naming an unknown user and
    `where` (the artifact) it is missing from."""
    if isinstance(user_ids, (str, bytes, int, np.integer)) or not isinstance(user_ids, (Sequence, np.ndarray)):
        user_ids = [user_ids]
    out = np.empty(len(user_ids), np.int64)
    for j, u in enumerate(user_ids):
        key = u.decode() if isinstance(u, bytes) else str(u)
        if key not in lookup:
            raise CkvError(f"user '{key}' is not in {where}")
        out[j] = lookup[key]
    return out


def _check_weights(model, checkpoint) -> None:
    """Refuse a model object whose weights are not the checkpoint file's (the artifact's sha256 names the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(checkpoint))
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{checkpoint}: cannot load checkpoint ({str(e).splitlines()[0][:120]})") from None
    mine = model.state_dict()
    if set(state) != set(mine) or any(state[k].shape != mine[k].shape or not torch.equal(state[k], mine[k].detach().cpu())
                                       for k in mine):
        raise CkvError(f"the model's weights are not those of {checkpoint}")


def _has_str(items) -> bool:
    return any(isinstance(x, str) for x in items) if isinstance(items, (list, tuple)) else isinstance(items, str)


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _select_compressed(cc: CompressedCache, idx: torch.Tensor) -> CompressedCache:
    def sel(x):
        if x is None:
            return None
        if isinstance(x, CompressedStream):
            return CompressedStream(x.pool, x.idx[idx], None if x.user is None else x.user[idx], x.basis)
        return x[idx]

    return CompressedCache([sel(k) for k in cc.keys], [sel(v) for v in cc.values], cc.lengths[idx], cc.items[idx],
                           cc.timestamps[idx])


__all__ = ["CacheStore", "CompressedCache", "Ranking", "SafetensorsMap", "extend_compressed", "hidden_after",
           "parse_header", "replay_hidden", "rewind", "score_candidates", "token_index", "unpack_at"]
