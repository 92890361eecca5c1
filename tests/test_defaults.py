"""What `ckv compress` does when it is told nothing (issue 18: data nobody tuned the defaults for): next-item pools
sized to the log (`--pool-size balanced`), stored in fp16 and fitted in the model's Fisher metric, calibration held out
of the reported users."""
from __future__ import annotations

import json

import pytest

from conftest import cli_runner, untrained_checkpoint
from ckv_cli.codecs.bits import bits_for, packed_nbytes
from ckv_cli.data import load
from ckv_cli.pipeline.sizing import CANDIDATES, balanced_pool_size


def test_balanced_pool_size_follows_the_token_count():
    assert balanced_pool_size(650_526, 64, 2) == 8192  # the ML-1M samples' caches
    assert balanced_pool_size(83_940, 64, 2) == 512  # ML-100K's
    assert balanced_pool_size(83_940, 64, 4) == 256  # an fp32 pool weighs twice as much
    assert balanced_pool_size(10**9, 64, 2) == max(CANDIDATES)
    assert balanced_pool_size(100, 64, 2) == min(CANDIDATES)  # nothing fits: the smallest
    for n in (5_000, 83_940, 650_526, 3_000_000):
        m = balanced_pool_size(n, 64, 2)
        assert m == min(CANDIDATES) or m * 64 * 2 <= packed_nbytes(n, bits_for(m))
        if m < max(CANDIDATES):
            assert 2 * m * 64 * 2 > packed_nbytes(n, bits_for(2 * m))  # the next size up would outweigh its indices


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ds = load("ml-100k")
    return untrained_checkpoint("sasrec", ds, tmp_path_factory.mktemp("defaults") / "m.safetensors", 16), ds


def test_cli_defaults_size_the_pool_and_hold_calibration_out(ckpt, tmp_path):
    path, ds = ckpt
    run = cli_runner(tmp_path)
    r = run("compress", path, "--data", "ml-100k", "-o", "a.safetensors", "--json", "a.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "a.json").read_text())
    sizing, acct = rep["pool_sizing"], rep["accounting"]
    m = balanced_pool_size(acct["tokens"], 16, 2)  # the tiny model is 16 wide
    assert sizing["rule"] == "balanced" and sizing["pool_size"] == m and f"pool size balanced: {m:,}" in r.stdout
    assert all(rep["plan"]["streams"][s]["params"]["pool_size"] == m for s in ("L1.k", "L1.v"))
    assert rep["plan"]["streams"]["L1.k"]["params"]["pool_dtype"] == "fp16"
    assert all(rep["plan"]["streams"][s]["params"]["metric"] == "fisher" for s in ("L1.k", "L1.v"))
    assert rep["fisher"]["users"] == ds.n_users // 2 and "pool metric: Fisher" in r.stdout
    assert acct["shared_bytes"] <= acct["per_user_bytes"] and "warnings" not in rep
    cal = rep["metrics"]["calibration"]
    assert cal["users"] == ds.n_users // 2 and cal["held_out_users"] == ds.n_users - ds.n_users // 2
    r = run("compress", path, "--data", "ml-100k", "-o", "b.safetensors", "--json", "b.json", "--calib-in-sample",
            "--pool-size", "64", "--param", "pool_dtype=fp32", "--param", "metric=l2")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert "pool_sizing" not in rep and rep["plan"]["streams"]["L1.k"]["params"]["pool_size"] == 64
    assert "pool_dtype" not in rep["plan"]["streams"]["L1.k"]["params"]  # fp32, as artifacts before the option
    assert "metric" not in rep["plan"]["streams"]["L1.k"]["params"] and "fisher" not in rep  # plain squared error
    assert rep["metrics"]["calibration"]["in_sample"] and "in-sample" in r.stdout


def test_target_grid_codes_event_times_for_models_that_read_them():
    from ckv_cli.pipeline.target import default_settings

    assert {s.time_bits for s in default_settings(True)} == {0, 4, 6}
    assert {s.time_bits for s in default_settings(False)} == {0}
    for s in default_settings(False):  # every setting in the Fisher metric but the concat layout's (its own basis)
        p = dict(s.params)
        assert (p.get("metric") == "fisher") == (p.get("layout", "residual") == "residual"), s.label
