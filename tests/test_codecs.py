"""Codecs on synthetic tensors: bit packing, k-means, the collective codec, the plain codec and cache plans."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ckv_cli.codecs import (CollectiveCodec, Field, PlainCodec, RecomputeCodec, build_plan, make_codec,
                            plan_from_description, recomputed)
from ckv_cli.codecs.base import user_index
from ckv_cli.codecs.bits import bits_for, byte_range, pack, packed_nbytes, unpack
from ckv_cli.codecs.kmeans import kmeans, nearest
from ckv_cli.errors import CkvError
from ckv_cli.models.base import next_item_spec
from ckv_cli.spec import FlatCache

# ---------------------------------------------------------------- bits


@pytest.mark.parametrize("bits", range(1, 21))
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=37)  # 37 values: the last byte is partly used for most widths
    values[:2] = [0, (1 << bits) - 1]  # both extremes
    packed = pack(values, bits)
    assert packed.dtype == np.uint8
    assert len(packed) == packed_nbytes(37, bits) == (37 * bits + 7) // 8
    np.testing.assert_array_equal(unpack(packed, bits, 37), values)
    assert len(pack(np.zeros(0, dtype=np.int64), bits)) == 0


@pytest.mark.parametrize("bits", [1, 3, 5, 7, 8, 9, 12, 13, 20])
def test_byte_range_reads_any_sub_range(bits):
    rng = np.random.default_rng(100 + bits)
    n = 23
    values = rng.integers(0, 1 << bits, size=n)
    packed = pack(values, bits)
    for start in range(n):
        for count in range(0, n - start + 1):
            lo, hi, offset = byte_range(start, count, bits)
            assert 0 <= lo <= hi <= len(packed) and 0 <= offset < 8
            assert hi - lo == (offset + count * bits + 7) // 8  # no byte more than needed
            np.testing.assert_array_equal(unpack(packed[lo:hi], bits, count, offset), values[start : start + count])


@pytest.mark.parametrize("bits", [1, 4, 7, 8, 13, 20])
def test_pack_rejects_a_value_too_wide(bits):
    assert unpack(pack([(1 << bits) - 1], bits), bits, 1)[0] == (1 << bits) - 1
    with pytest.raises(ValueError, match="does not fit"):
        pack([3, 1 << bits, 0], bits)


def test_bits_for():
    assert [bits_for(n) for n in (1, 2, 3, 4, 5, 48, 64, 65, 1683, 4096, 4097)] == [1, 1, 2, 2, 3, 6, 6, 7, 11, 12, 13]


# ---------------------------------------------------------------- k-means


def clustered(n=1200, d=12, k=8, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    assign = torch.randint(k, (n,), generator=g)
    return centers[assign] + spread * torch.randn(n, d, generator=g)


def test_kmeans_is_seeded():
    x = clustered()
    a, b = kmeans(x, 10, seed=3), kmeans(x, 10, seed=3)
    assert a.shape == (10, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(x, 10, seed=4))


def test_nearest_is_argmin_of_cdist():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(500, 8, generator=g), torch.randn(17, 8, generator=g)
    expected = torch.cdist(x, c).argmin(1)
    assert torch.equal(nearest(x, c), expected)
    assert torch.equal(nearest(x, c, chunk=7), expected)  # chunk boundaries change nothing


@pytest.mark.parametrize("m", [10, 13])
def test_kmeans_is_exact_with_as_many_centroids_as_distinct_points(m):
    g = torch.Generator().manual_seed(2)
    distinct = torch.randint(-20, 21, (10, 4), generator=g).float()  # integers: sums and means are exact
    assert len(torch.unique(distinct, dim=0)) == 10
    x = distinct[torch.randint(10, (300,), generator=g)]
    x[:10] = distinct  # every distinct point occurs
    c = kmeans(x, m, seed=0)
    assert c.shape == (m, 4)
    assert torch.equal(c[nearest(x, c)], x)


# ---------------------------------------------------------------- collective codec


OFFSETS = np.array([0, 100, 101, 400, 650, 900, 1200])  # six users of uneven length (one with a single token)


def fitted(layout="residual", user_dim=2, user_dtype="int8", pool_size=8, seed=0, x=None):
    x = clustered() if x is None else x
    codec = CollectiveCodec(d=x.shape[1], pool_size=pool_size, user_dim=user_dim, layout=layout, user_dtype=user_dtype)
    codec.fit(x, seed)
    return codec


def rel_err(codec, x):
    x_hat = codec.decode(codec.encode(x, OFFSETS), OFFSETS)
    return float(((x - x_hat) ** 2).sum() / (x**2).sum())


@pytest.mark.parametrize("layout", ["residual", "concat"])
def test_router_picks_the_nearest_pool_entry(layout):
    x = clustered()
    codec = fitted(layout, user_dim=3, pool_size=8)
    idx = torch.from_numpy(codec.encode(x, OFFSETS)["idx"].astype(np.int64))
    z = x if layout == "residual" else ((x - codec.mean) @ codec.basis)[:, codec.pool_coords]
    assert codec.pool.shape == (8, z.shape[1])
    dist = torch.cdist(z, codec.pool)  # (N, m)
    chosen = dist.gather(1, idx[:, None])[:, 0]
    assert torch.all(chosen <= dist.min(1).values + 1e-4)  # argmax of the router = nearest entry
    assert len(torch.unique(idx)) > 1


@pytest.mark.parametrize("user_dtype", ["fp16", "int8"])
def test_residual_error_does_not_grow_with_user_dim(user_dtype):
    x = clustered(k=16)
    errs = [rel_err(fitted("residual", r, user_dtype), x) for r in (0, 2, 4)]
    assert errs[0] >= errs[1] >= errs[2]
    assert errs[2] < 0.9 * errs[0]  # the user part does real work


@pytest.mark.parametrize("layout", ["residual", "concat"])
def test_fp16_user_part_is_no_worse_than_int8(layout):
    x = clustered()
    e16, e8 = rel_err(fitted(layout, 4, "fp16"), x), rel_err(fitted(layout, 4, "int8"), x)
    assert e16 <= e8 + 1e-6


@pytest.mark.parametrize("layout", ["residual", "concat"])
def test_int8_user_part_within_half_a_scale_step(layout):
    x = clustered()
    codec = fitted(layout, user_dim=4, user_dtype="int8")
    enc = codec.encode(x, OFFSETS)
    q, scale = enc["user"], enc["scale"]
    assert q.dtype == np.int8 and q.shape == (len(x), 4)
    assert scale.dtype == np.float16 and scale.shape == (len(OFFSETS) - 1, 1)
    idx = torch.from_numpy(enc["idx"].astype(np.int64))
    if layout == "residual":
        u = (x - codec.pool[idx]) @ codec.basis
    else:
        u = ((x - codec.mean) @ codec.basis)[:, codec.user_coords]
    owner = user_index(OFFSETS)
    s = torch.from_numpy(scale[owner].astype(np.float32))  # (N, 1)
    err = (u - torch.from_numpy(q.astype(np.float32)) * s).abs()
    assert torch.all(err <= 0.5 * s * (1 + 1e-5) + 1e-7)
    for b in range(len(OFFSETS) - 1):  # each user's largest value uses the full int8 range
        assert np.abs(q[OFFSETS[b] : OFFSETS[b + 1]].astype(int)).max() == 127


@pytest.mark.parametrize("layout", ["residual", "concat"])
@pytest.mark.parametrize("user_dtype", ["int8", "fp16"])
@pytest.mark.parametrize("user_dim", [0, 3])
def test_decode_of_encode_shape_and_dtype(layout, user_dtype, user_dim):
    x = clustered(n=400, d=10)
    offsets = np.array([0, 150, 400])
    codec = fitted(layout, user_dim, user_dtype, x=x)
    enc = codec.encode(x, offsets)
    assert set(enc) == {f.name for f in codec.fields()}
    assert enc["idx"].max() < codec.pool_size
    out = codec.decode(enc, offsets)
    assert out.shape == (400, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float(((x - out) ** 2).sum() / (x**2).sum()) < 0.2


@pytest.mark.parametrize("layout", ["residual", "concat"])
def test_shared_then_load_shared_reproduces_the_codec(layout):
    x = clustered()
    codec = fitted(layout, user_dim=2, pool_size=8)
    enc = codec.encode(x, OFFSETS)
    shared = codec.shared()
    assert "router_w" not in shared and "router_b" not in shared  # tied router: derived from the pool
    assert ("user_coords" in shared) == (layout == "concat")
    fresh = CollectiveCodec(**codec.params())
    fresh.load_shared({k: v.clone() for k, v in shared.items()})
    assert torch.equal(fresh.decode(enc, OFFSETS), codec.decode(enc, OFFSETS))
    for k, v in fresh.encode(x, OFFSETS).items():
        np.testing.assert_array_equal(v, enc[k])

    # as after distillation: the router moves away from the pool and must then be stored
    codec.trainable()
    with torch.no_grad():
        codec.router_w.copy_(codec.router_w.roll(1, 0))  # entry j's logit now comes from entry j - 1's row
        codec.router_b.copy_(codec.router_b.roll(1, 0))
    codec.freeze()
    shared = codec.shared()
    assert "router_w" in shared and "router_b" in shared
    enc2 = codec.encode(x, OFFSETS)
    np.testing.assert_array_equal(enc2["idx"], (enc["idx"] + 1) % codec.pool_size)  # the moved router routes differently
    fresh = CollectiveCodec(**codec.params())
    fresh.load_shared({k: v.clone() for k, v in shared.items()})
    for k, v in fresh.encode(x, OFFSETS).items():
        np.testing.assert_array_equal(v, enc2[k])
    assert torch.equal(fresh.decode(enc2, OFFSETS), codec.decode(enc2, OFFSETS))


def test_load_shared_rejects_a_pool_of_the_wrong_size():
    codec = fitted(pool_size=8)
    with pytest.raises(CkvError, match="pool has 8 entries"):
        CollectiveCodec(d=12, pool_size=16, user_dim=2).load_shared(codec.shared())


@pytest.mark.parametrize("kwargs, fragment", [
    ({"user_dim": 8}, "user dim"),
    ({"user_dim": 9}, "user dim"),
    ({"user_dim": -1}, "user dim"),
    ({"layout": "stacked"}, "layout"),
    ({"user_dtype": "int4"}, "user dtype"),
    ({"pool_size": 1}, "pool size"),
    ({"pool_size": 0}, "pool size"),
    ({"pool_size": 2.5}, "pool size"),
])
def test_collective_constructor_validation(kwargs, fragment):
    with pytest.raises(CkvError, match=fragment):
        CollectiveCodec(d=8, **{"pool_size": 16, **kwargs})


def test_collective_needs_fit_and_enough_vectors():
    codec = CollectiveCodec(d=4, pool_size=16)
    with pytest.raises(CkvError, match="before fit"):
        codec.encode(torch.zeros(3, 4), np.array([0, 3]))
    with pytest.raises(CkvError, match="calibration vectors"):  # k-means would return a smaller pool
        codec.fit(torch.randn(10, 4), 0)


def test_make_codec_errors():
    with pytest.raises(CkvError, match="unknown codec 'zip'"):
        make_codec("zip", 8, {})
    with pytest.raises(CkvError, match="bad parameters"):
        make_codec("collective", 8, {"pool": 16})


# ---------------------------------------------------------------- plain codec


def test_plain_codec():
    x = torch.randn(50, 6) * 10
    offsets = np.array([0, 20, 50])
    c16 = PlainCodec(d=6, dtype="float16")
    enc = c16.encode(x, offsets)
    assert enc["x"].dtype == np.float16 and c16.bytes_per_token() == 12
    assert torch.equal(c16.decode(enc, offsets), x.half().float())
    c32 = PlainCodec(d=6, dtype="float32")
    assert torch.equal(c32.decode(c32.encode(x, offsets), offsets), x)
    with pytest.raises(CkvError, match="float16 or float32"):
        PlainCodec(d=6, dtype="bfloat16")


# ---------------------------------------------------------------- plans


def plan_for(**kw):
    """A plan for a next-item model's cache (`next_item_spec`) of 3 layers, K 8 and V 6 wide, 1682 items."""
    args = {"n_layers": 3, "d_k": 8, "d_v": 6, "n_items": 1682, "timestamps": True}
    params = kw.pop("params", {"pool_size": 48, "user_dim": 3, "layout": "residual"})
    name = kw.pop("name", "collective")
    a = {**args, **{k: kw.pop(k) for k in list(kw) if k in args}}
    spec = next_item_spec(a["n_items"], a["n_layers"], a["d_k"], a["d_v"], a["timestamps"])
    return build_plan(spec, name, params, n_items=a["n_items"],
                      recompute_free=kw.pop("recompute_item_layers", True), **kw)


