"""Baseline codecs (issue 6) on synthetic tensors: bf16, KIVI-style int8/int4, low rank, product quantisation
and item-id lookup; their byte accounting, their plans, and their artifacts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckv_cli.artifact import Artifact, write_artifact
from ckv_cli.codecs import (RecomputeCodec, Bf16Codec, Int4Codec, Int8Codec, ItemIdCodec, LowRankCodec, PlainCodec, PQCodec,
                            make_codec, plan_from_description)
from ckv_cli.codecs.bits import pack
from ckv_cli.errors import CkvError
from conftest import ItemKVModel, flat_of
from conftest import next_item_plan as build_plan

OFFSETS = np.array([0, 70, 71, 140, 173, 300])  # five users: 70 tokens (2 groups of 32 + 6), 1, 69, 33, 127
HYP = settings(max_examples=25, deadline=None)


def randn(n, d, seed=0, scale=3.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def round_trip(codec, x, offsets=OFFSETS, **kw):
    return codec.decode(codec.encode(x, offsets, **kw), offsets, **kw)


def fitted(name, d, params=None, x=None, seed=0, **kw):
    codec = make_codec(name, d, params or {})
    if x is not None:
        codec.fit(x, seed, **kw)
    return codec


# ---------------------------------------------------------------- casts


def test_bf16_is_the_torch_cast_within_its_rounding():
    x = randn(300, 10) * torch.logspace(-3, 4, 10)  # channels from 1e-3 to 1e4
    codec = Bf16Codec(d=10)
    enc = codec.encode(x, OFFSETS)
    assert enc["x"].dtype == np.uint16 and enc["x"].shape == (300, 10)
    out = codec.decode(enc, OFFSETS)
    assert out.dtype == torch.float32 and torch.equal(out, x.bfloat16().float())
    assert torch.all((out - x).abs() <= x.abs() * 2.0**-8)  # round to nearest, 8 significant bits: half an ulp
    assert not torch.equal(out, x)
    big = torch.full((1, 10), 1e6)  # overflows fp16, not bf16
    assert torch.isfinite(codec.decode(codec.encode(big, np.array([0, 1])), np.array([0, 1]))).all()


def test_fp16_within_its_rounding():
    x = randn(300, 10)
    out = round_trip(PlainCodec(d=10), x)
    assert torch.all((out - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)


# ---------------------------------------------------------------- KIVI int8 / int4


def kivi_bound(x, offsets, axis, group_size, levels):
    """Per element (N, d): half a quantisation step of the element's group, computed from x alone, with the
    slack of rounding the zero point down and the scale up to fp16."""
    n, d = x.shape
    lo, hi = torch.empty_like(x), torch.empty_like(x)

    def per_token(rows):
        g = min(group_size, d)
        for a in range(0, d, g):
            cols = slice(a, a + g)
            lo[rows, cols] = x[rows, cols].amin(1, keepdim=True)
            hi[rows, cols] = x[rows, cols].amax(1, keepdim=True)

    for u in range(len(offsets) - 1):
        start, end = int(offsets[u]), int(offsets[u + 1])
        full = start + (end - start) // group_size * group_size if axis == "channel" else start
        for a in range(start, full, group_size):
            lo[a : a + group_size] = x[a : a + group_size].amin(0)
            hi[a : a + group_size] = x[a : a + group_size].amax(0)
        per_token(slice(full, end))
    step = ((hi - lo) + lo.abs() * 2.0**-10 + 2.0**-24) / levels * (1 + 2.0**-10) + 2.0**-24
    return step / 2 + 1e-6 * (x.abs() + 1)


@pytest.mark.parametrize("cls", [Int8Codec, Int4Codec])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("group_size, d", [(32, 64), (4, 10), (3, 7), (128, 16)])
def test_kivi_within_half_a_step(cls, axis, group_size, d):
    x = randn(300, d, seed=d) + torch.linspace(-5, 5, d)  # channels at different offsets, as keys have
    codec = cls(d=d, group_size=group_size, axis=axis)
    enc = codec.encode(x, OFFSETS)
    assert enc["q"].dtype == np.uint8 and enc["stats"].dtype == np.float16
    assert enc["q"].shape == (300, d if cls is Int8Codec else (d + 1) // 2)
    err = (round_trip(codec, x) - x).abs()
    bound = kivi_bound(x, OFFSETS, axis, group_size, codec.levels)
    assert torch.all(err <= bound)
    assert float(err.max()) > 0.1 * float(bound.max())  # really quantised: the bound is not vacuous


def test_kivi_wrong_grouping_breaks_the_bound():
    """The bound is tight enough to tell per-channel from per-token groups (so the test above can fail)."""
    x = randn(300, 16, seed=1) * torch.logspace(-2, 1, 16)  # channel scales differ: per-token steps are coarse
    err = (round_trip(Int4Codec(d=16, group_size=16, axis="token"), x) - x).abs()
    assert not torch.all(err <= kivi_bound(x, OFFSETS, "channel", 16, 15))


def test_int4_is_coarser_than_int8_and_packs_two_per_byte():
    x = randn(300, 64)
    e8 = float(((round_trip(Int8Codec(d=64), x) - x) ** 2).mean())
    e4 = float(((round_trip(Int4Codec(d=64), x) - x) ** 2).mean())
    assert 100 * e8 < e4 < 0.02 * float((x**2).mean())
    enc = Int4Codec(d=3).encode(torch.tensor([[0.0, 15.0, 5.0]]), np.array([0, 1]))  # one token, range 0..15
    np.testing.assert_array_equal(enc["q"], [[0x0F, 0x50]])  # first code in the high nibble, odd d padded


def rounded_down(stored, exact):
    """`stored` is `exact` rounded down to fp16."""
    return bool(np.all((stored <= exact) & (exact - stored <= np.abs(exact) * 2.0**-10 + 2.0**-24)))


def test_kivi_stats_layout_per_channel():
    """A user's full groups spread (d scales, d zeros) over their tokens; its tail tokens carry their own."""
    d, g = 4, 2
    x = randn(5, d, seed=3)
    codec = Int8Codec(d=d, group_size=g, axis="channel")
    stats = codec.encode(x, np.array([0, 5]))["stats"].astype(np.float32)
    assert stats.shape == (5, 2 * 2)  # w = 2 * ceil(d / g)
    for a in (0, 2):  # groups of tokens 0-1 and 2-3
        spread = stats[a : a + 2].reshape(-1)  # 2d values exactly fill the group's slots
        assert rounded_down(spread[d:], x[a : a + 2].amin(0).numpy())
        step = ((x[a : a + 2].amax(0) - x[a : a + 2].amin(0)) / 255).numpy()
        assert np.all((spread[:d] >= step) & (spread[:d] <= step * (1 + 2.0**-9) + 2.0**-20))
    tail = stats[4]  # token 4 alone: per token, channel groups of 2: two scales then two zeros
    assert rounded_down(tail[2:], np.array([x[4, :2].min(), x[4, 2:].min()]))


