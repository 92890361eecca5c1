"""The CTR task on a rating log: every rated event is a sample, label = rating >= 4.

Rules (what `ckv train --arch sim|eta|sdim|twin|nohistory` and `ckv evaluate` on those checkpoints use):
- **Split by time, globally**: the 80th and 90th percentiles of all timestamps cut the log into train
  (t < t80), validation (t80 <= t < t90) and test (t >= t90). No training sample happens after a test sample.
- **History** of a sample = the user's events strictly earlier in time (same-second events are excluded: the log
  stores ratings given together with one timestamp, so their order is unknown), the most recent `max_history`.
  Histories reach back into earlier splits: a test sample's history holds the user's training events.
- **History token** = (item id, its genres, per-event side features known once that event happened): the rating
  bucket (1..5) and the gap to the user's previous event, log2-bucketed in seconds. The cached K/V of a token are
  therefore per-event, not a function of the item alone (NOTES §3).
- **Target** = item id and its genres (its own rating is the label, never a feature).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckv_cli.data.sequences import SequenceData
from ckv_cli.errors import CkvError

N_RATINGS = 6  # 0 = padding, 1..5 = rating rounded down and clipped
N_GAPS = 32  # 0 = padding, 1 = the user's first event, 2.. = 2 + floor(log2(gap seconds + 1)), capped
SPLIT_QUANTILES = (0.8, 0.9)
SPLITS = ("train", "valid", "test")


@dataclass
class CTRBatch:
    users: torch.Tensor  # (B,) int64 user index + 1 (0 = unknown user)
    targets: torch.Tensor  # (B,) int64 target item
    labels: torch.Tensor  # (B,) float32
    items: torch.Tensor  # (B, L) int64 history items, right-padded with 0
    ratings: torch.Tensor  # (B, L) int64 rating bucket
    gaps: torch.Tensor  # (B, L) int64 gap bucket
    lengths: torch.Tensor  # (B,) int64 history lengths

    def to(self, device) -> "CTRBatch":
        return CTRBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class CTRData:
    seq: SequenceData
    users: np.ndarray  # (E,) user index of each event
    hist_start: np.ndarray  # (E,) global index of the first history event of each event as a sample
    hist_end: np.ndarray  # (E,) one past its last history event
    rating_bucket: np.ndarray  # (E,) int64
    gap_bucket: np.ndarray  # (E,) int64
    labels: np.ndarray  # (E,) float32
    split_of: np.ndarray  # (E,) int8: 0 train, 1 valid, 2 test
    cuts: tuple[int, int]  # the two timestamps that cut the splits
    max_history: int
    user_rows: np.ndarray | None = None  # (U,) the model's user-embedding row of each user (0 = unknown)

    def __post_init__(self):
        if self.user_rows is None:
            self.user_rows = np.arange(1, self.seq.n_users + 1, dtype=np.int64)

    def with_user_vocab(self, vocab: list[str]) -> "CTRData":
        """Map this data's users onto a checkpoint's user rows by raw id; users it never saw get row 0."""
        lookup = {raw: i + 1 for i, raw in enumerate(vocab)}
        rows = np.fromiter((lookup.get(str(u), 0) for u in self.seq.user_ids), dtype=np.int64, count=self.seq.n_users)
        return CTRData(**{**self.__dict__, "user_rows": rows})

    @property
    def name(self) -> str:
        return f"{self.seq.name}-ctr"

    @property
    def fingerprint(self) -> str:
        return f"{self.seq.fingerprint}-ctr{self.max_history}"

    def samples(self, split: str) -> np.ndarray:
        """Event indices of one split, in log order (user, time)."""
        if split not in SPLITS:
            raise CkvError(f"unknown split '{split}' (choose from: {', '.join(SPLITS)})")
        return np.flatnonzero(self.split_of == SPLITS.index(split))

    def batch(self, events: np.ndarray) -> CTRBatch:
        """Event indices (B,) -> a right-padded batch of their samples."""
        events = np.asarray(events, dtype=np.int64)
        start, end = self.hist_start[events], self.hist_end[events]
        lengths = end - start
        L = max(1, int(lengths.max())) if len(events) else 1
        idx = start[:, None] + np.arange(L)[None, :]  # (B, L)
        valid = np.arange(L)[None, :] < lengths[:, None]
        idx = np.where(valid, idx, 0)
        pick = lambda a: torch.from_numpy(np.where(valid, a[idx], 0).astype(np.int64))  # noqa: E731
        return CTRBatch(users=torch.from_numpy(self.user_rows[self.users[events]]), targets=torch.from_numpy(self.seq.items[events]),
                        labels=torch.from_numpy(self.labels[events]), items=pick(self.seq.items),
                        ratings=pick(self.rating_bucket), gaps=pick(self.gap_bucket), lengths=torch.from_numpy(lengths))

    def stats(self) -> dict:
        out = {"cuts": [int(c) for c in self.cuts], "max_history": self.max_history}
        for i, s in enumerate(SPLITS):
            m = self.split_of == i
            out[s] = {"samples": int(m.sum()), "users": int(len(np.unique(self.users[m]))),
                      "positive_rate": round(float(self.labels[m].mean()), 4) if m.any() else None}
        return out


def gap_buckets(timestamps: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(E,) timestamps sorted within users, (E,) bool first event of its user -> (E,) gap bucket."""
    gap = np.diff(timestamps, prepend=timestamps[:1]).clip(min=0)
    b = 2 + np.floor(np.log2(gap.astype(np.float64) + 1.0)).astype(np.int64)
    return np.where(first, 1, np.minimum(b, N_GAPS - 1))


