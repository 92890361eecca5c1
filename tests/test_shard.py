"""Sharded artifacts without Ray: `ckv compress --shard-size` in this process, read back user for user against
the single-file artifact of the same seed; the index read by the artifact reader, the store and `ckv inspect`;
`ckv verify` on a good, a truncated and a tampered set of shards; `--engine ray` without Ray installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import untrained_checkpoint
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.artifact.sharded import ShardedArtifact, open_artifact, verify_path
from ckv_cli.pipeline.shard import compress_sharded
from ckv_cli.serve.next_item import CacheStore

MAX_LEN = 16
OPTS = dict(params={"pool_size": 40, "user_dim": 2, "layout": "residual"}, calib_users=150, batch_users=64)
SHARD = 256  # ML-100K's 943 users: 4 shards, the last one short


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def hstu_ckpt(ds, tmp_path_factory):
    return untrained_checkpoint("hstu", ds, tmp_path_factory.mktemp("ckpt") / "hstu.safetensors", MAX_LEN)


def run_ckv(*args, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def assert_same_users(sharded, single, model):
    """Every user's stored fields and decoded cache, read from the shards, equal the single file's."""
    assert sharded.user_ids == single.user_ids
    assert np.array_equal(sharded.offsets, single.offsets)
    users = np.arange(single.n_users)
    a, off_a = sharded.read_fields(users)
    b, off_b = single.read_fields(users)
    assert np.array_equal(off_a, off_b) and set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    some = np.array([900, 3, 256, 255, 511, 942, 3])  # any order, across shards, repeated
    x, y = sharded.decode(some, model), single.decode(some, model)
    for name in single.plan.streams:
        assert torch.equal(x.stream(name), y.stream(name)), name


@pytest.fixture(scope="module")
def built(ds, hstu_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    model, meta = load_checkpoint(hstu_ckpt)
    opts = CompressOptions(**OPTS)
    single = compress_to_artifact(model, meta, hstu_ckpt, ds, opts, d / "one.safetensors", command="test")
    report = compress_sharded(model, meta, hstu_ckpt, ds, opts, d / "many.index.json", SHARD, command="test")
    return d, model, single, report


def test_local_shards_equal_the_single_file(built):
    d, model, single, report = built
    sharded, one = open_artifact(d / "many.index.json"), open_artifact(d / "one.safetensors")
    assert isinstance(sharded, ShardedArtifact) and not isinstance(one, ShardedArtifact)
    assert len(sharded.shards) == 4 and [s.n_users for s in sharded.shards] == [256, 256, 256, 175]
    assert_same_users(sharded, one, model)
    index = json.loads((d / "many.index.json").read_text())
    assert index["totals"]["users"] == 943 and index["totals"]["tokens"] == int(one.offsets[-1])
    files = sorted(p.name for p in d.iterdir())
    assert files == ["many-0000%d-of-00004.safetensors" % s for s in range(4)] + [
        "many.index.json", "many.shared.safetensors", "one.safetensors"]
    # bytes: per-user bytes as laid out in every shard, shared bytes once
    on_disk = sum(s["per_user_bytes"] for s in index["shards"])
    assert index["metadata"]["accounting"]["per_user_bytes"] == on_disk
    assert index["metadata"]["accounting"]["shared_bytes"] == single["accounting"]["shared_bytes"]
    # the metrics are sums over the same users: equal up to float rounding
    for k, v in single["metrics"]["compressed"].items():
        assert report["metrics"]["compressed"][k] == pytest.approx(v, abs=1e-9), k
    assert report["metrics"]["fidelity"]["hit10_flips"] == single["metrics"]["fidelity"]["hit10_flips"]


def test_store_reads_an_index(built, ds):
    d, model, _, _ = built
    users = [str(u) for u in ds.user_ids[[0, 300, 942, 511]]]
    with CacheStore.open(d / "many.index.json", model) as many, CacheStore.open(d / "one.safetensors", model) as one:
        assert len(many) == len(one) == 943
        a, b = many.rank_next(users, k=5), one.rank_next(users, k=5)
        assert np.array_equal(a.items, b.items) and np.allclose(a.scores, b.scores)
        fa, oa = many.read(users)
        fb, ob = one.read(users)
        assert np.array_equal(oa, ob) and all(np.array_equal(fa[k], fb[k]) for k in fb)


def test_verify_cli(built, tmp_path):
    d, _, _, _ = built
    work = tmp_path / "copy"
    work.mkdir()
    for p in d.iterdir():
        (work / p.name).write_bytes(p.read_bytes())
    ok = run_ckv("verify", work / "many.index.json", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert "4 shards" in ok.stdout and "943 users" in ok.stdout
    single = run_ckv("verify", work / "one.safetensors", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    # one byte flipped in the data of shard 2, shard 3 deleted
    shard2, shard3 = work / "many-00002-of-00004.safetensors", work / "many-00003-of-00004.safetensors"
    raw = bytearray(shard2.read_bytes())
    raw[-5] ^= 0x40
    shard2.write_bytes(bytes(raw))
    shard3.unlink()
    bad = run_ckv("verify", work / "many.index.json", cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    lines = bad.stdout.splitlines()
    assert any(shard3.name in line and "missing" in line for line in lines), bad.stdout
    assert any(shard2.name in line and "sha256" in line for line in lines), bad.stdout
    assert any(shard2.name in line and "checksum" in line for line in lines), bad.stdout
    assert not any("00000-of" in line or "00001-of" in line for line in lines), bad.stdout
    with pytest.raises(CkvError, match="not found"):
        open_artifact(work / "many.index.json")


def test_verify_finds_a_user_twice(built, tmp_path):
    d, _, _, _ = built
    for p in d.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    index = json.loads((tmp_path / "many.index.json").read_text())
    index["shards"][1] = dict(index["shards"][0], users=[256, 512])  # shard 0 listed twice
    (tmp_path / "many.index.json").write_text(json.dumps(index))
    problems, _ = verify_path(tmp_path / "many.index.json")
    assert any("is also in many-00000" in p for p in problems), problems
    with pytest.raises(CkvError):
        ShardedArtifact.open(tmp_path / "many.index.json")


def test_inspect_and_evaluate_take_an_index(built, hstu_ckpt, tmp_path):
    d, _, _, _ = built
    proc = run_ckv("inspect", d / "many.index.json", "--json", tmp_path / "i.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["shards"]["count"] == 4 and report["corrupted_tensors"] == []
    assert report["metadata"]["accounting"]["users"] == 943 and "L1.k" in report["pool_usage"]
    assert "ckv-artifact-shard" in run_ckv("inspect", d / "many-00001-of-00004.safetensors", cwd=tmp_path).stdout
    proc = run_ckv("evaluate", hstu_ckpt, d / "many.index.json", d / "one.safetensors", "--data", "ml-100k",
                   "--bootstrap", "10", "--repeats", "1", "--speed-batch", "32", "--json", tmp_path / "e.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads((tmp_path / "e.json").read_text())["comparisons"]
    assert a["compressed"] == pytest.approx(b["compressed"]) and a["users"] == b["users"] == 943


def test_sharding_errors(built, hstu_ckpt, tmp_path):
    d, model, _, _ = built
    _, meta = load_checkpoint(hstu_ckpt)
    ds = load("ml-100k")
    with pytest.raises(CkvError, match="multiple of --batch-users"):
        compress_sharded(model, meta, hstu_ckpt, ds, CompressOptions(**OPTS), tmp_path / "x.index.json", 100)
    with pytest.raises(CkvError, match=r"\.json"):
        compress_sharded(model, meta, hstu_ckpt, ds, CompressOptions(**OPTS), tmp_path / "x.safetensors", SHARD)
    with pytest.raises(CkvError, match="exists"):
        compress_sharded(model, meta, hstu_ckpt, ds, CompressOptions(**OPTS), d / "many.index.json", SHARD)
    assert list(tmp_path.iterdir()) == []


def test_engine_ray_without_ray_is_one_line(hstu_ckpt, tmp_path):
    """Ray hidden from the import system: one line saying how to install it, before any work."""
    code = ("import sys; sys.modules['ray'] = None; from ckv_cli.cli import main; "
            f"sys.argv = ['ckv', 'compress', {str(hstu_ckpt)!r}, '--data', 'ml-100k', '-o', 'x.index.json', "
            "'--engine', 'ray']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "CKV_NO_PROGRESS": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["ckv: error: --engine ray needs Ray, which is not installed here: "
                                        "pip install 'ckv-cli[ray]'"]
    assert list(tmp_path.iterdir()) == []
