"""Assigning users to shards and drawing the calibration sample without the global user order, so that a
distributed reader (`ckv_cli.pipeline.ray_read`) and this process give the same answer from the raw ids alone.

- Shard of a user (the `hash` rule of a sharded artifact's index): the first 8 bytes of sha256(utf-8 raw id),
  big-endian, modulo the number of shards. Within a shard, users are in raw-id order (as `build` sorts them).
- Calibration sample (`--shards`): the `k` users with the smallest key sha256("<seed>\\x1f<raw id>")[:8]
  (big-endian; ties, which need a 64-bit collision, by raw id): a bottom-k sample, uniform over users, which
  each shard can compute for its own users and a driver merges from k keys per shard.
- Data fingerprint of a sharded read: sha256 over the shards' fingerprints (each `sequences._fingerprint` of
  the shard's users, in shard order), so that no process needs every event to compute it.
"""
from __future__ import annotations

import hashlib

import numpy as np

CALIBRATION_RULE = "the calib_users users with the smallest sha256('<seed>\\x1f<raw id>')[:8]"


def _key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def shard_of(user_ids, n_shards: int) -> np.ndarray:
    """(U,) int64 shard of each raw user id (the hash rule); ids repeated in `user_ids` are hashed once."""
    ids = np.asarray(user_ids, dtype=str)
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    keys = np.fromiter((_key(str(u)) % n_shards for u in uniq), dtype=np.int64, count=len(uniq))
    return keys[inv.reshape(-1)]


def calibration_keys(user_ids, seed: int) -> np.ndarray:
    """(U,) uint64 calibration key of each raw user id (module docstring)."""
    return np.fromiter((_key(f"{seed}\x1f{u}") for u in user_ids), dtype=np.uint64, count=len(user_ids))


def bottom_k(keys: np.ndarray, user_ids, k: int) -> np.ndarray:
    """Positions of the `k` smallest keys (ties by raw id), in position order."""
    ids = np.asarray(user_ids, dtype=str)
    order = np.lexsort((ids, keys))
    return np.sort(order[:k])


def combined_fingerprint(shard_fingerprints: list[str]) -> str:
    """The data fingerprint of a log read shard by shard (module docstring)."""
    return hashlib.sha256("\x1f".join(shard_fingerprints).encode()).hexdigest()[:16]
