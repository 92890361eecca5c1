"""Sharded artifacts: one artifact split into safetensors shards of users, a shared-tensor file and a JSON index,
in the style of Hugging Face's `*.safetensors.index.json`.

Layout, for `ckv compress ... --shard-size N | --shards S -o DIR/NAME.index.json`:
- `NAME.shared.safetensors`: the shared tensors (`shared/<stream>/<name>`: pools, bases, routers), metadata
  `format` = ckv-artifact-shared, the plan, the ckv version and a sha256 per tensor;
- `NAME-00000-of-00003.safetensors`, ...: each shard holds its users (`assignment_of`: contiguous ranges of the
  dataset's user order under the range rule, the users whose id hashes to it, in raw-id order, under the hash
  rule): the per-user tensors of an artifact (`ckv_cli.artifact.format`) and no shared tensor, metadata
  `format` = ckv-artifact-shard with the plan, the fields, the checksums, the run's metadata and `shard`
  (number, count, the shared file and its sha256; the user range, or under the hash rule the user count);
  a shard rewritten by update number g (`ckv compress --update`) is `NAME-0000s-of-0000n.u0000g.safetensors`;
- `NAME.index.json`: `format` = ckv-artifact-index, `metadata` (the run: checkpoint and its sha256, data
  fingerprint, plan, byte accounting of all shards, metrics, command, engine), `shared` (file, sha256, bytes),
  `shards` (per shard: file, sha256, bytes, users as positions [a, b) in the artifact's user order, which is
  shard after shard; first and last user id, tokens, per-user bytes), `totals`, `assignment` (the rule; absent
  in indexes written before it was recorded: range) and `updates` (one entry per `--update`). Paths are relative
  to the index.

Reading: `open_artifact(path)` takes one artifact file, an index (a `.json` path) or one shard and returns an
`Artifact` or a `ShardedArtifact` (same interface: users, offsets, plan, `read_fields`, `decode`, `verify`), so
that `ckv evaluate`, `ckv inspect` and the stores read every form. `verify_path` is `ckv verify`. Writing the
shards is `ckv_cli.pipeline.shard`; updating them `ckv_cli.serve.update`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ckv_cli import __version__
from ckv_cli.artifact.format import (FORMAT_VERSION, SHARD_FORMAT, _sha, decode_meta, encode_meta, field_meta,
                                     load_shared_into, reorder_users, shared_tensors)
from ckv_cli.artifact.reader import Artifact
from ckv_cli.codecs import CachePlan, plan_from_description
from ckv_cli.errors import CkvError
from ckv_cli.io import formats
from ckv_cli.io.files import atomic_write, sha256_file, write_safetensors
from ckv_cli.io.guarded import where
from ckv_cli.io.safetensors import read_header

INDEX_FORMAT = formats.INDEX
SHARED_FORMAT = formats.SHARED
DEFAULT_SHARD_USERS = 65536


def is_index(path) -> bool:
    return Path(path).suffix.lower() == ".json"


def stem_of(index: Path) -> str:
    name = index.name
    for suffix in (".index.json", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def shared_path(index: Path) -> Path:
    return index.parent / f"{stem_of(index)}.shared.safetensors"


def shard_paths(index: Path, n_shards: int) -> list[Path]:
    return [index.parent / f"{stem_of(index)}-{s:05d}-of-{n_shards:05d}.safetensors" for s in range(n_shards)]


def updated_shard_path(index: Path, shard: int, n_shards: int, generation: int) -> Path:
    """Shard `shard` as rewritten (or added) by update number `generation` (`ckv compress --update`): a new name
    beside the old file, which stays valid until the new index replaces the old one."""
    return index.parent / f"{stem_of(index)}-{shard:05d}-of-{n_shards:05d}.u{generation:05d}.safetensors"


def set_names(index: Path, n_shards: int, generation: int = 0) -> list[str]:
    """The shared file's and the shards' names, generation 0 the canonical ones (`shared_path`, `shard_paths`);
    a `--force` run over an existing set writes the first generation whose names are free
    (`ckv_cli.io.fileset`), e.g. NAME.1.shared.safetensors, NAME.1-00000-of-00004.safetensors."""
    stem = stem_of(index) + (f".{generation}" if generation else "")
    return [f"{stem}.shared.safetensors"] + [f"{stem}-{s:05d}-of-{n_shards:05d}.safetensors" for s in range(n_shards)]


def shard_ranges(n_users: int, shard_size: int, batch_users: int) -> list[tuple[int, int]]:
    """Users [a, b) of each shard: contiguous ranges of user index, `shard_size` each (the last one shorter)."""
    if shard_size < 1 or shard_size % batch_users:
        raise CkvError(f"--shard-size must be a positive multiple of --batch-users ({batch_users}), got {shard_size}: "
                       "each shard then encodes the same batches of users as the in-process engine")
    return [(a, min(a + shard_size, n_users)) for a in range(0, n_users, shard_size)]


sha256_of = sha256_file


def write_shared(path: Path, plan: CachePlan, metadata: dict, force: bool) -> dict:
    """The shared tensors of a fitted plan into their own safetensors file; returns its file entry."""
    from safetensors.numpy import save_file

    tensors = shared_tensors(plan)
    meta = {k: encode_meta(v) for k, v in metadata.items()}
    meta.update({"format": SHARED_FORMAT, "format_version": FORMAT_VERSION, "ckv_version": __version__,
                 "plan": json.dumps(plan.describe(), sort_keys=True),
                 "checksums": json.dumps({k: _sha(a) for k, a in tensors.items()}, sort_keys=True)})
    write_safetensors(path, save_file, tensors, meta, force=force)
    written = where(path)  # (inside a transaction: the staged file)
    return {"file": path.name, "sha256": sha256_of(written), "bytes": written.stat().st_size,
            "tensor_bytes": {k: int(a.nbytes) for k, a in tensors.items()}}


def read_shared(path: Path) -> tuple[CachePlan, dict, dict[str, np.ndarray]]:
    """(plan with its shared tensors loaded, metadata, shared tensors) of a shared-tensor file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CkvError(f"shared-tensor file not found: {path}")
    header, raw = read_header(path)
    if raw.get("format") != SHARED_FORMAT:
        raise CkvError(f"{path}: not a ckv shared-tensor file (metadata 'format' is {raw.get('format')!r})")
    try:
        meta = {k: decode_meta(v) for k, v in raw.items()}
        plan = plan_from_description(meta["plan"], meta.get("fields") if isinstance(meta.get("fields"), dict) else None)
    except (ValueError, KeyError, TypeError, RecursionError, CkvError) as e:
        raise CkvError(f"{path}: corrupted metadata ({type(e).__name__})") from None
    try:
        with safe_open(str(path), "np") as f:
            shared = {n: f.get_tensor(n) for n in header}
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    load_shared_into(plan, shared, lambda why: CkvError(f"{path}: inconsistent shared tensors ({why})"))
    return plan, meta, shared


