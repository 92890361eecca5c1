"""What `ckv compress` does when it is told nothing (issue 18: data nobody tuned the defaults for): next-item models get
the predictive codec (the recomputed first layer plus a per-item table predict each token, a pool codes the rest),
pools sized to the log (`--pool-size balanced`, within 1% of fp16 per user where a smaller pool can), stored in fp16
and fitted in the model's Fisher metric, HSTU's event times at 4 bits, calibration held out of the reported users."""
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
    p = rep["plan"]["streams"]["L1.k"]
    assert p["codec"] == "predictive" and p["params"]["predictor"] == "linear+item" and p["params"]["dtype"] == "fp16"
    assert rep["plan"]["streams"]["L0.k"] == "items"  # the first layer: recomputed from the item ids
    assert all(rep["plan"]["streams"][s]["params"]["metric"] == "fisher" for s in ("L1.k", "L1.v"))
    assert sizing["per_user_budget_fp16"] == 0.01 and "no candidate pool" in sizing["reason"]  # 16 wide: 1% < an index
    assert rep["fisher"]["users"] == ds.n_users // 2 and "pool metric: Fisher" in r.stdout
    assert acct["shared_bytes"] <= acct["per_user_bytes"] and "warnings" not in rep
    cal = rep["metrics"]["calibration"]
    assert cal["users"] == ds.n_users // 2 and cal["held_out_users"] == ds.n_users - ds.n_users // 2
    r = run("compress", path, "--data", "ml-100k", "-o", "b.safetensors", "--json", "b.json", "--calib-in-sample",
            "--codec", "collective", "--pool-size", "64", "--param", "pool_dtype=fp32", "--param", "metric=l2")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert "pool_sizing" not in rep and rep["plan"]["streams"]["L1.k"]["params"]["pool_size"] == 64
    assert rep["plan"]["streams"]["L1.k"]["codec"] == "collective"
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


def test_default_codec_follows_the_model_and_the_options():
    """Predictive for next-item models (the first layer's K/V in the prediction only where it is recomputed; HSTU's
    event times at 4 bits), collective where a collective-only option is given or for CTR models."""
    from conftest import make_model
    from ckv_cli.pipeline.defaults import default_params
    from ckv_cli.tasks import CTR, task_of

    sasrec, hstu = make_model("sasrec"), make_model("hstu")
    codec, p = default_params(sasrec, task_of(sasrec), None, None, 0, "residual", "int8", True)
    assert codec == "predictive" and p == {"pool_size": "balanced", "predictor": "linear+item", "dtype": "fp16",
                                           "max_rows": "pool", "metric": "fisher"}
    assert default_params(sasrec, task_of(sasrec), None, None, 0, "residual", "int8", False)[1]["predictor"] == "item"
    assert default_params(hstu, task_of(hstu), None, None, 0, "residual", "int8", True)[1]["time_bits"] == 4
    for given in ((4, "residual", "int8"), (0, "concat", "int8"), (0, "residual", "fp16")):
        assert default_params(sasrec, task_of(sasrec), None, None, *given, True)[0] == "collective"
    assert "metric" not in default_params(sasrec, task_of(sasrec), None, None, 0, "concat", "int8", True)[1]
    assert default_params(sasrec, task_of(sasrec), "predictive", None, 0, "concat", "int8", True)[1]["metric"] == "fisher"
    assert "metric" not in default_params(sasrec, task_of(sasrec), None, "auto", 0, "residual", "int8", True)[1]
    assert default_params(sasrec, task_of(sasrec), "predictive", 512, 0, "residual", "int8", True)[1]["pool_size"] == 512
    assert default_params(sasrec, CTR, None, None, 0, "residual", "int8", True) == (
        "collective", {"pool_size": CTR.default_pool, "user_dim": 0, "layout": "residual", "user_dtype": "int8"})


@pytest.mark.parametrize("arch,time_bits,size", [("sasrec", 0, 8192), ("hstu", 4, 4096), ("hstu", 0, 8192)])
def test_balanced_pool_keeps_per_user_bytes_within_one_percent_where_it_can(arch, time_bits, size):
    """At the ML-1M samples' token count and width (64 per stream), balanced picks 8192; with HSTU's 4-bit event
    times that is 1.05% of fp16 per user and 4096 (1.00%) fits; with its int32 times no pool size fits 1%, and the
    balanced size stays."""
    from conftest import make_model
    from ckv_cli.pipeline.compress import CompressOptions, full_width, make_plan
    from ckv_cli.pipeline.sizing import balanced_plan, within_per_user_budget

    model = make_model(arch, d=64, n_items=3706, **({"d_qk": 32, "d_v": 32} if arch == "hstu" else {}))  # ML-1M
    params = {"pool_size": "balanced", "predictor": "item", "dtype": "fp16", **({"time_bits": 4} if time_bits else {})}
    opts = CompressOptions(codec="predictive", params=params)
    n_users, n_tokens, full = 6040, 650_526, full_width(model)
    assert full == 256
    plan, info = balanced_plan(lambda m: make_plan(model, opts, m), n_tokens, n_users, full)
    assert info["pool_size"] == size and plan.streams["L1.k"].pool_size == size
    fits = within_per_user_budget(make_plan(model, opts, size), n_users, n_tokens, full, 0.01)
    assert fits == (arch == "sasrec" or time_bits > 0)
    if size < 8192:
        assert not within_per_user_budget(make_plan(model, opts, 2 * size), n_users, n_tokens, full, 0.01)
        assert "halved to 4,096" in info["reason"]
    elif not fits:
        assert "no candidate pool" in info["reason"]


def test_balanced_sizing_accepts_an_index_width_its_smallest_candidate_could_not():
    """`--pool-size balanced --param index=item --param index_bits=6`: the options are checked on the largest
    candidate pool (a 64-entry pool takes only 6 bits, so it would refuse the width), and the size is chosen after."""
    from conftest import make_model
    from ckv_cli.pipeline.compress import CompressOptions, full_width, make_plan
    from ckv_cli.pipeline.sizing import balanced_plan

    model = make_model("sasrec", d=64, n_items=3706)
    params = {"pool_size": "balanced", "predictor": "item", "joint": "kv", "index": "item", "index_bits": 6}
    opts = CompressOptions(codec="predictive", params=params)
    assert make_plan(model, opts).streams["L1.k"].inner.pool_size == max(CANDIDATES)
    plan, info = balanced_plan(lambda m: make_plan(model, opts, m), 650_526, 6040, full_width(model))
    assert info["pool_size"] == 2048  # joint: one 128-wide pool, as heavy as its indices
