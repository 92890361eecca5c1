"""Reading CTR artifacts back (ckv_cli/artifact, ckv_cli/evaluate/compare.py, ckv_cli/serve/ctr.py): the plan rebuilt from the file, decoded caches, `ckv evaluate
CTR_CKPT ARTIFACT` (metrics equal to what compress reported), `ckv inspect --data`, `ckv verify`, and `CTRStore`
(score, fetch, append, save). Real ML-100k, small models trained on 3,000 samples."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.artifact import Artifact
from ckv_cli.evaluate.compare import compare_artifact
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.train.ctr import CTRTrainConfig, build_model, train_ctr
from ckv_cli.data.ctr import CTRBatch, build_ctr, load_ctr
from ckv_cli.errors import CkvError
from ckv_cli.serve.ctr import CTRStore, score_cache
from conftest import cli_runner
from test_cli import assert_one_line_error

def CTROptions(**kw) -> CompressOptions:
    """`CompressOptions` with the CTR defaults of `ckv compress` (a pool of 4096 per stream)."""
    return CompressOptions(**{"params": {"pool_size": 4096, "user_dim": 0, "layout": "residual"}, **kw})


SMALL = {"d": 16, "d_attn": 32, "n_heads": 4, "top_k": 10, "max_len": 200}
FAST = {"calib_tokens": 3000, "bootstrap": 20}
CODECS = {  # name -> (arch, codec, params)
    "sim-eventid": ("sim", "eventid", {}),
    "sim-fp32": ("sim", "plain", {"dtype": "float32"}),
    "sim-fp16": ("sim", "plain", {"dtype": "float16"}),
    "eta-collective": ("eta", "collective", {"pool_size": 64, "user_dim": 0, "layout": "residual"}),
    "sdim-userdim": ("sdim", "collective", {"pool_size": 64, "user_dim": 2, "layout": "residual"}),
}


@pytest.fixture(scope="module")
def data():
    return load_ctr("ml-100k-ctr", max_history=200)


def _save(model, path, data):
    save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.seq.item_ids,
                    metrics={}, train={}, force=True, user_vocab=data.seq.user_ids)
    return path


@pytest.fixture(scope="module")
def ckpts(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr-store-ckpt")
    out = {}
    for arch in ("sim", "eta", "sdim"):
        model, *_ = train_ctr(data, arch, CTRTrainConfig(epochs=1, train_samples=3000, threads=1, model=dict(SMALL)))
        out[arch] = _save(model, root / f"{arch}.safetensors", data)
    torch.manual_seed(1)
    out["sim-other"] = _save(build_model(data, "sim", dict(SMALL)), root / "sim-other.safetensors", data)
    return out


def _load(path, data):
    model, meta = load_checkpoint(path)
    return model, meta, data.with_user_vocab(meta["user_vocab"])


@pytest.fixture(scope="module")
def arts(ckpts, data, tmp_path_factory):
    """name -> (artifact path, compress report)."""
    root = tmp_path_factory.mktemp("ctr-store-art")
    out = {}
    for name, (arch, codec, params) in CODECS.items():
        model, meta, ds = _load(ckpts[arch], data)
        path = root / f"{name}.safetensors"
        rep = compress_to_artifact(model, meta, ckpts[arch], ds, CTROptions(codec=codec, params=params, **FAST), path)
        out[name] = (path, rep)
    return out


def _now_batch(ds, u: int, candidates: np.ndarray, max_len: int) -> CTRBatch:
    """One user's history "now" (its last max_len events) repeated for each candidate, as a training batch."""
    hi = int(ds.seq.offsets[u + 1])
    lo = max(int(ds.seq.offsets[u]), hi - max_len)
    C, L = len(candidates), hi - lo
    rep = lambda a: torch.from_numpy(np.asarray(a[lo:hi], np.int64))[None].expand(C, L).contiguous()  # noqa: E731
    return CTRBatch(users=torch.full((C,), int(ds.user_rows[u])), targets=torch.from_numpy(candidates.astype(np.int64)),
                    labels=torch.zeros(C), items=rep(ds.seq.items), ratings=rep(ds.rating_bucket),
                    gaps=rep(ds.gap_bucket), lengths=torch.full((C,), L))