INDEX_SHARD_KEYS = ("file", "sha256", "bytes", "users", "first_user_id", "last_user_id", "tokens", "per_user_bytes")


def index_document(metadata: dict, shared: dict, entries: list[dict], assignment: dict | None = None,
                   updates: list[dict] | None = None) -> dict:
    """The index of a sharded artifact (module docstring): `assignment` says which shard holds a user
    (`assignment_of`), `updates` lists the `ckv compress --update` runs applied since it was compressed."""
    shards = [{k: e[k] for k in INDEX_SHARD_KEYS} for e in entries]
    acct = metadata["accounting"]
    totals = {"shards": len(shards), "users": acct["users"], "tokens": acct["tokens"],
              "per_user_bytes": acct["per_user_bytes"], "shared_bytes": acct["shared_bytes"],
              "file_bytes": shared["bytes"] + sum(s["bytes"] for s in shards)}
    index = {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata,
             "shared": {k: shared[k] for k in ("file", "sha256", "bytes")}, "shards": shards, "totals": totals}
    if assignment is not None:
        index["assignment"] = assignment
    if updates:
        index["updates"] = updates
    return index


def index_text(index: dict) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"


def write_index(path: Path, metadata: dict, shared: dict, entries: list[dict], force: bool,
                assignment: dict | None = None) -> dict:
    index = index_document(metadata, shared, entries, assignment)
    text = index_text(index)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=force)
    return index


RANGE, HASH = "range", "hash"


def assignment_of(index: dict) -> dict:
    """Which shard holds a user: `{"rule": "range", "shard_size": N}` (shard s holds users [sN, (s+1)N) of the
    dataset's user order; an index written before the rule was recorded has no entry and is read as range;
    users added by `--update` are in shards appended at the end) or `{"rule": "hash", "shards": S}` (shard
    `ckv_cli.data.partition.shard_of(user id, S)`, users in raw-id order within it)."""
    a = index.get("assignment")
    if a is None:
        first = index["shards"][0]["users"] if index["shards"] else [0, 0]
        return {"rule": RANGE, "shard_size": first[1] - first[0]}
    return a


def _check_assignment(path: Path, index: dict) -> None:
    a = index.get("assignment")
    if a is None:
        return
    ok = isinstance(a, dict) and (
        (a.get("rule") == RANGE and type(a.get("shard_size")) is int and a["shard_size"] > 0)
        or (a.get("rule") == HASH and type(a.get("shards")) is int and a["shards"] == len(index["shards"])))
    if not ok:
        raise CkvError(f"{path}: corrupted index (its 'assignment' is not a range or hash rule over its shards)")


