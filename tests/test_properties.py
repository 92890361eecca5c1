"""Property tests (hypothesis) for what tests/test_baselines.py does not cover: the `collective` and `plain`
codecs within their error bounds on random caches of random shapes, and the artifact writer/reader round trip
(exact, for random small plans, users and metadata)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import ItemKVModel
from conftest import next_item_plan as build_plan
from ckv_cli.artifact import Artifact, write_artifact
from ckv_cli.artifact.format import decode_meta, encode_meta
from ckv_cli.codecs import CollectiveCodec, PlainCodec, recomputed

EXAMPLES = int(os.environ.get("CKV_HYP_EXAMPLES", 40))  # a deeper local run: CKV_HYP_EXAMPLES=2000
HYP = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_cache(n: int, d: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g) * 3  # a few clusters, as real K/V have
    return (centres[torch.randint(0, 4, (n,), generator=g)] + torch.randn(n, d, generator=g)) * scale


def random_offsets(n: int, data) -> np.ndarray:
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="user cuts"))
    return np.array([0, *cuts, n], dtype=np.int64)


# ---------------------------------------------------------------- collective


@HYP
@given(n_cal=st.integers(2, 60), n=st.integers(0, 40), d=st.integers(1, 8), data=st.data(),
       layout=st.sampled_from(["residual", "concat"]), user_dtype=st.sampled_from(["int8", "fp16"]),
       seed=st.integers(0, 10**6), scale=st.sampled_from([1e-2, 1.0, 30.0]))
def test_collective_within_its_bound(n_cal, n, d, data, layout, user_dtype, seed, scale):
    """The pool part is the nearest pool entry (the router is exact nearest-entry assignment); the user part
    adds back the residual's projection, up to its storage rounding: int8 within 0.6 of a per-user scale step
    per dim (half a step, plus the fp16 rounding of the scale at the clamp), fp16 within its relative rounding.
    So per token: |x - decoded| <= |pool-coordinate error of the nearest entry| + |user-part rounding|."""
    pool_size = data.draw(st.integers(2, max(2, n_cal)), label="pool size")
    user_dim = data.draw(st.integers(0, d - 1), label="user dim")
    assume(pool_size <= n_cal)
    codec = CollectiveCodec(d=d, pool_size=pool_size, user_dim=user_dim, layout=layout, user_dtype=user_dtype, iters=5)
    codec.fit(random_cache(n_cal, d, seed, scale), seed)
    x = random_cache(n, d, seed + 1, scale)
    offsets = random_offsets(n, data)
    enc = codec.encode(x, offsets)
    assert enc["idx"].shape == (n,) and int(enc["idx"].max(initial=0)) < pool_size
    out = codec.decode(enc, offsets)
    assert out.shape == (n, d) and out.dtype == torch.float32 and torch.isfinite(out).all()

    z = codec._coords(x)  # the coordinates the pool lives in (the SVD basis for concat)
    zp = z[:, codec.pool_coords] if layout == "concat" else z
    nearest = torch.cdist(zp.double(), codec.pool.double()).min(1).values  # (n,)
    chosen = (zp - codec.pool[torch.from_numpy(enc["idx"].astype(np.int64))]).double().norm(dim=1)
    tol = 1e-4 * scale * math.sqrt(d)
    assert torch.all(chosen <= nearest * (1 + 1e-4) + tol)  # the router picked a nearest entry
    if user_dim == 0:
        rounding = torch.zeros(n, dtype=torch.float64)
    else:
        u = z[:, codec.user_coords] if layout == "concat" else (z - codec.pool[enc["idx"].astype(np.int64)]) @ codec.basis
        if user_dtype == "int8":
            owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            step = torch.from_numpy(enc["scale"][owner, 0].astype(np.float64))  # (n,)
            rounding = 0.6 * step * math.sqrt(user_dim)
        else:
            rounding = u.double().norm(dim=1) * 2.0**-10 + 2.0**-24 * math.sqrt(user_dim)
    err = (x - out).double().norm(dim=1)
    assert torch.all(err <= chosen + rounding + tol), float((err - chosen - rounding).max())


# ---------------------------------------------------------------- plain


@HYP
@given(n=st.integers(0, 50), d=st.integers(1, 12), dtype=st.sampled_from(["float16", "float32"]), data=st.data(),
       seed=st.integers(0, 10**6), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
def test_plain_within_its_rounding(n, d, dtype, data, seed, scale):
    """float32 is exact; float16 is round-to-nearest: within half an ulp (2^-11 relative, 2^-25 absolute for
    subnormals) of every value inside the fp16 range."""
    x = random_cache(n, d, seed, scale)
    codec = PlainCodec(d=d, dtype=dtype)
    offsets = random_offsets(n, data)
    enc = codec.encode(x, offsets)
    assert enc["x"].dtype == np.dtype(dtype) and enc["x"].shape == (n, d)
    out = codec.decode(enc, offsets)
    assert out.dtype == torch.float32 and out.shape == (n, d)
    if dtype == "float32":
        assert torch.equal(out, x)
    else:
        assert torch.all((out - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)
        assert torch.equal(out, x.half().float())


# ---------------------------------------------------------------- artifact round trip


def fake_item_kv(items: torch.Tensor, positions: torch.Tensor):
    """A deterministic stand-in for the model's first layer: (B, L) -> (B, L, 3) keys and values."""
    k = torch.stack([items.float() * (j + 1) + positions.float() for j in range(3)], -1)
    return k, k.flip(-1) - 1


