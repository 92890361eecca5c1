"""Sharded artifacts: one artifact split into safetensors shards of contiguous users, a shared-tensor file and a
JSON index, in the style of Hugging Face's `*.safetensors.index.json`.

Layout, for `ckv compress ... --shard-size N -o DIR/NAME.index.json`:
- `NAME.shared.safetensors`: the shared tensors (`shared/<stream>/<name>`: pools, bases, routers), metadata
  `format` = ckv-artifact-shared, the plan, the ckv version and a sha256 per tensor;
- `NAME-00000-of-00003.safetensors`, ...: shard s holds the users [s*N, (s+1)*N) of the dataset's user order
  (sorted by raw id), in that order: the per-user tensors of an artifact (`ckv_cli.artifact`: user offsets and
  id table, `tokens/...`, `<stream>/<field>`) and no shared tensor, metadata `format` = ckv-artifact-shard
  with the plan, the fields, the checksums, the run's metadata and `shard` (number, count, user range, the
  shared file and its sha256);
- `NAME.index.json`: `format` = ckv-artifact-index, `metadata` (the run: checkpoint and its sha256, data
  fingerprint, plan, byte accounting of all shards, metrics, command, engine), `shared` (file, sha256, bytes),
  `shards` (per shard: file, sha256, bytes, user range, first and last user id, tokens, per-user bytes) and
  `totals`. Paths are relative to the index.

Shard assignment is fixed by user index (contiguous ranges), never by arrival order, and a shard's size is a
multiple of the encode batch, so that every shard encodes exactly the batches of users the in-process engine
encodes (the teacher prefill of a padded batch is not bit-identical across batch compositions; measured on the
sample HSTU: 4 of 1,200 tensors differ by up to 3.6e-7): the same seed gives the same bytes, shard for shard.
Rows a distributed reader delivers twice are dropped by user id (`Histories.deduplicated`).

Reading: `open_artifact(path)` takes one artifact file or an index (a `.json` path) and returns an `Artifact`
or a `ShardedArtifact` (same interface: users, offsets, plan, `read_fields`, `decode`, `verify`), so that
`ckv evaluate`, `ckv inspect` and `CacheStore` read both. `verify_path` is `ckv verify`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckv_cli import __version__
from ckv_cli.artifact import FORMAT_VERSION, SHARD_FORMAT, Artifact, ArtifactWriter, field_meta, load_shared_into
from ckv_cli.checkpoint import atomic_write, check_output, read_header, write_safetensors
from ckv_cli.codecs import CachePlan, plan_from_description
from ckv_cli.errors import CkvError

INDEX_FORMAT = "ckv-artifact-index"
SHARED_FORMAT = "ckv-artifact-shared"
DEFAULT_SHARD_USERS = 65536
HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- names


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


def shard_ranges(n_users: int, shard_size: int, batch_users: int) -> list[tuple[int, int]]:
    """Users [a, b) of each shard: contiguous ranges of user index, `shard_size` each (the last one shorter)."""
    if shard_size < 1 or shard_size % batch_users:
        raise CkvError(f"--shard-size must be a positive multiple of --batch-users ({batch_users}), got {shard_size}: "
                       "each shard then encodes the same batches of users as the in-process engine")
    return [(a, min(a + shard_size, n_users)) for a in range(0, n_users, shard_size)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- histories


@dataclass
class Histories:
    """A block of users' event windows, what a shard's encoder reads: user (dataset index, increasing), raw user
    id, and each user's last `max_len + 1` events (the cached window, its last event and the held-out item)."""

    users: np.ndarray  # (U,) int64
    user_ids: np.ndarray  # (U,) object (str)
    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (E,) int64
    timestamps: np.ndarray  # (E,) int64

    @classmethod
    def from_dataset(cls, ds, a: int, b: int, max_len: int) -> "Histories":
        ends = ds.offsets[a + 1 : b + 1]
        starts = np.maximum(ds.offsets[a:b], ends - (max_len + 1))
        from ckv_cli.store import token_index

        tok = token_index(starts, ends - starts)
        return cls(np.arange(a, b, dtype=np.int64), np.asarray([str(u) for u in ds.user_ids[a:b]], dtype=object),
                   np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64), ds.items[tok], ds.timestamps[tok])

    def to_arrow(self, shard: int):
        import pyarrow as pa

        off = pa.array(self.offsets, pa.int64())
        return pa.table({"user": pa.array(self.users, pa.int64()), "user_id": pa.array(list(self.user_ids), pa.string()),
                         "shard": pa.array(np.full(len(self.users), shard, np.int64)),
                         "items": pa.LargeListArray.from_arrays(off, pa.array(self.items, pa.int64())),
                         "timestamps": pa.LargeListArray.from_arrays(off, pa.array(self.timestamps, pa.int64()))})

    @classmethod
    def from_arrow(cls, table) -> "Histories":
        """Rows in any order, possibly repeated: sorted by user index, each user id kept once."""
        import pyarrow.compute as pc

        table = table.sort_by("user")
        items, ts = table.column("items").combine_chunks(), table.column("timestamps").combine_chunks()
        lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
        out = cls(table.column("user").to_numpy().astype(np.int64),
                  np.asarray(table.column("user_id").to_pylist(), dtype=object),
                  np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  pc.list_flatten(items).to_numpy().astype(np.int64), pc.list_flatten(ts).to_numpy().astype(np.int64))
        return out.deduplicated()

    def deduplicated(self) -> "Histories":
        """Each user id once (its first row in user order): a distributed reader may deliver a row twice."""
        _, first = np.unique(self.user_ids.astype(str), return_index=True)
        if len(first) == len(self.users):
            return self
        keep = np.sort(first)
        from ckv_cli.store import token_index

        starts, lengths = self.offsets[keep], np.diff(self.offsets)[keep]
        tok = token_index(starts, lengths)
        return Histories(self.users[keep], self.user_ids[keep], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         self.items[tok], self.timestamps[tok])

    def sequence_data(self):
        from ckv_cli.data.sequences import SequenceData

        return SequenceData(name="shard", user_ids=self.user_ids, item_ids=np.asarray(["<pad>"], dtype=object),
                            offsets=self.offsets, items=self.items, timestamps=self.timestamps, ratings=None,
                            genres=np.zeros((1, 0), np.uint8), genre_names=[])


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class ShardJob:
    """Everything a shard encoder needs (picklable: Ray ships it to every worker)."""

    checkpoint: str
    shared: str
    shared_sha256: str
    files: list[str]
    ranges: list[tuple[int, int]]
    batch_users: int
    metadata: dict
    force: bool = False


