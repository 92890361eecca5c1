"""`ckv compress --engine ray --shards S --data DATASET`: the log read, grouped and windowed on the Ray cluster;
the driver reads Parquet footers, per-shard summaries and the calibration sample, never the events.

DATASET is a Parquet dataset (a directory of .parquet files or a glob: `ckv_cli.data.readers.parquet_dataset`)
or one .parquet file, on storage every node sees. Two Ray Data jobs:

1. Read: one task per row group (`read_piece`: the columns mapped and checked as every Parquet reader of ckv
   does, `log_of_table`), each row tagged with its place in the log (`seq`: file, row) and its user's shard
   (`ckv_cli.data.partition.shard_of`, the hash rule); `groupby("shard").map_groups` then gives each shard's
   events, whole, to an actor (`_GroupShard`, one CPU) that sorts them back into log order and builds the
   shard's sequences exactly as `ckv_cli.data.sequences.build` builds a whole log (the same function: items
   through the checkpoint's vocabulary, unknown ones dropped and counted; users with fewer than 3 events
   dropped and counted; events sorted by time, ties in log order), windows each user to its last `max_len + 1`
   events and writes them to the staging directory (`shard-SSSSS.parquet`), with the shard's calibration
   candidates (its bottom-k users by calibration key, `calib-SSSSS.parquet`). It returns one summary row: user,
   event and drop counts, the shard's fingerprint, its candidates' keys.
2. Encode: `ckv_cli.pipeline.ray_engine.encode_shards` over the staged shards (actors read their own file).

Between the two the driver merges the candidates into the global bottom-k, reads those users' windows (k
windows), fits the plan on them (`ckv_cli.pipeline.compress.fit_and_distill`), writes the shared tensors; after
the second it writes the index. The driver holds the checkpoint's vocabulary, one summary per shard and the
calibration sample: its memory does not grow with the log. `compress_sharded(..., n_shards=S)` of the same
log read in one process gives the same bytes (tested: `tests/test_scale.py`, `tests/test_ray_cluster.py`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ckv_cli.errors import CkvError

MIN_EVENTS = 3  # as `ckv_cli.data.sequences.load`
VOCAB_FILE = "item_vocab.json"


def calib_path(staging: Path, shard: int) -> Path:
    return staging / f"calib-{shard:05d}.parquet"


def dataset_files(spec: str) -> list[Path] | None:
    """The Parquet files of `spec` (a dataset, or one .parquet file), or None when it is another kind of log
    (which the driver reads itself)."""
    from ckv_cli.data.readers import PARQUET_SUFFIXES, parquet_dataset

    files = parquet_dataset(spec)
    if files is not None:
        return files
    p = Path(spec)
    return [p] if p.is_file() and p.name.lower().endswith(PARQUET_SUFFIXES) else None


def _read_piece(batch, columns: dict | None, n_shards: int):
    """Ray Data task: one row group -> its events (user id, raw item id, timestamp, seq, shard)."""
    import pyarrow as pa

    from ckv_cli.data.partition import shard_of
    from ckv_cli.data.readers import Piece, read_piece

    row = {k: batch.column(k)[0].as_py() for k in batch.column_names}
    piece = Piece(**row)
    log = read_piece(piece, columns)
    n = len(log)
    return pa.table({"user_id": pa.array(log.users, pa.string()), "item": pa.array(log.items, pa.string()),
                     "timestamp": pa.array(log.timestamps, pa.int64()),
                     "seq": pa.array(piece.seq0 + np.arange(n, dtype=np.int64), pa.int64()),
                     "shard": pa.array(shard_of(log.users, n_shards) if n else np.zeros(0, np.int64), pa.int64()),
                     "reader": pa.array(np.full(n, node_tag(), np.int32), pa.int32())})


def node_tag() -> int:
    """A small number naming the Ray node this runs on (crc32 of its id): what a report counts nodes by."""
    import zlib

    import ray

    return zlib.crc32(ray.get_runtime_context().get_node_id().encode()) & 0x7FFFFFFF


class _GroupShard:
    """Ray actor: builds, windows and stages one shard's users (module docstring); holds the vocabulary (read
    from the staging directory, where the driver wrote it: a large one is not shipped with every actor)."""

    def __init__(self, max_len: int, seed: int, k: int, staging: str, name: str):
        from ckv_cli.data.sequences import vocab_lookup

        self.vocab = json.loads((Path(staging) / VOCAB_FILE).read_text())
        self.lookup = vocab_lookup(self.vocab)
        self.max_len, self.seed, self.k, self.staging, self.name = max_len, seed, k, Path(staging), name

    def __call__(self, table):
        import pyarrow as pa

        from ckv_cli.data.partition import bottom_k, calibration_keys
        from ckv_cli.data.readers import Log
        from ckv_cli.data.sequences import build
        from ckv_cli.pipeline.ray_engine import staged_path, write_staged
        from ckv_cli.pipeline.shard import Histories

        shard = int(table.column("shard")[0].as_py())
        table = table.sort_by("seq")
        seq = table.column("seq").to_numpy()
        keep = np.concatenate([[True], seq[1:] != seq[:-1]]) if len(seq) else np.zeros(0, bool)  # a row read twice
        table = table.filter(pa.array(keep))
        log = Log(users=np.asarray(table.column("user_id").to_numpy(zero_copy_only=False), dtype=str),
                  items=np.asarray(table.column("item").to_numpy(zero_copy_only=False), dtype=str),
                  timestamps=table.column("timestamp").to_numpy().astype(np.int64), ratings=None)
        ds = build(log, self.name, MIN_EVENTS, self.vocab, item_lookup=self.lookup, allow_empty=True)
        write_staged(Histories.of_users(ds, np.arange(ds.n_users), self.max_len).to_arrow(shard),
                     staged_path(self.staging, shard))
        keys = calibration_keys(ds.user_ids, self.seed)
        cand = bottom_k(keys, ds.user_ids, self.k)
        calib = Histories.of_users(ds, cand, self.max_len).to_arrow(shard)
        write_staged(calib, calib_path(self.staging, shard))  # the keys travel in the summary
        readers = np.unique(table.column("reader").to_numpy()).tolist() if table.num_rows else []
        summary = {"shard": shard, "node": node_tag(), "readers": readers, "users": ds.n_users,
                   "events": int(len(ds.items)), "rows": int(len(log)),
                   "dropped_users": ds.dropped_users, "dropped_events": ds.dropped_events,
                   "fingerprint": ds.fingerprint,
                   "candidates": [[int(keys[i]), str(ds.user_ids[i])] for i in cand]}
        return {"shard": np.array([shard]), "summary": np.array([json.dumps(summary)])}


def read_and_group(ray, pieces, columns, n_shards: int, item_vocab, max_len: int, opts, staging: Path, name: str,
                   workers: int) -> list[dict]:
    """Job 1 (module docstring): each shard's summary, in shard order (a shard no event reached: zeros)."""
    from ckv_cli.data.sequences import empty_fingerprint

    (staging / VOCAB_FILE).write_text(json.dumps(list(item_vocab)))
    rows = ray.data.from_items([dict(p.__dict__) for p in pieces], override_num_blocks=max(1, len(pieces)))
    events = rows.map_batches(_read_piece, fn_kwargs={"columns": columns, "n_shards": n_shards}, batch_size=1,
                              batch_format="pyarrow")
    done = (events.groupby("shard", num_partitions=max(1, min(n_shards, 4 * workers)))
            .map_groups(_GroupShard, fn_constructor_args=(max_len, opts.seed, opts.calib_users, str(staging), name),
                        num_cpus=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers))
            .take_all())
    got = {int(r["shard"]): json.loads(r["summary"]) for r in done}
    empty = {"node": None, "readers": [], "users": 0, "events": 0, "rows": 0, "dropped_users": 0, "dropped_events": 0,
             "fingerprint": empty_fingerprint(item_vocab), "candidates": []}
    return [got.get(s, {**empty, "shard": s}) for s in range(n_shards)]