@pytest.mark.parametrize("name", ["sim-eventid", "eta-collective", "sdim-userdim"])
def test_decoded_metrics_equal_the_compress_report(arts, ckpts, data, name):
    """The plan rebuilt from the file (no refit) decodes the caches compress scored: the metrics are exactly equal."""
    path, rep = arts[name]
    model, _, ds = _load(ckpts[CODECS[name][0]], data)
    with Artifact.open(path) as art:
        c = compare_artifact(model, ds, art, bootstrap=20)
    for side in ("uncompressed", "compressed"):
        assert c.metrics[side] == rep["metrics"][side], side
    assert c.metrics["delta"] == rep["metrics"]["delta"] and c.equals_compress_report
    assert c.metrics["delta_ci95"] == rep["metrics"]["delta_ci95"]  # same resamples, same seed
    assert c.accounting["per_user_bytes"] == rep["accounting"]["per_user_bytes"]


@pytest.mark.parametrize("name, tol", [("sim-eventid", 1e-5), ("sim-fp32", 1e-5), ("sim-fp16", 2e-3)])
def test_store_scores_equal_the_model(arts, ckpts, data, name, tol):
    """Lossless artifacts score candidates "now" as the uncompressed model's forward on the user's last max_len
    events; fp16 within its rounding."""
    model, _, ds = _load(ckpts["sim"], data)
    rng = np.random.default_rng(0)
    users = [0, 5, int(np.argmax(np.diff(ds.seq.offsets)))]  # the longest user's history is cut at max_len
    cand = rng.integers(1, ds.seq.n_items + 1, size=(len(users), 7))
    with CTRStore.open(arts[name][0], ckpts["sim"]) as store:
        got = store.score([str(ds.seq.user_ids[u]) for u in users], cand)
    for row, u in enumerate(users):
        with torch.no_grad():
            want = torch.sigmoid(model(_now_batch(ds, u, cand[row], model.config.max_len))).numpy()
        np.testing.assert_allclose(got[row], want, atol=tol, rtol=0)


def test_store_score_equals_scoring_the_fetched_cache(arts, ckpts, data):
    model, meta, ds = _load(ckpts["eta"], data)
    path = arts["eta-collective"][0]
    users = [str(u) for u in ds.seq.user_ids[[3, 1, 40]]]
    items = ["50", "181", "1"]  # raw ids of ML-100k items, looked up in the checkpoint's vocabulary
    with CTRStore.open(path, model, ckpts["eta"]) as store:
        assert store.users() == [str(u) for u in ds.seq.user_ids]
        probs = store.score(users, items)
        cache = store.fetch(users)
        rows = store.user_rows(store.index(users))
        cand = torch.from_numpy(store.item_index(items))
    assert probs.shape == (3, 3) and cache.branches["long"].codes is not None
    assert int(cache.lengths.max()) <= model.config.max_len
    for j in range(3):
        with torch.no_grad():
            want = torch.sigmoid(model.score(cache, rows, cand[j].expand(3))).numpy()
        np.testing.assert_allclose(probs[:, j], want, atol=1e-6)
    np.testing.assert_allclose(score_cache(model, cache, rows, cand[None].expand(3, 3)).numpy(), probs, atol=0)


def _truncated(ds, users: list[int], k: int):
    """The log without the last k events of each of `users` (the same users and items), as the CTR task."""
    keep = np.ones(len(ds.seq.items), bool)
    for u in users:
        keep[int(ds.seq.offsets[u + 1]) - k : int(ds.seq.offsets[u + 1])] = False
    lengths = np.add.reduceat(keep, ds.seq.offsets[:-1]).astype(np.int64)
    seq = dataclasses.replace(ds.seq, offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64), items=ds.seq.items[keep],
                              timestamps=ds.seq.timestamps[keep], ratings=ds.seq.ratings[keep])
    return build_ctr(seq, max_history=ds.max_history).with_user_vocab(list(ds.seq.user_ids))