def write_shared(path: Path, plan: CachePlan, metadata: dict, force: bool) -> dict:
    """The shared tensors of a fitted plan into their own safetensors file; returns its file entry."""
    from safetensors.numpy import save_file

    from ckv_cli.artifact import _sha, encode_meta

    tensors = {f"shared/{s}/{n}": t.detach().cpu().contiguous().numpy() for s, c in plan.streams.items()
               if not isinstance(c, str) for n, t in c.shared().items()}
    meta = {k: encode_meta(v) for k, v in metadata.items()}
    meta.update({"format": SHARED_FORMAT, "format_version": FORMAT_VERSION, "ckv_version": __version__,
                 "plan": json.dumps(plan.describe(), sort_keys=True),
                 "checksums": json.dumps({k: _sha(a) for k, a in tensors.items()}, sort_keys=True)})
    write_safetensors(path, save_file, tensors, meta, force=force)
    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size,
            "tensor_bytes": {k: int(a.nbytes) for k, a in tensors.items()}}


def read_shared(path: Path) -> tuple[CachePlan, dict, dict[str, np.ndarray]]:
    """(plan with its shared tensors loaded, metadata, shared tensors) of a shared-tensor file."""
    from safetensors import SafetensorError, safe_open

    from ckv_cli.artifact import decode_meta

    if not path.is_file():
        raise CkvError(f"shared-tensor file not found: {path}")
    header, raw = read_header(path)
    if raw.get("format") != SHARED_FORMAT:
        raise CkvError(f"{path}: not a ckv shared-tensor file (metadata 'format' is {raw.get('format')!r})")
    try:
        meta = {k: decode_meta(v) for k, v in raw.items()}
        plan = plan_from_description(meta["plan"])
    except (ValueError, KeyError, TypeError, RecursionError, CkvError) as e:
        raise CkvError(f"{path}: corrupted metadata ({type(e).__name__})") from None
    try:
        with safe_open(str(path), "np") as f:
            shared = {n: f.get_tensor(n) for n in header}
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    load_shared_into(plan, shared, lambda why: CkvError(f"{path}: inconsistent shared tensors ({why})"))
    return plan, meta, shared


