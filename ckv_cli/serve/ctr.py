"""Serving CTR models (SIM, ETA, SDIM, TWIN) from an artifact: `CTRStore` decodes a batch of users' caches, scores
candidates "now" (after each user's last cached event), and appends new events through the model and the codecs
(`ckv_cli.serve.store.Store` holds what every store shares).

    from ckv_cli import CTRStore
    store = CTRStore.open("sim.ckv.safetensors", "sim-ml1m-ctr.safetensors")  # checkpoint sha256 checked
    store.score(["42", "7"], ["Heat (1995)", "Fargo (1996)"])     # click probabilities (2, 2), "now"
    store.append("42", ["Fargo (1996)"], [5], [978300760], previous_timestamp=978300000)
    store.save("sim.ckv.v2.safetensors")                           # a new artifact with the appends merged

**A user's cache** (`fetch`): the decoded streams (and signatures) of the user's last `max_len` events, as
`model.prefill` lays them out for a sample whose history is that window (`model.user_caches`). Only artifacts of
models whose search reads item ids (SIM), or that recompute every stream (`eventid`), keep them; for the others
`CTRCache.items` is zeros. `score` runs `model.score` on that cache for each candidate; with `eventid` or plain fp32
it equals the model's forward on that history.

**Appending** (`append`): a new event's streams are a function of (item, rating bucket, gap bucket), computed by
the model (`model.token_streams`) and merged by the plan's codecs (`Store._merge`). The artifact keeps no
timestamps, so the gap bucket of a user's first appended event needs the time of the user's previous event:
`previous_timestamp` (remembered after the first append; a new user's first event is bucket 1, as in `build_ctr`).
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.data.ctr import N_RATINGS, gap_buckets
from ckv_cli.errors import CkvError
from ckv_cli.models.target_attention import BranchKV, CTRCache
from ckv_cli.serve.store import Store
from ckv_cli.spec import FlatCache


def _view(x, b: int, C: int):
    return None if x is None else x[b : b + 1].expand(C, *x.shape[1:])


@torch.no_grad()
def score_cache(model, cache: CTRCache, user_rows: torch.Tensor, candidates: torch.Tensor,
                budget: int = 1 << 19) -> torch.Tensor:
    """Click probabilities (B, C) of candidate items (B, C) from a batch's caches: per user, `model.score` on a
    stride-0 view of its cache repeated over the candidates (chunks of at most `budget` candidate x token rows)."""
    B, C = candidates.shape
    out = torch.empty(B, C)
    L = max(int(cache.items.shape[1]), 1)
    step = max(1, budget // L)
    for b in range(B):
        for a in range(0, C, step):
            c = min(step, C - a)
            br = {n: BranchKV(_view(x.keys, b, c), _view(x.values, b, c), _view(x.lengths, b, c), _view(x.codes, b, c),
                              _view(x.positions, b, c)) for n, x in cache.branches.items()}
            sub = CTRCache(br, _view(cache.items, b, c), _view(cache.lengths, b, c))
            out[b, a : a + c] = torch.sigmoid(model.score(sub, user_rows[b : b + 1].expand(c), candidates[b, a : a + c]))
    return out


class CTRStore(Store):
    """Users' CTR caches served from an artifact (module docstring). Open with `CTRStore.open`."""

    task = "ctr"

    def __init__(self, artifact, model, item_vocab, user_vocab=None):
        super().__init__(artifact, model, item_vocab, user_vocab)
        self._last_ts: dict[int, int] = {}

    @classmethod
    def _check_task(cls, model) -> None:
        if getattr(model, "task", None) != cls.task:
            raise CkvError("CTRStore serves CTR models (sim, eta, sdim, twin); use CacheStore for next-item models")

    @torch.no_grad()
    def fetch(self, user_ids) -> CTRCache:
        """Decoded caches of a batch of users (raw ids): each user's last `max_len` events, as `model.prefill`
        lays out a history of those events."""
        return self._cache(self.index(user_ids))

    def _cache(self, users: np.ndarray) -> CTRCache:
        fields, offsets = self._read(users)
        flat = self._decode(fields, offsets)
        return self.model.user_caches(flat.streams, flat.side, fields.get("tokens/items"), offsets)

    def score(self, user_ids, candidate_items) -> np.ndarray:
        """Click probabilities (B, C) of candidates for each user "now" (after its last cached event): one list of
        candidates for all users, or one list per user (B lists of C); raw item ids or indices."""
        users = self.index(user_ids)
        cand = self.item_index(candidate_items)
        if cand.ndim == 1:
            cand = np.broadcast_to(cand[None], (len(users), len(cand)))
        if cand.ndim != 2 or len(cand) != len(users):
            raise CkvError(f"candidate_items: give one list for all users or one list per user ({len(users)} users)")
        if len(users) == 0 or cand.shape[1] == 0:
            return np.zeros((len(users), cand.shape[1]), np.float32)
        cache = self._cache(users)
        if int(cache.lengths.min()) < 1:
            raise CkvError("a user has no cached event")
        return score_cache(self.model, cache, self.user_rows(users), torch.from_numpy(np.array(cand, dtype=np.int64))).numpy()

    @torch.no_grad()
    def append(self, user_id, items, ratings, timestamps, previous_timestamp: int | None = None,
               create: bool = False) -> None:
        """Append a user's new events (items: raw ids or indices; ratings: as in the log, bucketed as `build_ctr`
        does; timestamps in seconds, non-decreasing) through the model and the codecs (module docstring).
        `previous_timestamp`: the time of the user's last cached event (the artifact keeps none), needed for the
        first new event's gap bucket unless this store appended to the user before. An unknown user is an error
        unless `create` (then its first event is the user's first)."""
        uid = str(user_id)
        if uid not in self._lookup and not create:
            raise CkvError(f"user '{uid}' is not in {self.artifact.path} (create=True adds a new user)")
        new_items = self.item_index(items).reshape(-1)
        T = len(new_items)
        ratings, ts = np.asarray(ratings, dtype=np.float64).reshape(-1), np.asarray(timestamps).reshape(-1)
        if T == 0:
            raise CkvError("no new events to append")
        if len(ratings) != T or len(ts) != T:
            raise CkvError(f"{T} items, {len(ratings)} ratings and {len(ts)} timestamps: give one of each per event")
        if ts.dtype.kind not in "iu" or (np.diff(ts) < 0).any():
            raise CkvError("timestamps must be integers (seconds), non-decreasing")
        if not np.isfinite(ratings).all():
            raise CkvError("ratings must be finite numbers")
        u = self._lookup.get(uid)
        old, n_old = None, 0
        if u is not None:
            old, _ = self._read(np.array([u]))
            n_old = self._n_tokens(old)
        prev = self._last_ts.get(u) if u is not None else None
        if previous_timestamp is not None:
            prev = int(previous_timestamp)
        if n_old and prev is None:
            raise CkvError(f"user '{uid}' has cached events and the artifact keeps no timestamps: pass "
                           "previous_timestamp (the time of the user's last event) for the first new event's gap")
        if n_old and int(ts[0]) < prev:
            raise CkvError(f"the first new event ({int(ts[0])}) is older than the user's previous event ({prev})")
        ts = ts.astype(np.int64)
        if n_old:
            gaps = gap_buckets(np.r_[prev, ts], np.r_[False, np.zeros(T, bool)])[1:]
        else:
            first = np.zeros(T, bool)
            first[0] = True
            gaps = gap_buckets(ts, first)
        ids = {"items": new_items, "ratings": np.clip(np.floor(ratings).astype(np.int64), 1, N_RATINGS - 1),
               "gaps": gaps}
        streams, side = self.model.token_streams(ids)
        new = FlatCache(np.array([0, T]), streams, ids, side)
        if old is None:
            record = self._encode(new)
        else:
            def whole() -> FlatCache:
                dec = self._decode(old, np.array([0, n_old]))
                return FlatCache(np.array([0, n_old + T]), {k: torch.cat([dec.streams[k], streams[k]]) for k in streams},
                                 {k: np.concatenate([dec.ids.get(k, np.zeros(n_old, np.int64)), v]) for k, v in ids.items()})

            record = self._merge(old, new, whole)
        u = self._put(uid, u, record)
        self._last_ts[u] = int(ts[-1])


__all__ = ["CTRStore", "score_cache"]