def read_index(path: Path) -> dict:
    if not path.exists():
        raise CkvError(f"index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CkvError(f"{path}: not a readable JSON index ({type(e).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CkvError(f"{path}: not a ckv artifact index ('format' is not {INDEX_FORMAT!r})")
    if index.get("format_version") != FORMAT_VERSION:
        raise CkvError(f"{path}: index format version {index.get('format_version')!r}, this ckv reads {FORMAT_VERSION!r}")
    shards, shared = index.get("shards"), index.get("shared")
    if (not isinstance(shards, list) or not isinstance(shared, dict) or not isinstance(index.get("metadata"), dict)
            or any(not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _is_range(s.get("users"))
                   for s in shards) or not isinstance(shared.get("file"), str)):
        raise CkvError(f"{path}: corrupted index (shards, shared file or metadata)")
    for s in [shared] + shards:
        if Path(s["file"]).name != s["file"]:
            raise CkvError(f"{path}: corrupted index (file '{s['file']}' is not a name beside the index)")
    _check_assignment(path, index)
    return index


def _is_range(r) -> bool:
    return isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] <= r[1]


class ShardedArtifact(Artifact):
    """An index and its shards, read as one artifact: users in shard order (the dataset's order), offsets and
    field counts over all shards; `read_fields` reads each shard's users from that shard. `shards[s]` is the
    shard's own `Artifact` (its users numbered from 0), `starts[s]` its first user here."""

    @staticmethod
    def open(path: str | Path) -> "ShardedArtifact":
        path = Path(path)
        index = read_index(path)
        plan, _, shared = read_shared(path.parent / index["shared"]["file"])
        shards, expect = [], 0
        try:
            for entry in index["shards"]:
                art = Artifact.open(path.parent / entry["file"], shared=shared)
                shards.append(art)
                a, b = entry["users"]
                if (a, b) != (expect, expect + art.n_users):
                    raise CkvError(f"{art.path}: holds {art.n_users:,} users, the index says users {a:,}..{b - 1:,}")
                if art.meta.get("plan") != index["metadata"].get("plan"):
                    raise CkvError(f"{art.path}: its plan is not the index's")
                expect = b
            user_ids = [u for art in shards for u in art.user_ids]
            if len(set(user_ids)) != len(user_ids):
                raise CkvError(f"{path}: inconsistent artifact (a user is held by two shards)")
        except BaseException:
            for art in shards:
                art.close()
            raise
        starts = np.array([e["users"][0] for e in index["shards"]] + [expect], dtype=np.int64)
        tok = np.cumsum([0] + [int(art.offsets[-1]) for art in shards])
        offsets = np.concatenate([[0]] + [art.offsets[1:] + t for art, t in zip(shards, tok)]).astype(np.int64)
        fields = {name: field_meta(f, int(tok[-1]) if f.per == "token" else
                                   sum(int(art.fields[name]["count"]) for art in shards) if f.per == "ragged" else
                                   len(user_ids) + (name == "users/offsets"))
                  for name, f in plan.fields().items()}
        out = ShardedArtifact(path, {"format": INDEX_FORMAT, **index["metadata"]}, plan, fields, offsets, user_ids)
        out.shards, out.starts, out.index = shards, starts, index
        return out

    def read_fields(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        users = self.checked_users(users)
        return read_by_shard(users, self.starts, lambda s, local: self.shards[s].read_fields(local), self.fields)

    def verify(self) -> list[str]:
        """'<shard file>: <tensor>' of every tensor whose bytes no longer match its checksum, in every shard."""
        return [f"{art.path.name}: {name}" for art in self.shards for name in art.verify()]

    def close(self) -> None:
        for art in self.shards:
            art.close()


def read_by_shard(users: np.ndarray, starts: np.ndarray, read, fields_meta: dict):
    """Fields and offsets of `users` (global indices, any order) read shard by shard through `read(shard, local
    indices)`, put back in the order asked."""
    shard = np.searchsorted(starts, users, side="right") - 1
    parts = [(np.flatnonzero(shard == s), *read(s, users[shard == s] - starts[s])) for s in np.unique(shard)]
    if not parts:
        return read(0, users)
    return merge_parts(parts, fields_meta)


def merge_parts(parts, fields_meta: dict):
    """[(positions asked, fields, offsets), ...] covering positions 0..n-1 once -> (fields, offsets) in position
    order: per-user rows reordered, token rows (and ragged rows) gathered user by user."""
    pos = np.concatenate([p for p, _, _ in parts])
    lengths = np.concatenate([np.diff(o) for _, _, o in parts]).astype(np.int64)
    joined = {k: np.concatenate([f[k] for _, f, _ in parts]) for k in parts[0][1]}
    order = np.empty(len(pos), np.int64)  # position asked -> row in the joined parts
    order[pos] = np.arange(len(pos))
    fields = reorder_users(joined, fields_meta, lengths, order)
    return fields, np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)


def open_artifact(path: str | Path) -> Artifact:
    """One artifact file, an index of shards (a `.json` path), or one shard (read with the shared-tensor file its
    metadata names, beside it)."""
    path = Path(path)
    if is_index(path):
        return ShardedArtifact.open(path)
    if path.is_file() and read_header(path)[1].get("format") == SHARD_FORMAT:
        try:
            name = decode_meta(read_header(path)[1].get("shard", "{}")).get("shared_file")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or Path(name).name != name:
            raise CkvError(f"{path}: a shard whose metadata names no shared-tensor file")
        return Artifact.open(path, shared=read_shared(path.parent / name)[2])
    return Artifact.open(path)


def shards_summary(art: ShardedArtifact) -> dict:
    """What `ckv inspect` shows of an index: the shared file and each shard's users, tokens and bytes."""
    return {"count": len(art.shards), "shared": art.index["shared"], "totals": art.index.get("totals", {}),
            "files": [{k: e.get(k) for k in ("file", "users", "first_user_id", "last_user_id", "tokens", "bytes")}
                      for e in art.index["shards"]]}


# ---------------------------------------------------------------------------------------------- verify


def verify_path(path: str | Path) -> tuple[list[str], dict]:
    """`ckv verify`: (problems, one per line, each naming its file; summary). An index: the shared file and every
    shard exist and match the sha256 the index gives, every header passes the reader's checks, every tensor its
    checksum, and every user appears exactly once across the shards, in the ranges the index gives. One file:
    its header and tensor checksums."""
    path = Path(path)
    if not is_index(path):
        with Artifact.open(path) as art:
            return [f"{path.name}: tensor '{n}' does not match its checksum" for n in art.verify()], \
                {"files": 1, "users": art.n_users, "tokens": int(art.offsets[-1])}
    index = read_index(path)
    problems: list[str] = []
    shared_entry = index["shared"]
    shared = None
    if _check_file(path.parent / shared_entry["file"], shared_entry, problems):
        try:
            _, smeta, shared = read_shared(path.parent / shared_entry["file"])
            bad = [n for n, a in shared.items() if smeta.get("checksums", {}).get(n) != _sha(a)]
            problems += [f"{shared_entry['file']}: tensor '{n}' does not match its checksum" for n in bad]
        except CkvError as e:
            problems.append(f"{shared_entry['file']}: {e}")
            shared = None
    seen: dict[str, str] = {}
    users = tokens = 0
    expect = 0
    for entry in index["shards"]:
        name = entry["file"]
        a, b = entry["users"]
        if a != expect:
            problems.append(f"{name}: starts at user {a:,}, the previous shard ended at {expect:,} "
                            + ("(users missing)" if a > expect else "(users overlap)"))
        expect = b
        if not _check_file(path.parent / name, entry, problems) or shared is None:
            continue
        try:
            art = Artifact.open(path.parent / name, shared=shared)
        except CkvError as e:
            problems.append(f"{name}: {e}")
            continue
        problems += [f"{name}: tensor '{n}' does not match its checksum" for n in art.verify()]
        art.close()
        if art.n_users != b - a:
            problems.append(f"{name}: holds {art.n_users:,} users, the index says {b - a:,}")
        for u in art.user_ids:
            if u in seen:
                problems.append(f"{name}: user '{u}' is also in {seen[u]}")
            else:
                seen[u] = name
        users += art.n_users
        tokens += int(art.offsets[-1])
    totals = index.get("totals", {})
    if not problems and (users, tokens) != (totals.get("users"), totals.get("tokens")):
        problems.append(f"{path.name}: totals say {totals.get('users')} users / {totals.get('tokens')} tokens, "
                        f"the shards hold {users:,} / {tokens:,}")
    return problems, {"files": len(index["shards"]) + 1, "shards": len(index["shards"]), "users": users, "tokens": tokens}


def _check_file(path: Path, entry: dict, problems: list[str]) -> bool:
    """Exists and has the sha256 the index gives (else a problem line); whether reading it is worth trying."""
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return False
    digest = sha256_of(path)
    if digest != entry.get("sha256"):
        problems.append(f"{path.name}: sha256 {digest[:16]}... differs from the index's {str(entry.get('sha256'))[:16]}...")
    return True