def test_kivi_constant_groups_and_fp16_overflow():
    x = torch.full((40, 5), 2.5)
    for axis in ("channel", "token"):
        assert torch.equal(round_trip(Int4Codec(d=5, group_size=8, axis=axis), x, np.array([0, 40])), x)
    with pytest.raises(CkvError, match="fp16 range"):
        Int8Codec(d=5).encode(torch.full((2, 5), 1e5), np.array([0, 2]))


@HYP
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), d=st.integers(1, 9),
       group_size=st.integers(1, 6), axis=st.sampled_from(["channel", "token"]), bits=st.sampled_from([4, 8]),
       seed=st.integers(0, 10**6))
def test_kivi_property(lengths, d, group_size, axis, bits, seed):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x = randn(int(offsets[-1]), d, seed=seed)
    codec = (Int8Codec if bits == 8 else Int4Codec)(d=d, group_size=group_size, axis=axis)
    out = round_trip(codec, x, offsets)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.all((out - x).abs() <= kivi_bound(x, offsets, axis, group_size, codec.levels))


# ---------------------------------------------------------------- low rank


def rank_k(n, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) + torch.randn(d, generator=g) * 4


def test_lowrank_exact_on_data_of_rank_k():
    x = rank_k(300, 12, 3)
    codec = fitted("lowrank", 12, {"rank": 3}, x)
    enc = codec.encode(x, OFFSETS)
    assert enc["coef"].dtype == np.float16 and enc["coef"].shape == (300, 3)
    assert torch.allclose(codec.basis.T @ codec.basis, torch.eye(3), atol=1e-5)
    coef = (x - codec.mean) @ codec.basis
    err = (codec.decode(enc, OFFSETS) - x).norm(dim=1)
    assert torch.all(err <= coef.norm(dim=1) * 2.0**-11 + 1e-4 * x.norm(dim=1))  # only the fp16 rounding of c
    short = fitted("lowrank", 12, {"rank": 2}, x)  # one dimension short: far from exact
    assert float((round_trip(short, x) - x).norm(dim=1).max()) > 0.1


