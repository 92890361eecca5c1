"""`ckv compress CKPT --update ARTIFACT --data NEW_EVENTS`: bring an artifact up to date with new events, through
the model and the artifact's own plan (no refit), rewriting only what holds touched users.

What an update means for a user's cache. `ckv compress` of a log caches each user's events but the last two
(the held-out protocol: the last event is the evaluation target, the one before it is appended at scoring
time), at most `max_len - 1` of them. `--update` appends each user's new events to its cached window, as
`CacheStore.append` does (`append_many(..., window=max_len - 1)`: the same `_merge` of the new tokens into the
stored record; a window that would overflow re-encodes the user from a prefill of its last `max_len - 1`
events), and creates users it has not seen with all their new events cached. So the artifact afterwards holds,
user for user, what `ckv compress` with the same plan stores for the log in which every user's new events come
right after its cached events (before the two events compress keeps out of the cache; a new user's events
followed by two more): `tests/test_update.py` checks exactly that on ML-100K. For plans whose stored fields are
token-local (plain, fp16, pq, collective with no or an fp16 user part) the new tokens' fields are what compress
stores, up to float rounding of the K/V (the appended tokens' K/V come from `extend` over the decoded cache:
equal to the teacher's to float tolerance when the first layer is recomputed from item ids and the model has two
layers, like the sample models; deeper models carry the codec's error into later layers); per-user codecs
follow `_merge` (collective int8 keeps the user's scale when the new values fit under it; KIVI re-encodes the
user). The new events must not be older than the user's cached history (refused with one line where the
artifact keeps event times: models whose attention reads them, e.g. HSTU; SASRec artifacts keep none, and the
order is then the caller's to keep).

Sharded artifacts: only the shards holding touched users are rewritten, each into a new file beside the old one
(`ckv_cli.artifact.sharded.updated_shard_path`); new users go to the shard the index's rule gives (hash: their
hash shard, in raw-id order; range: new shards after the last). The new index, with the byte accounting redone
and the update recorded in `updates`, then replaces the old one in one rename (`replace_index`), after which
the files only the old index named are removed: until that rename the old index and every file it names are
intact and readable; a failure before it removes the new files and changes nothing. One artifact file is
rewritten whole, atomically (`CacheStore.save`). The metrics in the metadata stay those measured when the
artifact was compressed (an update scores nothing: new events come with no held-out target).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ckv_cli import __version__
from ckv_cli.errors import CkvError

PLAN_OPTIONS = ("codec", "share", "recompute_item_layers")  # besides the codec's params


def load_new_events(spec: str, columns: dict | None, item_vocab: list[str]):
    """The new events, per user in time order (ties in log order), through the checkpoint's vocabulary (events
    of unknown items dropped and counted); every user with at least one event."""
    from ckv_cli.data import load

    return load(spec, columns, min_events=1, item_vocab=item_vocab)


def check_plan_options(path, meta: dict, given: dict) -> None:
    """Refuse plan options (`given`: option name -> value, only those the caller set) that differ from the plan
    the artifact was compressed with: an update encodes with that plan and cannot change it."""
    params = meta.get("params") or {}
    for key, value in given.items():
        have = meta.get(key) if key in PLAN_OPTIONS else params.get(key)
        if key == "share":
            value, have = list(value), list(have or [])
        if value != have:
            flag = "--" + key.replace("_", "-")
            raise CkvError(f"{Path(path).name} was compressed with {key} {have!r}; --update encodes with the "
                           f"artifact's plan and cannot change it: {flag} {value!r} differs (drop it, or compress anew)")


def replace_index(index_path: Path, text: str, obsolete: list[Path]) -> None:
    """The swap of an update (module docstring): the new index (whose new files are written already) replaces
    the old one in one rename; then the files only the old index named are removed. The one place an update
    replaces files."""
    from ckv_cli.io.files import atomic_write

    atomic_write(index_path, lambda tmp: Path(tmp).write_text(text), force=True)
    for p in obsolete:
        p.unlink(missing_ok=True)


def _append(store, new, users: list[str], batch_users: int, window: int, create: bool) -> None:
    """Each of `users`' new events (from `new`, a SequenceData) appended, `batch_users` users at a time."""
    lookup = {str(u): i for i, u in enumerate(new.user_ids)}
    for a in range(0, len(users), batch_users):
        chunk = users[a : a + batch_users]
        seq = [new.sequence(lookup[u]) for u in chunk]
        store.append_many(chunk, [s[0] for s in seq], [s[1] for s in seq], create=create, window=window,
                          ordered=True)