user_id = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)  # any text utf-8 can encode
meta_value = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                          max_leaves=6)


@HYP
@given(data=st.data(), n_layers=st.integers(1, 3), d_v=st.integers(1, 5), n_items=st.integers(1, 300),
       timestamps=st.booleans(), recompute=st.booleans(), codec=st.sampled_from(["collective", "plain"]),
       lengths=st.lists(st.integers(0, 7), max_size=7), seed=st.integers(0, 10**6))
def test_artifact_round_trip_is_exact(data, n_layers, d_v, n_items, timestamps, recompute, codec, lengths, seed):
    """Whatever is written is read back bit for bit: every field of any subset of users in any order, the
    decoded cache, user ids, the plan and the metadata; and the same inputs give the same bytes."""
    d_k = 3  # the item-layer stand-in's width
    if codec == "collective":
        user_dim = data.draw(st.integers(0, min(d_k, d_v) - 1), label="user dim")
        params = {"pool_size": data.draw(st.integers(2, 9), label="pool"), "user_dim": user_dim,
                  "layout": data.draw(st.sampled_from(["residual", "concat"]), label="layout"),
                  "user_dtype": data.draw(st.sampled_from(["int8", "fp16"]), label="user dtype")}
    else:
        params = {"dtype": data.draw(st.sampled_from(["float16", "float32"]), label="dtype")}
    share = data.draw(st.sampled_from([("k", "v"), ("k",), ("v",)]), label="share")
    plan = build_plan(codec, params, n_layers=n_layers, d_k=d_k, d_v=d_v, n_items=n_items, timestamps=timestamps,
                      share=share, recompute_item_layers=recompute)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    rng = np.random.default_rng(seed)
    fields = {"tokens/items": rng.integers(1, n_items + 1, n).astype(np.uint32)}
    if timestamps:
        fields["tokens/timestamps"] = rng.integers(-2**31, 2**31, n).astype(np.int32)
    for i, (name, c) in enumerate(plan.streams.items()):
        if recomputed(c):
            continue
        c.fit(random_cache(24, c.d, seed + i, 1.0), seed)
        for fname, arr in c.encode(random_cache(n, c.d, seed + 100 + i, 1.0), offsets).items():
            fields[f"{name}/{fname}"] = arr
    users = [f"{k}:{s}" for k, s in enumerate(data.draw(st.lists(user_id, min_size=len(lengths), max_size=len(lengths)), label="ids"))]
    metadata = data.draw(st.dictionaries(st.sampled_from(["checkpoint", "dataset", "command", "seed", "params", "x"]),
                                         meta_value | st.sampled_from(["[v2].safetensors", "{a}", '"q"', ""]), max_size=4),
                         label="metadata")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        write_artifact(path, plan, fields, offsets, users, metadata)
        first = path.read_bytes()
        write_artifact(path, plan, fields, offsets, users, metadata, force=True)
        assert path.read_bytes() == first  # deterministic
        art = Artifact.open(path)
        assert art.verify() == []
        assert art.plan.describe() == plan.describe() and art.user_ids == users and art.n_users == len(lengths)
        np.testing.assert_array_equal(art.offsets, offsets)
        for k, v in metadata.items():  # strings and JSON objects/arrays as written; other values as their JSON text
            assert art.meta[k] == (v if isinstance(v, (str, dict, list)) else encode_meta(v)), k
        order = np.array(data.draw(st.permutations(range(len(lengths))), label="order")[: data.draw(
            st.integers(0, len(lengths)), label="how many")], dtype=np.int64)
        got, got_offsets = art.read_fields(order)
        np.testing.assert_array_equal(got_offsets, np.concatenate([[0], np.cumsum(np.asarray(lengths)[order])]))
        rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in order]).astype(np.int64) if len(order) else np.zeros(0, np.int64)
        declared = plan.fields()
        for name, arr in fields.items():
            want = arr[order] if declared[name].per == "user" else arr[rows]
            assert got[name].shape[0] == want.shape[0], name
            if declared[name].bits:
                np.testing.assert_array_equal(got[name], want.astype(np.int64), err_msg=name)
            else:
                assert got[name].dtype == want.dtype, name
                np.testing.assert_array_equal(got[name].reshape(want.shape), want, err_msg=name)
        sub = {k: (v[order] if declared[k].per == "user" else v[rows]) for k, v in fields.items()}
        want = plan.decode(sub, got_offsets, ItemKVModel(fake_item_kv))
        dec = art.decode(order, ItemKVModel(fake_item_kv))
        assert dec.streams.keys() == want.streams.keys()
        for n in dec.streams:
            assert torch.equal(dec.stream(n), want.stream(n))
        np.testing.assert_array_equal(dec.items, want.items)
        np.testing.assert_array_equal(dec.timestamps, want.timestamps)


@HYP
@given(value=meta_value | st.text())
def test_metadata_values_round_trip(value):
    """Any string (even one that starts like JSON, e.g. a path '[v2].safetensors'), JSON object or array comes
    back as written; numbers, booleans and null as their JSON text (the artifact's metadata is strings)."""
    assert decode_meta(encode_meta(value)) == (value if isinstance(value, (str, dict, list)) else encode_meta(value))
