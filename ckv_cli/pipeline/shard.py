"""Writing a sharded artifact (`ckv_cli.artifact.sharded` says what it is): fit the plan once, write the shared
tensors, encode the shards (in this process, or on Ray: `ckv_cli.pipeline.ray_engine`), then the index.

Shard assignment is fixed by the users, never by arrival order, under one of two rules the index records:
`range` (`--shard-size N`: contiguous ranges of the dataset's user order, each a multiple of the encode batch,
so that every shard encodes exactly the batches of users the single-file engine encodes) or `hash`
(`--shards S`: `ckv_cli.data.partition.shard_of`, which a distributed reader applies without the global user
order; `ckv_cli.pipeline.ray_read`). Each shard encodes its users in batches from its first user, in this
process or on a Ray worker alike (the teacher prefill of a padded batch is not bit-identical across batch
compositions; measured on the sample HSTU: 4 of 1,200 tensors differ by up to 3.6e-7): the same data, rule and
seed give the same bytes, shard for shard. Under the hash rule the calibration sample and the data fingerprint
are the partition module's (computable shard by shard), so this process and a distributed read agree on them.
Rows a distributed reader delivers twice are dropped by user id (`Histories.deduplicated`). The staged histories
are next-item ones (each user's last `max_len + 1` events): sharded output is for next-item models.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckv_cli import __version__
from ckv_cli.artifact.sharded import (DEFAULT_SHARD_USERS, HASH, RANGE, is_index, set_names, sha256_of,
                                      shard_ranges, stem_of, write_index, write_shared)
from ckv_cli.artifact.writer import ArtifactWriter
from ckv_cli.codecs import CachePlan
from ckv_cli.errors import CkvError
from ckv_cli.io.fileset import FileSet
from ckv_cli.io.guarded import where
from ckv_cli.spec import token_index
from ckv_cli.tasks import NEXT_ITEM, task_of


@dataclass
class Histories:
    """One shard's users' event windows, what its encoder reads: user (position in the shard: 0, 1, ...), raw
    user id, and each user's last `max_len + 1` events (the cached window, its last event and the held-out item)."""

    users: np.ndarray  # (U,) int64
    user_ids: np.ndarray  # (U,) object (str)
    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (E,) int64
    timestamps: np.ndarray  # (E,) int64

    @classmethod
    def of_users(cls, ds, users: np.ndarray, max_len: int) -> "Histories":
        """The windows of dataset users `users` (indices, increasing)."""
        users = np.asarray(users, dtype=np.int64)
        ends = ds.offsets[users + 1]
        starts = np.maximum(ds.offsets[users], ends - (max_len + 1))
        tok = token_index(starts, ends - starts)
        return cls(np.arange(len(users), dtype=np.int64), np.asarray([str(u) for u in ds.user_ids[users]], dtype=object),
                   np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64), ds.items[tok], ds.timestamps[tok])

    @classmethod
    def from_dataset(cls, ds, a: int, b: int, max_len: int) -> "Histories":
        return cls.of_users(ds, np.arange(a, b), max_len)

    def to_arrow(self, shard: int):
        import pyarrow as pa

        off = pa.array(self.offsets, pa.int64())
        return pa.table({"user": pa.array(self.users, pa.int64()), "user_id": pa.array(list(self.user_ids), pa.string()),
                         "shard": pa.array(np.full(len(self.users), shard, np.int64)),
                         "items": pa.LargeListArray.from_arrays(off, pa.array(self.items, pa.int64())),
                         "timestamps": pa.LargeListArray.from_arrays(off, pa.array(self.timestamps, pa.int64()))})

    @classmethod
    def from_arrow(cls, table) -> "Histories":
        """Rows in any order, possibly repeated: sorted by user position, each user id kept once."""
        import pyarrow.compute as pc

        if table.num_rows == 0:
            return cls.empty()
        table = table.sort_by("user")
        items, ts = table.column("items").combine_chunks(), table.column("timestamps").combine_chunks()
        lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
        out = cls(table.column("user").to_numpy().astype(np.int64),
                  np.asarray(table.column("user_id").to_pylist(), dtype=object),
                  np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  pc.list_flatten(items).to_numpy().astype(np.int64), pc.list_flatten(ts).to_numpy().astype(np.int64))
        return out.deduplicated()

    @classmethod
    def empty(cls) -> "Histories":
        return cls(np.zeros(0, np.int64), np.zeros(0, dtype=object), np.zeros(1, np.int64), np.zeros(0, np.int64),
                   np.zeros(0, np.int64))

    def deduplicated(self) -> "Histories":
        """Each user id once (its first row in user order): a distributed reader may deliver a row twice."""
        _, first = np.unique(self.user_ids.astype(str), return_index=True)
        if len(first) == len(self.users):
            return self
        keep = np.sort(first)
        starts, lengths = self.offsets[keep], np.diff(self.offsets)[keep]
        tok = token_index(starts, lengths)
        return Histories(self.users[keep], self.user_ids[keep], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         self.items[tok], self.timestamps[tok])

    def sequence_data(self):
        from ckv_cli.data.sequences import SequenceData

        return SequenceData(name="shard", user_ids=self.user_ids, item_ids=np.asarray(["<pad>"], dtype=object),
                            offsets=self.offsets, items=self.items, timestamps=self.timestamps, ratings=None,
                            genres=np.zeros((1, 0), np.uint8), genre_names=[])


