"""`ckv train` / `ckv evaluate` on the CTR task end to end (real ML-100k, a small model, in a subprocess)."""
from __future__ import annotations

import json

import pytest

from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.data.ctr import load_ctr
from conftest import cli_runner
from test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def ckv_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ctr-cli")
    return cli_runner(cwd), cwd


SMALL = ["--d", "16", "--attn-dim", "32", "--heads", "4", "--top-k", "10", "--max-len", "200", "--train-samples",
         "3000", "--epochs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def eta_checkpoint(ckv_run):
    run, cwd = ckv_run
    proc = run("train", "--arch", "eta", "--data", "ml-100k-ctr", "-o", "eta.safetensors", *SMALL, "--json", "train.json")
    assert proc.returncode == 0, proc.stderr
    return cwd / "eta.safetensors", json.loads((cwd / "train.json").read_text())


def test_train_writes_a_self_describing_ctr_checkpoint(eta_checkpoint):
    path, report = eta_checkpoint
    model, meta = load_checkpoint(path)
    assert meta["arch"] == "eta" and meta["dataset"] == "ml-100k-ctr" and model.task == "ctr"
    assert model.config.max_len == 200 and model.config.top_k == 10 and model.config.n_heads == 4
    assert len(meta["user_vocab"]) == model.config.n_users
    assert report["train_samples"] == 3000 and set(report["test"]) >= {"AUC", "gAUC", "logloss"}
    assert meta["metrics"]["test"] == report["test"]
    assert 0.5 < report["test"]["AUC"] < 1 and report["history"][0]["valid_AUC"] > 0.5


def test_evaluate_reproduces_the_recorded_metrics(ckv_run, eta_checkpoint):
    run, cwd = ckv_run
    path, report = eta_checkpoint
    proc = run("evaluate", path, "--data", "ml-100k-ctr", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    for k in ("AUC", "gAUC", "logloss", "samples", "users"):
        assert out["metrics"][k] == pytest.approx(report["test"][k], abs=1e-9), k
    # the plain dataset name reads as the CTR task too, and so does another split
    valid = run("evaluate", path, "--data", "ml-100k", "--split", "valid", "--json", "-")
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout[valid.stdout.index("{"):])["metrics"]["samples"] == len(load_ctr("ml-100k").samples("valid"))


def test_ctr_refusals(ckv_run, eta_checkpoint, tmp_path):
    run, _ = ckv_run
    path, _ = eta_checkpoint
    assert_one_line_error(run("compress", path, "--data", "ml-100k", "-o", tmp_path / "a.safetensors", "--engine", "ray"),
                          "CTR model")  # compress works on CTR models (tests/test_compress_ctr.py); sharding does not
    assert_one_line_error(run("evaluate", path, path, "--data", "ml-100k"), "CTR model")
    assert_one_line_error(run("train", "--arch", "sasrec", "--data", "ml-100k-ctr", "-o", tmp_path / "s.safetensors"),
                          "CTR task", "next-item")
    assert_one_line_error(run("train", "--arch", "sim", "--data", "ml-100k", "-o", tmp_path / "s.safetensors",
                              "--heads", "3"), "multiple of")
    assert not (tmp_path / "s.safetensors").exists()
