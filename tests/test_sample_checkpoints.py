"""The shipped checkpoints on real ML-1M: they load, their recorded test metrics reproduce, they beat the
quality floors of the README, and compressing them meets the byte and accuracy bars (slow: minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress
from ckv_cli.data import load
from ckv_cli.tasks.next_item import evaluate_model

ROOT = Path(__file__).resolve().parents[1] / "sample_checkpoints"
CHECKPOINTS = sorted(ROOT.glob("*-ml1m.safetensors"))
# the foundation issue's bars (published: SASRec 0.2853 / 0.1603, HSTU 0.3097 / 0.1720), published protocol
FLOORS = {"sasrec": {"HR@10": 0.27, "NDCG@10": 0.15}, "hstu": {"HR@10": 0.29, "NDCG@10": 0.16}}


@pytest.fixture(scope="module")
def ml1m():
    return load("ml-1m")


def test_sample_checkpoints_exist():
    assert {p.name for p in CHECKPOINTS} >= {"sasrec-ml1m.safetensors", "hstu-ml1m.safetensors"}
    for p in CHECKPOINTS:
        assert p.stat().st_size < 5 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_recorded_metrics_reproduce(path, ml1m):
    model, meta = load_checkpoint(path)
    assert meta["data_fingerprint"] == ml1m.fingerprint
    metrics = evaluate_model(model, ml1m, "test")
    for k, v in meta["metrics"]["test"].items():
        assert metrics[k] == pytest.approx(v, abs=1e-4), k
    for k, floor in FLOORS[meta["arch"]].items():
        assert metrics[k] >= floor, (k, metrics[k])


@pytest.mark.slow
@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_compress_defaults(path, ml1m):
    """Default `ckv compress` (the CLI's codec and parameters: predictive, a balanced fp16 pool kept within 1% of
    fp16 per user, fitted in the model's Fisher metric; HSTU's event times at 4 bits; calibration held out) meets
    issue 18's bars on both models: per-user bytes <= 1% of the fp16 cache, NDCG@10 within 1% relative and top-10
    overlap >= 0.90 (measured 0.919 and 0.902 with one thread; the floor here is 0.895, leaving room for the float
    sums of another thread count); the shared bytes stay under 2% of the fp16 cache."""
    from ckv_cli.pipeline.defaults import default_params
    from ckv_cli.tasks import task_of

    model, meta = load_checkpoint(path)
    codec, params = default_params(model, task_of(model), None, None, 0, "residual", "int8", True)
    result = compress(model, ml1m, CompressOptions(codec=codec, params=params, calib_holdout=True))
    acct, m = result.accounting, result.metrics
    size = {"sasrec": 8192, "hstu": 4096}[meta["arch"]]  # HSTU: 8192 would take 1.05% with its 4-bit times
    assert codec == "predictive" and result.plan.streams["L1.k"].pool_size == size
    assert acct["per_user_ratio_fp16"] <= 0.01 and acct["shared_bytes"] <= 0.02 * acct["full_fp16_bytes"]
    assert m["relative_delta"]["NDCG@10"] >= -0.01, m["relative_delta"]
    assert m["fidelity"]["top10_overlap"] >= 0.895
    assert m["uncompressed"]["NDCG@10"] == pytest.approx(meta["metrics"]["test"]["NDCG@10"], abs=5e-4)


@pytest.mark.slow
def test_sasrec_half_percent_with_a_moving_average_context(ml1m):
    """Issue 21 on the SASRec sample: a moving average of the first layer's K/V in the prediction (`ema`), one
    8192-entry index for K and V coded given the item (6-bit lists, escape tolerance 1) stores at most 0.6% of the
    fp16 cache per user, keeps top-10 overlap >= 0.90 (measured 0.917 with one thread; the floor here leaves room for
    another thread count's float sums) and NDCG@10 within 1% relative (docs/index-coding.md)."""
    model, _ = load_checkpoint(ROOT / "sasrec-ml1m.safetensors")
    params = {"pool_size": 8192, "predictor": "linear+item", "dtype": "fp16", "max_rows": "pool", "metric": "fisher",
              "ema": 0.1, "joint": "kv", "index": "item", "index_bits": 6, "escape_tol": 1}
    result = compress(model, ml1m, CompressOptions(codec="predictive", params=params, calib_holdout=True))
    acct, m = result.accounting, result.metrics
    assert acct["per_user_ratio_fp16"] <= 0.006, acct["per_user_ratio_fp16"]
    assert m["fidelity"]["top10_overlap"] >= 0.905
    assert m["relative_delta"]["NDCG@10"] >= -0.01, m["relative_delta"]


@pytest.mark.slow
def test_hstu_spare_list_slots_catch_held_out_escapes():
    """Real HSTU on ML-1M (1,000 calibration users, an 8,192-entry joint pool, 6-bit item lists, the bench's
    held-out split): filling the lists' spare slots with the calibration tokens' four nearest entries
    (`index_fill=4`, over the same pool) escapes fewer held-out tokens than lists by use, so the held-out users'
    bytes fall, at the same fidelity (docs/index-coding.md, stop 29)."""
    bench = load_script("bench/index_coding.py")
    spec = ("predictive:predictor=linear+item,metric=fisher,dtype=fp16,max_rows=pool,ema=0.15,time_bits=3,joint=kv,"
            "index=item,pool_size=8192,index_bits=6,escape_tol=1")
    args = bench.parse_args([str(ROOT / "hstu-ml1m.safetensors"), "--data", "ml-1m", "--bootstrap", "20",
                             "--specs", f"{spec};{spec},index_fill=4", "--out", "unused.json"])
    by_use, filled = bench.run(args)["rows"]
    a, b = by_use["index"]["L1.k"], filled["index"]["L1.k"]
    assert b["list_entries"] > a["list_entries"]
    assert b["escape_rate_held_out"] < a["escape_rate_held_out"] - 0.005, (a, b)
    assert filled["held_out_ratio_fp16"] < by_use["held_out_ratio_fp16"]
    assert b["held_out_by_list"]["room left"]["tokens"] < a["held_out_by_list"]["room left"]["tokens"]
    overlap = [r["held_out"]["fidelity"]["top10_overlap"] for r in (by_use, filled)]
    assert abs(overlap[1] - overlap[0]) < 0.005, overlap