def write_shard(model, plan: CachePlan, hist: Histories, job: ShardJob, shard: int, out_dir: Path) -> dict:
    """Encode one shard's users (in batches of `job.batch_users`, as the in-process engine does) and write the
    shard file; returns its index entry, its byte accounting and the scores summed over its users."""
    from ckv_cli.compress import accounting, run_plan, teacher_batches
    from ckv_cli.kv.extract import teacher_cache_lengths

    t0 = time.perf_counter()
    a, b = job.ranges[shard]
    if len(hist.users) != b - a or (len(hist.users) and (hist.users[0] != a or hist.users[-1] != b - 1)):
        raise CkvError(f"shard {shard}: got {len(hist.users):,} users, expected users {a:,}..{b - 1:,}")
    path = out_dir / job.files[shard]
    ds = hist.sequence_data()
    writer = ArtifactWriter(path, lambda i, j: teacher_cache_lengths(ds, model.config.max_len, i, j), ds.user_ids,
                            force=job.force, shared=False)
    try:
        writer.start(plan)
        _, scored, _ = run_plan(model, plan, teacher_batches(model, ds, range(ds.n_users), job.batch_users),
                                keep_fields=False, sink=writer.add, n_users=ds.n_users, keep_per_user=False)
        acct = accounting(plan, None, model.kv_dims, len(model.layers), counts=(scored.done, scored.n_tokens))
        on_disk = sum(v for k, v in writer.tensor_bytes.items() if k in acct["per_user_breakdown"])
        if on_disk != acct["per_user_bytes"]:
            raise CkvError(f"internal: shard {shard}: per-user bytes on disk ({on_disk}) differ from the accounting "
                           f"({acct['per_user_bytes']})")
        shard_meta = {"number": shard, "of": len(job.files), "users": [a, b], "shared_file": Path(job.shared).name,
                      "shared_sha256": job.shared_sha256}
        writer.finish({**job.metadata, "accounting": acct, "shard": shard_meta})
    finally:
        writer.discard()
    seconds = time.perf_counter() - t0
    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size, "users": [a, b],
            "first_user_id": str(hist.user_ids[0]) if b > a else None,
            "last_user_id": str(hist.user_ids[-1]) if b > a else None, "tokens": scored.n_tokens,
            "per_user_bytes": acct["per_user_bytes"], "per_user_breakdown": acct["per_user_breakdown"],
            "seconds": seconds, "scored": scored.summary()}


def combine(entries: list[dict], plan: CachePlan, model) -> tuple[dict, dict]:
    """(byte accounting, metrics) of all shards: per-user bytes summed as laid out in each shard (each packs its
    own last partial byte and holds its own offsets), scores summed over every user."""
    from ckv_cli.compress import Scored, accounting, metrics_report

    breakdown: dict[str, int] = {}
    for e in entries:
        for k, v in e["per_user_breakdown"].items():
            breakdown[k] = breakdown.get(k, 0) + v
    scored = Scored.merged([e["scored"] for e in entries])
    acct = accounting(plan, None, model.kv_dims, len(model.layers), counts=(scored.done, scored.n_tokens),
                      breakdown=breakdown)
    return acct, metrics_report(scored, scored.recon())


