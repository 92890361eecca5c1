"""The predictive codec served in stored form (`ckv_cli.serve.next_item.PredictedStream`): each token's vector is
its prediction plus a pool entry, attended part by part. SASRec's linear prediction goes through the first
layer's LayerNorm fold, HSTU's through its first-layer K/V (built from its tables), the map applied per query; the
item table and the pool are read as pools; nothing of the stream is built. Against the decoded cache: the same
vectors and the same scores, for every predictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_script, make_model
from ckv_cli.data import load
from ckv_cli.models.checkpoint import save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.serve.attention import CompressedStream
from ckv_cli.serve.next_item import (CacheStore, EmaSide, ItemLayer, LinearSide, PredictedStream, _dense_scores,
                                     _dense_values, token_rows)


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


def artifact(ds, tmp_path, arch: str, predictor: str, **extra):
    model = make_model(arch, n_items=ds.n_items, max_len=16)
    ckpt = tmp_path / f"{arch}.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids),
                    metrics={}, train={})
    opts = CompressOptions(codec="predictive", params={"pool_size": 32, "predictor": predictor, "max_rows": 200,
                                                       **extra}, calib_users=200)
    out = tmp_path / f"{arch}-{predictor}.safetensors"
    compress_to_artifact(model, {"arch": arch, "item_vocab": list(ds.item_ids)}, ckpt, ds, opts, out)
    return model, out


@pytest.mark.parametrize("arch", ["sasrec", "hstu"])
@pytest.mark.parametrize("predictor", ["linear+item", "linear", "item", "item+pos", "linear+item,ema",
                                       "linear+item,joint", "item+pos,joint", "linear+item,ema,joint"])
def test_predicted_streams_decode_and_score_as_the_decoded_cache(ds, tmp_path, arch, predictor):
    """ema: the moving average of the first layer's K/V is one more part (`EmaSide`, over the same kind of side); joint (one index for K and V): each stream is its
    half of the joint codec, read the same way."""
    predictor, *opts = predictor.split(",")
    ema = "ema" in opts
    model, path = artifact(ds, tmp_path, arch, predictor, **({"ema": 0.2} if ema else {}),
                           **({"joint": "kv"} if "joint" in opts else {}))
    users = [str(u) for u in ds.user_ids[:40:3]]
    with CacheStore.open(path, model) as store:
        cc = store.fetch_compressed(users)
        side = cc.keys[1]
        assert isinstance(side, PredictedStream) and isinstance(side.parts[0], CompressedStream)
        assert isinstance(cc.values[1], PredictedStream)  # a joint codec's V half too
        linear = [p for p in side.parts[1:] if not isinstance(p, CompressedStream)]
        if predictor.startswith("linear"):  # SASRec: folded into the first layer's tables; HSTU: over its K0/V0
            plain = ItemLayer if arch == "sasrec" else LinearSide
            assert [type(p) for p in linear] == ([plain, EmaSide] if ema else [plain])
            assert not ema or isinstance(linear[1].inner, plain)  # the moving average of the same kind of side
        else:
            assert not linear
        dense = store.fetch(users)
        got = cc.decode()
        for layer in (0, 1):
            assert torch.allclose(got.keys[layer], dense.keys[layer], atol=1e-4)
            assert torch.allclose(got.values[layer], dense.values[layer], atol=1e-4)
        sub = side.select(torch.tensor([2, 0]))
        assert torch.allclose(sub.decode(), side.decode()[[2, 0]])
        fast = store.rank_next(users, k=20)
        exact = store.rank_next(users, k=20, attention="decoded")
        assert np.allclose(fast.scores, exact.scores, atol=1e-4)
        cand = [[1, 5, 9]] * len(users)  # item indices
        assert np.allclose(store.score_items(users, cand), store.score_items(users, cand, attention="decoded"),
                           atol=1e-4)


@pytest.mark.parametrize("heads,queries", [(1, 1), (2, 1), (4, 3), (2, 40)])
def test_a_dense_side_read_in_place_gives_the_per_head_products(heads, queries):
    """`_dense_scores` / `_dense_values`: one bmm against block-diagonal queries (or every head's weights)
    instead of a per-head copy of the cache; the per-head products past `_BLOCK_COLUMNS` query columns."""
    g = torch.Generator().manual_seed(heads * 10 + queries)
    B, L, dh = 3, 11, 4
    x = torch.randn(B, L, heads * dh, generator=g)
    qh = torch.randn(heads, B, queries, dh, generator=g)
    w = torch.randn(heads, B, queries, L, generator=g)
    per_head = x.view(B, L, heads, dh).permute(2, 0, 1, 3)  # (H, B, L, dh)
    assert torch.allclose(_dense_scores(x, qh), qh @ per_head.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(_dense_values(x, w), w @ per_head, atol=1e-5)
    strided = torch.cat([x, torch.randn_like(x)], -1)[..., : heads * dh]  # a half of a wider buffer
    assert torch.allclose(_dense_scores(strided, qh), qh @ per_head.transpose(-1, -2), atol=1e-5)


@pytest.mark.parametrize("heads,queries", [(1, 1), (2, 1), (2, 3)])
def test_a_linear_side_over_the_real_tokens_rows_equals_it_over_dense_contexts(heads, queries):
    """`LinearSide` with contexts held as the real tokens' own rows (`first_layer_streams`' form: a
    `CompressedStream` whose pool is the flat (N, c) rows, each slot indexing its token's row) scores and sums
    values as over the same contexts padded densely (B, L, c); padding slots read a real row and are masked."""
    g = torch.Generator().manual_seed(heads * 10 + queries)
    B, L, c, dh = 4, 9, 6, 4
    valid = torch.arange(L)[None] < torch.tensor([9, 3, 1, 6])[:, None]  # (B, L)
    flat = [torch.randn(int(valid.sum()), c, generator=g) for _ in range(2)]  # K0, V0 of the real tokens
    rows = token_rows(valid)
    dense = [torch.zeros(B, L, c).index_put_((valid,), x) for x in flat]
    weight = [torch.randn(c, heads * dh, generator=g) for _ in range(2)]
    bias = torch.randn(heads * dh, generator=g)
    as_rows = LinearSide([CompressedStream(x, rows) for x in flat], weight, bias)
    padded = LinearSide(dense, weight, bias)
    qh = torch.randn(heads, B, queries, dh, generator=g)
    w = torch.randn(heads, B, queries, L, generator=g) * valid[None, :, None, :]
    m = valid[None, :, None, :]
    assert torch.allclose(as_rows.scores(qh) * m, padded.scores(qh) * m, atol=1e-5)
    assert torch.allclose(as_rows.values(w), padded.values(w), atol=1e-5)
    assert torch.allclose(as_rows.decode()[valid], padded.decode()[valid], atol=1e-6)
    assert torch.allclose(as_rows.select(torch.tensor([2, 0])).values(w[:, [2, 0]]), padded.values(w)[:, [2, 0]],
                          atol=1e-5)


def _hstu_store(ds, tmp_path, codec: str):
    model = make_model("hstu", n_items=ds.n_items, max_len=48)
    ckpt = tmp_path / "hstu48.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids),
                    metrics={}, train={})
    params = {"pool_size": 32} if codec == "collective" else {"pool_size": 32, "predictor": "linear+item",
                                                              "max_rows": 200}
    out = tmp_path / f"hstu48-{codec}.safetensors"
    compress_to_artifact(model, {"arch": "hstu", "item_vocab": list(ds.item_ids)}, ckpt, ds,
                         CompressOptions(codec=codec, params=params, calib_users=200), out)
    return model, out


@pytest.mark.parametrize("codec", ["predictive", "collective"])
def test_kept_first_layer_buffers_change_no_score(ds, tmp_path, codec):
    """HSTU's first-layer K/V go into buffers the store keeps per thread (`_kv_buffers`): a batch scored after a
    longer one (stale values in its padding slots) gives the very scores a fresh store gives, in any thread."""
    from concurrent.futures import ThreadPoolExecutor

    model, path = _hstu_store(ds, tmp_path, codec)
    with CacheStore.open(path, model) as store:
        lengths = np.diff(store.artifact.offsets)
        order = np.argsort(lengths, kind="stable")
        mixed = np.concatenate([order[:6], order[len(order) // 2 :][:6]])  # padding slots in its batch
        short, long = [[store.user_ids[u] for u in users] for users in (mixed, order[-12:])]
        assert lengths[mixed].min() + 5 < lengths[mixed].max() <= lengths[order[-12:]].min()
        cand = [[1, 5, 9, 33]] * 12
        long_first = store.score_items(long, cand)
        kept = store._local.kv[0]
        after_long = store.score_items(short, cand)
        assert store._local.kv[0] is kept  # the same buffers, reused
    with CacheStore.open(path, model) as fresh:
        fresh.score_items(short[:6], cand[:6])  # the six shortest users: small buffers
        small = fresh._local.kv[0].shape[0]
        short_only = fresh.score_items(short, cand)  # they grow
        assert fresh._local.kv[0].shape[0] > small
        assert np.array_equal(after_long, short_only)
        assert np.allclose(short_only, fresh.score_items(short, cand, attention="decoded"), atol=1e-4)
        with ThreadPoolExecutor(2) as pool:  # each thread its own buffers
            runs = list(pool.map(lambda users: fresh.score_items(users, cand), [long, short] * 4))
    assert all(np.array_equal(r, long_first if i % 2 == 0 else short_only) for i, r in enumerate(runs))


def test_bench_dense_heads_plumbing(tmp_path):
    """bench/dense_heads.py on tiny tensors: a row per head count, both forms timed, their results equal."""
    import json

    bench = load_script("bench/dense_heads.py", "bench_dense_heads")
    out = tmp_path / "dense.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--users", "3", "--history", "5", "--d", "8", "--heads", "1", "2", "--repeats", "2",
                           "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [r["heads"] for r in rows] == [1, 2]
    assert all(r["scores_served"] > 0 and r["values_per_head"] > 0 and r["max_abs_diff"] < 1e-5 for r in rows)