@dataclass
class ShardJob:
    """Everything a shard encoder needs (picklable: Ray ships it to every worker). `ranges[s]`: shard s's users
    as positions [a, b) in the artifact's user order (shard after shard)."""

    checkpoint: str
    shared: str
    shared_sha256: str
    files: list[str]
    ranges: list[tuple[int, int]]
    batch_users: int
    metadata: dict
    force: bool = False
    rule: str = RANGE


def shard_metadata(job: "ShardJob", shard: int) -> dict:
    """The `shard` entry of a shard file's metadata: range shards name their user range; hash shards their user
    count (their position in the artifact's order is the index's business: an update moves it)."""
    a, b = job.ranges[shard]
    out = {"number": shard, "of": len(job.files), "shared_file": Path(job.shared).name,
           "shared_sha256": job.shared_sha256}
    return {**out, "users": [a, b]} if job.rule == RANGE else {**out, "rule": job.rule, "n_users": b - a}


def write_shard(model, plan: CachePlan, hist: Histories, job: ShardJob, shard: int, out_dir: Path) -> dict:
    """Encode one shard's users (in batches of `job.batch_users`, as the in-process engine does) and write the
    shard file; returns its index entry, its byte accounting and the scores summed over its users."""
    from ckv_cli.pipeline.compress import RaggedRows, accounting, full_width, run_plan
    from ckv_cli.tasks.next_item import Scored, teacher_batches, teacher_cache_lengths

    t0 = time.perf_counter()
    a, b = job.ranges[shard]
    if len(hist.users) != b - a or not np.array_equal(hist.users, np.arange(b - a)):
        raise CkvError(f"shard {shard}: got {len(hist.users):,} users, expected {b - a:,}")
    path = out_dir / job.files[shard]
    ds = hist.sequence_data()
    writer = ArtifactWriter(path, lambda i, j: teacher_cache_lengths(ds, model.config.max_len, i, j), ds.user_ids,
                            force=job.force, shared=False)
    try:
        writer.start(plan)
        scored = Scored(ds.n_users, keep_per_user=False)
        rows = RaggedRows()
        _, errors = run_plan(model, plan, teacher_batches(model, ds, range(ds.n_users), job.batch_users), scored,
                             keep_fields=False, sink=writer.add, rows=rows)
        acct = accounting(plan, None, full_width(model), counts=(scored.done, scored.n_tokens), ragged=rows.rows)
        on_disk = sum(v for k, v in writer.tensor_bytes.items() if k in acct["per_user_breakdown"])
        if on_disk != acct["per_user_bytes"]:
            raise CkvError(f"internal: shard {shard}: per-user bytes on disk ({on_disk}) differ from the accounting "
                           f"({acct['per_user_bytes']})")
        writer.finish({**job.metadata, "accounting": acct, "shard": shard_metadata(job, shard)})
    finally:
        writer.discard()
    seconds = time.perf_counter() - t0
    written = where(path)  # (inside a transaction: the staged file)
    return {"file": path.name, "sha256": sha256_of(written), "bytes": written.stat().st_size, "users": [a, b],
            "first_user_id": str(hist.user_ids[0]) if b > a else None,
            "last_user_id": str(hist.user_ids[-1]) if b > a else None, "tokens": scored.n_tokens,
            "per_user_bytes": acct["per_user_bytes"], "per_user_breakdown": acct["per_user_breakdown"],
            "seconds": seconds, "scored": scored.summary(), "errors": errors.summary()}


