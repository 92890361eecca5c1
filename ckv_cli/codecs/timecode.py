"""Event times stored at the width the attention reads them (HSTU, Zhai et al., ICML 2024: its relative bias reads
w_time[bucket(|t_q - t_k|)], bucket(gap) = floor(log1p(gap) / 0.301) capped at `max_bucket`).

A query always comes after every cached event, so what a cached token's time contributes is its gap to the
queries to come: t_q - t_k = (t_q - t_a) + (t_a - t_k) with t_a the user's newest cached event (the anchor).
Per user the anchor is stored exactly (int32 seconds, as the timestamps it replaces); per token only the bucket
of its gap to the anchor, merged into `2**bits` intervals of buckets, and the reader rebuilds a representative
time t_a - g(interval).

The intervals and their representative gaps are fitted on the calibration tokens to minimise the expected squared
error of the bias values the queries to come will read: sum over tokens and over query delays d of
|w(bucket(d + g)) - w(bucket(d + rep))|^2, where w(b) stacks the model's time-bias values of bucket b over layers
(`weights`, (L, max_bucket + 1); without them w(b) = b: the squared bucket error), g is the token's gap to its
anchor and rep the representative gap of its interval. The delays d are the quantiles of the gaps between
consecutive calibration events (how long after the newest event the next one comes; 0 among them when events
share a second). Intervals are contiguous runs of anchor-gap buckets chosen by dynamic programming; candidate
representatives are whole-second gaps at a quarter, half and three quarters of each bucket (log scale). Buckets
where the bias is flat merge for free; where it varies they stay apart.

The plan stores it in place of int32 timestamps when given `time_bits` (a parameter: `--param time_bits=4`);
the bias tables come from the model (`time_bias_tables()`, HSTU). In an artifact: per token `time/code`, per user
`time/anchor`, shared `shared/time/bounds` (int16) and `shared/time/gaps` (int64). A store's append re-anchors a
user on its newest event and codes the old tokens' representative times again (`ckv_cli.serve.store`).
"""
from __future__ import annotations


import numpy as np
import torch

from ckv_cli.codecs.base import Field, check_positive_int
from ckv_cli.errors import CkvError

LOG_STEP = 0.301  # HSTU's bucket width in log1p(seconds)


def gap_bucket(gap: np.ndarray, max_bucket: int) -> np.ndarray:
    """HSTU's bucket of non-negative gaps (seconds): floor(log1p(gap) / 0.301), capped at `max_bucket`."""
    return np.clip(np.floor(np.log1p(np.asarray(gap, np.float64).clip(min=0)) / LOG_STEP), 0, max_bucket).astype(np.int64)


