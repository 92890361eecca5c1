"""HSTU event times coded at a few bits in artifacts (`--param time_bits`, `ckv_cli.codecs.timecode`): written, read
back as the in-memory plan decodes them, counted, appended to by a store (re-anchored), sharded, and refused when
damaged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import cli_runner, make_model, rewrite
from ckv_cli import CacheStore
from ckv_cli.artifact import Artifact
from ckv_cli.codecs.timecode import anchors_and_gaps, gap_bucket
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.tasks.next_item import teacher_batches

MAX_LEN = 16
PARAMS = {"pool_size": 32, "time_bits": 3}


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def written(ds, tmp_path_factory):
    """An untrained HSTU over ML-100K whose time-bias tables vary (so the intervals matter), compressed with
    predictive codes and 3-bit event times."""
    d = tmp_path_factory.mktemp("timecode")
    model = make_model("hstu", n_items=ds.n_items, max_len=MAX_LEN)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):  # a bias that falls with the gap, unlike the untrained zeros
            b = torch.arange(layer.bias.time.numel(), dtype=torch.float32)
            layer.bias.time.copy_(torch.sin(b / (7.0 + i)) - b / 40.0)
    ckpt = d / "hstu.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids),
                    metrics={}, train={"epochs": 0})
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(codec="predictive", params=PARAMS, calib_users=150)
    path = d / "a.safetensors"
    report = compress_to_artifact(model, meta, ckpt, ds, opts, path)
    return ckpt, path, model, meta, report, opts


def test_artifact_holds_codes_and_anchors_not_timestamps(written, ds):
    _, path, model, _, report, _ = written
    acct = report["accounting"]
    with Artifact.open(path) as art:
        assert "tokens/timestamps" not in art.fields and art.fields["time/code"]["bits"] == 3
        assert art.plan.describe()["time"] == {"codec": "bucket", "bits": 3, "max_bucket": 128}
        n_users, n_tokens = art.n_users, int(art.offsets[-1])
        assert acct["per_user_breakdown"]["time/code"] == (n_tokens * 3 + 7) // 8
        assert acct["per_user_breakdown"]["time/anchor"] == 4 * n_users
        assert "tokens/timestamps" not in acct["per_user_breakdown"]
        bounds = art.plan.time.bounds
        assert {"shared/time/bounds", "shared/time/gaps"} <= set(acct["shared_breakdown"])
        assert 2 < len(bounds) <= 9  # more than one interval: the bias varies
        users = np.arange(40)
        fields, offsets = art.read_fields(users)
        times = art.decode_fields(fields, offsets, model).ids["timestamps"]
    tb = next(teacher_batches(model, ds, users, len(users), True))
    np.testing.assert_array_equal(tb.tokens.offsets, offsets)
    exact = np.asarray(tb.tokens.ids["timestamps"], np.int64)  # what compress encoded
    anchor, gaps = anchors_and_gaps(exact, offsets)
    np.testing.assert_array_equal(fields["time/anchor"].reshape(-1), anchor)
    # each decoded time lies in its exact time's interval of anchor-gap buckets
    rep_gap = np.repeat(anchor, np.diff(offsets)) - times
    interval = lambda g: np.searchsorted(bounds, gap_bucket(g, 128), side="right") - 1  # noqa: E731
    np.testing.assert_array_equal(interval(rep_gap), interval(gaps))


def test_reads_equal_the_report_and_the_same_seed_the_same_bytes(written, ds, tmp_path):
    from ckv_cli.evaluate.compare import compare_artifact

    ckpt, path, model, meta, _, opts = written
    with Artifact.open(path) as art:
        c = compare_artifact(model, ds, art, bootstrap=20, speed_batch=8, repeats=1)
    assert c.equals_compress_report
    again = tmp_path / "again.safetensors"
    compress_to_artifact(model, meta, ckpt, ds, opts, again)
    assert again.read_bytes() == Path(path).read_bytes()


def test_store_appends_re_anchor_the_user(written, ds):
    ckpt, path, model, _, _, _ = written
    uid = str(ds.user_ids[7])
    with CacheStore.open(path, ckpt) as store:
        a = store.rank_next([uid], k=10, attention="compressed")
        b = store.rank_next([uid], k=10, attention="decoded")
        np.testing.assert_allclose(a.scores, b.scores, atol=2e-5)
        before, off = store.read([uid])
        anchor = int(before["time/anchor"][0, 0])
        old_times = store.fetch_flat([uid]).ids["timestamps"]
        with pytest.raises(CkvError, match="older than its cached history"):  # checked against the exact anchor
            store.append_many([uid], [[int(ds.sequence(7)[0][0])]], [[anchor - 1]], ordered=True)
        t_new = anchor + 86400
        store.append(uid, [int(ds.sequence(7)[0][0])], [t_new])
        after, off2 = store.read([uid])
        assert int(after["time/anchor"][0, 0]) == t_new and int(off2[-1]) == int(off[-1]) + 1
        want = store.plan.time.encode(np.append(old_times, t_new), np.array([0, int(off2[-1])]))
        np.testing.assert_array_equal(after["time/code"], want["code"].astype(np.int64))
        c = store.rank_next([uid], k=10, attention="compressed")
        d = store.rank_next([uid], k=10, attention="decoded")
        np.testing.assert_allclose(c.scores, d.scores, atol=2e-5)


def test_sharded_reads_equal_the_single_file(written, ds, tmp_path):
    from ckv_cli.artifact.sharded import open_artifact
    from ckv_cli.pipeline.shard import compress_sharded

    ckpt, path, model, meta, _, opts = written
    compress_sharded(model, meta, ckpt, ds, opts, tmp_path / "many.index.json", 256)
    one, many = open_artifact(path), open_artifact(tmp_path / "many.index.json")
    try:
        users = np.array([900, 3, 300, 0])
        a, oa = one.read_fields(users)
        b, ob = many.read_fields(users)
        np.testing.assert_array_equal(oa, ob)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    finally:
        one.close()
        many.close()


def test_damaged_intervals_and_plans_are_refused(written, tmp_path):
    _, path, _, _, _, _ = written
    t = load_file(str(path))
    bounds = t["shared/time/bounds"].copy()
    bounds[1] = bounds[0]  # no longer rising
    with pytest.raises(CkvError, match="event times: time codec: bounds do not rise"):
        Artifact.open(rewrite(path, tmp_path / "a.safetensors", {"shared/time/bounds": bounds}))
    with pytest.raises(CkvError, match="representative gaps"):
        Artifact.open(rewrite(path, tmp_path / "b.safetensors",
                               {"shared/time/gaps": np.full_like(t["shared/time/gaps"], -5)}))
    from ckv_cli.codecs.plan import plan_from_description

    with Artifact.open(path) as art:
        desc = art.plan.describe()
    for bad, why in (({**desc, "time": {"codec": "bucket", "bits": 40, "max_bucket": 128}}, "bits 40"),
                     ({**desc, "time": {"codec": "exact"}}, "time entry"),
                     ({**desc, "timestamps": False}, "stores no timestamps")):
        with pytest.raises(CkvError, match=why):
            plan_from_description(json.loads(json.dumps(bad)))


def test_cli_writes_inspects_and_verifies(written, tmp_path):
    ckpt, _, _, _, _, _ = written
    run = cli_runner(tmp_path)
    out = tmp_path / "cli.safetensors"
    r = run("compress", ckpt, "--data", "ml-100k", "-o", out, "--codec", "predictive", "--pool-size", "32",
            "--param", "time_bits=3", "--calib-users", "150", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["accounting"]["per_user_breakdown"]["time/code"] > 0
    r = run("inspect", out)
    assert r.returncode == 0 and "time/code" in r.stdout, r.stdout + r.stderr
    assert run("verify", out).returncode == 0


def test_update_appends_a_day_and_re_anchors(written, ds, tmp_path):
    """`ckv compress --update` on a time-coded artifact: the users' anchors move to their new events, the rest of
    the file reads as before, and the result verifies."""
    import shutil

    from ckv_cli.artifact.sharded import verify_path
    from ckv_cli.serve.update import load_new_events, update_artifact

    ckpt, path, model, meta, _, _ = written
    out = shutil.copy(path, tmp_path / "u.safetensors")
    users = [2, 40, 41]
    with Artifact.open(out) as art:
        before, _ = art.read_fields(np.array([art.lookup[str(ds.user_ids[u])] for u in users]))
        other, _ = art.read_fields(np.array([art.lookup[str(ds.user_ids[5])]]))
    new_ts = before["time/anchor"].reshape(-1) + 86400
    rows = [f"{ds.user_ids[u]},{ds.item_ids[int(ds.sequence(u)[0][0])]},{t}" for u, t in zip(users, new_ts)]
    (tmp_path / "day.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    update_artifact(model, ckpt, out, load_new_events(str(tmp_path / "day.csv"), None, meta["item_vocab"]))
    with Artifact.open(out) as art:
        after, _ = art.read_fields(np.array([art.lookup[str(ds.user_ids[u])] for u in users]))
        same, _ = art.read_fields(np.array([art.lookup[str(ds.user_ids[5])]]))
    np.testing.assert_array_equal(after["time/anchor"].reshape(-1), new_ts)
    for k in other:
        np.testing.assert_array_equal(same[k], other[k], err_msg=k)
    assert verify_path(out)[0] == []