def kinds(plan):
    return {k: ("recompute" if recomputed(c) else (c.name, c.params())) for k, c in plan.streams.items()}


def test_build_plan_item_layers_and_share():
    plan = plan_for()
    assert list(plan.streams) == ["L0.k", "L0.v", "L1.k", "L1.v", "L2.k", "L2.v"]
    assert isinstance(plan.streams["L0.k"], RecomputeCodec) and isinstance(plan.streams["L0.v"], RecomputeCodec)
    assert all(isinstance(plan.streams[k], CollectiveCodec) for k in ("L1.k", "L1.v", "L2.k", "L2.v"))
    assert plan.streams["L1.k"].d == 8 and plan.streams["L1.v"].d == 6

    stored = plan_for(recompute_item_layers=False)
    assert isinstance(stored.streams["L0.k"], CollectiveCodec) and isinstance(stored.streams["L0.v"], CollectiveCodec)

    k_only = plan_for(share=("k",))
    assert isinstance(k_only.streams["L0.v"], RecomputeCodec)
    for layer in (1, 2):
        assert isinstance(k_only.streams[f"L{layer}.k"], CollectiveCodec)
        v = k_only.streams[f"L{layer}.v"]
        assert isinstance(v, PlainCodec) and v.dtype == "float16" and v.d == 6