def combine(entries: list[dict], plan: CachePlan, model) -> tuple[dict, dict]:
    """(byte accounting, metrics) of all shards: per-user bytes summed as laid out in each shard (each packs its
    own last partial byte and holds its own offsets), scores summed over every user."""
    from ckv_cli.pipeline.compress import Errors, accounting, full_width
    from ckv_cli.tasks.next_item import Scored

    breakdown: dict[str, int] = {}
    for e in entries:
        for k, v in e["per_user_breakdown"].items():
            breakdown[k] = breakdown.get(k, 0) + v
    scored = Scored.merged([e["scored"] for e in entries])
    errors = Errors()
    for e in entries:
        errors.merge(e["errors"])
    acct = accounting(plan, None, full_width(model), counts=(scored.done, scored.n_tokens), breakdown=breakdown)
    return acct, scored.report(errors.recon())


def check_sharding(model, opts, out: Path, engine: str, hashed: bool) -> None:
    """Refusals before any work: CTR models, evicting codecs, an output that is not an index, an unknown engine,
    distillation under the hash rule (it samples users from the whole log, which no shard has)."""
    from ckv_cli.codecs.evict import refuse_artifact

    if task_of(model) is not NEXT_ITEM:
        raise CkvError(f"sharded output (--shard-size, --shards, --engine ray) is for next-item models; "
                       f"{getattr(model, 'arch', 'this model')} is a CTR model: write one artifact file")
    refuse_artifact(opts.codec)
    if not is_index(out):
        raise CkvError(f"sharded output is an index: -o must end with .json (e.g. {stem_of(out)}.index.json), got {out}")
    if engine not in ("local", "ray"):
        raise CkvError(f"unknown --engine '{engine}' (choose local or ray)")
    if hashed and opts.distill_steps:
        raise CkvError("--distill-steps does not go with --shards yet (distillation samples users from the whole log)")
    if engine == "ray":
        from ckv_cli.pipeline.ray_engine import require_ray

        require_ray()


class ShardOutputs:
    """The files a sharded run writes (index, shared file, shards), checked before any work and replaced as a unit
    (`ckv_cli.io.fileset.FileSet`: with `force` the new set is written beside the old one under free names and the
    index is swapped last). Used as a context: leaving it before `commit` (an error, an interrupt) removes the files
    this run wrote; the old set stays valid."""

    def __init__(self, out: Path, n_shards: int, force: bool):
        self.out, self.force = Path(out), force
        self.fileset = FileSet(self.out, force, lambda g: set_names(self.out, n_shards, g))
        self.shared, self.files = self.fileset.paths[0], self.fileset.paths[1:]

    def commit(self, write_index):
        return self.fileset.commit(write_index)

    def __enter__(self) -> "ShardOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.fileset.__exit__(*exc)


def check_shard_count(n_shards) -> None:
    if type(n_shards) is not int or n_shards < 1:
        raise CkvError(f"--shards must be a positive integer, got {n_shards!r}")


def hash_groups(user_ids, n_shards: int) -> list[np.ndarray]:
    """Dataset indices of each shard's users under the hash rule, increasing (raw-id order)."""
    from ckv_cli.data.partition import shard_of

    check_shard_count(n_shards)
    shard = shard_of(user_ids, n_shards)
    return [np.flatnonzero(shard == s) for s in range(n_shards)]


def hash_metadata(base: dict, fingerprint: str, n_users: int, opts) -> dict:
    """The run metadata under the hash rule: the sharded data fingerprint and the calibration sample's rule."""
    from ckv_cli.data.partition import CALIBRATION_RULE

    return {**base, "data_fingerprint": fingerprint, "calib_users": min(opts.calib_users, n_users),
            "calib_sample": CALIBRATION_RULE}