def update_artifact(model, checkpoint_path, path, new, plan_options: dict | None = None, batch_users: int = 256,
                    command: str = "", data_name: str = "") -> dict:
    """The module docstring's update of the artifact at `path` (one file or an index) with `new` (a
    SequenceData: `load_new_events`); returns what changed."""
    from ckv_cli.artifact.sharded import ShardedArtifact, is_index
    from ckv_cli.serve.next_item import CacheStore

    t0 = time.perf_counter()
    path = Path(path)
    store = CacheStore.open(path, model, checkpoint=checkpoint_path)
    try:
        if store.artifact.meta.get("student_sha256") is not None:
            raise CkvError(f"{path.name} was written by compress --finetune (the teacher's caches, read by a fine-tuned "
                           "student): --update does not take it yet; compress the extended log anew")
        check_plan_options(path, store.artifact.meta, plan_options or {})
        if model.config.max_len < 2:
            raise CkvError("--update needs a model window (max_len) of at least 2")
        uids = [str(u) for u in new.user_ids]
        old = [u for u in uids if u in store]
        created = [u for u in uids if u not in store]
        entry = {"data": data_name, "data_fingerprint": new.fingerprint, "users_appended": len(old),
                 "users_created": len(created), "events": int(len(new.items)),
                 "dropped_events": int(new.dropped_events), "command": command, "ckv_version": __version__}
        window = model.config.max_len - 1
        if isinstance(store.artifact, ShardedArtifact) or is_index(path):
            out = _update_sharded(store, new, old, created, window, batch_users, entry)
        else:
            _append(store, new, old, batch_users, window, create=False)
            _append(store, new, sorted(created), batch_users, window, create=True)
            updates = list(store.artifact.meta.get("updates") or []) + [entry]
            store.save(path, force=True, batch_users=1024, metadata={
                "updates": updates, "appended": {"users": len(old), "created": len(created), "generation": len(updates)}})
            out = {"files_written": [path.name], "files_removed": []}
    finally:
        store.close()
    return {"artifact": str(path), "update": entry, **out, "seconds": round(time.perf_counter() - t0, 2)}


