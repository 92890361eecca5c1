"""`ckv compress --engine ray`: encode the shards as a Ray Data job (Ray is imported here only, lazily).

The driver fits the plan (`ckv_cli.pipeline.compress.fit_and_distill`) and writes the shared tensors; the users'
histories (their last `max_len + 1` events) are staged as Parquet, one file per shard, beside the output; Ray
Data reads them (`read_parquet`), groups the rows by shard (`groupby("shard").map_groups`: Ray Data's
`map_batches` over batches that hold one whole shard each) and hands each shard to an actor of a pool of
`workers` (one CPU each), which holds one model (loaded from the checkpoint) and one plan (loaded from the
shared file, so the shared file alone is what the workers encode with), encodes the shard's users in batches
of `--batch-users` and writes the shard file (`ckv_cli.pipeline.shard.write_shard`). A shard reaches its actor whole
and in user order, duplicates dropped by user id: the bytes do not depend on how Ray split or repeated the
rows. The checkpoint, the output directory and the staging directory must be on storage every Ray node sees.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ckv_cli.errors import CkvError

INSTALL_HINT = "--engine ray needs Ray, which is not installed here: pip install 'ckv-cli[ray]'"


def require_ray():
    """The `ray` module, or a one-line CkvError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CkvError(INSTALL_HINT) from None
    return ray


class _ShardEncoder:
    """One Ray actor: a model and a plan, loaded once; each call encodes and writes one shard."""

    def __init__(self, job):
        import torch

        from ckv_cli.artifact.sharded import read_shared
        from ckv_cli.models.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        self.job = job
        self.model, _ = load_checkpoint(Path(job.checkpoint))
        self.plan, _, _ = read_shared(Path(job.shared))

    def __call__(self, table):
        from ckv_cli.pipeline.shard import Histories, write_shard

        shards = np.unique(table.column("shard").to_numpy())
        if len(shards) != 1:
            raise CkvError(f"internal: a batch holds shards {shards.tolist()}")
        entry = write_shard(self.model, self.plan, Histories.from_arrow(table), self.job, int(shards[0]),
                            Path(self.job.shared).parent)
        return {"shard": np.array([int(shards[0])]), "entry": np.array([json.dumps(entry)])}


def stage(histories: list, out_dir: Path) -> Path:
    """Each shard's histories (`ckv_cli.pipeline.shard.Histories`) as one Parquet file in a new directory in `out_dir`."""
    import pyarrow.parquet as pq

    staging = Path(tempfile.mkdtemp(prefix=".ckv-staging-", dir=out_dir))
    for s, hist in enumerate(histories):
        pq.write_table(hist.to_arrow(s), staging / f"shard-{s:05d}.parquet")
    return staging


def encode_shards(job, histories, workers: int, address: str | None = None, dataset=None) -> list[dict]:
    """Run the job on Ray: a local instance of `workers` CPUs unless Ray is already initialised or `address`
    names a cluster. `histories` is an iterable of each shard's `Histories`, staged as Parquet; `dataset` (a Ray
    Dataset of the same rows) replaces the staged one (tests feed repeated rows this way). Returns the shards'
    index entries in shard order."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.verbose_progress = False
    # a task-based sort shuffle: hash shuffling's aggregator actors hold CPUs the encoders then wait for (a local
    # Ray of 2 CPUs with 2 workers never finished)
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    out_dir = Path(job.shared).parent
    staging = None
    try:
        if dataset is None:
            staging = stage(histories, out_dir)
            dataset = ray.data.read_parquet(str(staging))
        rows = (dataset.groupby("shard", num_partitions=max(1, min(len(job.files), workers)))
                .map_groups(_ShardEncoder, fn_constructor_args=(job,), num_cpus=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers))
                .take_all())
    except CkvError:
        raise
    except Exception as e:  # a worker's CkvError arrives wrapped in Ray's task error
        cause = e
        while cause is not None and not isinstance(cause, CkvError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise CkvError(str(cause)) from None
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if started:
            ray.shutdown()
    entries = sorted((json.loads(r["entry"]) for r in rows), key=lambda e: e["users"][0])
    if len(entries) != len(job.files):
        raise CkvError(f"internal: Ray returned {len(entries)} of the {len(job.files)} shards")
    return entries