@pytest.mark.parametrize("codec, params", [("eventid", {}), ("plain", {"dtype": "float32"})])
def test_append_then_score_equals_compress_of_the_extended_log(ckpts, data, tmp_path, codec, params):
    model, meta, ds = _load(ckpts["sim"], data)
    users, k = [2, 7], 3
    short = _truncated(ds, users, k)
    opts = CTROptions(codec=codec, params=params, **FAST)
    compress_to_artifact(model, meta, ckpts["sim"], short, opts, tmp_path / "short.safetensors")
    compress_to_artifact(model, meta, ckpts["sim"], ds, opts, tmp_path / "full.safetensors")
    ids = [str(ds.seq.user_ids[u]) for u in users]
    cand = np.arange(1, 30)
    with CTRStore.open(tmp_path / "short.safetensors", ckpts["sim"]) as store, \
            CTRStore.open(tmp_path / "full.safetensors", ckpts["sim"]) as full:
        before = store.score(ids, cand)
        for u, uid in zip(users, ids):
            hi = int(ds.seq.offsets[u + 1])
            new = slice(hi - k, hi)
            store.append(uid, ds.seq.items[new], ds.seq.ratings[new], ds.seq.timestamps[new],
                         previous_timestamp=int(ds.seq.timestamps[hi - k - 1]))
        assert store.appended_users == ids
        got, want = store.read(ids), full.read(ids)
        assert set(got[0]) == set(want[0]) and np.array_equal(got[1], want[1])
        for name in got[0]:  # the fields compress of the extended log stores: ids bit for bit, floats to rounding
            if got[0][name].dtype.kind in "iu":  # (the model's K/V of an event computed in another batch)
                assert np.array_equal(got[0][name], want[0][name]), name
            else:
                np.testing.assert_allclose(got[0][name], want[0][name], atol=1e-6, err_msg=name)
        after = store.score(ids, cand)
        np.testing.assert_allclose(after, full.score(ids, cand), atol=1e-6)
        assert not np.allclose(after, before)
        # the model on the extended history
        for row, u in enumerate(users):
            with torch.no_grad():
                ref = torch.sigmoid(model(_now_batch(ds, u, cand, model.config.max_len))).numpy()
            np.testing.assert_allclose(after[row], ref, atol=1e-5)
        # save: a new artifact with the appends merged, that reads back the same
        store.save(tmp_path / "saved.safetensors")
    with CTRStore.open(tmp_path / "saved.safetensors", ckpts["sim"]) as saved:
        np.testing.assert_array_equal(saved.score(ids, cand), after)
        fields, off = saved.read(ids)
        assert all(np.array_equal(fields[n], got[0][n]) for n in fields) and np.array_equal(off, got[1])
        assert saved.artifact.meta["appended"]["users"] == ids
        assert saved.artifact.meta["accounting"]["tokens"] == len(ds.seq.items)


def test_append_with_per_user_codecs_and_new_users(arts, ckpts, data):
    """Collective with user dims re-encodes the user's stream (its per-user scale); a new user starts empty."""
    _, _, ds = _load(ckpts["sdim"], data)
    path = arts["sdim-userdim"][0]
    with CTRStore.open(path, ckpts["sdim"]) as store:
        uid = str(ds.seq.user_ids[0])
        n = int(np.diff(store.read([uid])[1])[0])
        with pytest.raises(CkvError, match="previous_timestamp"):
            store.append(uid, [1, 2], [4, 5], [10, 20])
        store.append(uid, [1, 2], [4, 5], [2_000_000_000, 2_000_000_100], previous_timestamp=1_999_999_000)
        fields, off = store.read([uid])
        assert int(off[-1]) == n + 2 and fields["long.v/scale"].shape == (1, 1)
        store.append(uid, [3], [1], [2_000_000_200])  # the store remembers the user's last time
        assert int(store.read([uid])[1][-1]) == n + 3
        store.append("new-user", ["50", "181"], [3, 4], [5, 6], create=True)
        p = store.score(["new-user", uid], [1, 2, 3])
        assert p.shape == (2, 3) and np.isfinite(p).all()
        with pytest.raises(CkvError, match="not in"):
            store.append("another", [1], [1], [1])