@pytest.mark.parametrize("share", [("q",), ("k", "x"), ()])
def test_build_plan_bad_share(share):
    with pytest.raises(CkvError, match="--share"):
        plan_for(share=share)


def test_build_plan_unknown_codec():
    with pytest.raises(CkvError, match="unknown codec 'zip'"):
        plan_for(name="zip", params={})


@pytest.mark.parametrize("kw", [{}, {"share": ("v",)}, {"recompute_item_layers": False},
                                {"params": {"pool_size": 16, "user_dim": 2, "layout": "concat", "user_dtype": "fp16"}},
                                {"name": "plain", "params": {"dtype": "float32"}, "timestamps": False}])
def test_plan_from_description_round_trip(kw):
    plan = plan_for(**kw)
    desc = json.loads(json.dumps(plan.describe()))  # as stored in an artifact's metadata
    again = plan_from_description(desc)
    assert kinds(again) == kinds(plan)
    assert (again.n_layers, again.n_items, again.timestamps) == (plan.n_layers, plan.n_items, plan.timestamps)
    assert again.fields() == plan.fields()


def test_field_nbytes_for_packed_bits():
    f = Field("idx", "token", bits=5)
    assert [f.nbytes(n) for n in (0, 1, 3, 8, 9)] == [0, 1, 2, 5, 6]
    for bits in (1, 5, 11, 13):
        for n in (1, 7, 8, 33):
            assert Field("x", "token", bits=bits).nbytes(n) == len(pack(np.zeros(n, dtype=np.int64), bits))
    assert Field("user", "token", dtype="int8", width=3).nbytes(10) == 30
    assert Field("scale", "user", dtype="float16").nbytes(4) == 8
    assert Field("offsets", "user", dtype="int64").nbytes(5) == 40


