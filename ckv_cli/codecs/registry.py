"""The codec registry: every compression method by name (adding a codec touches its own file and this list)."""
from __future__ import annotations

from ckv_cli.codecs.base import StreamCodec


def registry() -> dict[str, type[StreamCodec]]:
    from ckv_cli.codecs.collective import CollectiveCodec
    from ckv_cli.codecs.evict import EvictCodec
    from ckv_cli.codecs.itemid import ItemIdCodec
    from ckv_cli.codecs.kivi import Int4Codec, Int8Codec
    from ckv_cli.codecs.lowrank import LowRankCodec
    from ckv_cli.codecs.plain import Bf16Codec, PlainCodec
    from ckv_cli.codecs.pq import PQCodec
    from ckv_cli.codecs.predictive import PredictiveCodec
    from ckv_cli.codecs.recompute import RecomputeCodec

    return {c.name: c for c in (CollectiveCodec, PlainCodec, Bf16Codec, Int8Codec, Int4Codec, LowRankCodec, PQCodec,
                                ItemIdCodec, EvictCodec, RecomputeCodec, PredictiveCodec)}