def test_bad_input_is_a_one_line_error(arts, ckpts, data, tmp_path):
    path = arts["sim-eventid"][0]
    with pytest.raises(CkvError, match="another checkpoint"):
        CTRStore.open(path, ckpts["sim-other"])
    with pytest.raises(CkvError, match="made from a sim checkpoint, the model is eta"):
        CTRStore.open(path, ckpts["eta"])
    with CTRStore.open(path, ckpts["sim"]) as store:
        with pytest.raises(CkvError, match="user 'nobody' is not in"):
            store.fetch(["nobody"])
        with pytest.raises(CkvError, match="not in the checkpoint's item vocabulary"):
            store.score([str(data.seq.user_ids[0])], ["no such item"])
        with pytest.raises(CkvError, match="item index"):
            store.score([str(data.seq.user_ids[0])], [0])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CkvError, match="not a readable safetensors file"):
        CTRStore.open(truncated, ckpts["sim"])
    with pytest.raises(CkvError, match="not a CTR artifact but a ckv checkpoint"):
        CTRStore.open(ckpts["sim"], ckpts["sim"])
    # out-of-range ids a damaged file could hold are refused before decoding
    damaged = _damage(path, "tokens/ratings", tmp_path / "damaged.safetensors")
    with CTRStore.open(damaged, ckpts["sim"]) as store:
        with pytest.raises(CkvError, match="out of range"):
            store.score([str(data.seq.user_ids[0])], [1])
        assert store.artifact.verify() == ["tokens/ratings"]


def _damage(path, tensor: str, out):
    """A copy of `path` with the first 16 bytes of `tensor` set to 0xff."""
    from ckv_cli.io.safetensors import SafetensorsMap

    m = SafetensorsMap(path)
    a = m.data_start + m.header[tensor]["data_offsets"][0]
    m.close()
    raw = bytearray(path.read_bytes())
    raw[a : a + 16] = b"\xff" * 16
    out.write_bytes(bytes(raw))
    return out


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ctr-store-cli")
    return cli_runner(cwd), cwd


def test_cli_evaluate_inspect_verify(cli, arts, ckpts):
    run, cwd = cli
    path, rep = arts["eta-collective"]
    proc = run("evaluate", ckpts["eta"], path, "--data", "ml-100k-ctr", "--bootstrap", "20", "--json", "e.json",
               "--max-delta", "AUC=0.5", "--max-delta", "logloss=1%", "--max-ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads((cwd / "e.json").read_text())
    c = out["comparisons"][0]
    assert c["metrics"]["compressed"]["AUC"] == rep["metrics"]["compressed"]["AUC"] and c["equals_compress_report"]
    assert c["accounting"]["per_user_ratio_fp16"] == rep["accounting"]["per_user_ratio_fp16"]
    assert out["gates"]["failures"] == [] and "AUC" in proc.stdout and "95% CI" in proc.stdout
    # gates that fail: exit 1, one line each
    proc = run("evaluate", ckpts["eta"], path, "--data", "ml-100k-ctr", "--bootstrap", "0", "--max-ratio", "0.001",
               "--max-delta", "gAUC=0%")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("gate failed: per-user ratio" in line for line in lines) and "Traceback" not in proc.stderr
    shown = run("inspect", path, "--data", "ml-100k-ctr", "--users", "50", "--json", "i.json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads((cwd / "i.json").read_text())
    assert set(report["reconstruction_rel_mse"]) == {"short.k", "short.v", "long.k", "long.v"}
    assert report["pool_usage"]["long.k"]["pool_size"] == 64 and report["reconstruction_users"] == 50
    ok = run("verify", path)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr


def test_cli_refusals(cli, arts, ckpts, tmp_path):
    run, _ = cli
    path = arts["sim-eventid"][0]
    assert_one_line_error(run("evaluate", ckpts["sim-other"], path, "--data", "ml-100k-ctr"), "another checkpoint")
    assert_one_line_error(run("evaluate", ckpts["sim"], path, "--data", "ml-100k-ctr", "--max-delta", "NDCG@10=0.1"),
                          "bad --max-delta")
    damaged = _damage(path, "tokens/items", tmp_path / "damaged.safetensors")
    assert_one_line_error(run("evaluate", ckpts["sim"], damaged, "--data", "ml-100k-ctr"), "does not match its checksum")
    bad = run("verify", damaged)
    assert bad.returncode == 1 and "does not match its checksum" in bad.stdout and "Traceback" not in bad.stderr