def _update_sharded(store, new, old: list[str], created: list[str], window: int, batch_users: int,
                    entry: dict) -> dict:
    """Shard by shard: append, write the new shard file, forget the appends; then the index (module docstring)."""
    from ckv_cli.artifact.sharded import HASH, assignment_of, index_document, index_text, updated_shard_path
    from ckv_cli.data.partition import shard_of
    from ckv_cli.io.files import check_output

    art = store.artifact
    index_path = art.path
    index = art.index
    rule = assignment_of(index)
    n_old_shards = len(art.shards)
    generation = len(index.get("updates") or []) + 1
    starts = art.starts  # (S + 1,) first user of each shard, then the number of users
    touched: dict[int, list[str]] = {}
    for uid in old:
        s = int(np.searchsorted(starts, store.index(uid)[0], side="right") - 1)
        touched.setdefault(s, []).append(uid)
    born: dict[int, list[str]] = {}
    if rule["rule"] == HASH:
        for uid, s in zip(created, shard_of(created, rule["shards"]).tolist() if created else []):
            born.setdefault(int(s), []).append(uid)
    else:
        size = rule["shard_size"]
        ordered = sorted(created)
        for i in range(0, len(ordered), size):
            born[n_old_shards + i // size] = ordered[i : i + size]
    n_shards = n_old_shards + sum(1 for s in born if s >= n_old_shards)
    written: list[Path] = []
    new_entries: dict[int, dict] = {}
    try:
        for s in sorted(set(touched) | set(born)):
            _append(store, new, sorted(touched.get(s, [])), batch_users, window, create=False)
            _append(store, new, sorted(born.get(s, [])), batch_users, window, create=True)
            members = (np.arange(starts[s], starts[s + 1]) if s < n_old_shards else np.zeros(0, np.int64)).tolist()
            members += store.index(born.get(s, [])).tolist() if born.get(s) else []
            names = store.user_ids  # a copy: taken once per shard
            if rule["rule"] == HASH:
                members.sort(key=lambda u: names[u])
            if rule["rule"] == HASH:
                span = None
            elif s < n_old_shards:  # a range shard keeps its users' positions
                span = [int(starts[s]), int(starts[s + 1])]
            else:  # new range shards follow the last one
                first = int(starts[-1]) + sum(len(born[t]) for t in born if n_old_shards <= t < s)
                span = [first, first + len(born[s])]
            target = updated_shard_path(index_path, s, n_shards, generation)
            if target.exists() and target.name not in {e["file"] for e in index["shards"]}:
                target.unlink()  # left by an update that failed before its index swap
            check_output(target, force=False)
            written.append(target)
            new_entries[s] = _write_shard(store, np.asarray(members, np.int64), [names[u] for u in members], target,
                                          s, n_shards, span, generation, len(touched.get(s, [])), len(born.get(s, [])))
            store.forget(members)
        entries, obsolete = [], []
        for s in range(n_shards):
            if s in new_entries:
                entries.append(new_entries[s])
                if s < n_old_shards:
                    obsolete.append(index_path.parent / index["shards"][s]["file"])
            else:
                e = dict(index["shards"][s])
                e["per_user_breakdown"] = art.shards[s].meta["accounting"]["per_user_breakdown"]
                entries.append(e)
        pos = 0
        for e in entries:
            n = e["users"][1] - e["users"][0] if "n_users" not in e else e["n_users"]
            e["users"] = [pos, pos + n]
            pos += n
        metadata = dict(index["metadata"])
        metadata["accounting"] = _accounting(store, entries)
        record = {**entry, "generation": generation,
                  "shards_rewritten": sorted(s for s in new_entries if s < n_old_shards),
                  "shards_added": sorted(s for s in new_entries if s >= n_old_shards)}
        doc = index_document(metadata, index["shared"], entries, rule, list(index.get("updates") or []) + [record])
        text = index_text(doc)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    store.close()  # the old shards are mapped: let go of them before they are removed
    replace_index(index_path, text, obsolete)
    return {"shards": n_shards, "shards_rewritten": [index["shards"][s]["file"] for s in sorted(new_entries)
                                                     if s < n_old_shards],
            "shards_added": [new_entries[s]["file"] for s in sorted(new_entries) if s >= n_old_shards],
            "files_written": [p.name for p in written], "files_removed": [p.name for p in obsolete],
            "generation": generation}


def _write_shard(store, members: np.ndarray, ids: list[str], target: Path, s: int, n_shards: int,
                 span: list[int] | None, generation: int, appended: int, created: int) -> dict:
    """One rewritten (or new) shard file of users `members` (store indices, in shard order; raw ids `ids`); its index entry
    with `n_users` (positions are set once every shard is known) and its per-user byte breakdown. `span`: the
    users' positions, which a range shard records (None: a hash shard, which records its user count)."""
    from ckv_cli.artifact.sharded import HASH, sha256_of
    from ckv_cli.pipeline.compress import accounting, full_width
    from ckv_cli.serve.store import WRITTEN_BY_WRITER

    art = store.artifact
    src = art.shards[min(s, len(art.shards) - 1)].meta  # a new shard takes the run metadata of the last one
    lengths = store.token_counts(members)
    acct = accounting(store.plan, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), full_width(store.model))
    shard_meta = {k: v for k, v in src["shard"].items() if k not in ("users", "n_users")}
    shard_meta.update({"number": s, "of": n_shards, "generation": generation})
    shard_meta.update({"rule": HASH, "n_users": len(members)} if span is None else {"users": span})
    meta = {k: v for k, v in src.items() if k not in WRITTEN_BY_WRITER and k not in ("shard", "accounting", "appended")}
    meta.update({"accounting": acct, "shard": shard_meta,
                 "appended": {"users": appended, "created": created, "generation": generation}})
    stored = store.write_users(target, members, meta, shared=False)
    return {"file": target.name, "sha256": sha256_of(target), "bytes": target.stat().st_size, "users": [0, 0],
            "n_users": len(members), "first_user_id": ids[0] if ids else None, "last_user_id": ids[-1] if ids else None,
            "tokens": int(lengths.sum()), "per_user_bytes": acct["per_user_bytes"],
            "per_user_breakdown": {k: v for k, v in stored.items() if k in acct["per_user_breakdown"]}}


def _accounting(store, entries: list[dict]) -> dict:
    """The byte accounting of all shards (per-user bytes as laid out in each; `ckv_cli.pipeline.shard.combine`)."""
    from ckv_cli.pipeline.compress import accounting, full_width

    breakdown: dict[str, int] = {}
    for e in entries:
        for k, v in e["per_user_breakdown"].items():
            breakdown[k] = breakdown.get(k, 0) + v
    users = sum(e["users"][1] - e["users"][0] for e in entries)
    tokens = sum(e["tokens"] for e in entries)
    return json.loads(json.dumps(accounting(store.plan, None, full_width(store.model), counts=(users, tokens),
                                            breakdown=breakdown)))