def calibration_sample(summaries: list[dict], k: int, staging: Path):
    """The global bottom-k of the shards' candidates, as one `SequenceData` of their windows in raw-id order
    (the order in which this process would take them from the whole log)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ckv_cli.pipeline.shard import Histories

    cands = sorted((key, uid, s["shard"]) for s in summaries for key, uid in s["candidates"])[:k]
    parts = []
    for shard in sorted({c[2] for c in cands}):
        wanted = pa.array([c[1] for c in cands if c[2] == shard], pa.string())
        t = pq.read_table(calib_path(staging, shard))
        parts.append(t.filter(pc.is_in(t.column("user_id"), value_set=wanted)))
    table = pa.concat_tables(parts)
    order = np.argsort(np.asarray(table.column("user_id").to_pylist(), dtype=str), kind="stable")
    table = table.take(pa.array(order)).set_column(0, "user", pa.array(np.arange(len(order)), pa.int64()))
    hist = Histories.from_arrow(table)
    if len(hist.users) != len(cands):
        raise CkvError(f"internal: {len(hist.users)} of the {len(cands)} calibration users were staged")
    return hist.sequence_data()


def check_read(summaries: list[dict], name: str, n_files: int, vocab_size: int) -> None:
    """The refusals `build` makes of a whole log, made of the shards' sums."""
    rows = sum(s["rows"] for s in summaries)
    if rows == 0:
        raise CkvError(f"{name}: no rows in its {n_files} Parquet file(s)")
    if sum(s["users"] for s in summaries) == 0:
        if sum(s["dropped_events"] for s in summaries) == rows:
            raise CkvError(f"{name}: none of its items is in the checkpoint's vocabulary ({vocab_size:,} items): "
                           "was the checkpoint trained on other data?")
        raise CkvError(f"{name}: no user has at least {MIN_EVENTS} events")


