"""Recompute from ids: store nothing for a stream that is an exact function of ids every token keeps anyway.

NOTES §3: a first self-attention layer's K/V are a function of (item, position); every stream of the
target-attention CTR models (SIM, ETA, SDIM, TWIN, and so CollectiveKV's own models, arXiv 2601.19178) is a
function of the event (item, rating bucket, gap bucket). Storing those ids and recomputing is lossless, and is the
baseline any pool must beat. The plan stores the ids the stream is a function of (the model declares them:
`ckv_cli.spec.Stream.from_ids`) and asks the model reading the cache to recompute the stream; this codec never
sees the model and stores no field. `eventid` (every stream of a CTR model recomputed) is the same codec.
"""
from __future__ import annotations

from ckv_cli.codecs.base import StreamCodec
from ckv_cli.errors import CkvError


class RecomputeCodec(StreamCodec):
    """Nothing stored: the reader recomputes the stream from the token's stored ids (`CachePlan.decode`)."""

    name = "recompute"

    def __init__(self, d: int | None = None):
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise CkvError(f"d must be an integer >= 1, got {d!r}")
        self.d = d  # None where a description gives no width (the model's width is used)

    def params(self) -> dict:
        return {} if self.d is None else {"d": self.d}

    def fit(self, x, seed):
        pass

    def fields(self):
        return []

    def encode(self, x, user_offsets):
        return {}

    def decode(self, fields, user_offsets):
        raise CkvError("internal: a recomputed stream is decoded by the plan, through the model")
