"""`ckv evaluate CTR_CHECKPOINT --sweep` (issue 6, ckv_cli/evaluate/sweep.py) on ML-100k with small untrained SIM and SDIM
models: rows sorted by bytes, refused rows, lossless rows exact, the reference computed once, the test-user
subsample, CSV/JSON/PNG, and the command line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.data.ctr import SPLITS, load_ctr
from ckv_cli.errors import CkvError
from ckv_cli.evaluate.sweep import GRIDS, csv_columns, markdown_table, parse_task_sweep, run_sweep, verdict_line, write_csv
from ckv_cli.pipeline.compress import CompressOptions, compress
from ckv_cli.tasks import CTR
from ckv_cli.tasks.ctr import sweep_users
from ckv_cli.train.ctr import build_model
from conftest import cli_runner, load_script
from test_cli import assert_one_line_error

SMALL = {"d": 16, "d_attn": 32, "n_heads": 4, "top_k": 10, "max_len": 100}
GRID = "collective:pool_size=16;plain:dtype=float16;eventid;itemid;lowrank:rank=0"  # itemid, rank 0: refused
USERS = 60
DEFAULT_GRID = GRIDS[CTR.name]
CSV_COLUMNS = csv_columns({"task": CTR.name})


def parse_ctr_sweep(spec):
    return parse_task_sweep(spec, CTR)


def CTROptions(**kw) -> CompressOptions:
    """`CompressOptions` with the CTR defaults of `ckv compress` (a pool of 4096 per stream)."""
    return CompressOptions(**{"params": {"pool_size": 4096, "user_dim": 0, "layout": "residual"}, **kw})


@pytest.fixture(scope="module")
def data():
    return load_ctr("ml-100k-ctr", max_history=SMALL["max_len"])


@pytest.fixture(scope="module")
def ckpts(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-ctr")
    out = {}
    for arch in ("sim", "sdim", "nohistory"):
        torch.manual_seed(0)
        model = build_model(data, arch, dict(SMALL) if arch != "nohistory" else {"d": 16})
        path = root / f"{arch}.safetensors"
        save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.seq.item_ids,
                        metrics={}, train={"epochs": 0}, user_vocab=data.seq.user_ids)
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def sim(ckpts, data):
    model, meta = load_checkpoint(ckpts["sim"])
    return model, data.with_user_vocab(meta["user_vocab"])


@pytest.fixture(scope="module")
def payload(sim):
    model, ds = sim
    return run_sweep(model, ds, parse_ctr_sweep(GRID), calib_users=50, bootstrap=50, users=USERS)


def test_parse_ctr_spec():
    labels = [s.label for s in parse_ctr_sweep("default")]
    assert labels == list(DEFAULT_GRID) and "eventid" in labels
    assert {s.split(":")[0] for s in labels} >= {"plain", "bf16", "int8", "int4", "lowrank", "pq", "collective", "eventid"}
    assert dict(parse_ctr_sweep("pq:subvectors=4,codes=stored")[0].params) == {"subvectors": 4, "codes": "stored"}
    for bad in ("nosuch", "eventid:pool_size=3", "collective:", "pq:subvectors", ""):
        with pytest.raises(CkvError):
            parse_ctr_sweep(bad)


def test_rows_sorted_refused_and_lossless(payload):
    rows = payload["rows"]
    ran = [r for r in rows if r["status"] == "ok"]
    assert [r["spec"] for r in ran] == [r["spec"] for r in sorted(ran, key=lambda r: r["per_user_bytes"])]
    assert {r["spec"] for r in ran} == {"collective:pool_size=16", "plain:dtype=float16", "eventid"}
    refused = {r["spec"]: r["message"] for r in rows if r["status"] == "refused"}
    assert set(refused) == {"itemid", "lowrank:rank=0"} and all(refused.values())
    by = {r["spec"]: r for r in ran}
    for k in ("AUC", "gAUC", "logloss"):
        assert by["eventid"]["metrics"][k]["delta"] == 0.0
        assert abs(by["plain:dtype=float16"]["metrics"][k]["delta"]) < 1e-3
        assert by["eventid"]["metrics"][k]["ci_low"] <= 0 <= by["eventid"]["metrics"][k]["ci_high"]
    assert by["eventid"]["max_abs_prob_change"] == 0.0
    assert by["eventid"]["bytes_per_token"] < by["collective:pool_size=16"]["bytes_per_token"] < by["plain:dtype=float16"]["bytes_per_token"]
    assert by["eventid"]["pareto"]  # the smallest row, lossless
    assert "eventid" in verdict_line(payload) and "function of its event" in verdict_line(payload)
    text = markdown_table(payload)
    assert "| `eventid` |" in text and "refused:" in text and "test samples of 60 of the" in text


def test_scope_and_shared_reference(payload, sim):
    model, ds = sim
    s = payload["scored"]
    test = ds.split_of == SPLITS.index("test")
    assert s["users"] == USERS < s["test_users"] == len(np.unique(ds.users[test]))
    chosen = sweep_users(ds, USERS, 0)
    assert s["samples"] == int((test & np.isin(ds.users, chosen)).sum()) > 0
    assert payload["users"] == ds.seq.n_users and payload["teacher_seconds"] > 0
    # a single entry run the plain way on the same users gives the sweep's row (bytes over all users, same deltas)
    row = next(r for r in payload["rows"] if r["spec"] == "plain:dtype=float16")
    ref = CTR.teacher(model, ds, 256, users=chosen)  # the reference scores, computed once
    alone = compress(model, ds, CTROptions(codec="plain", params={"dtype": "float16"}, calib_users=50,
                                           bootstrap=50), teacher=ref)
    assert alone.accounting["per_user_bytes"] == row["per_user_bytes"]
    assert alone.metrics["delta"]["AUC"] == row["metrics"]["AUC"]["delta"]
    assert ref.n_users == USERS and alone.metrics["samples"] == s["samples"]
    again = compress(model, ds, CTROptions(codec="plain", params={"dtype": "float16"}, calib_users=50,
                                           bootstrap=50), teacher=ref)
    assert again.metrics["delta"] == alone.metrics["delta"]
    streamed = compress(model, ds, CTROptions(codec="plain", params={"dtype": "float16"}, calib_users=50,
                                              bootstrap=50), users=chosen)  # no teacher: references scored as it goes
    assert streamed.metrics["delta"] == alone.metrics["delta"]


def test_user_batches_do_not_change_scores(sim):
    """Scored users gathered in batches of 7 (never consecutive) give the scores of batches of 256."""
    model, ds = sim
    chosen = sweep_users(ds, 30, 3)
    runs = [compress(model, ds, CTROptions(codec="int8", params={}, calib_users=50, bootstrap=0, batch_users=n),
                     users=chosen) for n in (256, 7)]
    assert runs[0].metrics["delta"] == runs[1].metrics["delta"]
    assert runs[0].metrics["samples"] == runs[1].metrics["samples"] > 0


def test_csv_json(payload, tmp_path):
    write_csv(tmp_path / "s.csv", payload)
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(payload["rows"])
    assert float(next(r for r in rows if r["spec"] == "eventid")["AUC_delta"]) == 0.0
    json.dumps(payload)  # JSON-able


def test_sweep_users_option(sim):
    _, ds = sim
    every = sweep_users(ds, 0, 0)
    assert np.array_equal(sweep_users(ds, 10**6, 0), every)
    assert len(sweep_users(ds, 5, 1)) == 5 and set(sweep_users(ds, 5, 1)) <= set(every)
    with pytest.raises(CkvError):
        sweep_users(ds, -1, 0)


def test_cli(ckpts, tmp_path):
    run = cli_runner(tmp_path)
    proc = run("evaluate", ckpts["sdim"], "--data", "ml-100k-ctr", "--sweep", "collective:pool_size=16;eventid;int8",
               "--sweep-users", "40", "--calib-users", "40", "--bootstrap", "20", "--json", "s.json", "--csv", "s.csv")
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["arch"] == "sdim" and out["task"] == "ctr" and out["scored"]["users"] == 40
    assert [r["status"] for r in out["rows"]] == ["ok"] * 3 and (tmp_path / "s.csv").exists()
    assert "collective" in proc.stdout and "eventid" in proc.stdout
    assert_one_line_error(run("evaluate", ckpts["sdim"], "--data", "ml-100k-ctr", "--sweep", "collective:bogus=1"),
                          "bogus")
    assert_one_line_error(run("evaluate", ckpts["nohistory"], "--data", "ml-100k-ctr", "--sweep", "int8"),
                          "caches nothing per user")


def test_bench_sweep_ctr_sections(ckpts, tmp_path):
    """bench/sweep.py on the CTR checkpoints: JSON/CSV per model, a short section for the model that caches nothing,
    and --render-only rebuilds sweep.md from the JSONs."""
    bench = load_script("bench/sweep.py", "bench_sweep")
    args = ["--checkpoints", str(ckpts["sdim"]), str(ckpts["nohistory"]), "--data", "ml-100k", "--out", str(tmp_path),
            "--ctr-spec", "collective:pool_size=16;eventid", "--sweep-users", "20", "--calib-users", "30",
            "--bootstrap", "10", "--no-plot"]
    assert bench.main(args) == 0
    md = (tmp_path / "sweep.md").read_text()
    assert "## sdim (sdim)" in md and "## nohistory (nohistory)" in md and "No sweep possible" in md
    assert "| sdim | ctr |" in md and "caches nothing per user" in md
    assert json.loads((tmp_path / "sweep-sdim.json").read_text())["scored"]["users"] == 20
    assert (tmp_path / "sweep-sdim.csv").exists()
    (tmp_path / "sweep.md").unlink()
    assert bench.main(args + ["--render-only"]) == 0
    assert (tmp_path / "sweep.md").read_text() == md