def write_index(path: Path, metadata: dict, shared: dict, entries: list[dict], force: bool) -> dict:
    shards = [{k: e[k] for k in ("file", "sha256", "bytes", "users", "first_user_id", "last_user_id", "tokens",
                                  "per_user_bytes")} for e in entries]
    acct = metadata["accounting"]
    totals = {"shards": len(shards), "users": acct["users"], "tokens": acct["tokens"],
              "per_user_bytes": acct["per_user_bytes"], "shared_bytes": acct["shared_bytes"],
              "file_bytes": shared["bytes"] + sum(s["bytes"] for s in shards)}
    index = {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata,
             "shared": {k: shared[k] for k in ("file", "sha256", "bytes")}, "shards": shards, "totals": totals}
    text = json.dumps(index, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=force)
    return index


def compress_sharded(model, meta: dict, checkpoint_path, ds, opts, out, shard_size: int = DEFAULT_SHARD_USERS,
                     engine: str = "local", workers: int = 2, address: str | None = None, force: bool = False,
                     advance=None, command: str = "", on_stream=None, dataset=None) -> dict:
    """`ckv compress --shard-size N [--engine ray]`: fit the plan once here (calibration sample, distillation),
    write the shared tensors, encode the shards (in this process, or on Ray: `ckv_cli.engines.ray_engine`),
    then the index. Returns the report (as `compress_to_artifact`'s, plus the engine's timings). Every output
    (index, shared file, shards) is checked before any work; on failure the files this run wrote are removed."""
    from ckv_cli.codecs.evict import refuse_artifact
    from ckv_cli.compress import fit_and_distill, run_metadata
    from ckv_cli.data.datasets import sha256_file

    refuse_artifact(opts.codec)
    out = Path(out)
    if not is_index(out):
        raise CkvError(f"sharded output is an index: -o must end with .json (e.g. {stem_of(out)}.index.json), got {out}")
    if engine not in ("local", "ray"):
        raise CkvError(f"unknown --engine '{engine}' (choose local or ray)")
    if engine == "ray":
        from ckv_cli.engines.ray_engine import encode_shards, require_ray

        require_ray()
    ranges = shard_ranges(ds.n_users, shard_size, opts.batch_users)
    files, shared = shard_paths(out, len(ranges)), shared_path(out)
    for p in [out, shared, *files]:
        check_output(p, force)
    written = [p for p in [shared, *files] if not p.exists()]
    t0 = time.perf_counter()
    try:
        base = run_metadata(meta, checkpoint_path, sha256_file(Path(checkpoint_path)), ds, opts)
        base["command"] = command
        plan, distilled = fit_and_distill(model, ds, opts, on_stream)
        shared_entry = write_shared(shared, plan, base, force)
        job = ShardJob(str(Path(checkpoint_path).resolve()), str(shared.resolve()), shared_entry["sha256"],
                       [f.name for f in files], ranges, opts.batch_users, base, force)
        t1 = time.perf_counter()
        hists = (Histories.from_dataset(ds, a, b, model.config.max_len) for a, b in ranges)
        if engine == "ray":
            entries = encode_shards(job, hists, workers, address, dataset)
            if advance:
                advance(ds.n_users)
        else:
            entries = []
            for s, hist in enumerate(hists):
                entries.append(write_shard(model, plan, hist, job, s, out.parent))
                if advance:
                    advance(len(hist.users))
        t2 = time.perf_counter()
        acct, metrics = combine(entries, plan, model)
        if distilled:
            metrics["distillation"] = {"steps": len(distilled), "first": distilled[0], "last": distilled[-1]}
        busy = sum(e["seconds"] for e in entries)
        tokens = acct["tokens"]
        engine_info = {"name": engine, "workers": workers if engine == "ray" else 1, "address": address,
                       "shards": len(entries), "shard_size": shard_size, "fit_seconds": round(t1 - t0, 2),
                       "encode_seconds": round(t2 - t1, 2), "worker_seconds": round(busy, 2),
                       "tokens_per_second_per_worker": tokens / busy if busy else 0.0,
                       "tokens_per_second": tokens / (t2 - t1) if t2 > t1 else 0.0}
        metadata = {**base, "plan": plan.describe(), "accounting": acct, "metrics": metrics, "engine": engine_info,
                    "ckv_version": __version__}
        index = write_index(out, json.loads(json.dumps(metadata)), shared_entry, entries, force)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    report = {"artifact": str(out), **{k: v for k, v in metadata.items() if k != "command"}}
    report["stored_tensor_bytes"] = acct["per_user_bytes"] + acct["shared_bytes"]
    report["file_bytes"] = index["totals"]["file_bytes"]
    return report