def build_ctr(seq: SequenceData, max_history: int = 1000, positive_rating: float = 4.0) -> CTRData:
    """The CTR view of a rating log (rules in the module docstring)."""
    if seq.ratings is None:
        raise CkvError(f"{seq.name}: the CTR task needs a rating column (label = rating >= {positive_rating:g}) and this "
                       "log has none; provide one (map it with --columns rating=NAME)")
    if max_history < 1:
        raise CkvError(f"max history must be at least 1, got {max_history}")
    E = len(seq.items)
    users = np.repeat(np.arange(seq.n_users), seq.lengths())
    first = np.zeros(E, dtype=bool)
    first[seq.offsets[:-1]] = True
    # history ends at the first event of the same (user, second): same-second events never see each other
    new_run = first | np.r_[True, seq.timestamps[1:] != seq.timestamps[:-1]]
    hist_end = np.maximum.accumulate(np.where(new_run, np.arange(E), 0))
    hist_start = np.maximum(seq.offsets[users], hist_end - max_history)
    cuts = tuple(int(c) for c in np.quantile(seq.timestamps, SPLIT_QUANTILES, method="lower"))
    split_of = (seq.timestamps >= cuts[0]).astype(np.int8) + (seq.timestamps >= cuts[1]).astype(np.int8)
    rating_bucket = np.clip(np.floor(seq.ratings).astype(np.int64), 1, N_RATINGS - 1)
    return CTRData(seq=seq, users=users, hist_start=hist_start, hist_end=hist_end, rating_bucket=rating_bucket,
                   gap_bucket=gap_buckets(seq.timestamps, first), labels=(seq.ratings >= positive_rating).astype(np.float32),
                   split_of=split_of, cuts=cuts, max_history=max_history)


def ctr_base(spec: str) -> str | None:
    """The log a `--data NAME-ctr` spec (the CTR view of a log, not a file of that name) reads, else None."""
    return spec[: -len("-ctr")] if spec.endswith("-ctr") and not Path(spec).exists() else None


def load_ctr(spec: str, columns: dict[str, str] | None = None, max_history: int = 1000,
             item_vocab: list[str] | None = None) -> CTRData:
    """`ml-1m-ctr` (or `ml-1m`, or a rating log file) read as the CTR task."""
    from ckv_cli.data.sequences import load

    return build_ctr(load(ctr_base(spec) or spec, columns, item_vocab=item_vocab), max_history=max_history)
