"""Codecs: one class per compression method, registered by name. `build_plan` turns a codec name, its
options and the model's cache shape into a `CachePlan`; `plan_from_description` rebuilds one from an artifact."""
from __future__ import annotations

from ckv_cli.codecs.base import Field, StreamCodec
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.evict import EvictCodec
from ckv_cli.codecs.itemid import ItemIdCodec
from ckv_cli.codecs.kivi import Int4Codec, Int8Codec
from ckv_cli.codecs.lowrank import LowRankCodec
from ckv_cli.codecs.plain import Bf16Codec, PlainCodec
from ckv_cli.codecs.plan import ITEMS, CachePlan
from ckv_cli.codecs.pq import PQCodec
from ckv_cli.errors import CkvError

REGISTRY: dict[str, type[StreamCodec]] = {c.name: c for c in (CollectiveCodec, PlainCodec, Bf16Codec, Int8Codec,
                                                               Int4Codec, LowRankCodec, PQCodec, ItemIdCodec,
                                                               EvictCodec)}


def make_codec(name: str, d: int, params: dict, kind: str = "") -> StreamCodec:
    """`kind` ('k' or 'v') adds the codec's defaults for that stream kind under `params`."""
    if name not in REGISTRY:
        raise CkvError(f"unknown codec '{name}' (known: {', '.join(sorted(REGISTRY))})")
    try:
        return REGISTRY[name](d=d, **{**REGISTRY[name].stream_defaults.get(kind, {}), **params})
    except TypeError as e:
        raise CkvError(f"bad parameters for codec '{name}': {e}") from None


def build_plan(name: str, params: dict, *, n_layers: int, d_k: int, d_v: int, n_items: int, timestamps: bool,
               item_layers: tuple[int, ...] = (0,), share: tuple[str, ...] = ("k", "v"),
               recompute_item_layers: bool = True) -> CachePlan:
    """Every stream of every layer gets `name`, except item-function layers (recomputed from item ids when
    `recompute_item_layers`) and kinds left out of `share` (kept at fp16)."""
    bad = set(share) - {"k", "v"}
    if bad or not share:
        raise CkvError(f"--share takes k, v or k,v (got {','.join(share) or 'nothing'})")
    if name not in REGISTRY:  # refused even when no stream would use it (a one-layer model, recomputed)
        raise CkvError(f"unknown codec '{name}' (known: {', '.join(sorted(REGISTRY))})")
    streams = {}
    for layer in range(n_layers):
        for kind, d in (("k", d_k), ("v", d_v)):
            key = CachePlan.key(layer, kind)
            if recompute_item_layers and layer in item_layers:
                streams[key] = ITEMS
            elif kind in share:
                streams[key] = make_codec(name, d, params, kind)
            else:
                streams[key] = PlainCodec(d=d, dtype="float16")
    return CachePlan(n_layers, streams, n_items, timestamps)


def plan_from_description(desc: dict) -> CachePlan:
    streams = {}
    for key, entry in desc["streams"].items():
        if entry == ITEMS:
            streams[key] = ITEMS
        else:
            params = dict(entry["params"])
            d = params.pop("d")
            streams[key] = make_codec(entry["codec"], d, params)
    return CachePlan(int(desc["n_layers"]), streams, int(desc["n_items"]), bool(desc["timestamps"]))


__all__ = ["ITEMS", "REGISTRY", "Bf16Codec", "CachePlan", "CollectiveCodec", "EvictCodec", "Field", "Int4Codec", "Int8Codec",
           "ItemIdCodec", "LowRankCodec", "PQCodec", "PlainCodec", "StreamCodec", "build_plan", "make_codec",
           "plan_from_description"]
