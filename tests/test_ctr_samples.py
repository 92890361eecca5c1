"""The shipped CTR checkpoints on real ML-1M: under 5 MB, self-describing, their recorded test metrics reproduce,
and every history model beats the no-history baseline on test AUC and gAUC (issue 3's bar; slow: minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.tasks.ctr import evaluate_ctr
from ckv_cli.data.ctr import load_ctr

ROOT = Path(__file__).resolve().parents[1] / "sample_checkpoints"
ARCHS = ("nohistory", "sim", "eta", "sdim", "twin")
PATHS = {a: ROOT / f"{a}-ml1m-ctr.safetensors" for a in ARCHS}


def test_ctr_sample_checkpoints_exist_and_describe_themselves():
    for arch, path in PATHS.items():
        assert path.exists(), path
        assert path.stat().st_size < 5 * 1024 * 1024
        model, meta = load_checkpoint(path)
        assert meta["arch"] == arch and meta["dataset"] == "ml-1m-ctr" and model.task == "ctr"
        assert model.config.d == 64 and model.config.max_len == 1000
        if arch != "nohistory":
            assert model.config.d_attn == 256 and model.config.short_len == 50
            assert model.config.top_k == (100 if arch == "twin" else 50)


def test_history_models_beat_the_baseline_on_recorded_metrics():
    test = {a: load_checkpoint(p)[1]["metrics"]["test"] for a, p in PATHS.items()}
    for arch in ("sim", "eta", "sdim", "twin"):
        assert test[arch]["AUC"] > test["nohistory"]["AUC"], (arch, test[arch], test["nohistory"])
        assert test[arch]["gAUC"] > test["nohistory"]["gAUC"], (arch, test[arch], test["nohistory"])


@pytest.fixture(scope="module")
def ml1m_ctr():
    return load_ctr("ml-1m-ctr")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_ctr_metrics_reproduce(arch, ml1m_ctr):
    model, meta = load_checkpoint(PATHS[arch])
    assert meta["data_fingerprint"] == ml1m_ctr.fingerprint
    metrics = evaluate_ctr(model, ml1m_ctr.with_user_vocab(meta["user_vocab"]), "test")
    for k in ("AUC", "gAUC", "logloss"):
        assert metrics[k] == pytest.approx(meta["metrics"]["test"][k], abs=1e-5), k
