"""A cache plan: which codec stores each cached stream (layer l's K or V), and the per-token bookkeeping
(item ids, timestamps) every compressed cache keeps.

A stream whose K/V are an exact function of (item, position) — a first attention layer — can be marked
`items`: nothing is stored for it, the reader recomputes it from the item ids through a callable the caller
supplies (the plan never sees the model). Item ids are stored for every token in any case (bit-packed):
they let a cache be re-encoded or its window slid, and they are counted in the per-user bytes.

An evicting codec (`evict`) drops tokens: the plan decides once per token which are kept (`keep_mask`, one
decision for every layer, K and V), hands the mask to every evict stream, zeroes the dropped tokens of `items`
streams, stores the mask when it is not known from the per-user counts (`tokens/keep`, 1 bit per token) and
returns it with the decoded cache (`FlatCache.keep`), where attention reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec
from ckv_cli.codecs.bits import bits_for
from ckv_cli.codecs.evict import EvictCodec, kept_counts
from ckv_cli.errors import CkvError
from ckv_cli.kv.extract import FlatCache

ITEMS = "items"  # plan entry: recompute from item ids


def _items(codec: StreamCodec, items: np.ndarray) -> dict:
    """The item ids as a keyword for codecs that read them (`needs_items`), nothing for the others."""
    return {"items": items} if codec.needs_items else {}


def _keep(codec: StreamCodec, keep: np.ndarray | None) -> dict:
    """The plan's keep mask as a keyword for evicting codecs (`needs_keep`), nothing for the others."""
    return {"keep": keep} if codec.needs_keep else {}


@dataclass
class CachePlan:
    n_layers: int
    streams: dict[str, StreamCodec | str]  # "L0.k" -> codec, or ITEMS
    n_items: int
    timestamps: bool  # the model's attention reads event times (HSTU)

    def __post_init__(self):
        params = {(c.keep, c.policy) for c in self.streams.values() if isinstance(c, EvictCodec)}
        if len(params) > 1:
            raise CkvError("every evict stream of a plan must have the same keep and policy (one decision per token)")

    @staticmethod
    def key(layer: int, kind: str) -> str:
        return f"L{layer}.{kind}"

    @property
    def evictor(self) -> tuple[int, EvictCodec] | None:
        """(layer, codec) of the first layer with an evict stream (whose keys the key-norm rules read), or None."""
        for layer in range(self.n_layers):
            for kind in ("k", "v"):
                codec = self.streams.get(self.key(layer, kind))
                if isinstance(codec, EvictCodec):
                    return layer, codec
        return None

    def keep_mask(self, flat: FlatCache) -> np.ndarray | None:
        """Which tokens the plan keeps (N,) bool, one decision per token for every stream; None without eviction."""
        ev = self.evictor
        return None if ev is None else ev[1].select(flat.keys[ev[0]], flat.offsets)

    def kept_tokens(self, offsets: np.ndarray) -> int:
        """Tokens kept over the users of `offsets` (every token without eviction): the rows of `kept` fields."""
        lengths = np.diff(offsets)
        ev = self.evictor
        return int(lengths.sum() if ev is None else kept_counts(lengths, ev[1].keep).sum())

    def fields(self) -> dict[str, Field]:
        """Every stored array, by artifact name."""
        out = {"tokens/items": Field("items", "token", bits=bits_for(self.n_items + 1)),
               "users/offsets": Field("offsets", "user", dtype="int64")}
        if self.timestamps:
            out["tokens/timestamps"] = Field("timestamps", "token", dtype="int32")
        ev = self.evictor
        if ev is not None and ev[1].stores_flags:
            out["tokens/keep"] = Field("keep", "token", bits=1)
        for name, codec in self.streams.items():
            if codec != ITEMS:
                for f in codec.fields():
                    out[f"{name}/{f.name}"] = f
        return out

    def fit(self, flat: FlatCache, seed: int, progress: Callable[[str], None] | None = None) -> None:
        for i, (name, codec) in enumerate(self.streams.items()):
            if codec == ITEMS:
                continue
            if progress:
                progress(name)
            try:
                codec.fit(flat.stream(name), seed + i, **_items(codec, flat.items))
            except CkvError as e:  # say which stream was refused
                raise CkvError(f"{name}: {e}", e.exit_code) from None

    def encode(self, flat: FlatCache) -> dict[str, np.ndarray]:
        out = {"tokens/items": flat.items.astype(np.uint32)}
        if self.timestamps:
            ts = flat.timestamps
            if len(ts) and (int(ts.min()) < -(2**31) or int(ts.max()) >= 2**31):  # astype would wrap silently
                raise CkvError(f"timestamps {int(ts.min())}..{int(ts.max())} do not fit the artifact's int32 field "
                               "(seconds expected; divide millisecond timestamps by 1000)")
            out["tokens/timestamps"] = ts.astype(np.int32)
        keep = self.keep_mask(flat)
        if keep is not None and self.evictor[1].stores_flags:
            out["tokens/keep"] = keep.astype(np.uint8)
        for name, codec in self.streams.items():
            if codec != ITEMS:
                for fname, arr in codec.encode(flat.stream(name), flat.offsets, **_items(codec, flat.items),
                                               **_keep(codec, keep)).items():
                    out[f"{name}/{fname}"] = arr
        return out

    def decode(self, fields: dict[str, np.ndarray], offsets: np.ndarray,
               item_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> FlatCache:
        """Fields of a batch of users (token fields concatenated in user order) -> their flat cache.
        `item_kv(items (B, L), positions (B, L))` recomputes the K/V of `items` streams."""
        items = np.asarray(fields["tokens/items"], dtype=np.int64)
        ts = np.asarray(fields["tokens/timestamps"], dtype=np.int64) if self.timestamps else np.zeros_like(items)
        ev = self.evictor
        keep = None if ev is None else (np.asarray(fields["tokens/keep"], dtype=bool) if ev[1].stores_flags
                                        else ev[1].select(None, offsets))
        keys, values = [], []
        recomputed = None
        for layer in range(self.n_layers):
            for kind, dest in (("k", keys), ("v", values)):
                name = self.key(layer, kind)
                codec = self.streams[name]
                if codec == ITEMS:
                    if recomputed is None:
                        recomputed = self._recompute(items, offsets, item_kv)
                        if keep is not None:  # dropped tokens decode as zeros in every stream
                            drop = torch.from_numpy(~keep)
                            recomputed = tuple(x.masked_fill(drop[:, None], 0.0) for x in recomputed)
                    dest.append(recomputed[0 if kind == "k" else 1])
                else:
                    sub = {f.name: fields[f"{name}/{f.name}"] for f in codec.fields()}
                    dest.append(codec.decode(sub, offsets, **_items(codec, items), **_keep(codec, keep)))
        return FlatCache(offsets, keys, values, items, ts, keep)

    @staticmethod
    @torch.no_grad()
    def _recompute(items: np.ndarray, offsets: np.ndarray, item_kv) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = np.diff(offsets)
        B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
        pos = torch.arange(L)[None, :].expand(B, L)
        valid = pos < torch.from_numpy(lengths)[:, None]
        padded = torch.zeros(B, L, dtype=torch.long)
        padded[valid] = torch.from_numpy(items)
        k, v = item_kv(padded, pos)
        return k[valid], v[valid]

    def describe(self) -> dict:
        """JSON-able: enough to rebuild the plan from an artifact's metadata."""
        return {"n_layers": self.n_layers, "n_items": self.n_items, "timestamps": self.timestamps,
                "streams": {n: (ITEMS if c == ITEMS else {"codec": c.name, "params": c.params()})
                            for n, c in self.streams.items()}}
