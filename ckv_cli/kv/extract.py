"""Teacher caches for the held-out protocol, and the flat layout (all users' tokens concatenated, with offsets).

For each user the cached history is the test history (everything before the held-out item, last `max_len`
events) minus its last event: that event is appended later with `extend` through the (compressed) cache, and
its output ranks all items for the held-out target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ckv_cli.data.batching import history_batch
from ckv_cli.data.sequences import SequenceData
from ckv_cli.models.base import KVCache


@dataclass
class CacheBatch:
    users: np.ndarray  # (B,) user indices into the dataset
    cache: KVCache  # teacher cache of each user's history prefix
    last_items: torch.Tensor  # (B, 1) the last known event, appended with `extend`
    last_ts: torch.Tensor  # (B, 1)
    targets: torch.Tensor  # (B,) held-out item


@dataclass
class FlatCache:
    """All users' cached tokens back to back: user b's tokens are [offsets[b], offsets[b+1])."""

    offsets: np.ndarray  # (B + 1,) int64
    keys: list[torch.Tensor]  # per layer (N, d_k)
    values: list[torch.Tensor]  # per layer (N, d_v)
    items: np.ndarray  # (N,) int64
    timestamps: np.ndarray  # (N,) int64
    keep: np.ndarray | None = None  # (N,) bool: tokens attention reads (`KVCache.keep`); None = all

    def _locate(self, name: str) -> tuple[list[torch.Tensor], int]:
        layer, kind = int(name[1 : name.index(".")]), name[-1]  # plan key, e.g. "L1.k"
        return (self.keys if kind == "k" else self.values), layer

    def stream(self, name: str) -> torch.Tensor:
        """One stream's vectors by plan key, e.g. "L1.k" -> keys[1] (N, d)."""
        streams, layer = self._locate(name)
        return streams[layer]

    def set_stream(self, name: str, x: torch.Tensor) -> None:
        streams, layer = self._locate(name)
        streams[layer] = x


def last_event_batch(hist_items: list[np.ndarray], hist_times: list[np.ndarray], users: np.ndarray, max_len: int):
    """The users' histories cut to the window, split into the cached prefix and the last event:
    (items (B, L), timestamps (B, L), lengths (B,), last items (B, 1), last timestamps (B, 1))."""
    hi = [hist_items[u][-max_len:] for u in users]
    ht = [hist_times[u][-max_len:] for u in users]
    items, times, lengths = history_batch([h[:-1] for h in hi], [t[:-1] for t in ht], max_len)
    last_items = torch.tensor([[h[-1]] for h in hi], dtype=torch.long)
    last_ts = torch.tensor([[t[-1]] for t in ht], dtype=torch.long)
    return items, times, lengths, last_items, last_ts


class _TestHistories:
    """`data.split("test")`'s histories (everything before the held-out item), sliced one user at a time when
    indexed, so that nothing per user is built for users not yet reached (memory flat in the number of users)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __getitem__(self, u) -> np.ndarray:
        return self.values[self.offsets[u] : self.offsets[u + 1] - 1]


def teacher_cache_lengths(data: SequenceData, max_len: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens in the teacher cache of users [start, stop) as `iter_test_caches` builds it, without building it:
    the test history (all events but the held-out one) cut to its last `max_len` events, minus the last event."""
    stop = data.n_users if stop is None else stop
    lengths = np.diff(data.offsets[start : stop + 1]).astype(np.int64, copy=False)  # one array, worked on in place
    lengths -= 1
    np.minimum(lengths, max_len, out=lengths)
    lengths -= 1
    return np.maximum(lengths, 0, out=lengths)


@torch.no_grad()
def iter_test_caches(model, data: SequenceData, users: np.ndarray | range, batch_size: int = 256) -> Iterator[CacheBatch]:
    model.eval()
    hist_items, hist_times = _TestHistories(data.items, data.offsets), _TestHistories(data.timestamps, data.offsets)
    for a in range(0, len(users), batch_size):
        batch = np.asarray(users[a : a + batch_size])  # users may be a range: one batch's indices at a time
        items, times, lengths, last_items, last_ts = last_event_batch(hist_items, hist_times, batch, model.config.max_len)
        cache, _ = model.prefill(items, times, lengths)
        targets = data.items[data.offsets[batch.astype(np.int64) + 1] - 1]  # the held-out (last) events
        yield CacheBatch(users=batch, cache=cache, last_items=last_items, last_ts=last_ts,
                         targets=torch.from_numpy(np.asarray(targets, dtype=np.int64)))


def flatten(cache: KVCache) -> FlatCache:
    valid = cache.length_mask()  # (B, L): evicted tokens stay, with their mask
    offsets = np.zeros(len(cache.lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(cache.lengths.numpy())
    return FlatCache(offsets, [k[valid] for k in cache.keys], [v[valid] for v in cache.values],
                     cache.items[valid].numpy(), cache.timestamps[valid].numpy(),
                     None if cache.keep is None else cache.keep[valid].numpy())


def unflatten(flat: FlatCache) -> KVCache:
    lengths = torch.from_numpy(np.diff(flat.offsets))
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, L, *x.shape[1:], dtype=x.dtype)
        out[valid] = x
        return out

    return KVCache([pad(k) for k in flat.keys], [pad(v) for v in flat.values], lengths,
                   pad(torch.from_numpy(flat.items)), pad(torch.from_numpy(flat.timestamps)),
                   None if flat.keep is None else pad(torch.from_numpy(np.asarray(flat.keep, dtype=bool))))
