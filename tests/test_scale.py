"""The distributed read (`ckv compress --engine ray --shards S --data DATASET`, `ckv_cli.pipeline.ray_read`) on a
local Ray of 2 CPUs: ML-100K as a Parquet dataset (three files, several row groups each, a few events of items
the checkpoint does not know and a user with too few events), read, grouped and windowed on the workers, gives
byte for byte the shards, shared file and index of the in-process engine under the same (hash) rule; so does a
small log with shards no user reaches. Also: Parquet datasets read in one process equal the log they were cut
from; the hash rule's shards hold exactly their users, in raw-id order; the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import untrained_checkpoint
from ckv_cli.artifact.sharded import open_artifact, verify_path
from ckv_cli.data import load
from ckv_cli.data.datasets import fetch
from ckv_cli.data.partition import bottom_k, calibration_keys, shard_of
from ckv_cli.data.readers import parquet_dataset, read_log
from ckv_cli.errors import CkvError
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions
from ckv_cli.pipeline.shard import compress_sharded

MAX_LEN = 16
OPTS = dict(params={"pool_size": 40, "user_dim": 2, "layout": "residual"}, calib_users=150, batch_users=64)


def write_dataset(log, root: Path, parts: int = 3, row_group: int = 10_000, extra: list[tuple] = ()) -> Path:
    """`log` cut into `parts` Parquet files in file order (user ids as integers where they are), `extra` rows
    (user, item, timestamp) appended to the last file."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(log.users)
    cuts = np.linspace(0, n, parts + 1).astype(int)
    for i in range(parts):
        a, b = cuts[i], cuts[i + 1]
        users, items, ts = list(log.users[a:b]), list(log.items[a:b]), list(log.timestamps[a:b])
        if i == parts - 1:
            for u, it, t in extra:
                users.append(u), items.append(it), ts.append(t)
        pq.write_table(pa.table({"user": pa.array([int(u) for u in users], pa.int64()), "item": pa.array(items),
                                 "timestamp": pa.array(ts, pa.int64())}),
                       root / f"part-{i:02d}.parquet", row_group_size=row_group)
    (root / "_SUCCESS").write_text("")  # what Spark leaves: skipped
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    log = read_log(fetch("ml-100k"))
    extra = [(5000, "1", 10), (5000, "2", 20),  # a user with two events: dropped
             (7, "no-such-item", 880000000), (12, "no-such-item", 880000001)]  # unknown items: dropped
    root = write_dataset(log, d / "logs", extra=extra)
    ckpt = untrained_checkpoint("hstu", load("ml-100k"), d / "hstu.safetensors", MAX_LEN)
    return d, root, ckpt


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    yield ray
    ray.shutdown()


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("x*.safetensors"))}


def test_a_parquet_dataset_reads_as_the_log_it_was_cut_from(data):
    d, root, _ = data
    files = parquet_dataset(str(root))
    assert [f.name for f in files] == ["part-00.parquet", "part-01.parquet", "part-02.parquet"]
    assert parquet_dataset(str(root / "part-0*.parquet")) == files
    whole = load("ml-100k")
    vocab = list(whole.item_ids)
    ds = load(str(root), item_vocab=vocab)
    assert (ds.name, ds.dropped_users, ds.dropped_events) == ("logs", 1, 2)
    ref = load(str(fetch("ml-100k")), item_vocab=vocab)
    assert ds.n_users == ref.n_users == 943
    for k in ("offsets", "items", "timestamps"):
        np.testing.assert_array_equal(getattr(ds, k), getattr(ref, k))
    assert list(ds.user_ids) == list(ref.user_ids)
    with pytest.raises(CkvError, match="no Parquet files match"):
        load(str(root / "*.csv"))


def test_hash_shards_hold_their_users_in_id_order(data, tmp_path):
    d, root, ckpt = data
    model, meta = load_checkpoint(ckpt)
    ds = load(str(root), item_vocab=meta["item_vocab"])
    report = compress_sharded(model, meta, ckpt, ds, CompressOptions(**OPTS), tmp_path / "x.index.json", n_shards=4,
                              command="t")
    index = json.loads((tmp_path / "x.index.json").read_text())
    assert index["assignment"] == {"rule": "hash", "shards": 4} and report["engine"]["assignment"] == "hash"
    want = shard_of(ds.user_ids, 4)
    with open_artifact(tmp_path / "x.index.json") as art:
        for s, shard in enumerate(art.shards):
            assert shard.user_ids == sorted(shard.user_ids)
            assert shard.user_ids == [str(u) for u in ds.user_ids[want == s]]
            assert shard.meta["shard"]["rule"] == "hash" and shard.meta["shard"]["n_users"] == shard.n_users
    assert verify_path(tmp_path / "x.index.json")[0] == []
    calib = bottom_k(calibration_keys(ds.user_ids, 0), ds.user_ids, 150)
    assert len(calib) == 150 and (np.diff(calib) > 0).all()
    assert report["calib_users"] == 150 and "sha256" in report["calib_sample"]