def anchors_and_gaps(timestamps: np.ndarray, user_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anchor per user (U,), gap of each token to its user's anchor (N,)); an empty user's anchor is 0."""
    ts = np.asarray(timestamps, np.int64)
    lengths = np.diff(user_offsets)
    last = np.maximum(user_offsets[1:] - user_offsets[0] - 1, 0)
    anchor = np.where(lengths > 0, ts[last] if len(ts) else 0, 0).astype(np.int64)
    gaps = np.repeat(anchor, lengths) - ts
    if len(gaps) and gaps.min() < 0:  # anchor = the newest event only when each user's events are time-sorted
        anchor = np.zeros(len(lengths), np.int64)
        np.maximum.at(anchor, np.repeat(np.arange(len(lengths)), lengths), ts)
        gaps = np.repeat(anchor, lengths) - ts
    return anchor, gaps


def candidate_gaps(max_bucket: int) -> np.ndarray:
    """Whole-second gaps at 1/4, 1/2 and 3/4 of each bucket 0..max_bucket (log scale) and 0, deduplicated: the
    representatives an interval may take."""
    b = np.arange(max_bucket + 1, dtype=np.float64)
    cands = np.round(np.expm1((b[:, None] + np.array([0.25, 0.5, 0.75])[None]) * LOG_STEP)).reshape(-1)
    cands = np.unique(np.concatenate([[0.0], cands]))
    return cands[gap_bucket(cands, 1 << 30) <= max_bucket].astype(np.int64)


def query_delays(timestamps: np.ndarray, user_offsets: np.ndarray, n: int = 32) -> np.ndarray:
    """`n` quantiles of the gaps between consecutive events of the same user (seconds, >= 0): how long after a
    user's newest event the next query comes, as these users behaved."""
    ts = np.asarray(timestamps, np.int64)
    same = np.ones(len(ts), bool)
    same[np.asarray(user_offsets[:-1], np.int64) - user_offsets[0]] = False  # the first token of each user
    diffs = np.diff(ts, prepend=ts[:1] if len(ts) else ts)[same[: len(ts)]].clip(min=0)
    if not len(diffs):
        return np.zeros(1, np.int64)
    return np.quantile(diffs, (np.arange(n) + 0.5) / n, method="nearest").astype(np.int64)


def fit_intervals(gaps: np.ndarray, delays: np.ndarray, weights: np.ndarray, levels: int, max_bucket: int,
                  max_tokens: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    """(bounds (K + 1,) over anchor-gap buckets, representative gap (K,) in seconds), K <= levels, minimising
    sum over tokens and delays of |w(bucket(d + g)) - w(bucket(d + rep))|^2 (module docstring)."""
    nb = max_bucket + 1
    g = np.asarray(gaps, np.int64)
    if len(g) > max_tokens:  # an even, deterministic subsample
        g = g[np.linspace(0, len(g) - 1, max_tokens).astype(np.int64)]
    cands = candidate_gaps(max_bucket)  # (R,)
    cand_bucket = gap_bucket(cands, max_bucket)
    sq = ((weights[:, :, None] - weights[:, None, :]) ** 2).sum(0)  # (B, B): bucket b read as bucket r
    # tokens that read the same buckets under every delay, from the same anchor bucket, cost the same: group them
    key = np.vstack([gap_bucket(g, max_bucket)[None], gap_bucket(delays[:, None] + g[None], max_bucket)])  # (1 + D, T)
    rows, counts = np.unique(key.T, axis=0, return_counts=True)  # (U, 1 + D), (U,)
    cost_tb = np.zeros((nb, len(cands)))  # summed over the tokens of each anchor bucket, per candidate
    for j, c in enumerate(cands):
        err = sq[rows[:, 1:], gap_bucket(delays + c, max_bucket)[None]].sum(1)  # (U,)
        cost_tb[:, j] = np.bincount(rows[:, 0], weights=err * counts, minlength=nb)
    cum = np.vstack([np.zeros((1, len(cands))), np.cumsum(cost_tb, 0)])  # (B + 1, R)
    cost = np.full((nb + 1, nb + 1), np.inf)
    rep = np.zeros((nb + 1, nb + 1), np.int64)
    for a in range(nb):
        for e in range(a + 1, nb + 1):
            inside = np.nonzero((cand_bucket >= a) & (cand_bucket < e))[0]
            if not len(inside):
                continue
            c = cum[e, inside] - cum[a, inside]
            k = int(c.argmin())
            cost[a, e], rep[a, e] = c[k], inside[k]
    levels = min(levels, nb)
    best = np.full((levels + 1, nb + 1), np.inf)
    arg = np.zeros((levels + 1, nb + 1), np.int64)
    best[0, 0] = 0.0
    for k in range(1, levels + 1):
        for e in range(1, nb + 1):
            cand = best[k - 1, :e] + cost[:e, e]
            arg[k, e] = int(cand.argmin())
            best[k, e] = cand[arg[k, e]]
    least = best[1:, nb].min()
    k = int(np.nonzero(best[1:, nb] <= least + 1e-12 * max(1.0, least))[0].max()) + 1  # ties: more intervals
    bounds, e = [nb], nb
    for level in range(k, 0, -1):
        e = int(arg[level, e])
        bounds.append(e)
    bounds = np.array(bounds[::-1], np.int64)
    reps = np.array([cands[rep[bounds[i], bounds[i + 1]]] for i in range(k)], np.int64)
    return bounds, reps


class BucketTimeCodec:
    """Per-token event times at `bits` bits (interval of the anchor-gap bucket) + one exact anchor per user."""

    name = "bucket"

    def __init__(self, bits: int = 4, max_bucket: int = 128):
        self.bits = check_positive_int("time bits", bits, 1)
        if self.bits > 16:
            raise CkvError(f"time bits must be at most 16, got {bits}")
        self.max_bucket = check_positive_int("max bucket", max_bucket, 1)
        self.bounds = self.gaps = None  # (K + 1,) bucket bounds, (K,) representative gaps

    def params(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "max_bucket": self.max_bucket}

    def fit(self, timestamps: np.ndarray, user_offsets: np.ndarray, weights: np.ndarray | None = None) -> None:
        _, gaps = anchors_and_gaps(timestamps, user_offsets)
        nb = self.max_bucket + 1
        w = np.arange(nb, dtype=np.float64)[None] if weights is None else np.asarray(weights, np.float64)
        if w.ndim != 2 or w.shape[1] != nb:
            raise CkvError(f"time-bias weights must have shape (layers, {nb}), got {tuple(w.shape)}")
        self.bounds, self.gaps = fit_intervals(gaps, query_delays(timestamps, user_offsets), w, 1 << self.bits,
                                               self.max_bucket)

    def fields(self) -> list[Field]:
        return [Field("code", "token", bits=self.bits), Field("anchor", "user", dtype="int32")]

    def encode(self, timestamps: np.ndarray, user_offsets: np.ndarray) -> dict[str, np.ndarray]:
        if self.bounds is None:
            raise CkvError("time codec used before fit or load")
        anchor, gaps = anchors_and_gaps(timestamps, user_offsets)
        code = np.searchsorted(self.bounds, gap_bucket(gaps, self.max_bucket), side="right") - 1
        return {"code": code.astype(np.uint32), "anchor": anchor.astype(np.int32)[:, None]}

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> np.ndarray:
        """(N,) representative timestamps: anchor - representative gap of the token's interval."""
        if self.gaps is None:
            raise CkvError("time codec used before fit or load")
        code = np.asarray(fields["code"], np.int64)
        if len(code) and int(code.max()) >= len(self.gaps):
            raise CkvError(f"time code {int(code.max())} past the {len(self.gaps)} intervals")
        anchor = np.asarray(fields["anchor"], np.int64).reshape(-1)
        return np.repeat(anchor, np.diff(user_offsets)) - self.gaps[code]

    def shared(self) -> dict[str, torch.Tensor]:
        return {"bounds": torch.from_numpy(self.bounds.astype(np.int16)), "gaps": torch.from_numpy(self.gaps)}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        """Checked: 1..2**bits intervals, bounds rising from bucket 0 to max_bucket + 1, gaps in 0..2**31 - 1."""
        bounds, gaps = shared["bounds"], shared["gaps"]
        if bounds.dim() != 1 or gaps.dim() != 1 or not 1 <= len(gaps) <= 1 << self.bits or len(bounds) != len(gaps) + 1:
            raise CkvError(f"time codec: bounds {list(bounds.shape)} and gaps {list(gaps.shape)} are not K + 1 and K "
                           f"intervals, K <= {1 << self.bits}")
        b, g = bounds.numpy().astype(np.int64), gaps.numpy().astype(np.int64)
        if b[0] != 0 or b[-1] != self.max_bucket + 1 or (np.diff(b) <= 0).any():
            raise CkvError(f"time codec: bounds do not rise from 0 to {self.max_bucket + 1}")
        if g.min() < 0 or g.max() >= 2**31:
            raise CkvError("time codec: representative gaps outside 0..2**31 - 1 seconds")
        self.bounds, self.gaps = b, g

