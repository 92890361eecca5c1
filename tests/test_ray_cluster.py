"""A Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`: a head and a worker node, one CPU each,
each its own raylet and object store) runs the distributed read and the encode of real ML-1M with the sample
HSTU checkpoint (`ckv compress --engine ray --shards 4`, read from a Parquet dataset of four files), and the
result is byte for byte what the in-process engine writes from the same dataset. Slow (the two-node start takes
~25 s, the ML-1M encode minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from ckv_cli.artifact.sharded import verify_path  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.data.datasets import fetch  # noqa: E402
from ckv_cli.data.readers import read_log  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.pipeline.compress import CompressOptions  # noqa: E402
from ckv_cli.pipeline.ray_read import compress_distributed  # noqa: E402
from ckv_cli.pipeline.shard import compress_sharded  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "hstu-ml1m.safetensors"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_two_node_cluster_equals_in_process(cluster, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    log = read_log(fetch("ml-1m"))
    root = tmp_path / "ml-1m"
    root.mkdir()
    cuts = np.linspace(0, len(log.users), 5).astype(int)
    for i in range(4):
        a, b = cuts[i], cuts[i + 1]
        pq.write_table(pa.table({"user": pa.array(log.users[a:b]), "item": pa.array(log.items[a:b]),
                                 "timestamp": pa.array(log.timestamps[a:b])}), root / f"part-{i}.parquet",
                       row_group_size=100_000)
    model, meta = load_checkpoint(CKPT)
    opts = CompressOptions(params={"pool_size": 1024, "user_dim": 0, "layout": "residual"}, calib_users=500)
    (tmp_path / "local").mkdir(), (tmp_path / "ray").mkdir()
    ds = load(str(root), item_vocab=meta["item_vocab"])
    compress_sharded(model, meta, CKPT, ds, opts, tmp_path / "local/x.index.json", n_shards=4, command="t")
    del ds
    report = compress_distributed(model, meta, CKPT, str(root), None, opts, tmp_path / "ray/x.index.json", 4,
                                  workers=2, command="t")
    print("read", json.dumps(report["read"]), "engine", json.dumps(report["engine"]))
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("x*.safetensors"))}
    remote = {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").glob("x*.safetensors"))}
    assert len(local) == 5 and local == remote
    assert report["read"]["users"] == 6040 and report["read"]["events"] == 1_000_209
    assert 2 in (report["read"]["nodes"], report["engine"]["nodes"])  # the read or the encode ran on both nodes
    assert verify_path(tmp_path / "ray/x.index.json")[0] == []