def test_ray_read_equals_the_in_process_engine(data, tmp_path, local_ray):
    from ckv_cli.pipeline.ray_read import compress_distributed

    d, root, ckpt = data
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(**OPTS)
    ds = load(str(root), item_vocab=meta["item_vocab"])
    (tmp_path / "local").mkdir(), (tmp_path / "ray").mkdir()
    local = compress_sharded(model, meta, ckpt, ds, opts, tmp_path / "local/x.index.json", n_shards=3, command="t")
    remote = compress_distributed(model, meta, ckpt, str(root), None, opts, tmp_path / "ray/x.index.json", 3,
                                  workers=2, command="t")
    a, b = files_of(tmp_path / "local"), files_of(tmp_path / "ray")
    assert len(a) == 4 and a == b  # the shared file and 3 shards, byte for byte
    ia, ib = (json.loads((tmp_path / f"{k}/x.index.json").read_text()) for k in ("local", "ray"))
    ia["metadata"].pop("engine"), ib["metadata"].pop("engine")
    assert ia == ib
    assert remote["metrics"] == local["metrics"] and remote["data_fingerprint"] == local["data_fingerprint"]
    assert remote["read"] == {**remote["read"], "files": 3, "users": 943, "rows": 100004, "events": 100000,
                              "dropped_users": 1, "dropped_events": 2}
    assert remote["engine"]["read"] == "ray" and not list(tmp_path.glob("ray/.ckv-staging-*"))
    assert verify_path(tmp_path / "ray/x.index.json")[0] == []


@pytest.mark.slow  # a Ray start for an edge case: the full tier (the fast tier keeps one Ray read)
def test_ray_read_with_shards_no_user_reaches(tmp_path, local_ray):
    """12 users, 16 shards: some shards are empty (an empty shard file), the bytes still equal in-process."""
    from ckv_cli.data.readers import Log
    from ckv_cli.pipeline.ray_read import compress_distributed

    rng = np.random.default_rng(1)
    users = np.repeat([f"{u}" for u in range(12)], 6)
    log = Log(users=users, items=np.asarray([str(i) for i in rng.integers(1, 30, len(users))]),
              timestamps=np.tile(np.arange(6), 12) * 100, ratings=None)
    root = write_dataset(log, tmp_path / "logs", parts=2, row_group=20)
    vocab_ds = load(str(root))
    ckpt = untrained_checkpoint("hstu", vocab_ds, tmp_path / "hstu.safetensors", 8)
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(params={"pool_size": 4, "user_dim": 0, "layout": "residual"}, calib_users=5, batch_users=4)
    (tmp_path / "local").mkdir(), (tmp_path / "ray").mkdir()
    ds = load(str(root / "*.parquet"), item_vocab=meta["item_vocab"])  # the same spec: the dataset's name is in the bytes
    compress_sharded(model, meta, ckpt, ds, opts, tmp_path / "local/x.index.json", n_shards=16, command="t")
    remote = compress_distributed(model, meta, ckpt, str(root / "*.parquet"), None, opts,
                                  tmp_path / "ray/x.index.json", 16, workers=2, command="t")
    assert files_of(tmp_path / "local") == files_of(tmp_path / "ray")
    index = json.loads((tmp_path / "ray/x.index.json").read_text())
    assert sum(1 for e in index["shards"] if e["users"][0] == e["users"][1]) >= 4
    assert remote["read"]["users"] == 12
    with open_artifact(tmp_path / "ray/x.index.json") as art:
        assert art.n_users == 12 and sorted(art.user_ids) == sorted(str(u) for u in range(12))


def test_refusals(data, tmp_path):
    from ckv_cli.pipeline.ray_read import compress_distributed

    d, root, ckpt = data
    model, meta = load_checkpoint(ckpt)
    with pytest.raises(CkvError, match="--distill-steps does not go with --shards"):
        compress_distributed(model, meta, ckpt, str(root), None, CompressOptions(**OPTS, distill_steps=2),
                             tmp_path / "x.index.json", 3)
    with pytest.raises(CkvError, match="reads a Parquet dataset on the workers"):
        compress_distributed(model, meta, ckpt, str(fetch("ml-100k")), None, CompressOptions(**OPTS),
                             tmp_path / "x.index.json", 3)
    with pytest.raises(CkvError, match="--shards must be a positive integer"):
        compress_sharded(model, meta, ckpt, load("ml-100k"), CompressOptions(**OPTS), tmp_path / "x.index.json",
                         n_shards=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_distributed_read(data, tmp_path):
    """`ckv compress --engine ray --shards 3 --data DIR` end to end in its own process (its own local Ray): the
    report says the log was read on the workers; the index verifies."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ray")
    d, root, ckpt = data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ckv_cli.cli", "compress", str(ckpt), "--data", str(root), "-o",
                           str(tmp_path / "x.index.json"), "--engine", "ray", "--shards", "3", "--workers", "2",
                           "--pool-size", "40", "--calib-users", "150", "--batch-users", "64", "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["read"]["events"] == 100000 and report["engine"]["read"] == "ray"
    assert "read on the workers" in proc.stdout
    assert "note: dropped 1 users with fewer than 3 events and 2 events" in proc.stderr
    assert verify_path(tmp_path / "x.index.json")[0] == []
