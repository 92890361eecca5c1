"""`ckv compress --update` (`ckv_cli.serve.update`) on ML-100K with a small untrained HSTU (its artifacts keep event
times): the updated artifact equals, user for user, `ckv compress` with the same plan of the extended log (each
touched user's new events right after its cached ones, new users' events followed by two more: the module
docstring's contract), for the hash rule, the range rule and one artifact file; only shards holding touched users
are rewritten; an index written by the code before the assignment was recorded is read and updated; the
refusals (another checkpoint, another plan, events older than the cached history) are one line and change
nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import load_script, untrained_checkpoint
from ckv_cli.artifact.sharded import open_artifact, read_shared, verify_path
from ckv_cli.data import load
from ckv_cli.data.datasets import fetch
from ckv_cli.data.partition import shard_of
from ckv_cli.data.readers import read_log
from ckv_cli.errors import CkvError
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.pipeline.shard import compress_sharded
from ckv_cli.serve.update import load_new_events, update_artifact

MAX_LEN = 32  # ML-100K users have 20 events or more: some caches overflow the window, some do not
OPTS = dict(params={"pool_size": 40, "user_dim": 2, "layout": "residual", "user_dtype": "fp16"}, calib_users=150,
            batch_users=64)
FIXTURE = Path(__file__).parent / "fixtures" / "range-index"


def split_log(log, touched, born, k: int = 3):
    """Row indices (old log, new events) of a raw log: each touched user's `k` events before its last two move to
    the new events; each new user's events leave the old log and all but its last two are new events."""
    uniq, inv = np.unique(log.users, return_inverse=True)
    order = np.lexsort((log.timestamps, inv))  # as `build` sorts: by user, time, then file order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(inv))])
    pos = {u: i for i, u in enumerate(uniq)}
    drop, new = [], []
    for u in touched:
        rows = order[offsets[pos[u]] : offsets[pos[u] + 1]]
        drop += list(rows[-(k + 2) : -2])
        new += list(rows[-(k + 2) : -2])
    for v in born:
        rows = order[offsets[pos[v]] : offsets[pos[v] + 1]]
        drop += list(rows)
        new += list(rows[:-2])
    keep = np.ones(len(log.users), bool)
    keep[drop] = False
    return np.flatnonzero(keep), np.sort(np.array(new, dtype=np.int64))


def write_parquet(log, rows, path: Path) -> Path:
    pq.write_table(pa.table({"user": pa.array(log.users[rows]), "item": pa.array(log.items[rows]),
                             "timestamp": pa.array(log.timestamps[rows])}), path)
    return path


def same_users(updated, reference, model, users=None):
    """Every user of `reference` (or `users`) has, in `updated`, the same stored fields bit for bit and the same
    decoded cache."""
    assert sorted(updated.user_ids) == sorted(reference.user_ids)
    ids = list(reference.user_ids) if users is None else users
    a = np.array([updated.lookup[u] for u in ids])
    b = np.array([reference.lookup[u] for u in ids])
    fa, oa = updated.read_fields(a)
    fb, ob = reference.read_fields(b)
    np.testing.assert_array_equal(oa, ob)
    assert set(fa) == set(fb)
    for k in fb:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k
    xa, xb = updated.decode(a, model), reference.decode(b, model)
    for name in reference.plan.streams:
        assert torch.equal(xa.stream(name), xb.stream(name)), name


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """ML-100K as three Parquet files: the full log, the old log (10 users' three events before their last two and
    3 users entirely taken out) and the new events; plus an untrained HSTU over its items."""
    d = tmp_path_factory.mktemp("update")
    log = read_log(fetch("ml-100k"))
    rng = np.random.default_rng(0)
    users = rng.choice(np.unique(log.users), 13, replace=False)
    touched, born = [str(u) for u in users[:10]], [str(u) for u in users[10:]]
    old, new = split_log(log, touched, born)
    paths = {"old": write_parquet(log, old, d / "old.parquet"), "new": write_parquet(log, new, d / "new.parquet"),
             "full": write_parquet(log, np.arange(len(log.users)), d / "full.parquet")}
    ckpt = untrained_checkpoint("hstu", load("ml-100k"), d / "hstu.safetensors", MAX_LEN)
    return d, paths, ckpt, touched, born


