"""`ckv evaluate` with artifacts (paired bootstrap, fidelity, gates) and `ckv inspect` (artifact and checkpoint), on
ML-100K with a tiny untrained SASRec."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.artifact import Artifact
from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.evaluate.compare import check_gates, compare_artifact, parse_gate
from ckv_cli.tasks.next_item import score_fidelity
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.tasks.next_item import rank_targets
from ckv_cli.evaluate.inspect import analyse_checkpoint, spectrum, unexplained_by
from ckv_cli.metrics import RANKING_METRICS, paired_bootstrap
from test_compress import one_line_error, run_ckv

MAX_LEN = 16


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def setup(ds, tmp_path_factory):
    """A checkpoint, a lossy artifact (small pool) and an exact one (fp32), written by the library."""
    d = tmp_path_factory.mktemp("eval")
    ckpt = d / "sasrec.safetensors"
    save_checkpoint(make_model("sasrec", n_items=ds.n_items, max_len=MAX_LEN), ckpt, dataset=ds.name,
                    fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={"epochs": 0})
    model, meta = load_checkpoint(ckpt)
    arts = {}
    for name, opts in (("pool", CompressOptions(params={"pool_size": 16, "user_dim": 0, "layout": "residual"}, calib_users=100)),
                       ("exact", CompressOptions(codec="plain", params={"dtype": "float32"}))):
        arts[name] = d / f"{name}.safetensors"
        compress_to_artifact(model, meta, ckpt, ds, opts, arts[name])
    return d, ckpt, model, arts


# ---------------------------------------------------------------- library


def test_paired_bootstrap_constant_and_normal():
    ref = {"m": np.zeros(500)}
    lo, hi = paired_bootstrap(ref, {"m": np.full(500, 0.25)}, n=200)["m"]
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    new = {"m": rng.normal(0.1, 1.0, 4000)}
    lo, hi = paired_bootstrap({"m": np.zeros(4000)}, new, n=1000, seed=3)["m"]
    mean, half = new["m"].mean(), 1.96 / np.sqrt(4000)
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert all(np.isnan(v) for v in paired_bootstrap({"m": np.zeros(3)}, {"m": np.ones(3)}, n=0)["m"])


def test_paired_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    ref, new = {"m": rng.random(300)}, {"m": rng.random(300)}
    assert paired_bootstrap(ref, new, n=100, seed=5) == paired_bootstrap(ref, new, n=100, seed=5)
    assert paired_bootstrap(ref, new, n=100, seed=5) != paired_bootstrap(ref, new, n=100, seed=6)


def test_score_fidelity_identical_and_different():
    s = torch.randn(4, 30)
    s[:, 0] = float("-inf")
    t = torch.tensor([1, 2, 3, 4])
    same = score_fidelity(s, s.clone(), t)
    assert (same["top10_overlap"] == 1).all() and np.allclose(same["kl"], 0, atol=1e-6)
    assert (same["rank_ref"] == same["rank_new"]).all()
    flipped = s.clone()
    flipped[:, 1:] = -s[:, 1:]
    other = score_fidelity(s, flipped, t)
    assert (other["top10_overlap"] == 0).all() and (other["kl"] > 1).all()


def test_exact_artifact_matches_the_model(setup, ds):
    _, _, model, arts = setup
    c = compare_artifact(model, ds, Artifact.open(arts["exact"]), bootstrap=100, repeats=1, speed_batch=32)
    assert c.users == ds.n_users
    assert c.fidelity["hit10_flips"] == 0 and c.fidelity["top10_overlap"] == 1.0 and c.fidelity["kl_mean"] < 1e-6
    for k, d in c.delta.items():
        assert d["delta"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0, k
    # the reference (cache of all but the last event, then extend) ranks as a plain prefill of the whole history
    direct = rank_targets(model, ds, "test")
    from ckv_cli.metrics import ranking_metrics

    for k, v in ranking_metrics(direct).items():
        assert c.reference[k] == pytest.approx(v, abs=2e-3), k
    assert c.speed["full_fp16_in_memory_s"] > 0 and c.speed["compressed_domain_s"] > 0 and c.speed["decode_then_attend_s"] > 0


def test_lossy_artifact_has_a_delta_inside_its_ci(setup, ds):
    _, _, model, arts = setup
    c = compare_artifact(model, ds, Artifact.open(arts["pool"]), bootstrap=300, repeats=1, speed_batch=32)
    assert c.fidelity["top10_overlap"] < 1 and c.fidelity["kl_mean"] > 0
    assert c.fidelity["hit10_flips"] == c.fidelity["hit10_gained"] + c.fidelity["hit10_lost"]
    for k, d in c.delta.items():
        assert d["ci_low"] <= d["delta"] <= d["ci_high"], k
    assert c.accounting["per_user_ratio_fp16"] < 0.1
    # a gate tighter than the measured drop fails, one looser passes
    worst = min(RANKING_METRICS, key=lambda k: c.delta[k]["delta"])
    drop = -c.delta[worst]["delta"]
    if drop > 0:
        assert check_gates([c], [f"{worst}={drop / 2}"], None)
    assert check_gates([c], [f"{worst}={max(drop, 0) + 0.01}"], 0.5) == []
    assert check_gates([c], [], c.accounting["per_user_ratio_fp16"] / 2)


def test_parse_gate():
    assert parse_gate("NDCG@10=0.01", list(RANKING_METRICS)) == ("NDCG@10", 0.01, False)
    assert parse_gate("HR@10=2%", list(RANKING_METRICS)) == ("HR@10", pytest.approx(0.02), True)
    for bad in ("NDCG@10", "foo=1", "NDCG@10=abc", "NDCG@10=-1"):
        with pytest.raises(CkvError):
            parse_gate(bad, list(RANKING_METRICS))


def test_unexplained_by_and_spectrum():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 8, generator=g)
    items = np.random.default_rng(0).integers(0, 20, 500)
    x = table[torch.from_numpy(items)]
    assert unexplained_by(x, items) < 1e-10
    noisy = x + torch.randn(500, 8, generator=g)
    assert 0.2 < unexplained_by(noisy, items) < 0.9
    spec = spectrum(torch.randn(300, 2, generator=g) @ torch.randn(2, 8, generator=g))
    assert spec[1] == pytest.approx(1.0, abs=1e-5) and (np.diff(spec) >= -1e-6).all()


def test_checkpoint_analysis_finds_the_item_layer(setup, ds):
    _, _, model, _ = setup
    an = analyse_checkpoint(model, ds, n_users=200, seed=0, target=0.5)
    s = an["streams"]
    assert s["L0.k"]["item_function"] and s["L0.v"]["item_function"]
    assert not s["L1.k"]["item_function"] and s["L1.k"]["unexplained_by_item_position"] > 1e-3
    assert an["recompute_from_items"] == ["L0.k", "L0.v"]
    for name in ("L1.k", "L1.v"):
        errs = s[name]["pool_errors"]
        for m, e in errs.items():
            after = [e["after_user_dims"][r] for r in sorted(e["after_user_dims"])]
            assert after[0] == pytest.approx(e["rel_error"]) and all(b <= a + 1e-9 for a, b in zip(after, after[1:]))


# ---------------------------------------------------------------- command line


def test_cli_evaluate_gates(setup):
    d, ckpt, _, arts = setup
    out = d / "e.json"
    p = run_ckv("evaluate", ckpt, arts["pool"], "--data", "ml-100k", "--bootstrap", "200", "--repeats", "1",
                "--speed-batch", "32", "--json", out, cwd=d)
    assert p.returncode == 0, p.stderr
    assert "95% CI" in p.stdout and "top-10 overlap" in p.stdout and "per-user ratio" in p.stdout and "speed-up" in p.stdout
    report = json.loads(out.read_text())["comparisons"][0]
    drop = -report["delta"]["HR@50"]["delta"]
    loose = run_ckv("evaluate", ckpt, arts["pool"], "--data", "ml-100k", "--bootstrap", "20", "--repeats", "1",
                    "--speed-batch", "8", "--max-delta", f"HR@50={max(drop, 0) + 0.05}", "--max-ratio", "0.5", cwd=d)
    assert loose.returncode == 0, loose.stderr
    tight = run_ckv("evaluate", ckpt, arts["pool"], "--data", "ml-100k", "--bootstrap", "20", "--repeats", "1",
                    "--speed-batch", "8", "--max-ratio", "0.0001", cwd=d)
    assert tight.returncode == 1
    lines = tight.stderr.splitlines()
    assert len(lines) == 1 and "per-user ratio" in lines[0] and "0.0100%" in lines[0], tight.stderr


def test_cli_evaluate_refuses_an_artifact_of_another_checkpoint(setup, ds):
    d, _, _, arts = setup
    other = d / "other.safetensors"
    save_checkpoint(make_model("sasrec", seed=1, n_items=ds.n_items, max_len=MAX_LEN), other, dataset=ds.name,
                    fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={"epochs": 0})
    one_line_error(run_ckv("evaluate", other, arts["pool"], "--data", "ml-100k", cwd=d), "another checkpoint")
    one_line_error(run_ckv("evaluate", other, "--data", "ml-100k", "--max-delta", "NDCG@10=1", cwd=d), "artifact")


def test_cli_inspect_artifact_and_corruption(setup):
    d, ckpt, _, arts = setup
    p = run_ckv("inspect", arts["pool"], "--data", "ml-100k", "--users", "50", "--json", d / "i.json", cwd=d)
    assert p.returncode == 0, p.stderr
    r = json.loads((d / "i.json").read_text())
    art = Artifact.open(arts["pool"])
    assert {t["name"] for t in r["tensors"]} == set(art.meta["checksums"])
    u = r["pool_usage"]["L1.k"]
    assert sum(u["counts"]) == art.meta["accounting"]["tokens"] and 0 < u["used"] <= 16
    assert set(r["reconstruction_rel_error"]) == {"L0.k", "L0.v", "L1.k", "L1.v"}
    assert r["reconstruction_rel_error"]["L0.k"] < 1e-6 < r["reconstruction_rel_error"]["L1.k"]
    assert "integrity: all tensors match" in p.stdout
    # flip one byte inside the data of L1.v/idx: inspect names that tensor and exits 1
    bad = d / "bad.safetensors"
    raw = bytearray(arts["pool"].read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:header])["L1.v/idx"]["data_offsets"][0]
    raw[header + start] ^= 0xFF
    bad.write_bytes(bytes(raw))
    p = run_ckv("inspect", bad, cwd=d)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "'L1.v/idx'" in p.stderr and len(p.stderr.splitlines()) == 1


def test_cli_inspect_checkpoint(setup):
    d, ckpt, _, _ = setup
    p = run_ckv("inspect", ckpt, cwd=d)
    assert p.returncode == 0 and "--data" in p.stdout, p.stderr
    one_line_error(run_ckv("inspect", ckpt, "--plot", d / "plots", cwd=d), "--data")
    one_line_error(run_ckv("inspect", d / "missing.safetensors", cwd=d), "not found")
    args = ["inspect", ckpt, "--data", "ml-100k", "--users", "100", "--json", d / "c.json"]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", d / "plots"]
    except ImportError:
        pass
    p = run_ckv(*args, cwd=d)
    assert p.returncode == 0, p.stderr
    r = json.loads((d / "c.json").read_text())
    assert r["analysis"]["recompute_from_items"] == ["L0.k", "L0.v"] and "recommended" in p.stdout
    if "--plot" in args:
        png = d / "plots" / "sasrec.spectrum.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
