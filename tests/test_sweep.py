"""`ckv evaluate --sweep` (issue 6): spec parsing, Pareto flags, the sweep on ML-100K with a tiny untrained SASRec
(shared teacher, exact codec, evict, refused rows, JSON/CSV/PNG), the collective verdict of
bench/sweep.py, and the command line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import untrained_checkpoint
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.pipeline.compress import CompressOptions, compress
from ckv_cli.spec import FlatCache
from ckv_cli.tasks.next_item import Teacher, iter_test_caches
from ckv_cli.metrics import RANKING_METRICS
from ckv_cli.evaluate.sweep import (CSV_COLUMNS, DEFAULT_GRID, collective_verdict, markdown_table, order_rows,
                                    pareto_flags, parse_sweep, run_sweep, verdict_line, write_csv)
from test_compress import one_line_error, run_ckv

MAX_LEN = 16
GRID = "collective:pool_size=16;plain:dtype=float32;itemid;evict:keep=0.5,policy=keynorm"  # three run, one refused


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def ckpt(ds, tmp_path_factory):
    return untrained_checkpoint("sasrec", ds, tmp_path_factory.mktemp("sweep") / "sasrec.safetensors", MAX_LEN)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)[0]


@pytest.fixture(scope="module")
def payload(model, ds):
    return run_sweep(model, ds, parse_sweep(GRID), calib_users=100, bootstrap=200)


# ---------------------------------------------------------------- parsing


def test_parse_good_specs():
    specs = parse_sweep(" collective:pool_size=1024 ; int4:group_size=64;pq:subvectors=8,bits=8;bf16;")
    assert [s.label for s in specs] == ["collective:pool_size=1024", "int4:group_size=64", "pq:subvectors=8,bits=8", "bf16"]
    assert dict(specs[0].params) == {"pool_size": 1024} and dict(specs[2].params) == {"subvectors": 8, "bits": 8}
    assert dict(parse_sweep("plain:dtype=float32")[0].params) == {"dtype": "float32"}
    assert dict(parse_sweep("itemid:tolerance=1e-2")[0].params) == {"tolerance": 0.01}
    default = parse_sweep("default")
    assert [s.label for s in default] == list(DEFAULT_GRID)
    codecs = {s.codec for s in default}
    assert codecs == {"plain", "bf16", "int8", "int4", "lowrank", "pq", "collective", "itemid", "evict"}
    assert all(2 <= sum(s.codec == c for s in default) <= 4 for c in ("int4", "lowrank", "pq", "collective"))
    more = parse_sweep("default;int8;collective:pool_size=2048")  # duplicates dropped, extras appended
    assert [s.label for s in more] == list(DEFAULT_GRID) + ["collective:pool_size=2048"]


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty --sweep"),
    (" ; ", "empty --sweep"),
    ("nosuch", "unknown codec 'nosuch'"),
    ("pq:", "expected codec:KEY=VALUE"),
    ("pq:subvectors", "expected KEY=VALUE"),
    ("pq:=8", "expected KEY=VALUE"),
    ("pq:subvectors=8,,bits=8", "stray ','"),
    ("pq:bogus=1", "has no parameter 'bogus'"),
    ("int8;collective:pool=16", "has no parameter 'pool'"),
])
def test_parse_bad_specs(spec, fragment):
    with pytest.raises(CkvError) as e:
        parse_sweep(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- Pareto and ordering


def test_pareto_flags_hand_made():
    # bytes:  10    10    20    30    30    40
    # delta: -0.2  -0.1  -0.1  +0.0  -0.3  +0.0
    flags = pareto_flags([10, 10, 20, 30, 30, 40], [-0.2, -0.1, -0.1, 0.0, -0.3, 0.0])
    assert flags == [False, True, True, True, False, True]  # equal delta at more bytes stays on the front
    assert pareto_flags([], []) == []
    assert pareto_flags([5], [-1.0]) == [True]


def _row(spec, nbytes, delta, status="ok"):
    codec = spec.split(":")[0]
    if status != "ok":
        return {"spec": spec, "codec": codec, "params": {}, "status": status, "message": "why", "seconds": 0.0}
    m = {k: {"value": 0.1, "delta": delta, "relative": delta / 0.1, "ci_low": delta - 0.01, "ci_high": delta + 0.01}
         for k in RANKING_METRICS}
    return {"spec": spec, "codec": codec, "params": {}, "status": "ok", "message": "", "bytes_per_token": nbytes / 10,
            "per_user_bytes": nbytes, "per_user_ratio_fp16": 0.1, "per_user_ratio_fp32": 0.05, "shared_bytes": 0,
            "total_ratio_fp16": 0.1, "metrics": m, "top10_overlap": 0.9, "kl_mean": 0.01, "hit10_flips": 1, "seconds": 1.0}


def test_order_rows_and_verdict():
    rows = order_rows([_row("evict", 0, 0, "not implemented"), _row("int8", 300, -0.001), _row("itemid", 0, 0, "refused"),
                       _row("collective:pool_size=16", 50, -0.01), _row("pq:subvectors=2", 60, -0.02),
                       _row("lowrank:rank=2", 40, -0.05)])
    assert [r["spec"] for r in rows] == ["lowrank:rank=2", "collective:pool_size=16", "pq:subvectors=2", "int8",
                                         "itemid", "evict"]
    assert [r["pareto"] for r in rows] == [True, True, False, True, False, False]
    payload = {"rows": rows, "reference": {k: 0.1 for k in RANKING_METRICS}, "users": 10, "tokens": 100,
               "full_fp16_bytes_per_token": 512}
    v = collective_verdict(payload)
    assert not v["collective_best"]
    assert [e["baseline"] for e in v["beats"]] == ["int8"] and v["beats"][0]["collective"] == "collective:pool_size=16"
    assert [e["baseline"] for e in v["dominated"]] == ["pq:subvectors=2"]
    assert [e["baseline"] for e in v["smaller"]] == ["lowrank:rank=2"]
    line = verdict_line(payload)
    assert "**no**" in line and "beaten by `int8`" in line and "\n" not in line
    payload["rows"] = order_rows([r for r in rows if r["spec"] != "int8"])
    assert collective_verdict(payload)["collective_best"] and "**yes**" in verdict_line(payload)
    table = markdown_table(payload)
    assert table.count("\n| `") == len(payload["rows"]) and "not implemented: why" in table


# ---------------------------------------------------------------- the sweep on ML-100K


def test_teacher_matches_streamed_caches(model, ds):
    teacher = Teacher.build(model, ds, batch_users=300)
    streamed = FlatCache.concat([model.flatten(b.cache) for b in iter_test_caches(model, ds, np.arange(ds.n_users), 300)])
    np.testing.assert_array_equal(teacher.flat.offsets, streamed.offsets)
    assert teacher.flat.streams.keys() == streamed.streams.keys()
    assert all(torch.equal(teacher.flat.stream(n), streamed.stream(n)) for n in streamed.streams)
    assert [len(tb.users) for tb in teacher.batches] == [300, 300, 300, ds.n_users - 900]
    last = teacher.batches[-1]
    assert torch.equal(last.flat.stream("L1.k"), streamed.stream("L1.k")[int(streamed.offsets[900]):])  # a view at the right place
    users = np.array([5, 2, 900])
    part = teacher.flat.select(users)
    assert list(np.diff(part.offsets)) == list(np.diff(streamed.offsets)[users])
    assert torch.equal(part.stream("L0.v")[: part.offsets[1]], streamed.stream("L0.v")[streamed.offsets[5] : streamed.offsets[6]])


def test_sweep_rows(payload, ds):
    rows = payload["rows"]
    assert [r["spec"] for r in rows] == ["collective:pool_size=16", "evict:keep=0.5,policy=keynorm",
                                         "plain:dtype=float32", "itemid"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "refused"]
    ran = [rows[0], rows[2]]
    assert ran[0]["per_user_bytes"] < rows[1]["per_user_bytes"] < ran[1]["per_user_bytes"]  # sorted by bytes
    assert "not a function of the item alone" in rows[3]["message"] and "\n" not in rows[3]["message"]
    exact = ran[1]
    assert exact["top10_overlap"] == 1.0 and exact["hit10_flips"] == 0 and exact["kl_mean"] < 1e-6
    for k, m in exact["metrics"].items():
        assert m["delta"] == 0 and m["ci_low"] == 0 and m["ci_high"] == 0, k
    assert payload["users"] == ds.n_users and set(payload["reference"]) == set(RANKING_METRICS)
    lossy = ran[0]["metrics"]["NDCG@10"]
    assert lossy["ci_low"] <= lossy["delta"] <= lossy["ci_high"]
    assert ran[0]["pareto"]  # the fewest bytes: nothing can dominate it
    assert exact["pareto"] == (lossy["delta"] <= 0)  # fp32 (delta 0) is on the front unless the pool did better
    assert ran[0]["shared_bytes"] > 0 and ran[0]["top10_overlap"] < 1
    assert all(r["seconds"] >= 0 for r in rows)
    json.dumps(payload)  # JSON-able as is


def test_sweep_evict_row(payload, ds):
    """evict keeps half of each user's tokens (masked, not compacted): its bytes are the kept tokens' fp16 K/V
    of the stored layer, a keep bit per token, item ids and offsets; dropping tokens changes the scores."""
    from ckv_cli.codecs.bits import bits_for, packed_nbytes
    from ckv_cli.codecs.evict import kept_counts
    from ckv_cli.tasks.next_item import teacher_cache_lengths

    row = payload["rows"][1]
    lengths = teacher_cache_lengths(ds, MAX_LEN)
    n, kept = int(lengths.sum()), int(kept_counts(lengths, 0.5).sum())
    assert payload["tokens"] == n
    want = {"tokens/items": packed_nbytes(n, bits_for(ds.n_items + 1)), "users/offsets": 8 * (ds.n_users + 1),
            "tokens/keep": packed_nbytes(n, 1), "L1.k/x": kept * 16 * 2, "L1.v/x": kept * 16 * 2}
    assert row["per_user_breakdown"] == want and row["per_user_bytes"] == sum(want.values())
    assert row["shared_bytes"] == 0 and row["top10_overlap"] < 1
    assert row["plan"]["streams"]["L0.k"] == "items" and row["plan"]["streams"]["L1.v"]["params"]["keep"] == 0.5


def test_sweep_row_equals_compress(payload, model, ds):
    """The sweep and `ckv compress` share one code path: the same plan gives the same bytes and fidelity."""
    result = compress(model, ds, CompressOptions(codec="plain", params={"dtype": "float32"}, calib_users=100))
    row = payload["rows"][2]
    assert row["spec"] == "plain:dtype=float32"
    assert row["per_user_bytes"] == result.accounting["per_user_bytes"]
    assert row["bytes_per_token"] == result.accounting["bytes_per_token"]
    assert row["metrics"]["NDCG@10"]["value"] == result.metrics["compressed"]["NDCG@10"]
    assert payload["reference"] == result.metrics["uncompressed"]
    assert set(result.per_user) == {"rank_ref", "rank_new", "top10_overlap", "kl"}
    assert len(result.per_user["rank_new"]) == ds.n_users


def test_sweep_outputs(payload, tmp_path):
    write_csv(tmp_path / "s.csv", payload)
    with open(tmp_path / "s.csv") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == CSV_COLUMNS and [r["spec"] for r in lines] == [r["spec"] for r in payload["rows"]]
    assert float(lines[2]["NDCG@10_delta"]) == 0 and lines[2]["pareto"] == str(payload["rows"][2]["pareto"])
    assert lines[3]["status"] == "refused" and lines[3]["NDCG@10_delta"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temporary left behind
    pytest.importorskip("matplotlib")
    from ckv_cli.evaluate.plots import plot_sweep

    png = plot_sweep(payload["rows"], "test", tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- command line


def test_cli_sweep(ckpt, tmp_path):
    proc = run_ckv("evaluate", ckpt, "--data", "ml-100k", "--sweep", "plain:dtype=float32;collective:pool_size=16;evict",
                   "--calib-users", "100", "--bootstrap", "100", "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv",
                   "--plot", tmp_path / "plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["arch"] == "sasrec" and out["checkpoint"] == str(ckpt) and out["calib_users"] == 100
    assert [r["spec"] for r in out["rows"]] == ["collective:pool_size=16", "evict", "plain:dtype=float32"]
    assert all(r["status"] == "ok" for r in out["rows"]) and out["rows"][1]["plan"]["streams"]["L1.k"]["params"] == {
        "d": 16, "keep": 0.5, "policy": "recent"}  # the defaults
    assert "collective:pool_size=16" in proc.stdout and "evict" in proc.stdout
    assert (tmp_path / "s.csv").read_text().count("\n") == 4
    if (tmp_path / "plots").exists():  # matplotlib installed
        assert (tmp_path / "plots" / "sasrec.sweep.png").stat().st_size > 0


def test_cli_sweep_refusals(ckpt, tmp_path):
    base = ("evaluate", ckpt, "--data", "ml-100k")
    one_line_error(run_ckv(*base, "--sweep", "default", "--max-delta", "NDCG@10=1%", cwd=tmp_path), "--sweep", "gates")
    one_line_error(run_ckv(*base, "--sweep", "default", "--max-ratio", "0.1", cwd=tmp_path), "--sweep", "gates")
    one_line_error(run_ckv(*base, "--sweep", "pq:bogus=1", "--json", tmp_path / "x.json", cwd=tmp_path), "bogus")
    one_line_error(run_ckv(*base, "--csv", tmp_path / "x.csv", cwd=tmp_path), "--sweep")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.csv").exists()


def test_verdict_undercut_by_a_smaller_row_not_distinguishably_worse():
    """A baseline smaller than every collective row counts against collective when it is not measurably worse
    (eventid on the CTR models: lossless, fewer bytes); a smaller row that is clearly worse does not."""
    base = [_row("collective:pool_size=16", 50, 0.002), _row("int8", 300, -0.001)]
    payload = {"rows": order_rows(base + [_row("lowrank:rank=2", 40, -0.05)])}
    v = collective_verdict(payload)
    assert v["collective_best"] and not v["undercuts"] and [e["baseline"] for e in v["smaller"]] == ["lowrank:rank=2"]
    payload = {"rows": order_rows(base + [_row("eventid", 20, 0.0)])}  # CI [-0.01, +0.01] overlaps collective's
    v = collective_verdict(payload)
    assert not v["collective_best"] and [e["baseline"] for e in v["undercuts"]] == ["eventid"]
    assert "**no**" in verdict_line(payload) and "undercut by `eventid`" in verdict_line(payload)
