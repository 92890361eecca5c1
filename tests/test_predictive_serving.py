"""The predictive codec served in stored form (`ckv_cli.serve.next_item.PredictedStream`): each token's vector is
its prediction plus a pool entry, attended part by part. SASRec's linear prediction goes through the first
layer's LayerNorm fold, HSTU's through its first-layer K/V (built from its tables), the map applied per query; the
item table and the pool are read as pools; nothing of the stream is built. Against the decoded cache: the same
vectors and the same scores, for every predictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.data import load
from ckv_cli.models.checkpoint import save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.serve.attention import CompressedStream
from ckv_cli.serve.next_item import CacheStore, EmaSide, ItemLayer, LinearSide, PredictedStream


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
