"""Writing a sharded artifact (`ckv_cli.artifact.sharded` says what it is): fit the plan once, write the shared
tensors, encode the shards (in this process, or on Ray: `ckv_cli.pipeline.ray_engine`), then the index.

Shard assignment is fixed by user index (contiguous ranges), never by arrival order, and a shard's size is a
multiple of the encode batch, so that every shard encodes exactly the batches of users the in-process engine
encodes (the teacher prefill of a padded batch is not bit-identical across batch compositions; measured on the
sample HSTU: 4 of 1,200 tensors differ by up to 3.6e-7): the same seed gives the same bytes, shard for shard.
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
from ckv_cli.artifact.sharded import (DEFAULT_SHARD_USERS, is_index, sha256_of, shard_paths, shard_ranges,
                                      shared_path, stem_of, write_index, write_shared)
from ckv_cli.artifact.writer import ArtifactWriter
from ckv_cli.codecs import CachePlan
from ckv_cli.errors import CkvError
from ckv_cli.io.files import check_output
from ckv_cli.spec import token_index
from ckv_cli.tasks import NEXT_ITEM, task_of


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
    """Everything a shard encoder needs (picklable: Ray ships it to every worker)."""

    checkpoint: str
    shared: str
    shared_sha256: str
    files: list[str]
    ranges: list[tuple[int, int]]
    batch_users: int
    metadata: dict
    force: bool = False


def write_shard(model, plan: CachePlan, hist: Histories, job: ShardJob, shard: int, out_dir: Path) -> dict:
    """Encode one shard's users (in batches of `job.batch_users`, as the in-process engine does) and write the
    shard file; returns its index entry, its byte accounting and the scores summed over its users."""
    from ckv_cli.pipeline.compress import RaggedRows, accounting, full_width, run_plan
    from ckv_cli.tasks.next_item import Scored, teacher_batches, teacher_cache_lengths

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
        scored = Scored(ds.n_users, keep_per_user=False)
        rows = RaggedRows()
        _, errors = run_plan(model, plan, teacher_batches(model, ds, range(ds.n_users), job.batch_users), scored,
                             keep_fields=False, sink=writer.add, rows=rows)
        acct = accounting(plan, None, full_width(model), counts=(scored.done, scored.n_tokens), ragged=rows.rows)
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


def compress_sharded(model, meta: dict, checkpoint_path, ds, opts, out, shard_size: int = DEFAULT_SHARD_USERS,
                     engine: str = "local", workers: int = 2, address: str | None = None, force: bool = False,
                     advance=None, command: str = "", on_stream=None, dataset=None) -> dict:
    """`ckv compress --shard-size N [--engine ray]`: fit the plan once here (calibration sample, distillation),
    write the shared tensors, encode the shards (in this process, or on Ray: `ckv_cli.engines.ray_engine`),
    then the index. Returns the report (as `compress_to_artifact`'s, plus the engine's timings). Every output
    (index, shared file, shards) is checked before any work; on failure the files this run wrote are removed."""
    from ckv_cli.codecs.evict import refuse_artifact
    from ckv_cli.io.files import sha256_file
    from ckv_cli.pipeline.compress import fit_and_distill, run_metadata

    if task_of(model) is not NEXT_ITEM:
        raise CkvError(f"sharded output (--shard-size, --engine ray) is for next-item models; {getattr(model, 'arch', 'this model')} "
                       "is a CTR model: write one artifact file")
    refuse_artifact(opts.codec)
    out = Path(out)
    if not is_index(out):
        raise CkvError(f"sharded output is an index: -o must end with .json (e.g. {stem_of(out)}.index.json), got {out}")
    if engine not in ("local", "ray"):
        raise CkvError(f"unknown --engine '{engine}' (choose local or ray)")
    if engine == "ray":
        from ckv_cli.pipeline.ray_engine import encode_shards, require_ray

        require_ray()
    ranges = shard_ranges(ds.n_users, shard_size, opts.batch_users)
    files, shared = shard_paths(out, len(ranges)), shared_path(out)
    for p in [out, shared, *files]:
        check_output(p, force)
    written = [p for p in [shared, *files] if not p.exists()]
    t0 = time.perf_counter()
    try:
        base = run_metadata(meta, checkpoint_path, sha256_file(Path(checkpoint_path)), ds, opts, model)
        base["command"] = command
        plan, distilled, _ = fit_and_distill(model, ds, opts, on_stream)
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