# ---------------------------------------------------------------------------------------------- reading


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
        for entry in index["shards"]:
            art = Artifact.open(path.parent / entry["file"], shared=shared)
            a, b = entry["users"]
            if (a, b) != (expect, expect + art.n_users):
                raise CkvError(f"{art.path}: holds {art.n_users:,} users, the index says users {a:,}..{b - 1:,}")
            if art.meta.get("plan") != index["metadata"].get("plan"):
                raise CkvError(f"{art.path}: its plan is not the index's")
            shards.append(art)
            expect = b
        starts = np.array([e["users"][0] for e in index["shards"]] + [expect], dtype=np.int64)
        user_ids = [u for art in shards for u in art.user_ids]
        if len(set(user_ids)) != len(user_ids):
            raise CkvError(f"{path}: inconsistent artifact (a user is held by two shards)")
        tok = np.cumsum([0] + [int(art.offsets[-1]) for art in shards])
        offsets = np.concatenate([[0]] + [art.offsets[1:] + t for art, t in zip(shards, tok)]).astype(np.int64)
        fields = {name: field_meta(f, int(tok[-1]) if f.per == "token" else len(user_ids) + (name == "users/offsets"))
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


def read_by_shard(users: np.ndarray, starts: np.ndarray, read, fields_meta: dict):
    """Fields and offsets of `users` (global indices, any order) read shard by shard through `read(shard, local
    indices)`, put back in the order asked."""
    from ckv_cli.store import token_index

    shard = np.searchsorted(starts, users, side="right") - 1
    parts = [(np.flatnonzero(shard == s), *read(s, users[shard == s] - starts[s])) for s in np.unique(shard)]
    if not parts:
        return read(0, users)
    return merge_parts(parts, fields_meta, token_index)


def merge_parts(parts, fields_meta: dict, token_index):
    """[(positions asked, fields, offsets), ...] covering positions 0..n-1 once -> (fields, offsets) in position
    order: per-user rows reordered, token rows gathered user by user."""
    pos = np.concatenate([p for p, _, _ in parts])
    lengths = np.concatenate([np.diff(o) for _, _, o in parts]).astype(np.int64)
    joined = {k: np.concatenate([f[k] for _, f, _ in parts]) for k in parts[0][1]}
    order = np.empty(len(pos), np.int64)  # position asked -> row in the joined parts
    order[pos] = np.arange(len(pos))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)[order]
    tok = token_index(starts, lengths[order])
    fields = {k: (v[order] if fields_meta[k]["per"] == "user" else v[tok]) for k, v in joined.items()}
    return fields, np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)


def open_artifact(path: str | Path) -> Artifact:
    """One artifact file, an index of shards (a `.json` path), or one shard (read with the shared-tensor file its
    metadata names, beside it)."""
    path = Path(path)
    if is_index(path):
        return ShardedArtifact.open(path)
    if path.is_file() and read_header(path)[1].get("format") == SHARD_FORMAT:
        from ckv_cli.artifact import decode_meta

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
        from ckv_cli.compress_ctr import is_ctr_artifact

        if path.is_file() and is_ctr_artifact(path):  # a CTR model's artifact: no next-item plan to check
            from ckv_cli.store_ctr import verify_ctr_artifact

            return verify_ctr_artifact(path)
        art = Artifact.open(path)
        return [f"{path.name}: tensor '{n}' does not match its checksum" for n in art.verify()], \
            {"files": 1, "users": art.n_users, "tokens": int(art.offsets[-1])}
    index = read_index(path)
    problems: list[str] = []
    shared_entry = index["shared"]
    shared = None
    if _check_file(path.parent / shared_entry["file"], shared_entry, problems):
        try:
            _, smeta, shared = read_shared(path.parent / shared_entry["file"])
            from ckv_cli.artifact import _sha

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