def compressed(logs, name: str, out: Path, rule: str, plan=None, opts: dict = OPTS):
    d, paths, ckpt, _, _ = logs
    model, meta = load_checkpoint(ckpt)
    ds = load(str(paths[name]), item_vocab=meta["item_vocab"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if rule == "file":
        compress_to_artifact(model, meta, ckpt, ds, CompressOptions(**opts), out, command="t")
    elif rule == "hash":
        compress_sharded(model, meta, ckpt, ds, CompressOptions(**opts), out, n_shards=3, command="t", plan=plan)
    else:
        compress_sharded(model, meta, ckpt, ds, CompressOptions(**opts), out, 256, command="t", plan=plan)
    return model, meta


@pytest.mark.parametrize("rule", ["hash", "range", "file"])
def test_update_equals_compress_of_the_extended_log(logs, tmp_path, rule):
    d, paths, ckpt, touched, born = logs
    out = tmp_path / "a" / ("x.safetensors" if rule == "file" else "x.index.json")
    model, meta = compressed(logs, "old", out, rule)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    new = load_new_events(str(paths["new"]), None, meta["item_vocab"])
    done = []  # progress: every touched user reported once, a batch at a time
    report = update_artifact(model, ckpt, out, new, batch_users=8, command="t", advance=done.append)
    assert report["update"]["users_appended"] == 10 and report["update"]["users_created"] == 3
    assert sum(done) == 13 and max(done) <= 8
    assert report["update"]["events"] == 10 * 3 + sum(len(new.sequence(list(new.user_ids).index(v))[0]) for v in born)
    assert verify_path(out)[0] == []
    plan = read_shared(out.parent / "x.shared.safetensors")[0] if rule != "file" else open_artifact(out).plan
    ref = tmp_path / "b" / "x.index.json"
    compressed(logs, "full", ref, "hash", plan=plan)  # the extended log, the same plan
    with open_artifact(out) as updated, open_artifact(ref) as reference:
        assert updated.n_users == reference.n_users == 943
        same_users(updated, reference, model)
        assert updated.meta["accounting"]["tokens"] == reference.meta["accounting"]["tokens"]
        assert updated.meta["accounting"]["per_user_bytes"] == sum(
            s.meta["accounting"]["per_user_bytes"] for s in getattr(updated, "shards", [updated]))
    if rule == "file":
        return
    index = json.loads(out.read_text())
    assert index["updates"][0]["users_created"] == 3 and index["assignment"]["rule"] == rule
    files = {p.name for p in out.parent.iterdir()}
    assert files == {e["file"] for e in index["shards"]} | {"x.index.json", "x.shared.safetensors"}
    kept = [e["file"] for e in index["shards"] if e["file"] in before]
    assert all((out.parent / f).read_bytes() == before[f] for f in kept)  # untouched shards: the same files
    if rule == "range":  # new users go to a new shard after the last one
        assert report["shards_added"] == ["x-00004-of-00005.u00001.safetensors"]
        assert index["shards"][-1]["users"] == [940, 943]


def test_update_of_item_coded_indices(logs, tmp_path):
    """Item-coded indices (issue 21: per-item lists, escapes in a ragged field): an update appends through the
    lists (a new token takes its list position or escapes), each rewritten shard counts its own escape rows, and
    the result equals compressing the extended log with the same plan."""
    d, paths, ckpt, _, _ = logs
    opts = {**OPTS, "params": {**OPTS["params"], "index": "item", "index_bits": 3, "escape_tol": 0.5}}
    out = tmp_path / "a" / "x.index.json"
    model, meta = compressed(logs, "old", out, "hash", opts=opts)
    new = load_new_events(str(paths["new"]), None, meta["item_vocab"])
    update_artifact(model, ckpt, out, new, batch_users=8, command="t")
    assert verify_path(out)[0] == []
    plan = read_shared(out.parent / "x.shared.safetensors")[0]
    ref = tmp_path / "b" / "x.index.json"
    compressed(logs, "full", ref, "hash", plan=plan, opts=opts)
    with open_artifact(out) as updated, open_artifact(ref) as reference:
        same_users(updated, reference, model)
        esc = "L1.k/esc"
        assert esc in updated.fields and updated.fields[esc]["count"] == reference.fields[esc]["count"] > 0
        assert updated.meta["accounting"]["per_user_bytes"] == sum(
            s.meta["accounting"]["per_user_bytes"] for s in updated.shards)
        for s in updated.shards:  # each shard's accounting counts the escape rows it holds
            rows = s.fields[esc]["count"]
            assert s.meta["accounting"]["per_user_breakdown"][esc] == (rows * s.plan.streams["L1.k"].index.full_bits + 7) // 8


@pytest.mark.parametrize("params", [{"predictor": "linear+item", "ema": 0.2}, {"predictor": "item+pos"},
                                    {"predictor": "linear+item", "ema": 0.2, "joint": "kv", "index": "item",
                                     "index_bits": 3, "escape_tol": 0.5}], ids=["ema", "item+pos", "ema-joint-item"])
def test_update_of_a_predictive_stream_that_reads_the_window(logs, tmp_path, monkeypatch, params):
    """`ema` (a token's prediction reads the tokens before it) and `item+pos` (its position): not token-local, but
    an update routes only the new tokens, predicted from the whole window (`codes_tail`); a user whose window
    slides, or a new one, is encoded whole. The result equals compressing the extended log with the same plan,
    bit for bit (the moving average does not depend on the batch a user is encoded in)."""
    from ckv_cli.codecs.predictive import PredictiveCodec

    d, paths, ckpt, touched, born = logs
    opts = {**OPTS, "codec": "predictive", "params": {"pool_size": 40, **params}}
    out = tmp_path / "a" / "x.index.json"
    model, meta = compressed(logs, "old", out, "hash", opts=opts)
    plan = read_shared(out.parent / "x.shared.safetensors")[0]
    assert not plan.streams["L1.k"].token_local and plan.streams["L1.k"].codes_tail
    with open_artifact(out) as before:
        n_old = np.diff(before.read_fields(np.array([before.lookup[u] for u in touched]))[1])
    routed = []
    nearest = PredictiveCodec._nearest
    monkeypatch.setattr(PredictiveCodec, "_nearest", lambda self, res: routed.append(len(res)) or nearest(self, res))
    new = load_new_events(str(paths["new"]), None, meta["item_vocab"])
    update_artifact(model, ckpt, out, new, batch_users=8, command="t")
    monkeypatch.undo()
    assert verify_path(out)[0] == []
    ref = tmp_path / "b" / "x.index.json"
    compressed(logs, "full", ref, "hash", plan=plan, opts=opts)
    with open_artifact(out) as updated, open_artifact(ref) as reference:
        same_users(updated, reference, model)
        n_born = np.diff(reference.read_fields(np.array([reference.lookup[u] for u in born]))[1])
    window = MAX_LEN - 1  # what an update keeps (`ckv_cli.serve.update`)
    slid = n_old + 3 > window
    assert slid.any() and not slid.all()  # both paths are taken
    streams = 1 if "joint" in params else 2  # L1.k and L1.v, or one joint index
    assert sum(routed) == streams * (3 * int((~slid).sum()) + window * int(slid.sum()) + int(n_born.sum()))


def test_update_with_the_cell_search_routes_as_compress(logs, tmp_path, monkeypatch):
    """`probes` (the approximate cell search, recorded in the artifact): an update rebuilds the cells from the stored
    pool and routes the new tokens through them, so it equals compressing the extended log with the same plan."""
    from ckv_cli.codecs import cells

    monkeypatch.setattr(cells, "ENTRIES_PER_CELL", 8)  # a 40-entry pool in 5 cells, 2 probed: not the exact search
    opts = {**OPTS, "codec": "predictive", "params": {"pool_size": 40, "probes": 2}}
    out = tmp_path / "a" / "x.index.json"
    model, meta = compressed(logs, "old", out, "hash", opts=opts)
    plan = read_shared(out.parent / "x.shared.safetensors")[0]
    codec = plan.streams["L1.k"]
    assert codec.params()["probes"] == 2 and not codec._cell_index().exact
    new = load_new_events(str(logs[1]["new"]), None, meta["item_vocab"])
    update_artifact(model, logs[2], out, new, batch_users=8, command="t")
    assert verify_path(out)[0] == []
    ref = tmp_path / "b" / "x.index.json"
    compressed(logs, "full", ref, "hash", plan=plan, opts=opts)
    with open_artifact(out) as updated, open_artifact(ref) as reference:
        same_users(updated, reference, model)


def test_only_shards_of_touched_users_are_rewritten(logs, tmp_path):
    d, paths, ckpt, _, _ = logs
    out = tmp_path / "x.index.json"
    model, meta = compressed(logs, "full", out, "hash")
    index = json.loads(out.read_text())
    ds = load(str(paths["full"]), item_vocab=meta["item_vocab"])
    in_one = [str(u) for u in ds.user_ids[shard_of(ds.user_ids, 3) == 1][:5]]
    log = read_log(paths["full"])
    rows = [np.flatnonzero(log.users == u)[np.argmax(log.timestamps[log.users == u])] for u in in_one]
    # each user's newest event again, a day later
    new_path = tmp_path / "day.parquet"
    pq.write_table(pa.table({"user": pa.array(log.users[rows]), "item": pa.array(log.items[rows]),
                             "timestamp": pa.array(log.timestamps[rows] + 86400)}), new_path)
    report = update_artifact(model, ckpt, out, load_new_events(str(new_path), None, meta["item_vocab"]))
    assert report["shards_rewritten"] == ["x-00001-of-00003.safetensors"] and report["shards_added"] == []
    after = json.loads(out.read_text())
    assert [e["file"] for e in after["shards"]] == ["x-00000-of-00003.safetensors", "x-00001-of-00003.u00001.safetensors",
                                                    "x-00002-of-00003.safetensors"]
    for s in (0, 2):
        assert after["shards"][s] == index["shards"][s]
    assert not (tmp_path / "x-00001-of-00003.safetensors").exists()
    with open_artifact(out) as art:
        fields, offsets = art.read_fields(np.array([art.lookup[u] for u in in_one]))
        assert (np.diff(offsets) <= MAX_LEN - 1).all()
    assert verify_path(out)[0] == []
    # the next night: the same shard again, a second generation replaces the first
    pq.write_table(pa.table({"user": pa.array(log.users[rows[:2]]), "item": pa.array(log.items[rows[:2]]),
                             "timestamp": pa.array(log.timestamps[rows[:2]] + 2 * 86400)}), new_path)
    again = update_artifact(model, ckpt, out, load_new_events(str(new_path), None, meta["item_vocab"]))
    assert again["generation"] == 2 and again["files_removed"] == ["x-00001-of-00003.u00001.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("x-*")) == ["x-00000-of-00003.safetensors",
                                                            "x-00001-of-00003.u00002.safetensors",
                                                            "x-00002-of-00003.safetensors"]
    assert [u["users_appended"] for u in json.loads(out.read_text())["updates"]] == [5, 2]
    assert verify_path(out)[0] == []


def test_an_old_range_index_is_read_and_updated(tmp_path):
    """The fixture was written by the code before this change (no 'assignment' in the index: the range rule).
    Two of its users get a new event a day after their newest, a new user three events: their shards are
    rewritten, the new user goes to a new shard after the last, and the index records the rule."""
    for p in FIXTURE.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    index = tmp_path / "old.index.json"
    assert "assignment" not in json.loads(index.read_text())
    assert verify_path(index)[0] == []
    model, meta = load_checkpoint(tmp_path / "hstu.safetensors")
    with open_artifact(index) as art:
        assert art.n_users == 60 and [s.n_users for s in art.shards] == [16, 16, 16, 12]
        before, before_off = art.read_fields(np.array([art.lookup["u3"], art.lookup["u40"]]))
        t_last = int(before["tokens/timestamps"].max())
    day = t_last + 10**7
    pq.write_table(pa.table({"user": ["u3", "u40", "new1", "new1", "new1", "u3"], "item": ["i5", "i6", "i1", "i2", "i3", "i1"],
                             "timestamp": [day, day, day, day + 1, day + 2, 5]}), tmp_path / "bad.parquet")
    with pytest.raises(CkvError, match="user 'u3': a new event at 5 is older than its cached history"):
        update_artifact(model, tmp_path / "hstu.safetensors", index,
                        load_new_events(str(tmp_path / "bad.parquet"), None, meta["item_vocab"]))
    assert json.loads(index.read_text()) == json.loads((FIXTURE / "old.index.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in FIXTURE.iterdir()] + ["bad.parquet"])
    pq.write_table(pa.table({"user": ["u3", "u40", "new1", "new1", "new1"], "item": ["i5", "i6", "i1", "i2", "i3"],
                             "timestamp": [day, day, day, day + 1, day + 2]}), tmp_path / "day.parquet")
    report = update_artifact(model, tmp_path / "hstu.safetensors", index,
                             load_new_events(str(tmp_path / "day.parquet"), None, meta["item_vocab"]))
    assert report["update"]["users_appended"] == 2 and report["update"]["users_created"] == 1
    assert report["shards_added"] == ["old-00004-of-00005.u00001.safetensors"]
    after = json.loads(index.read_text())
    assert after["assignment"] == {"rule": "range", "shard_size": 16}
    assert after["shards"][-1]["users"] == [60, 61] and after["totals"]["users"] == 61
    assert verify_path(index)[0] == []
    vocab = meta["item_vocab"]
    with open_artifact(index) as art:
        assert art.n_users == 61
        fields, offsets = art.read_fields(np.array([art.lookup[u] for u in ("u3", "u40", "new1")]))
        lengths = np.diff(offsets)
        assert lengths.tolist() == [min(n + 1, 15) for n in np.diff(before_off)] + [3]
        last = fields["tokens/items"][offsets[1:] - 1]
        assert [vocab[i] for i in last] == ["i5", "i6", "i3"]


def run_ckv(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_cli_update_and_refusals(logs, tmp_path):
    d, paths, ckpt, touched, _ = logs
    out = tmp_path / "x.index.json"
    model, meta = compressed(logs, "old", out, "hash")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = untrained_checkpoint("hstu", load("ml-100k"), tmp_path.parent / f"{tmp_path.name}-other.safetensors",
                                 MAX_LEN)
    with torch.no_grad():  # other weights, same architecture
        m, _ = load_checkpoint(other)
        for p in m.parameters():
            p.add_(0.01)
    from ckv_cli.models.checkpoint import save_checkpoint

    save_checkpoint(m, other, dataset="ml-100k", fingerprint="0" * 16, item_vocab=meta["item_vocab"], metrics={},
                    train={}, force=True)
    refusals = [
        ((other, "--update", out, "--data", paths["new"]), "was made from another checkpoint"),
        ((ckpt, "--update", out, "--data", paths["new"], "--pool-size", "64"),
         "x.index.json was compressed with pool_size 40; --update encodes with the artifact's plan and cannot change "
         "it: --pool-size 64 differs (drop it, or compress anew)"),
        ((ckpt, "--update", out, "--data", paths["old"]), "is older than its cached history"),
    ]
    for args, message in refusals:
        proc = run_ckv("compress", *args, cwd=tmp_path)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing changed, nothing left
    proc = run_ckv("compress", ckpt, "--update", out, "--data", paths["new"], "--json", tmp_path.parent / "u.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path.parent / "u.json").read_text())
    assert report["update"]["users_appended"] == 10 and report["generation"] == 1
    assert "users appended to / created" in proc.stdout
    assert run_ckv("verify", out, cwd=tmp_path).returncode == 0


def test_bench_append_plumbing(logs, tmp_path):
    """bench/append.py on an `ema` artifact: one event for each of B users with room in their window, the routed
    rows counted (the new tokens alone: one per user and stream), the JSON written."""
    d, paths, ckpt, _, _ = logs
    art = tmp_path / "ema.safetensors"
    compressed(logs, "old", art, "file", opts={**OPTS, "codec": "predictive",
                                               "params": {"pool_size": 40, "predictor": "linear+item", "ema": 0.2}})
    bench = load_script("bench/append.py", "bench_append")
    out = tmp_path / "append.json"
    assert bench.main(["--artifact", str(art), "--checkpoint", str(ckpt), "--users", "1", "3", "--repeats", "2",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["users"] for r in rows] == [1, 3] and all(r["ms"] > 0 for r in rows)
    assert [r["routed_rows"] for r in rows] == [2, 6]  # L1.k and L1.v: the new token of each user