def test_plan_fields_byte_accounting():
    plan = plan_for()
    fields = plan.fields()
    assert fields["tokens/items"].bits == 11  # 1682 items + padding
    assert fields["tokens/timestamps"].dtype == "int32"
    assert "tokens/timestamps" not in plan_for(timestamps=False).fields()
    assert not any(k.startswith("L0.") for k in fields)  # recomputed: nothing stored
    assert fields["L1.k/idx"] == Field("idx", "token", bits=6)  # 48 entries
    assert fields["L1.k/user"] == Field("user", "token", dtype="int8", width=3)
    assert fields["L2.v/scale"] == Field("scale", "user", dtype="float16", width=1)
    codec = plan.streams["L1.k"]
    assert codec.bytes_per_token() == 6 / 8 + 3 and codec.bytes_per_user() == 2
    fp16 = plan_for(params={"pool_size": 4096, "user_dim": 2, "user_dtype": "fp16"})
    assert fp16.streams["L1.v"].bytes_per_token() == 12 / 8 + 4 and fp16.streams["L1.v"].bytes_per_user() == 0
    assert "L1.v/scale" not in fp16.fields()


def synthetic_flat(plan, offsets, seed=0, ts_base=10**9):
    g = torch.Generator().manual_seed(seed)
    n = int(offsets[-1])
    keys = [clustered(n, 8, seed=seed + 10 * layer) for layer in range(plan.n_layers)]
    values = [clustered(n, 6, seed=seed + 10 * layer + 1) for layer in range(plan.n_layers)]
    items = torch.randint(1, plan.n_items + 1, (n,), generator=g).numpy()
    ts = ts_base + np.arange(n, dtype=np.int64) * 37
    streams = {}
    for layer in range(plan.n_layers):
        streams[f"L{layer}.k"], streams[f"L{layer}.v"] = keys[layer], values[layer]
    return FlatCache(np.asarray(offsets, dtype=np.int64), streams, {"items": items, "timestamps": ts})


