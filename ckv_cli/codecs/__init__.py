"""Codecs: one class per compression method, registered by name (`registry`). `build_plan` turns a codec name, its
options and a model's declared cache (`ckv_cli.spec.CacheSpec`) into a `CachePlan`; `plan_from_description`
rebuilds one from an artifact."""
from __future__ import annotations

from ckv_cli.codecs.base import Field, StreamCodec
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.evict import EvictCodec
from ckv_cli.codecs.itemid import ItemIdCodec
from ckv_cli.codecs.kivi import Int4Codec, Int8Codec
from ckv_cli.codecs.lowrank import LowRankCodec
from ckv_cli.codecs.plain import Bf16Codec, PlainCodec
from ckv_cli.codecs.plan import (EVENTID, RECOMPUTE, CachePlan, build_plan, make_codec, plan_from_description,
                                 recomputed)
from ckv_cli.codecs.pq import PQCodec
from ckv_cli.codecs.recompute import RecomputeCodec
from ckv_cli.codecs.registry import registry

REGISTRY = registry()

__all__ = ["EVENTID", "RECOMPUTE", "REGISTRY", "Bf16Codec", "CachePlan", "CollectiveCodec", "EvictCodec", "Field",
           "Int4Codec", "Int8Codec", "ItemIdCodec", "LowRankCodec", "PQCodec", "PlainCodec", "RecomputeCodec",
           "StreamCodec", "build_plan", "make_codec", "plan_from_description", "recomputed", "registry"]