def test_lowrank_error_falls_with_rank():
    x = randn(300, 12) * torch.linspace(0.1, 3, 12)
    errs = [float(((round_trip(fitted("lowrank", 12, {"rank": k}, x), x) - x) ** 2).sum()) for k in (1, 4, 8, 11)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01 * errs[0]


@HYP
@given(n=st.integers(8, 60), d=st.integers(2, 10), data=st.data(), seed=st.integers(0, 10**6))
def test_lowrank_property(n, d, data, seed):
    rank = data.draw(st.integers(1, min(d - 1, n)))  # the codec refuses a rank above the calibration vectors
    true_rank = data.draw(st.integers(1, rank))
    x = rank_k(n, d, true_rank, seed)
    offsets = np.array([0, n // 2, n])
    codec = fitted("lowrank", d, {"rank": rank}, x)
    out = round_trip(codec, x, offsets)
    assert out.shape == x.shape
    coef = (x - codec.mean) @ codec.basis
    assert torch.all((out - x).norm(dim=1) <= coef.norm(dim=1) * 2.0**-11 + 1e-4 * (x.norm(dim=1) + 1))


# ---------------------------------------------------------------- product quantisation


def pq_data(n, widths, per_sub, seed=0):
    """Every sub-vector one of `per_sub` integer-valued vectors (sums and means stay exact)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for w in widths:
        table = torch.randint(-20, 21, (per_sub, w), generator=g).float()
        pick = torch.randint(per_sub, (n,), generator=g)
        pick[:per_sub] = torch.arange(per_sub)  # every entry occurs
        parts.append(table[pick])
    return torch.cat(parts, 1)


@pytest.mark.parametrize("d, subvectors, bits, per_sub", [(12, 4, 3, 8), (10, 3, 4, 11), (7, 7, 2, 3)])
def test_pq_exact_when_sub_vectors_are_centroids(d, subvectors, bits, per_sub):
    codec = PQCodec(d=d, subvectors=subvectors, bits=bits)
    assert sum(codec.widths) == d and max(codec.widths) - min(codec.widths) <= 1
    x = pq_data(300, codec.widths, per_sub)
    codec.fit(x, 0)
    enc = codec.encode(x, OFFSETS)
    assert sorted(enc) == sorted(f"code{j}" for j in range(subvectors))
    assert all(int(c.max()) < 1 << bits for c in enc.values())
    assert torch.equal(codec.decode(enc, OFFSETS), x)
    assert [tuple(cb.shape) for cb in codec.shared().values()] == [(1 << bits, w) for w in codec.widths]


def test_pq_picks_the_nearest_centroid_per_sub_vector():
    x = randn(400, 8)
    codec = fitted("pq", 8, {"subvectors": 2, "bits": 3}, x)
    enc = codec.encode(x, np.array([0, 400]))
    for j, (part, cb) in enumerate(zip(x.split(codec.widths, 1), codec.codebooks)):
        dist = torch.cdist(part, cb)
        chosen = dist.gather(1, torch.from_numpy(enc[f"code{j}"].astype(np.int64))[:, None])[:, 0]
        assert torch.all(chosen <= dist.min(1).values + 1e-4)


@HYP
@given(d=st.integers(1, 9), data=st.data(), bits=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_pq_property(d, data, bits, seed):
    subvectors = data.draw(st.integers(1, d))
    codec = PQCodec(d=d, subvectors=subvectors, bits=bits)
    x = pq_data(40, codec.widths, 1 << bits, seed)
    codec.fit(x, seed)
    assert torch.equal(round_trip(codec, x, np.array([0, 13, 40])), x)


# ---------------------------------------------------------------- item id


def item_data(n, d, n_items=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items + 1, d, generator=g)
    items = torch.randint(1, n_items + 1, (n,), generator=g).numpy()
    return table, items, table[items]


def test_itemid_bit_exact_on_item_data():
    table, items, x = item_data(300, 6)
    codec = fitted("itemid", 6, x=x, items=items)
    enc = codec.encode(x, OFFSETS, items=items)
    assert enc == {} and codec.fields() == [] and codec.bytes_per_token() == 0
    assert torch.equal(codec.decode(enc, OFFSETS, items=items), x)
    assert torch.equal(codec.table[np.unique(items)], table[np.unique(items)])


def test_itemid_refuses_a_stream_that_is_not_a_function_of_the_item():
    _, items, x = item_data(300, 6)
    noisy = x + 0.01 * randn(300, 6, seed=5, scale=1.0)
    with pytest.raises(CkvError, match="not a function of the item alone"):
        ItemIdCodec(d=6).fit(noisy, 0, items=items)
    loose = ItemIdCodec(d=6, tolerance=0.1)  # within the tolerance: accepted, error bounded by it
    loose.fit(noisy, 0, items=items)
    out = loose.decode({}, OFFSETS, items=items)
    assert float((out - noisy).norm(dim=1).max()) <= 0.1 * float(noisy.norm(dim=1).pow(2).mean().sqrt())
    codec = fitted("itemid", 6, x=x, items=items)
    with pytest.raises(CkvError, match="not a function of the item alone"):  # users encoded later are checked too
        codec.encode(noisy, OFFSETS, items=items)


def test_itemid_refuses_unseen_items_and_unverifiable_calibration():
    _, items, x = item_data(300, 6)
    codec = fitted("itemid", 6, x=x, items=items)
    unseen = np.setdiff1d(np.arange(1, 31), items)
    other = np.concatenate([items[:299], [unseen[0] if len(unseen) else 99]])
    with pytest.raises(CkvError, match="never seen in calibration"):
        codec.encode(x, OFFSETS, items=other)
    with pytest.raises(CkvError, match="never seen in calibration"):
        codec.decode({}, OFFSETS, items=np.array([10**6]))
    with pytest.raises(CkvError, match="no item occurs twice"):
        ItemIdCodec(d=6).fit(x[:5], 0, items=np.arange(1, 6))
    with pytest.raises(CkvError, match="before fit"):
        ItemIdCodec(d=6).encode(x, OFFSETS, items=items)


@HYP
@given(n=st.integers(2, 50), d=st.integers(1, 8), n_items=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_itemid_property(n, d, n_items, seed):
    _, items, x = item_data(n, d, n_items, seed)
    items[1] = items[0]  # at least one repeat
    x = x.clone()
    x[1] = x[0]
    codec = ItemIdCodec(d=d)
    codec.fit(x, seed, items=items)
    assert torch.equal(codec.decode({}, np.array([0, n]), items=items), x)


# ---------------------------------------------------------------- every codec: bytes, batches, validation


CASES = {  # name -> (params, d, data (x, items) for fit and encode)
    "bf16": ({}, 10, None), "int8": ({"group_size": 4}, 10, None),
    "int4": ({"group_size": 3, "axis": "channel"}, 7, None),
    "lowrank": ({"rank": 3}, 10, None), "pq": ({"subvectors": 3, "bits": 5}, 10, None), "itemid": ({}, 6, "items"),
}


def case(name, seed=0):
    params, d, kind = CASES[name]
    if kind == "items":
        _, items, x = item_data(300, d, seed=seed)
        codec = fitted(name, d, params, x, items=items)
        return codec, x, {"items": items}
    x = randn(300, d, seed=seed)
    return fitted(name, d, params, x), x, {}


@pytest.mark.parametrize("name", list(CASES))
def test_declared_bytes_match_the_stored_arrays(name):
    codec, x, kw = case(name)
    offsets = np.array([0, 100, 101, 296])  # 296 tokens: whole bytes for any bit width
    x = x[:296]
    kw = {k: v[:296] for k, v in kw.items()}
    enc = codec.encode(x, offsets, **kw)
    fields = {f.name: f for f in codec.fields()}
    assert set(enc) == set(fields)
    stored = 0
    for fname, arr in enc.items():
        f = fields[fname]
        assert f.per == "token" and len(arr) == 296
        if f.bits:
            assert arr.ndim == 1 and int(arr.max()) < 1 << f.bits
            stored += len(pack(arr, f.bits))
        else:
            assert arr.dtype == np.dtype(f.dtype) and arr.reshape(296, -1).shape[1] == f.width
            stored += arr.nbytes
        assert f.nbytes(296) == (len(pack(arr, f.bits)) if f.bits else arr.nbytes)
    assert stored == codec.bytes_per_token() * 296
    assert codec.bytes_per_user() == 0


def test_bytes_per_token_at_d64_with_default_parameters():
    got = {name: make_codec(name, 64, {}, kind).bytes_per_token()
           for name, kind in (("bf16", ""), ("int8", "k"), ("int8", "v"), ("int4", "k"), ("int4", "v"),
                              ("lowrank", ""), ("pq", ""), ("itemid", ""))}
    # int8: 64 codes + 2 groups x (scale, zero) fp16; int4: 32 bytes of codes + the same stats; keys spread
    # one (scale, zero) per channel over a group of 32 tokens: 2 x 64 x 2 bytes / 32 = 8 bytes per token too
    assert got == {"bf16": 128, "int8": 72, "int4": 40, "lowrank": 16, "pq": 8, "itemid": 0}


@pytest.mark.parametrize("name", list(CASES))
def test_encoding_users_in_batches_changes_nothing(name):
    """compress encodes users batch by batch and the artifact reads users one by one: fields must not depend on
    which other users are in the batch."""
    codec, x, kw = case(name)
    whole = codec.encode(x, OFFSETS, **kw)
    parts = []
    for a, b in ((0, 2), (2, 5)):
        sl = slice(int(OFFSETS[a]), int(OFFSETS[b]))
        parts.append(codec.encode(x[sl], OFFSETS[a : b + 1] - OFFSETS[a], **{k: v[sl] for k, v in kw.items()}))
    for fname in whole:
        np.testing.assert_array_equal(whole[fname], np.concatenate([p[fname] for p in parts]))


@pytest.mark.parametrize("name", list(CASES))
def test_shared_then_load_shared_reproduces_the_decode(name):
    codec, x, kw = case(name)
    enc = codec.encode(x, OFFSETS, **kw)
    fresh = make_codec(name, codec.d, {k: v for k, v in codec.params().items() if k != "d"})
    fresh.load_shared({k: v.clone() for k, v in codec.shared().items()})
    assert torch.equal(fresh.decode(enc, OFFSETS, **kw), codec.decode(enc, OFFSETS, **kw))


@pytest.mark.parametrize("name, params, fragment", [
    ("bf16", {"dtype": "float16"}, "bad parameters"),
    ("int8", {"group_size": 0}, "group size"),
    ("int4", {"group_size": 2.5}, "group size"),
    ("int8", {"axis": "head"}, "axis must be"),
    ("int4", {"bits": 4}, "bad parameters"),
    ("lowrank", {"rank": 0}, "rank"),
    ("lowrank", {"rank": 8}, "smaller than the vector width"),
    ("pq", {"subvectors": 9}, "cannot exceed the vector width"),
    ("pq", {"subvectors": 0}, "subvectors"),
    ("pq", {"bits": 0}, "bits"),
    ("pq", {"bits": 17}, "at most 16"),
    ("itemid", {"tolerance": -1}, "tolerance"),
    ("itemid", {"tolerance": "tight"}, "tolerance"),
])
def test_parameter_validation(name, params, fragment):
    with pytest.raises(CkvError, match=fragment) as e:
        make_codec(name, 8, params)
    assert "\n" not in str(e.value)


def test_fit_needs_enough_vectors_and_encode_needs_fit():
    with pytest.raises(CkvError, match="calibration vectors"):
        PQCodec(d=4, bits=6, subvectors=2).fit(randn(63, 4), 0)
    with pytest.raises(CkvError, match="calibration vectors"):
        LowRankCodec(d=8, rank=5).fit(randn(4, 8), 0)
    for codec in (PQCodec(d=4, subvectors=2), LowRankCodec(d=4, rank=2)):
        with pytest.raises(CkvError, match="before fit"):
            codec.encode(randn(3, 4), np.array([0, 3]))


def test_load_shared_rejects_mismatched_tensors():
    x = randn(300, 10)
    with pytest.raises(CkvError, match="metadata says"):
        make_codec("lowrank", 10, {"rank": 4}).load_shared(fitted("lowrank", 10, {"rank": 3}, x).shared())
    with pytest.raises(CkvError, match="metadata says"):
        make_codec("pq", 10, {"subvectors": 3, "bits": 4}).load_shared(
            fitted("pq", 10, {"subvectors": 3, "bits": 3}, x).shared())


# ---------------------------------------------------------------- plans and artifacts


def test_build_plan_gives_keys_per_channel_and_values_per_token():
    args = {"n_layers": 2, "d_k": 8, "d_v": 6, "n_items": 30, "timestamps": False}
    for name in ("int8", "int4"):
        plan = build_plan(name, {"group_size": 4}, **args)
        assert plan.streams["L1.k"].axis == "channel" and plan.streams["L1.v"].axis == "token"
        again = plan_from_description(json.loads(json.dumps(plan.describe())))
        assert again.streams["L1.k"].params() == plan.streams["L1.k"].params()
        assert again.fields() == plan.fields()
        forced = build_plan(name, {"axis": "token"}, **args)  # an explicit axis wins for both kinds
        assert forced.streams["L1.k"].axis == forced.streams["L1.v"].axis == "token"
    assert build_plan("lowrank", {"rank": 2}, **args).streams["L1.k"].params() == {"d": 8, "rank": 2}


PLAN_PARAMS = {"bf16": {}, "int8": {"group_size": 8}, "int4": {}, "lowrank": {"rank": 4},
               "pq": {"subvectors": 2, "bits": 4}, "itemid": {}}
MAX_REL_ERR = {"bf16": 1e-5, "int8": 1e-4, "int4": 0.01, "lowrank": 0.4, "pq": 0.25, "itemid": 0.0}  # about 2x measured
LENGTHS = [40, 1, 75, 33, 120, 31]


def item_flat(offsets, seed=0, noise=0.0, n_items=20):
    """Two layers: layer 0 a function of (item, position) (recomputed), layer 1 a function of the item alone
    (plus `noise`, which makes it per-user); the same item tables for every seed."""
    g = torch.Generator().manual_seed(1000)
    tk, tv = torch.randn(n_items + 1, 8, generator=g), torch.randn(n_items + 1, 6, generator=g)
    g = torch.Generator().manual_seed(seed)
    n = int(offsets[-1])
    items = torch.randint(1, n_items + 1, (n,), generator=g).numpy()
    k1 = tk[items] + noise * torch.randn(n, 8, generator=g)
    v1 = tv[items] + noise * torch.randn(n, 6, generator=g)
    pos = torch.from_numpy(np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets)))
    k0, v0 = fake_item_kv(torch.from_numpy(items)[None], pos[None])
    return flat_of(offsets, [k0[0], k1], [v0[0], v1], items, np.zeros(n, dtype=np.int64))


def fake_item_kv(items, positions):
    k = torch.stack([items.float() * (j + 1) + positions.float() for j in range(8)], -1)
    v = torch.stack([items.float() - j * positions.float() for j in range(6)], -1)
    return k, v


@pytest.mark.parametrize("name", list(PLAN_PARAMS))
def test_plan_and_artifact_round_trip(name, tmp_path):
    plan = build_plan(name, PLAN_PARAMS[name], n_layers=2, d_k=8, d_v=6, n_items=40, timestamps=False)
    assert isinstance(plan.streams["L0.k"], RecomputeCodec)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    noise = 0.0 if name == "itemid" else 0.3
    calib, flat = item_flat(offsets, seed=1, noise=noise), item_flat(offsets, seed=2, noise=noise)  # other users
    plan.fit(calib, seed=0)
    enc = plan.encode(flat)
    assert set(enc) == set(plan.fields()) - {"users/offsets"}
    dec = plan.decode(enc, flat.offsets, ItemKVModel(fake_item_kv))
    for a, b in ((flat.stream("L1.k"), dec.stream("L1.k")), (flat.stream("L1.v"), dec.stream("L1.v"))):
        assert float(((a - b) ** 2).sum() / (a**2).sum()) <= MAX_REL_ERR[name]
    assert torch.equal(dec.stream("L0.k"), flat.stream("L0.k"))

    path = tmp_path / f"{name}.safetensors"
    stored = write_artifact(path, plan, enc, flat.offsets, [f"u{i}" for i in range(len(LENGTHS))], {})
    n_tokens, n_users = int(offsets[-1]), len(LENGTHS)
    for fname, f in plan.fields().items():  # bytes on disk = bytes declared
        count = n_tokens if f.per == "token" else n_users + (fname == "users/offsets")
        assert stored[fname] == f.nbytes(count), fname
    art = Artifact.open(path)
    assert art.verify() == []
    assert art.plan.describe() == plan.describe()
    users = np.array([4, 0, 2])
    got = art.decode(users, ItemKVModel(fake_item_kv))
    rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in users])
    for a, b in ((dec.stream("L1.k")[rows], got.stream("L1.k")), (dec.stream("L1.v")[rows], got.stream("L1.v"))):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.items, flat.items[rows])


def test_plan_names_the_stream_itemid_refuses():
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    plan = build_plan("itemid", {}, n_layers=2, d_k=8, d_v=6, n_items=40, timestamps=False)
    with pytest.raises(CkvError, match=r"^L1\.k: itemid: this stream is not a function of the item alone"):
        plan.fit(item_flat(offsets, noise=0.05), seed=0)