def ranges_of(counts: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum([0] + list(counts)).tolist()
    return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def compress_sharded(model, meta: dict, checkpoint_path, ds, opts, out, shard_size: int = DEFAULT_SHARD_USERS,
                     engine: str = "local", workers: int = 2, address: str | None = None, force: bool = False,
                     advance=None, command: str = "", on_stream=None, dataset=None, n_shards: int | None = None,
                     plan: CachePlan | None = None) -> dict:
    """`ckv compress --shard-size N | --shards S [--engine ray]`: fit the plan once here (calibration sample,
    distillation; or take `plan`, fitted already), write the shared tensors, encode the shards (in this
    process, or on Ray: `ckv_cli.pipeline.ray_engine`), then the index. `n_shards` selects the hash rule (module
    docstring), else `shard_size` the range rule. Returns the report (as `compress_to_artifact`'s, plus the
    engine's timings). Every output (index, shared file, shards) is checked before any work and the set is replaced
    as a unit (`ShardOutputs`); on failure or an interrupt the files this run wrote are removed."""
    from ckv_cli.data.partition import bottom_k, calibration_keys, combined_fingerprint
    from ckv_cli.data.sequences import subset_fingerprint
    from ckv_cli.io.files import sha256_file
    from ckv_cli.pipeline.compress import fit_and_distill, run_metadata

    out = Path(out)
    hashed = n_shards is not None
    check_sharding(model, opts, out, engine, hashed)
    if hashed:
        groups = hash_groups(ds.user_ids, n_shards)
        assignment = {"rule": HASH, "shards": n_shards}
    else:
        groups = [np.arange(a, b) for a, b in shard_ranges(ds.n_users, shard_size, opts.batch_users)]
        assignment = {"rule": RANGE, "shard_size": shard_size}
    outputs = ShardOutputs(out, len(groups), force)
    t0 = time.perf_counter()
    with outputs:  # an interrupted or failed run removes the new files; an old set stays valid until the index swap
        base = run_metadata(meta, checkpoint_path, sha256_file(Path(checkpoint_path)), ds, opts, model)
        base["command"] = command
        calib = None
        if hashed:
            base = hash_metadata(base, combined_fingerprint([subset_fingerprint(ds, g) for g in groups]),
                                 ds.n_users, opts)
            calib = bottom_k(calibration_keys(ds.user_ids, opts.seed), ds.user_ids, opts.calib_users)
        distilled = None
        if plan is None:
            plan, distilled, _ = fit_and_distill(model, ds, opts, on_stream, calib_users=calib)
        hists = (Histories.of_users(ds, g, model.config.max_len) for g in groups)
        report = encode_and_index(model, plan, base, checkpoint_path, outputs, [len(g) for g in groups], assignment,
                                  opts.batch_users, hists=hists, engine=engine, workers=workers, address=address,
                                  advance=advance, dataset=dataset, t0=t0, distilled=distilled)
    return report


def encode_and_index(model, plan: CachePlan, base: dict, checkpoint_path, outputs: ShardOutputs, counts: list[int],
                     assignment: dict, batch_users: int, hists=None, staging: Path | None = None,
                     engine: str = "local", workers: int = 2, address: str | None = None, advance=None,
                     dataset=None, t0: float | None = None, distilled=None, engine_extra: dict | None = None) -> dict:
    """The shared file, the shards (`hists`: each shard's `Histories` in shard order; or on Ray, `staging`: a
    directory of them staged as Parquet, one file per shard) and the index; returns the report."""
    t0 = time.perf_counter() if t0 is None else t0
    out, force = outputs.out, outputs.force
    shared_entry = write_shared(outputs.shared, plan, base, force)
    job = ShardJob(str(Path(checkpoint_path).resolve()), str(outputs.shared.resolve()), shared_entry["sha256"],
                   [f.name for f in outputs.files], ranges_of(counts), batch_users, base, force, assignment["rule"])
    t1 = time.perf_counter()
    if engine == "ray":
        from ckv_cli.pipeline.ray_engine import encode_shards

        entries = encode_shards(job, hists, workers, address, dataset, staging=staging)
        if advance:
            advance(sum(counts))
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
    engine_info = {"name": engine, "workers": workers if engine == "ray" else 1,
                   "address": address, "shards": len(entries),
                   **({"shard_size": assignment["shard_size"]} if assignment["rule"] == RANGE else {}),
                   "assignment": assignment["rule"], "fit_seconds": round(t1 - t0, 2),
                   "encode_seconds": round(t2 - t1, 2), "worker_seconds": round(busy, 2),
                   "tokens_per_second_per_worker": tokens / busy if busy else 0.0,
                   "tokens_per_second": tokens / (t2 - t1) if t2 > t1 else 0.0, **(engine_extra or {})}
    if engine == "ray":
        engine_info["nodes"] = len({e["node"] for e in entries if e.get("node") is not None})
    metadata = {**base, "plan": plan.describe(), "accounting": acct, "metrics": metrics, "engine": engine_info,
                "ckv_version": __version__}
    index = outputs.commit(lambda: write_index(out, json.loads(json.dumps(metadata)), shared_entry, entries, force,
                                               assignment))
    report = {"artifact": str(out), **{k: v for k, v in metadata.items() if k != "command"}}
    report["stored_tensor_bytes"] = acct["per_user_bytes"] + acct["shared_bytes"]
    report["file_bytes"] = index["totals"]["file_bytes"]
    return report
