"""`ckv compress --engine ray` on a local Ray instance (2 CPUs, started once for the module): the shards Ray
writes are byte for byte those of the in-process sharded engine and read back equal to the single-file
artifact of the same seed, user for user; rows a distributed reader repeats are dropped by user id; on
ML-1M with the sample HSTU (slow) the Ray output decodes to the in-process caches."""
from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")  # a guard only: CI installs the ray extra (`make setup`), so these run there

from test_shard import OPTS, SHARD, assert_same_users, ds, hstu_ckpt  # noqa: E402,F401  (fixtures)

from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.artifact.sharded import open_artifact, shard_ranges  # noqa: E402
from ckv_cli.pipeline.shard import Histories, compress_sharded  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False)
    yield
    ray.shutdown()


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("x-*.safetensors"))}


def out(tmp_path, name):
    """x.index.json in its own directory: the same file names (shards name their shared file) in each run."""
    (tmp_path / name).mkdir()
    return tmp_path / name / "x.index.json"


def test_ray_shards_equal_the_local_engine(ds, hstu_ckpt, tmp_path):
    model, meta = load_checkpoint(hstu_ckpt)
    opts = CompressOptions(**OPTS)
    local = compress_sharded(model, meta, hstu_ckpt, ds, opts, out(tmp_path, "local"), SHARD, command="t")
    remote = compress_sharded(model, meta, hstu_ckpt, ds, opts, out(tmp_path, "ray"), SHARD, engine="ray",
                              workers=2, command="t")
    a, b = shard_bytes(tmp_path / "local"), shard_bytes(tmp_path / "ray")
    assert len(a) == len(b) == 4 and a == b  # shard for shard, byte for byte (metadata included)
    assert (tmp_path / "local/x.shared.safetensors").read_bytes() == (tmp_path / "ray/x.shared.safetensors").read_bytes()
    assert remote["metrics"] == local["metrics"] and remote["accounting"] == local["accounting"]
    eng = remote["engine"]
    assert eng["name"] == "ray" and eng["workers"] == 2 and eng["tokens_per_second_per_worker"] > 0
    single = compress_to_artifact(model, meta, hstu_ckpt, ds, opts, tmp_path / "one.safetensors", command="t")
    assert_same_users(open_artifact(tmp_path / "ray/x.index.json"), open_artifact(tmp_path / "one.safetensors"), model)
    assert single["accounting"]["tokens"] == remote["accounting"]["tokens"]


@pytest.mark.slow  # a Ray start for an edge case: the full tier (the fast tier keeps one Ray run)
def test_repeated_rows_are_dropped_by_user_id(ds, hstu_ckpt, tmp_path):
    """A reader that delivers some users twice (and shuffled) changes nothing: same shards."""
    from ckv_cli.pipeline.ray_engine import stage

    model, meta = load_checkpoint(hstu_ckpt)
    opts = CompressOptions(**OPTS)
    compress_sharded(model, meta, hstu_ckpt, ds, opts, out(tmp_path, "a"), SHARD, command="t")
    staging = stage([Histories.from_dataset(ds, a, b, MAX_LEN) for a, b in shard_ranges(ds.n_users, SHARD, 64)],
                    tmp_path)
    rows = ray.data.read_parquet(str(staging))
    noisy = rows.union(rows.filter(lambda r: r["user"] % 7 == 0)).random_shuffle(seed=1)
    assert noisy.count() > ds.n_users
    compress_sharded(model, meta, hstu_ckpt, ds, opts, out(tmp_path, "b"), SHARD, engine="ray", workers=2,
                     command="t", dataset=noisy)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


MAX_LEN = 16


@pytest.mark.slow
def test_ml1m_ray_equals_in_process(tmp_path):
    """The bar: on ML-1M (sample HSTU, whose prefill depends on the batch at float rounding) the Ray output
    decodes to the same caches as the in-process artifact, user for user."""
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "hstu-ml1m.safetensors"
    model, meta = load_checkpoint(ckpt)
    ml1m = load("ml-1m", item_vocab=meta["item_vocab"])
    opts = CompressOptions(params={"pool_size": 1024, "user_dim": 0, "layout": "residual"}, calib_users=500)
    compress_to_artifact(model, meta, ckpt, ml1m, opts, tmp_path / "one.safetensors", command="t")
    report = compress_sharded(model, meta, ckpt, ml1m, opts, tmp_path / "ray.index.json", 2048, engine="ray",
                              workers=2, command="t")
    print("engine", json.dumps(report["engine"]))
    assert report["engine"]["shards"] == 3
    sharded, single = open_artifact(tmp_path / "ray.index.json"), open_artifact(tmp_path / "one.safetensors")
    assert sharded.n_users == single.n_users == 6040
    assert_same_users(sharded, single, model)
    index = json.loads((tmp_path / "ray.index.json").read_text())
    assert index["totals"]["users"] == 6040 and index["totals"]["tokens"] == int(single.offsets[-1])
