"""`ckv compress` on the target-attention CTR models (the CTR task, ckv_cli/tasks/ctr.py): real ML-100k, small trained models.

Lossless codecs give deltas of exactly 0; the uncompressed reference equals the model's own forward; the bytes in
the report are the bytes on disk; the same seed gives a byte-identical artifact; bad options are one-line errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ckv_cli.codecs.bits import bits_for
from ckv_cli.codecs.plan import pack_side, unpack_side
from ckv_cli.data.ctr import load_ctr
from ckv_cli.io.safetensors import read_header
from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress, compress_to_artifact
from ckv_cli.tasks.ctr import calibration_events, event_ids, groups, predict, score_group, tokens_of
from ckv_cli.train.ctr import CTRTrainConfig, train_ctr
from conftest import cli_runner
from test_cli import assert_one_line_error


def CTROptions(**kw) -> CompressOptions:
    """`CompressOptions` with the CTR defaults of `ckv compress` (a pool of 4096 per stream)."""
    return CompressOptions(**{"params": {"pool_size": 4096, "user_dim": 0, "layout": "residual"}, **kw})

SMALL = {"d": 16, "d_attn": 32, "n_heads": 4, "top_k": 10, "max_len": 200}
FAST = {"calib_tokens": 3000, "bootstrap": 20}


@pytest.fixture(scope="module")
def data():
    return load_ctr("ml-100k-ctr", max_history=200)


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """One small trained checkpoint per architecture (3,000 training samples, one epoch: a second or two each)."""
    out = {}
    root = tmp_path_factory.mktemp("ctr-ckpt")
    for arch in ("sim", "eta", "sdim", "twin"):
        cfg = CTRTrainConfig(epochs=1, train_samples=3000, threads=1, model=dict(SMALL))
        model, *_ = train_ctr(data, arch, cfg)
        path = root / f"{arch}.safetensors"
        save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.seq.item_ids,
                        metrics={}, train={}, force=True, user_vocab=data.seq.user_ids)
        out[arch] = path
    return out


def _load(path, data):
    model, meta = load_checkpoint(path)
    return model, meta, data.with_user_vocab(meta["user_vocab"])


@pytest.mark.parametrize("arch, codec", [("sim", "eventid"), ("eta", "plain"), ("sdim", "eventid"), ("twin", "plain")])
def test_lossless_codecs_change_nothing(models, data, arch, codec):
    """plain fp32 and the event-id baseline decode to the exact cache: every delta is exactly 0."""
    from ckv_cli.metrics import auc

    model, _, ds = _load(models[arch], data)
    params = {"dtype": "float32"} if codec == "plain" else {}
    r = compress(model, ds, CTROptions(codec=codec, params=params, **FAST))
    m = r.metrics
    assert m["delta"] == {"AUC": 0.0, "gAUC": 0.0, "logloss": 0.0}, m["delta"]
    assert m["max_abs_prob_change"] == 0.0 and all(v == 0.0 for v in m["reconstruction_rel_mse"].values())
    assert m.get("signature_mismatch_rate", 0.0) == 0.0
    # the reference (scores from the undecoded cache) is the model's own forward on every test sample
    events = ds.samples("test")
    assert m["samples"] == len(events) and m["users"] == len(np.unique(ds.users[events]))
    assert m["uncompressed"]["AUC"] == pytest.approx(auc(ds.labels[events], predict(model, ds, events)), abs=1e-6)
    fields = set(r.accounting["per_user_breakdown"])
    if codec == "eventid":  # item, rating bucket and gap bucket ids, bit-packed: nothing else
        assert fields == {"users/offsets", "tokens/items", "tokens/ratings", "tokens/gaps"}
        n = len(ds.seq.items)
        want = sum((n * b + 7) // 8 for b in (bits_for(ds.seq.n_items + 1), 3, 5)) + 8 * (ds.seq.n_users + 1)
        assert r.accounting["per_user_bytes"] == want


def test_reference_cache_matches_forward_sample_by_sample(models, data):
    """score_group over the per-event streams equals model(batch) per sample (not only in AUC)."""
    model, _, ds = _load(models["twin"], data)
    users = np.unique(ds.users[ds.samples("test")])[:5]
    lo, hi = int(ds.seq.offsets[users[0]]), int(ds.seq.offsets[users[-1] + 1])
    tokens = tokens_of(model, ds, np.arange(lo, hi), np.array([0, hi - lo]))
    samples = lo + np.flatnonzero(ds.split_of[lo:hi] == 2)
    for g in groups(samples, ds, 1 << 12):
        got = score_group(model, ds, g, lo, tokens)
        with torch.no_grad():
            want = model(ds.batch(g))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_collective_accounting_and_bytes_on_disk(models, data, tmp_path):
    model, meta, ds = _load(models["eta"], data)
    out = tmp_path / "eta.ckv.safetensors"
    opts = CTROptions(params={"pool_size": 64, "user_dim": 0, "layout": "residual"}, **FAST)
    rep = compress_to_artifact(model, meta, models["eta"], ds, opts, out, command="test")
    acct = rep["accounting"]
    header, raw = read_header(out)
    size = {n: i["data_offsets"][1] - i["data_offsets"][0] for n, i in header.items()}
    assert sum(size[n] for n in acct["per_user_breakdown"]) == acct["per_user_bytes"] == rep["per_user_bytes_on_disk"]
    assert sum(v for n, v in size.items() if n.startswith("shared/")) == acct["shared_bytes"] > 0
    assert sum(size.values()) == rep["stored_tensor_bytes"]
    # 4 streams of d_attn 32 at fp16: 256 bytes per token; 4 indices of 6 bits = 3 bytes per token, no item ids,
    # signatures derived from the decoded cache (nothing stored)
    assert acct["full_fp16_bytes_per_token"] == 4 * 32 * 2 and acct["tokens"] == len(ds.seq.items)
    assert set(acct["per_user_breakdown"]) == {"users/offsets", "short.k/idx", "short.v/idx", "long.k/idx", "long.v/idx"}
    assert acct["per_user_bytes"] == 4 * ((acct["tokens"] * 6 + 7) // 8) + 8 * (acct["users"] + 1)
    assert rep["codes"] == "derived" and 0 < rep["metrics"]["signature_mismatch_rate"] < 0.5
    # self-describing metadata; calibration on training events only
    assert raw["task"] == "ctr" and raw["arch"] == "eta" and raw["command"] == "test"
    assert json.loads(raw["accounting"])["per_user_bytes"] == acct["per_user_bytes"]
    assert json.loads(raw["plan"])["streams"]["long.k"]["codec"] == "collective"
    calib, _ = calibration_events(ds, opts.calib_users, opts.calib_tokens, opts.seed)
    assert (ds.split_of[calib] == 0).all() and len(calib) == FAST["calib_tokens"]


def test_stored_signatures_are_exact(models, data):
    model, _, ds = _load(models["sdim"], data)
    _, side = model.token_streams(event_ids(ds, np.arange(500)))
    codes, (spec,) = side["codes"], model.cache_spec().side
    assert torch.equal(model.side_values("codes", unpack_side(pack_side(codes, spec.bits), spec.count, spec.bits)), codes)
    r = compress(model, ds, CTROptions(params={"pool_size": 64}, codes="stored", **FAST))
    assert r.metrics["signature_mismatch_rate"] == 0.0
    assert r.accounting["per_user_breakdown"]["tokens/codes"] == (len(ds.seq.items) * 48 + 7) // 8


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ctr-compress-cli")
    return cli_runner(cwd), cwd


def test_cli_same_seed_same_bytes_and_inspect(cli, models):
    run, cwd = cli
    args = ["compress", models["sim"], "--data", "ml-100k-ctr", "-o", "a.safetensors", "--pool-size", "64",
            "--calib-users", "200", "--param", "calib_tokens=3000", "--param", "bootstrap=20", "--force", "--json", "a.json"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    one = (cwd / "a.safetensors").read_bytes()
    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert (cwd / "a.safetensors").read_bytes() == one
    rep = json.loads((cwd / "a.json").read_text())
    assert rep["per_user_bytes_on_disk"] == rep["accounting"]["per_user_bytes"]
    assert "tokens/items" in rep["accounting"]["per_user_breakdown"]  # SIM's category search reads item ids
    assert "AUC: uncompressed -> compressed" in first.stdout
    shown = run("inspect", "a.safetensors", "--json", "-")
    assert shown.returncode == 0, shown.stderr
    assert "CTR artifact of sim" in shown.stdout and "integrity\tok" in shown.stdout


@pytest.mark.parametrize("extra, fragment", [
    (["--share", "q"], "--share takes k, v or k,v"),
    (["--param", "codes=maybe"], "codes must be one of derived, stored"),
    (["--engine", "ray"], "--engine applies to next-item models"),
])
def test_cli_bad_options_are_one_line_errors(cli, models, extra, fragment):
    run, _ = cli
    proc = run("compress", models["twin"], "--data", "ml-100k-ctr", "-o", "bad.safetensors", *extra)
    assert_one_line_error(proc, fragment)


def test_nohistory_has_nothing_to_compress(cli, data, tmp_path):
    run, _ = cli
    cfg = CTRTrainConfig(epochs=1, train_samples=500, threads=1, model=dict(SMALL))
    model, *_ = train_ctr(data, "nohistory", cfg)
    path = tmp_path / "nohistory.safetensors"
    save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.seq.item_ids,
                    metrics={}, train={}, force=True, user_vocab=data.seq.user_ids)
    assert_one_line_error(run("compress", path, "--data", "ml-100k-ctr", "-o", "n.safetensors"), "caches nothing")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sim", "eta", "sdim", "twin"])
def test_ml1m_bars_with_the_defaults(arch, tmp_path):
    """The issue's bars on a sample ML-1M checkpoint with the defaults: per-user bytes <= 0.5% of fp16, AUC and
    gAUC within 0.001 (about 3 minutes each on 2 cores)."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "sample_checkpoints" / f"{arch}-ml1m-ctr.safetensors"
    if not path.exists():
        pytest.skip(f"{path} not present")
    model, meta = load_checkpoint(path)
    ds = load_ctr("ml-1m-ctr", max_history=model.config.max_len, item_vocab=meta["item_vocab"]).with_user_vocab(meta["user_vocab"])
    rep = compress_to_artifact(model, meta, path, ds, CTROptions(), tmp_path / "a.safetensors")
    assert rep["accounting"]["per_user_ratio_fp16"] <= 0.005
    assert abs(rep["metrics"]["delta"]["AUC"]) <= 0.001 and abs(rep["metrics"]["delta"]["gAUC"]) <= 0.001
