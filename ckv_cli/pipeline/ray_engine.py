"""`ckv compress --engine ray`: encode the shards as a Ray Data job (Ray is imported here only, lazily).

The driver fits the plan (`ckv_cli.pipeline.compress.fit_and_distill`) and writes the shared tensors; the users'
histories (their last `max_len + 1` events) are staged as Parquet, one file per shard, in a directory beside
the output: by the driver when it read the log itself, by the workers when Ray read it
(`ckv_cli.pipeline.ray_read`). A Ray Data job over the shard numbers (`map_batches`, one shard per batch)
hands each shard to an actor of a pool of `workers` (one CPU each), which holds one model (loaded from the
checkpoint) and one plan (loaded from the shared file, so the shared file alone is what the workers encode
with), reads the shard's staged rows, encodes its users in batches of `--batch-users` and writes the shard file
(`ckv_cli.pipeline.shard.write_shard`). A shard reaches its actor whole and in user order, rows repeated by a
reader dropped by user id: the bytes do not depend on how Ray split, ordered or repeated the work. The
checkpoint, the output directory and the staging directory must be on storage every Ray node sees.
"""
from __future__ import annotations

import contextlib
import json
import os
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
    """One Ray actor: a model and a plan, loaded once; each call encodes and writes one shard: a table of its
    staged rows (`groupby("shard")`), or a one-row table naming the shard, whose rows it reads from the staging
    directory (`shard-SSSSS.parquet`; absent or empty for a shard of no users)."""

    def __init__(self, job, staging: str | None = None):
        import torch

        from ckv_cli.artifact.sharded import read_shared
        from ckv_cli.models.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        self.job, self.staging = job, staging
        self.model, _ = load_checkpoint(Path(job.checkpoint))
        self.plan, _, _ = read_shared(Path(job.shared))

    def __call__(self, table):
        from ckv_cli.pipeline.shard import Histories, write_shard

        shards = np.unique(table.column("shard").to_numpy())
        if len(shards) != 1:
            raise CkvError(f"internal: a batch holds shards {shards.tolist()}")
        shard = int(shards[0])
        if self.staging is not None:
            hist = read_staged(Path(self.staging), shard)
        else:
            hist = Histories.from_arrow(table)
        from ckv_cli.pipeline.ray_read import node_tag

        entry = write_shard(self.model, self.plan, hist, self.job, shard, Path(self.job.shared).parent)
        entry["node"] = node_tag()
        return {"shard": np.array([shard]), "entry": np.array([json.dumps(entry)])}


def staged_path(staging: Path, shard: int) -> Path:
    return staging / f"shard-{shard:05d}.parquet"


def read_staged(staging: Path, shard: int):
    """Shard `shard`'s staged `Histories` (none staged: a shard of no users)."""
    import pyarrow.parquet as pq

    from ckv_cli.pipeline.shard import Histories

    path = staged_path(staging, shard)
    return Histories.from_arrow(pq.read_table(path)) if path.exists() else Histories.empty()


def write_staged(table, path: Path) -> None:
    """A staged table into `path` through a temporary name (a retried task rewrites it whole)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def stage(histories, out_dir: Path) -> Path:
    """Each shard's histories (`ckv_cli.pipeline.shard.Histories`) as one Parquet file in a new directory in `out_dir`."""
    staging = Path(tempfile.mkdtemp(prefix=".ckv-staging-", dir=out_dir))
    for s, hist in enumerate(histories):
        write_staged(hist.to_arrow(s), staged_path(staging, s))
    return staging


@contextlib.contextmanager
def ray_session(workers: int, address: str | None = None):
    """Ray, started here (a local instance of `workers` CPUs, or joining `address`) unless already initialised,
    and shut down on leaving if started here; Ray Data set up quietly, with a task-based sort shuffle (hash
    shuffling's aggregator actors hold CPUs the encoders then wait for: a local Ray of 2 CPUs with 2 workers
    never finished). A worker's CkvError, which reaches the driver wrapped in Ray's task error, is raised as
    itself."""
    import logging

    ray = require_ray()
    for name in ("ray", "ray.data"):  # the driver's Ray Data progress lines, not ckv's output
        logging.getLogger(name).setLevel(logging.ERROR)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.verbose_progress = False
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield ray
    except CkvError:
        raise
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, CkvError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise CkvError(str(cause)) from None
        raise
    finally:
        if started:
            ray.shutdown()


def encode_shards(job, histories, workers: int, address: str | None = None, dataset=None,
                  staging: Path | None = None) -> list[dict]:
    """Run the job on Ray: a local instance of `workers` CPUs unless Ray is already initialised or `address`
    names a cluster. The shards' rows come from `staging` (a directory of staged shards, one Parquet file each:
    `ckv_cli.pipeline.ray_read` writes them on the workers), else from `histories` (an iterable of each shard's
    `Histories`, staged here), else from `dataset` (a Ray Dataset of staged rows, grouped by shard: tests feed
    repeated rows this way). Returns the shards' index entries in shard order."""
    out_dir = Path(job.shared).parent
    own = None
    with ray_session(workers, address) as ray:
        try:
            pool = ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
            if dataset is not None:
                rows = (dataset.groupby("shard", num_partitions=max(1, min(len(job.files), workers)))
                        .map_groups(_ShardEncoder, fn_constructor_args=(job,), num_cpus=1, batch_format="pyarrow",
                                    compute=pool).take_all())
            else:
                if staging is None:
                    staging = own = stage(histories, out_dir)
                names = ray.data.from_items([{"shard": s} for s in range(len(job.files))],
                                            override_num_blocks=max(1, len(job.files)))
                rows = names.map_batches(_ShardEncoder, fn_constructor_args=(job, str(staging)), batch_size=1,
                                         num_cpus=1, batch_format="pyarrow", compute=pool).take_all()
        finally:
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)
    entries = sorted((json.loads(r["entry"]) for r in rows), key=lambda e: e["file"])
    if len(entries) != len(job.files):
        raise CkvError(f"internal: Ray returned {len(entries)} of the {len(job.files)} shards")
    return entries