def fake_item_kv(items, positions):
    """A deterministic stand-in for the model's first layer: a function of (item, position) only."""
    k = torch.stack([items.float() * (j + 1) + positions.float() for j in range(8)], -1)
    v = torch.stack([items.float() - j * positions.float() for j in range(6)], -1)
    return k, v


class FakeModel:
    """What a plan asks of the model that reads a cache: its first layer recomputed (`fake_item_kv`)."""

    def recompute(self, names, ids, offsets):
        pos = torch.from_numpy(np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], np.diff(offsets)))
        k, v = fake_item_kv(torch.from_numpy(np.asarray(ids["items"], np.int64)), pos)
        return {n: (k if n.endswith(".k") else v) for n in names}, {}


def test_plan_encode_decode_round_trip():
    plan = plan_for()
    offsets = np.array([0, 40, 41, 300, 500])
    flat = synthetic_flat(plan, offsets)
    plan.fit(flat, seed=0)
    enc = plan.encode(flat)
    assert set(enc) == set(plan.fields()) - {"users/offsets"}
    dec = plan.decode(enc, offsets, FakeModel())
    np.testing.assert_array_equal(dec.items, flat.items)
    np.testing.assert_array_equal(dec.timestamps, flat.timestamps)
    pos = torch.from_numpy(np.arange(500) - np.repeat(offsets[:-1], np.diff(offsets)))
    k0, v0 = fake_item_kv(torch.from_numpy(flat.items)[None], pos[None])
    assert torch.equal(dec.stream("L0.k"), k0[0]) and torch.equal(dec.stream("L0.v"), v0[0])  # recomputed, per user position
    for layer in (1, 2):
        for a, b in ((flat.stream(f"L{layer}.k"), dec.stream(f"L{layer}.k")), (flat.stream(f"L{layer}.v"), dec.stream(f"L{layer}.v"))):
            assert a.shape == b.shape
            assert float(((a - b) ** 2).sum() / (a**2).sum()) < 0.1


def test_plan_rejects_timestamps_beyond_int32():
    plan = plan_for(params={"pool_size": 4, "user_dim": 0})
    offsets = np.array([0, 30])
    plan.fit(synthetic_flat(plan, offsets), seed=0)
    assert plan.encode(synthetic_flat(plan, offsets, ts_base=2**31 - 30 * 37))["tokens/timestamps"][-1] == 2**31 - 37
    with pytest.raises(CkvError, match="int32"):  # millisecond timestamps would wrap silently
        plan.encode(synthetic_flat(plan, offsets, ts_base=1_600_000_000_000))
    assert "tokens/timestamps" in plan.encode(synthetic_flat(plan, offsets))
    no_ts = plan_for(params={"pool_size": 4, "user_dim": 0}, timestamps=False)
    no_ts.fit(synthetic_flat(no_ts, offsets), seed=0)
    assert "tokens/timestamps" not in no_ts.encode(synthetic_flat(no_ts, offsets, ts_base=1_600_000_000_000))
