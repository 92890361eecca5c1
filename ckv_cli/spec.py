"""What a model caches, declared by the model: the contract every model fulfils (ckv's own, an imported one, or a
user's), and the flat token layout codecs, plans and artifacts work on.

- `TokenId`: an id kept per cached token (item, timestamp, rating bucket, gap bucket), at a fixed stored width:
  `bits` (unsigned, bit-packed) or a numpy `dtype`. `required` ids are read whenever the model scores from a
  cache (SASRec's window items, HSTU's timestamps, SIM's category search): every plan stores them.
- `Stream`: one cached vector per token (a layer's K or V, a branch's K or V), its width, and the ids it is an
  exact function of (with the token's position in its user's cache): such a stream can be recomputed from the
  stored ids instead of being stored (the `recompute` codec). `()` = user-specific, never recomputable.
- `Side`: a per-token field the model derives from its streams, e.g. ETA's and SDIM's hash signatures: `count`
  values of `bits` bits each, stored exactly or derived again from the decoded streams.
- `CacheSpec`: the ids, streams and side fields of one model.
- `FlatCache`: a batch of users' cached tokens back to back (user b's are [offsets[b], offsets[b+1])): streams
  by name (N, width), ids by name (N,), side fields by name (N, count), and the keep mask of an evicting codec.

Nothing here imports the rest of ckv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class TokenId:
    name: str  # the artifact field is tokens/<name>: "items", "timestamps", "ratings", "gaps"
    bits: int = 0  # > 0: unsigned ints bit-packed at this width
    dtype: str = ""  # else stored as this numpy dtype ("int32")
    required: bool = False  # read by the model whenever it scores from a cache: always stored


@dataclass(frozen=True)
class Stream:
    name: str  # "L1.k", "long.v"
    width: int
    kind: str  # "k" or "v" (which codec defaults apply: KIVI quantises keys per channel)
    from_ids: tuple[str, ...] = ()  # ids it is an exact function of (with the position); () = user-specific

    @property
    def recomputable(self) -> bool:
        return bool(self.from_ids)


@dataclass(frozen=True)
class Side:
    name: str  # the artifact field is tokens/<name> when stored: "codes"
    count: int  # values per token
    bits: int  # bits per value

    @property
    def total_bits(self) -> int:
        return self.count * self.bits


@dataclass(frozen=True)
class CacheSpec:
    ids: tuple[TokenId, ...]
    streams: tuple[Stream, ...]
    side: tuple[Side, ...] = ()

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    def token_id(self, name: str) -> TokenId:
        return next(i for i in self.ids if i.name == name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    @property
    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.streams}

    @property
    def reads_times(self) -> bool:
        """Whether the model's attention reads event times (it requires the `timestamps` id)."""
        return any(t.name == "timestamps" and t.required for t in self.ids)


def token_positions(offsets: np.ndarray) -> np.ndarray:
    """(N,) int64 position of each token in its user's window (0 = the oldest) from the users' offsets (U + 1,),
    which may start past 0 (a batch cut out of a larger one)."""
    offsets = np.asarray(offsets, np.int64)
    starts = offsets[:-1] - offsets[0]
    return np.arange(int(offsets[-1] - offsets[0]), dtype=np.int64) - np.repeat(starts, np.diff(offsets))


@dataclass
class FlatCache:
    """A batch of users' cached tokens back to back: user b's tokens are [offsets[b], offsets[b+1])."""

    offsets: np.ndarray  # (B + 1,) int64
    streams: dict[str, torch.Tensor]  # name -> (N, width)
    ids: dict[str, np.ndarray]  # name -> (N,) int64
    side: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, count)
    keep: np.ndarray | None = None  # (N,) bool: tokens attention reads (an evicting codec); None = all

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else 0

    @property
    def items(self) -> np.ndarray:
        return self.ids["items"]

    @property
    def timestamps(self) -> np.ndarray:
        return self.ids.get("timestamps", np.zeros(self.n_tokens, np.int64))

    def stream(self, name: str) -> torch.Tensor:
        return self.streams[name]

    def set_stream(self, name: str, x: torch.Tensor) -> None:
        self.streams[name] = x

    def positions(self) -> np.ndarray:
        """(N,) each token's position in its user's cache (0 = the oldest cached token)."""
        return token_positions(self.offsets)

    def rows(self, idx: np.ndarray, offsets: np.ndarray) -> "FlatCache":
        """The tokens at `idx` (N',) as a flat cache of users `offsets`."""
        t = torch.from_numpy(np.asarray(idx, np.int64))
        return FlatCache(np.asarray(offsets, np.int64), {k: v[t] for k, v in self.streams.items()},
                         {k: v[idx] for k, v in self.ids.items()}, {k: v[t] for k, v in self.side.items()},
                         None if self.keep is None else self.keep[idx])

    def users(self, a: int, b: int) -> "FlatCache":
        """Users [a, b) as views (no copy)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        return FlatCache(self.offsets[a : b + 1] - lo, {k: v[lo:hi] for k, v in self.streams.items()},
                         {k: v[lo:hi] for k, v in self.ids.items()}, {k: v[lo:hi] for k, v in self.side.items()},
                         None if self.keep is None else self.keep[lo:hi])

    def select(self, users: np.ndarray) -> "FlatCache":
        """The tokens of `users` (indices into this cache's users, in the order given), copied."""
        users = np.asarray(users, dtype=np.int64)
        starts, lengths = self.offsets[users], np.diff(self.offsets)[users]
        idx = token_index(starts, lengths)
        return self.rows(idx, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @staticmethod
    def concat(parts: list["FlatCache"], consume: bool = False) -> "FlatCache":
        """Users of `parts` back to back. `consume` drops each part's stream tensors once joined (one stream at a
        time), so the peak is about 1.25x the result instead of 2x; the parts are unusable afterwards."""
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        streams = {}
        for name in parts[0].streams:
            streams[name] = torch.cat([p.streams[name] for p in parts])
            if consume:
                for p in parts:
                    p.streams[name] = None
        keep = None if parts[0].keep is None else np.concatenate([p.keep for p in parts])
        return FlatCache(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), streams,
                         {k: np.concatenate([p.ids[k] for p in parts]) for k in parts[0].ids},
                         {k: torch.cat([p.side[k] for p in parts]) for k in parts[0].side}, keep)


def bits_for(n_values: int) -> int:
    """Narrowest unsigned width holding 0..n_values-1."""
    return max(1, math.ceil(math.log2(max(n_values, 2))))


def token_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[b], starts[b] + lengths[b]) as one int64 index, without a Python loop."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    out_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(starts - out_start, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
