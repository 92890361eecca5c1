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
follow `_merge` (collective int8 keeps the user's scale when the new values fit under it; predictive `ema` and
`item+pos` code only the new tokens, predicted from the whole window; KIVI re-encodes the user). The new events
must not be older than the user's cached history (refused with one line where the artifact keeps event times:
models whose attention reads them, e.g. HSTU; SASRec artifacts keep none, and the order is then the caller's to
keep).

Sharded artifacts: only the shards holding touched users are opened and rewritten, each into a new file beside
the old one (`ckv_cli.artifact.sharded.updated_shard_path`), one at a time (memory: one shard's users, not the
artifact's); new users go to the shard the index's rule gives (hash: their hash shard, in raw-id order; range:
new shards after the last). The checks `CacheStore.open` makes (the model's weights are the checkpoint's, the
checkpoint is the artifact's, the plan fits the model) are made once, on the index and its shared file. The new
index, with the byte accounting redone and the update recorded in `updates`, then replaces the old one in one
rename (`replace_index`), after which the files only the old index named are removed: until that rename the old
index and every file it names are intact and readable; a failure before it removes the new files and changes
nothing. One artifact file is
rewritten whole, atomically (`CacheStore.save`). The metrics in the metadata stay those measured when the
artifact was compressed (an update scores nothing: new events come with no held-out target).
"""
from __future__ import annotations

import bisect
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
    from ckv_cli.io.signals import deferred

    atomic_write(index_path, lambda tmp: Path(tmp).write_text(text), force=True)
    with deferred():  # the old files go together (a signal is raised after): a hard kill may leave some, harmless
        for p in obsolete:
            p.unlink(missing_ok=True)


def _append(store, new, users: list[str], batch_users: int, window: int, create: bool, advance=None) -> None:
    """Each of `users`' new events (from `new`, a SequenceData) appended, `batch_users` users at a time
    (`advance(n)` after each batch of n users)."""
    lookup = {str(u): i for i, u in enumerate(new.user_ids)}
    for a in range(0, len(users), batch_users):
        chunk = users[a : a + batch_users]
        seq = [new.sequence(lookup[u]) for u in chunk]
        store.append_many(chunk, [s[0] for s in seq], [s[1] for s in seq], create=create, window=window,
                          ordered=True)
        if advance:
            advance(len(chunk))


def update_artifact(model, checkpoint_path, path, new, plan_options: dict | None = None, batch_users: int = 256,
                    command: str = "", data_name: str = "", advance=None) -> dict:
    """The module docstring's update of the artifact at `path` (one file or an index) with `new` (a
    SequenceData: `load_new_events`); returns what changed. `advance(n)` is told of every n users appended."""
    from ckv_cli.artifact.sharded import is_index
    from ckv_cli.serve.next_item import CacheStore

    t0 = time.perf_counter()
    path = Path(path)
    if model.config.max_len < 2:
        raise CkvError("--update needs a model window (max_len) of at least 2")
    entry = {"data": data_name, "data_fingerprint": new.fingerprint, "events": int(len(new.items)),
             "dropped_events": int(new.dropped_events), "command": command, "ckv_version": __version__}
    window = model.config.max_len - 1
    if is_index(path):
        out = _update_index(model, checkpoint_path, path, new, plan_options or {}, window, batch_users, entry, advance)
    else:
        store = CacheStore.open(path, model, checkpoint=checkpoint_path)
        try:
            _refuse(path, store.artifact.meta, plan_options or {})
            uids = [str(u) for u in new.user_ids]
            old = [u for u in uids if u in store]
            created = sorted(u for u in uids if u not in store)
            entry.update({"users_appended": len(old), "users_created": len(created)})
            _append(store, new, old, batch_users, window, create=False, advance=advance)
            _append(store, new, created, batch_users, window, create=True, advance=advance)
            updates = list(store.artifact.meta.get("updates") or []) + [entry]
            store.save(path, force=True, batch_users=1024, metadata={
                "updates": updates, "appended": {"users": len(old), "created": len(created), "generation": len(updates)}})
        finally:
            store.close()
        out = {"files_written": [path.name], "files_removed": []}
    return {"artifact": str(path), "update": entry, **out, "seconds": round(time.perf_counter() - t0, 2)}


def _refuse(path: Path, meta: dict, plan_options: dict) -> None:
    """What no update takes: an artifact of `--finetune`, plan options other than the artifact's."""
    if meta.get("student_sha256") is not None:
        raise CkvError(f"{path.name} was written by compress --finetune (the teacher's caches, read by a fine-tuned "
                       "student): --update does not take it yet; compress the extended log anew")
    check_plan_options(path, meta, plan_options)


def _checked_index(model, checkpoint_path, path: Path, plan_options: dict):
    """(index, plan with its shared tensors, shared tensors) of an index an update may change: the checks
    `CacheStore.open` makes of an artifact, made once on the index's metadata and shared file."""
    from ckv_cli.artifact.reader import check_source
    from ckv_cli.artifact.sharded import read_index, read_shared
    from ckv_cli.io.files import sha256_file
    from ckv_cli.serve.store import check_weights

    index = read_index(path)
    meta = index["metadata"]
    if meta.get("task", "next-item") != "next-item" or getattr(model, "task", None) != "next-item":
        raise CkvError(f"{path.name}: --update is for next-item artifacts and models")
    arch = meta.get("arch")
    if arch is not None and arch != getattr(model, "arch", None):
        raise CkvError(f"{path}: made from a {arch} checkpoint, the model is {getattr(model, 'arch', '?')}")
    check_weights(model, checkpoint_path)
    check_source(meta, path, sha256_file(Path(checkpoint_path)))
    _refuse(path, meta, plan_options)
    plan, _, shared = read_shared(path.parent / index["shared"]["file"])
    why = plan.check_model(model)
    if why:
        raise CkvError(f"{path}: {why}")
    return index, plan, shared


def _update_index(model, checkpoint_path, path: Path, new, plan_options: dict, window: int, batch_users: int,
                  entry: dict, advance=None) -> dict:
    """A sharded artifact, shard by shard (only the shards that hold or receive touched users are opened): append,
    write the new shard file, close; then the index (module docstring)."""
    from ckv_cli.artifact.reader import Artifact
    from ckv_cli.artifact.sharded import HASH, assignment_of, index_document, index_text, updated_shard_path
    from ckv_cli.data.partition import shard_of
    from ckv_cli.io.files import check_output
    from ckv_cli.serve.next_item import CacheStore

    index, plan, shared = _checked_index(model, checkpoint_path, path, plan_options)
    rule = assignment_of(index)
    entries = index["shards"]
    n_old = len(entries)
    generation = len(index.get("updates") or []) + 1
    uids = sorted(str(u) for u in new.user_ids)

    def open_shard(s: int) -> CacheStore:
        art = Artifact.open(path.parent / entries[s]["file"], shared=shared)
        if art.meta.get("plan") != index["metadata"].get("plan"):
            art.close()
            raise CkvError(f"{art.path}: its plan is not the index's")
        return CacheStore(art, model, None)

    # which shard holds each user (or receives it: a user no shard holds is new)
    holder: dict[str, int] = {}
    if rule["rule"] == HASH:
        wanted = {u: int(s) for u, s in zip(uids, shard_of(uids, rule["shards"]).tolist())} if uids else {}
    else:  # range: the shards whose id range could hold the user (appended shards overlap the first ones')
        wanted = {}
        for s, e in enumerate(entries):
            lo, hi = e.get("first_user_id"), e.get("last_user_id")
            if lo is None:
                continue
            for u in uids[bisect.bisect_left(uids, lo) : bisect.bisect_right(uids, hi)]:
                wanted.setdefault(u, []).append(s)
        for s in sorted({s for v in wanted.values() for s in v}):
            store = open_shard(s)
            try:
                holder.update({u: s for u, ss in wanted.items() if s in ss and u in store})
            finally:
                store.close()
    born: dict[int, list[str]] = {}
    if rule["rule"] == HASH:
        touched: dict[int, list[str]] = {}
        for u, s in wanted.items():
            touched.setdefault(s, []).append(u)  # held or born there: told apart when the shard is open
    else:
        touched = {}
        for u, s in holder.items():
            touched.setdefault(s, []).append(u)
        created = [u for u in uids if u not in holder]
        for i in range(0, len(created), rule["shard_size"]):
            born[n_old + i // rule["shard_size"]] = created[i : i + rule["shard_size"]]
    n_shards = n_old + len(born)
    written: list[Path] = []
    new_entries: dict[int, dict] = {}
    appended = created_n = 0
    try:
        for s in sorted(set(touched) | set(born)):
            store = open_shard(min(s, n_old - 1))  # a new range shard: its users are created in the last one's store
            try:
                n_before = len(store)
                mine = [u for u in touched.get(s, []) if u in store] if s < n_old else []
                fresh = born.get(s, []) if s >= n_old else [u for u in touched.get(s, []) if u not in store]
                _append(store, new, mine, batch_users, window, create=False, advance=advance)
                _append(store, new, fresh, batch_users, window, create=True, advance=advance)
                appended, created_n = appended + len(mine), created_n + len(fresh)
                names = store.user_ids
                members = list(range(n_before)) if s < n_old else []
                members += list(range(n_before, len(names)))
                if rule["rule"] == HASH:
                    members.sort(key=lambda u: names[u])
                span = None
                if rule["rule"] != HASH:  # range shards keep their positions; new ones follow the last
                    first = (entries[s]["users"][0] if s < n_old
                             else entries[-1]["users"][1] + sum(len(born[t]) for t in born if t < s))
                    span = [first, first + len(members)]
                target = updated_shard_path(path, s, n_shards, generation)
                if target.exists() and target.name not in {e["file"] for e in entries}:
                    target.unlink()  # left by an update that failed before its index swap
                check_output(target, force=False)
                written.append(target)
                new_entries[s] = _write_shard(store, np.asarray(members, np.int64), [names[u] for u in members],
                                              target, s, n_shards, span, generation, len(mine), len(fresh))
                if s < n_old:
                    new_entries[s]["old_breakdown"] = store.artifact.meta["accounting"]["per_user_breakdown"]
            finally:
                store.close()
        out_entries, obsolete = [], []
        breakdown = dict(index["metadata"]["accounting"]["per_user_breakdown"])
        for s in range(n_shards):
            if s in new_entries:
                e = new_entries[s]
                for k, v in e.pop("old_breakdown", {}).items():
                    breakdown[k] -= v
                for k, v in e["per_user_breakdown"].items():
                    breakdown[k] = breakdown.get(k, 0) + v
                out_entries.append(e)
                if s < n_old:
                    obsolete.append(path.parent / entries[s]["file"])
            else:
                e = dict(entries[s])
                e["n_users"] = e["users"][1] - e["users"][0]
                out_entries.append(e)
        pos = 0
        for e in out_entries:
            e["users"] = [pos, pos + e["n_users"]]
            pos += e["n_users"]
        metadata = dict(index["metadata"])
        metadata["accounting"] = _accounting(model, plan, breakdown, out_entries)
        entry.update({"users_appended": appended, "users_created": created_n})
        record = {**entry, "generation": generation,
                  "shards_rewritten": sorted(s for s in new_entries if s < n_old),
                  "shards_added": sorted(s for s in new_entries if s >= n_old)}
        doc = index_document(metadata, index["shared"], out_entries, rule, list(index.get("updates") or []) + [record])
        text = index_text(doc)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    replace_index(path, text, obsolete)
    return {"shards": n_shards, "shards_rewritten": [entries[s]["file"] for s in sorted(new_entries) if s < n_old],
            "shards_added": [new_entries[s]["file"] for s in sorted(new_entries) if s >= n_old],
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

    src = store.artifact.meta  # the shard's own (a new shard: the last one's, whose store created its users)
    lengths = store.token_counts(members)
    shard_meta = {k: v for k, v in src["shard"].items() if k not in ("users", "n_users")}
    shard_meta.update({"number": s, "of": n_shards, "generation": generation})
    shard_meta.update({"rule": HASH, "n_users": len(members)} if span is None else {"users": span})
    meta = {k: v for k, v in src.items() if k not in WRITTEN_BY_WRITER and k not in ("shard", "accounting", "appended")}
    meta.update({"shard": shard_meta, "appended": {"users": appended, "created": created, "generation": generation}})

    def with_accounting(ragged: dict[str, int]) -> dict:  # the escape rows the writer counted
        meta["accounting"] = accounting(store.plan, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                                        full_width(store.model), ragged=ragged)
        return meta

    stored = store.write_users(target, members, with_accounting, shared=False, lengths=lengths)
    acct = meta["accounting"]
    return {"file": target.name, "sha256": sha256_of(target), "bytes": target.stat().st_size, "users": [0, 0],
            "n_users": len(members), "first_user_id": ids[0] if ids else None, "last_user_id": ids[-1] if ids else None,
            "tokens": int(lengths.sum()), "per_user_bytes": acct["per_user_bytes"],
            "per_user_breakdown": {k: v for k, v in stored.items() if k in acct["per_user_breakdown"]}}


def _accounting(model, plan, breakdown: dict[str, int], entries: list[dict]) -> dict:
    """The byte accounting of all shards: per-user bytes as laid out in each (the index's, with the rewritten
    shards' old bytes taken out and their new ones added; `ckv_cli.pipeline.shard.combine`)."""
    from ckv_cli.pipeline.compress import accounting, full_width

    users = sum(e["users"][1] - e["users"][0] for e in entries)
    tokens = sum(e["tokens"] for e in entries)
    return json.loads(json.dumps(accounting(plan, None, full_width(model), counts=(users, tokens), breakdown=breakdown)))
