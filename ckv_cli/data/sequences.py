"""From a raw log to per-user time-ordered sequences, vocabularies and the leave-one-out split (the CTR view of
the same log is `ckv_cli/data/ctr.py`).

Conventions:
- events are sorted by (user, timestamp), ties kept in file order (a stable sort);
- item index 0 is padding, real items are 1..n_items (vocabulary sorted by raw id, or taken from a checkpoint);
- users with fewer than `min_events` events are dropped and counted;
- leave-one-out: the last event of each user is the test target, the second-to-last the validation target,
  training sees everything before the validation target.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckv_cli.data.datasets import DATASETS, fetch
from ckv_cli.data.readers import Log, dataset_name, read_log
from ckv_cli.errors import CkvError


@dataclass
class SequenceData:
    name: str
    user_ids: np.ndarray  # (U,) raw ids
    item_ids: np.ndarray  # (n_items + 1,) raw ids, [0] = "<pad>"
    offsets: np.ndarray  # (U + 1,) int64: user u's events are [offsets[u], offsets[u+1])
    items: np.ndarray  # (E,) int64 item index, 1..n_items
    timestamps: np.ndarray  # (E,) int64 seconds
    ratings: np.ndarray | None  # (E,) float32
    genres: np.ndarray  # (n_items + 1, n_genres) uint8 multi-hot, row 0 = padding
    genre_names: list[str]
    dropped_users: int = 0
    dropped_events: int = 0
    fingerprint: str = ""
    stats: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)  # role -> column recognised by a common name (the CLI says so)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[u], self.offsets[u + 1]
        return self.items[a:b], self.timestamps[a:b]

    def split(self, which: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Histories (items, timestamps) and targets for 'train' (all but last two), 'valid' or 'test'."""
        cut = {"train": 2, "valid": 1, "test": 0}[which]
        hist_items, hist_times, targets = [], [], []
        for u in range(self.n_users):
            it, ts = self.sequence(u)
            end = len(it) - cut
            if which == "train":
                hist_items.append(it[:end]); hist_times.append(ts[:end])
            else:
                hist_items.append(it[: end - 1]); hist_times.append(ts[: end - 1]); targets.append(it[end - 1])
        return hist_items, hist_times, np.asarray(targets, dtype=np.int64)

    def target_times(self, which: str) -> np.ndarray:
        """(U,) timestamp of each user's held-out event of split 'valid' or 'test' (the request time of a model with
        next-event query time)."""
        cut = {"valid": 2, "test": 1}[which]
        return self.timestamps[self.offsets[1:] - cut]


def _fingerprint(user_ids, item_ids, offsets, items, timestamps) -> str:
    h = hashlib.sha256()
    for arr in (offsets, items, timestamps):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(map(str, user_ids)).encode())
    h.update("\x1f".join(map(str, item_ids)).encode())
    return h.hexdigest()[:16]


