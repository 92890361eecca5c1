"""Codecs: one class per compression method, registered by name. `build_plan` turns a codec name, its
options and the model's cache shape into a `CachePlan`; `plan_from_description` rebuilds one from an artifact."""
from __future__ import annotations

from ckv_cli.codecs.base import Field, StreamCodec
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.plain import PlainCodec
from ckv_cli.codecs.plan import ITEMS, CachePlan
from ckv_cli.errors import CkvError

REGISTRY: dict[str, type[StreamCodec]] = {c.name: c for c in (CollectiveCodec, PlainCodec)}


def make_codec(name: str, d: int, params: dict) -> StreamCodec:
    if name not in REGISTRY:
        raise CkvError(f"unknown codec '{name}' (known: {', '.join(sorted(REGISTRY))})")
    try:
        return REGISTRY[name](d=d, **params)
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
    streams = {}
    for layer in range(n_layers):
        for kind, d in (("k", d_k), ("v", d_v)):
            key = CachePlan.key(layer, kind)
            if recompute_item_layers and layer in item_layers:
                streams[key] = ITEMS
            elif kind in share:
                streams[key] = make_codec(name, d, params)
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


__all__ = ["ITEMS", "REGISTRY", "CachePlan", "CollectiveCodec", "Field", "PlainCodec", "StreamCodec",
           "build_plan", "make_codec", "plan_from_description"]