def compress_distributed(model, meta: dict, checkpoint_path, spec: str, columns: dict | None, opts, out,
                         n_shards: int, workers: int = 2, address: str | None = None, force: bool = False,
                         advance=None, command: str = "", on_stream=None) -> dict:
    """The module docstring's run; returns the report of `compress_sharded` plus what the read found (events,
    drops) in `read`."""
    from ckv_cli.data.partition import combined_fingerprint
    from ckv_cli.data.readers import dataset_name, parquet_pieces
    from ckv_cli.io.files import sha256_file
    from ckv_cli.pipeline.compress import fit_and_distill, run_metadata
    from ckv_cli.pipeline.ray_engine import ray_session
    from ckv_cli.pipeline.shard import (HASH, ShardOutputs, check_shard_count, check_sharding, encode_and_index,
                                        hash_metadata)

    out = Path(out)
    check_sharding(model, opts, out, "ray", True)
    check_shard_count(n_shards)
    files = dataset_files(spec)
    if files is None:
        raise CkvError(f"--engine ray reads a Parquet dataset on the workers (a directory or glob of .parquet files); "
                       f"{spec} is not one")
    name = dataset_name(spec)
    vocab = meta["item_vocab"]
    outputs = ShardOutputs(out, n_shards, force)
    staging = Path(tempfile.mkdtemp(prefix=".ckv-staging-", dir=out.parent))
    t0 = time.perf_counter()
    with outputs:  # leaving before the index swap removes the new files
        try:
            pieces = parquet_pieces(files)
            with ray_session(workers, address) as ray:
                summaries = read_and_group(ray, pieces, columns, n_shards, vocab, model.config.max_len, opts, staging,
                                           name, workers)
                check_read(summaries, name, len(files), len(vocab) - 1)
                t_read = time.perf_counter()
                n_users = sum(s["users"] for s in summaries)
                calib = calibration_sample(summaries, opts.calib_users, staging)
                calib.name = name
                base = run_metadata(meta, checkpoint_path, sha256_file(Path(checkpoint_path)), calib, opts, model)
                base["command"] = command
                base = hash_metadata(base, combined_fingerprint([s["fingerprint"] for s in summaries]), n_users, opts)
                plan, distilled, _ = fit_and_distill(model, calib, opts, on_stream, calib_users=np.arange(calib.n_users))
                del calib
                nodes = {n for s in summaries for n in s["readers"] + [s["node"]] if n is not None}
                read = {"files": len(files), "row_groups": len(pieces), "nodes": len(nodes),
                        "rows": sum(s["rows"] for s in summaries),
                        "events": sum(s["events"] for s in summaries), "users": n_users,
                        "dropped_users": sum(s["dropped_users"] for s in summaries),
                        "dropped_events": sum(s["dropped_events"] for s in summaries)}
                report = encode_and_index(model, plan, base, checkpoint_path, outputs, [s["users"] for s in summaries],
                                          {"rule": HASH, "shards": n_shards}, opts.batch_users, staging=staging,
                                          engine="ray", workers=workers, address=address, advance=advance, t0=t0,
                                          distilled=distilled,
                                          engine_extra={"read": "ray", "read_seconds": round(t_read - t0, 2)})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report["read"] = read
    return report