def subset_fingerprint(ds: SequenceData, users: np.ndarray) -> str:
    """The fingerprint `build` gives the log of users `users` (indices, increasing) alone: what a worker that
    builds one shard computes (`ckv_cli.data.partition.combined_fingerprint`)."""
    from ckv_cli.spec import token_index

    users = np.asarray(users, dtype=np.int64)
    starts, lengths = ds.offsets[users], ds.offsets[users + 1] - ds.offsets[users]
    tok = token_index(starts, lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return _fingerprint(ds.user_ids[users], ds.item_ids, offsets, ds.items[tok], ds.timestamps[tok])


def empty_fingerprint(item_vocab) -> str:
    """The fingerprint `build` gives a log of no users (a shard no event reached)."""
    return _fingerprint(np.zeros(0, dtype=str), np.asarray(item_vocab, dtype=object), np.zeros(1, np.int64),
                        np.zeros(0, np.int64), np.zeros(0, np.int64))


def build(log: Log, name: str, min_events: int = 3, item_vocab: list[str] | None = None,
          item_lookup: dict | None = None, allow_empty: bool = False) -> SequenceData:
    """Sort, index and filter a raw log (see the module docstring). `item_lookup` ({raw id: index} of
    `item_vocab`) saves building it again (a worker builds one shard after another); `allow_empty` returns a
    dataset of no users where the log keeps none (one shard of many) instead of refusing it."""
    users, items, times, ratings = log.users, log.items, log.timestamps, log.ratings
    dropped_events = 0
    if item_vocab is not None:
        lookup = item_lookup if item_lookup is not None else vocab_lookup(item_vocab)
        idx = np.array([lookup.get(x, -1) for x in items.tolist()], dtype=np.int64).reshape(len(items))
        known = idx > 0
        dropped_events = int((~known).sum())
        if len(idx) and not known.any() and not allow_empty:
            raise CkvError(f"{name}: none of its {len(np.unique(items)):,} items is in the checkpoint's vocabulary "
                           f"({len(item_vocab) - 1:,} items, e.g. {str(item_vocab[1]) if len(item_vocab) > 1 else ''!r}; "
                           f"this data has e.g. {str(items[0])!r}): was the checkpoint trained on other data?")
        users, times, idx = users[known], times[known], idx[known]
        ratings = ratings[known] if ratings is not None else None
        item_ids = np.asarray(item_vocab, dtype=object)
    else:
        uniq, inv = np.unique(items, return_inverse=True)
        idx = inv.astype(np.int64) + 1
        item_ids = np.concatenate([np.asarray(["<pad>"], dtype=object), uniq.astype(object)])
    user_uniq, user_inv = np.unique(users, return_inverse=True)
    order = np.lexsort((times, user_inv))  # stable: ties keep file order
    user_inv, idx, times = user_inv[order], idx[order], times[order]
    ratings = ratings[order] if ratings is not None else None
    counts = np.bincount(user_inv, minlength=len(user_uniq))
    keep_user = counts >= min_events
    keep_event = keep_user[user_inv]
    dropped_users = int((~keep_user).sum())
    user_inv, idx, times = user_inv[keep_event], idx[keep_event], times[keep_event]
    ratings = ratings[keep_event] if ratings is not None else None
    if len(idx) == 0 and not allow_empty:
        unknown = f" of items the checkpoint knows ({dropped_events:,} events of other items dropped)" if dropped_events else ""
        raise CkvError(f"{name}: no user has at least {min_events} events{unknown}; "
                       f"{len(user_uniq):,} users, each with fewer")
    new_id = np.cumsum(keep_user) - 1
    user_inv = new_id[user_inv]
    user_ids = user_uniq[keep_user]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(user_inv, minlength=len(user_ids)))
    genre_names = sorted({g for gs in (log.item_genres or {}).values() for g in gs})
    genres = np.zeros((len(item_ids), len(genre_names)), dtype=np.uint8)
    if log.item_genres:
        gi = {g: j for j, g in enumerate(genre_names)}
        for i, raw in enumerate(item_ids[1:], start=1):
            for g in log.item_genres.get(raw, []):
                genres[i, gi[g]] = 1
    return SequenceData(
        name=name, user_ids=user_ids, item_ids=item_ids, offsets=offsets, items=idx, timestamps=times,
        ratings=ratings, genres=genres, genre_names=genre_names, dropped_users=dropped_users,
        dropped_events=dropped_events, fingerprint=_fingerprint(user_ids, item_ids, offsets, idx, times),
        columns=dict(log.recognised or {}),
    )


def vocab_lookup(item_vocab) -> dict:
    """{raw item id: index} of a vocabulary (index 0, the padding, included: callers keep indices > 0)."""
    return {raw: i for i, raw in enumerate(item_vocab)}


def load(spec: str, columns: dict[str, str] | None = None, min_events: int = 3,
         item_vocab: list[str] | None = None) -> SequenceData:
    """A named dataset (`ml-1m`, `ml-100k`) or a path to a log file."""
    path, name = resolve(spec)
    return build(read_log(path, columns), name, min_events=min_events, item_vocab=item_vocab)


def resolve(spec: str) -> tuple[str | Path, str]:
    """(the file to read, the name reports give it) of `--data`: a named dataset (fetched on first use) or a path."""
    if spec in DATASETS:
        return fetch(spec), spec
    if Path(spec).exists() or any(c in spec for c in "/\\.*?["):
        return spec, dataset_name(spec)
    raise CkvError(f"unknown dataset '{spec}'; named datasets: {', '.join(DATASETS)} (or give a file path)")
