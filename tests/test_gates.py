"""Gates that know the noise and protocols that fit the log (issue 18, parts 5-6), on ML-100K with a tiny model:
the CI gate decides by the CI's worse end, fidelity gates, the warning when the threshold is finer than the noise,
`--include-seen` for artifacts and training, and the share of test targets inside the history window."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli_runner, untrained_checkpoint
from ckv_cli.data import load
from ckv_cli.data.readers import Log
from ckv_cli.data.sequences import build
from ckv_cli.evaluate.compare import Comparison, Gates, check_gates, gate_warnings
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.tasks.next_item import targets_in_window


def comparison(delta: float, low: float, high: float, task: str = "next-item", **fidelity) -> Comparison:
    name = "NDCG@10" if task == "next-item" else "logloss"
    d = {"value": 0.2 + delta, "delta": delta, "relative": delta / 0.2, "ci_low": low, "ci_high": high}
    return Comparison("a.safetensors", 600, {name: 0.2}, {name: 0.2 + delta}, {name: d}, fidelity, {}, task=task)


def test_the_ci_gate_decides_by_the_worse_end():
    small_drop_wide_ci = comparison(-0.001, -0.02, +0.018)
    assert check_gates([small_drop_wide_ci], Gates(max_delta=["NDCG@10=0.005"])) == []  # the point estimate passes
    failed = check_gates([small_drop_wide_ci], Gates(max_delta_ci=["NDCG@10=0.005"]))  # noise cannot pass
    assert len(failed) == 1 and "does not rule out" in failed[0] and "0.0200 > 0.0050" in failed[0]
    assert check_gates([comparison(-0.001, -0.004, +0.002)], Gates(max_delta_ci=["NDCG@10=0.005"])) == []
    assert check_gates([comparison(-0.001, -0.004, +0.002)], Gates(max_delta_ci=["NDCG@10=1%"])) != []  # 2% of 0.2
    # a gain never fails, whatever its CI; a lower-is-better metric gates its rise, by the CI's high end
    assert check_gates([comparison(+0.01, +0.001, +0.02)], Gates(max_delta_ci=["NDCG@10=0"])) == []
    rise = comparison(+0.0001, -0.0002, +0.003, task="ctr")
    assert "logloss" in check_gates([rise], Gates(max_delta_ci=["logloss=0.001"]))[0]
    assert check_gates([comparison(+0.0001, -0.0002, +0.0004, task="ctr")], Gates(max_delta_ci=["logloss=0.001"])) == []
    nan = comparison(-0.001, float("nan"), float("nan"))  # no bootstrap: the CI gate cannot pass
    assert check_gates([nan], Gates(max_delta_ci=["NDCG@10=0.5"])) != []


def test_fidelity_gates_and_the_noise_warning():
    c = comparison(0.0, -0.03, +0.03, top10_overlap=0.85, kl_mean=0.04)
    assert check_gates([c], Gates(min_overlap=0.8, max_kl=0.05)) == []
    failed = check_gates([c], Gates(min_overlap=0.9, max_kl=0.01))
    assert [f.split(":")[1].split()[0] for f in failed] == ["top-10", "mean"]
    warnings = gate_warnings([c], Gates(max_delta=["NDCG@10=1%"], max_delta_ci=["NDCG@10=0.1"]))
    assert len(warnings) == 1 and "--max-delta NDCG@10" in warnings[0] and "600 users cannot resolve it" in warnings[0]


def test_targets_in_window_share():
    # user a re-consumes its target inside a 2-event window, user b never does; user c's target left it
    log = Log(users=np.array(list("aaaabbbbcccc")), items=np.array(["2", "3", "1", "3", "1", "2", "3", "4",
                                                                 "5", "6", "7", "5"]),
              timestamps=np.arange(12), ratings=None)
    ds = build(log, "tiny")
    assert targets_in_window(ds, max_len=10) == pytest.approx(2 / 3)
    assert targets_in_window(ds, max_len=2) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    ds = load("ml-100k")
    ckpt = untrained_checkpoint("sasrec", ds, root / "s.safetensors", 16)
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(params={"pool_size": 32, "user_dim": 0, "layout": "residual"}, calib_users=150)
    compress_to_artifact(model, meta, ckpt, ds, opts, root / "a.safetensors")
    return root, ckpt


def test_include_seen_for_artifacts_and_the_cli_gates(setup):
    root, ckpt = setup
    run = cli_runner(root)
    out = {}
    for flag in ("--exclude-seen", "--include-seen"):
        proc = run("evaluate", ckpt, "a.safetensors", "--data", "ml-100k", flag, "--bootstrap", "50", "--speed-batch",
                   "8", "--repeats", "1", "--json", f"{flag}.json")
        assert proc.returncode == 0, proc.stderr
        out[flag] = json.loads((root / f"{flag}.json").read_text())
    a, b = (out[f]["comparisons"][0] for f in ("--exclude-seen", "--include-seen"))
    assert a["equals_compress_report"] and not b["equals_compress_report"]  # compress used the published protocol
    assert b["reference"]["MRR"] != a["reference"]["MRR"] and "ranked too" in b["metrics"]["protocol"]
    share = out["--exclude-seen"]["targets_in_window"]
    assert 0 <= share < 0.2  # ML-100K: a user rates a film once
    # gates: a CI gate finer than the noise of 943 users warns; the fidelity gates fail on this coarse pool
    fid = out["--exclude-seen"]["comparisons"][0]["metrics"]["fidelity"]
    proc = run("evaluate", ckpt, "a.safetensors", "--data", "ml-100k", "--bootstrap", "50", "--speed-batch", "8",
               "--repeats", "1", "--max-delta-ci", "NDCG@10=0.0001", "--min-overlap", f"{fid['top10_overlap'] + 0.01}",
               "--max-kl", f"{fid['kl_mean'] / 2}")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("warning: --max-delta-ci NDCG@10" in x and "cannot resolve" in x for x in lines)
    assert any("top-10 overlap" in x for x in lines) and any("KL" in x for x in lines), proc.stderr
    assert "Traceback" not in proc.stderr


def test_training_follows_the_chosen_protocol(tmp_path):
    """`ckv train --include-seen`: validation (early stopping) and the recorded test metrics rank seen items."""
    run = cli_runner(tmp_path)
    proc = run("train", "--arch", "sasrec", "--data", "ml-100k", "-o", "m.safetensors", "--epochs", "1", "--d", "8",
               "--max-len", "16", "--include-seen", "--threads", "1", "--json", "t.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "t.json").read_text())
    from ckv_cli.tasks.next_item import SEEN_PROTOCOL, evaluate_model

    model, meta = load_checkpoint(tmp_path / "m.safetensors")
    ds = load("ml-100k", item_vocab=meta["item_vocab"])
    assert report["test_protocol"] == SEEN_PROTOCOL
    assert report["test"] == pytest.approx(evaluate_model(model, ds, "test", exclude_seen=False), abs=1e-9)
    assert report["test"] != pytest.approx(evaluate_model(model, ds, "test", exclude_seen=True), abs=1e-9)
