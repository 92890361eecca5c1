"""The `evict` codec (issue 6): token eviction masked out of attention. keep=1 is the fp16 plain codec exactly;
the kept tokens are the expected ones (recent / lowest key norm) in every layer, K and V; bytes counted are the
bytes stored; a dropped token cannot influence the output; the mask survives extend; artifacts and CTR refuse it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import N_ITEMS, make_model
from ckv_cli.codecs import CachePlan, EvictCodec, make_codec, plan_from_description
from ckv_cli.codecs.bits import packed_nbytes
from ckv_cli.codecs.evict import kept_counts
from ckv_cli.pipeline.compress import accounting
from ckv_cli.errors import CkvError
from ckv_cli.models.base import flatten, unflatten
from ckv_cli.pipeline.compress import full_width

LENGTHS = [12, 7, 1, 5, 10, 0]


def _setup(model, lengths=LENGTHS, seed=1):
    """A prefilled teacher cache of users with `lengths` tokens (flat), and one new event per user."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    items = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    ts = torch.cumsum(torch.randint(1, 5000, (B, L), generator=g), 1)
    cache, _ = model.prefill(items, ts, torch.tensor(lengths))
    last_items = torch.randint(1, N_ITEMS + 1, (B, 1), generator=g)
    last_ts = ts.max(1, keepdim=True).values + 7
    return flatten(cache), last_items, last_ts


def _plan(model, codec, params, recompute=True):
    from ckv_cli.codecs import build_plan

    return build_plan(model.cache_spec(), codec, params, n_items=N_ITEMS, recompute_free=recompute)


def _roundtrip(model, plan, flat):
    enc = plan.encode(flat)
    return enc, plan.decode(enc, flat.offsets, model)


@torch.no_grad()
def _append(model, flat, last_items, last_ts):
    return model.extend(unflatten(flat), last_items, last_ts)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("params, fragment", [
    ({"keep": 0}, "keep must be a fraction in (0, 1]"),
    ({"keep": 1.5}, "keep must be a fraction in (0, 1]"),
    ({"keep": -0.1}, "keep must be a fraction in (0, 1]"),
    ({"keep": float("nan")}, "keep must be a fraction in (0, 1]"),
    ({"keep": "half"}, "keep must be a fraction in (0, 1]"),
    ({"keep": True}, "keep must be a fraction in (0, 1]"),
    ({"policy": "oldest"}, "policy must be one of recent, keynorm, keynorm_high"),
    ({"bogus": 1}, "bad parameters for codec 'evict'"),
])
def test_parameter_validation(params, fragment):
    with pytest.raises(CkvError) as e:
        make_codec("evict", 16, params)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_defaults_and_description_roundtrip():
    c = make_codec("evict", 16, {"keep": 1})  # an int from the command line is a fraction too
    assert c.params() == {"d": 16, "keep": 1.0, "policy": "recent"}
    plan = _plan(make_model("sasrec"), "evict", {"keep": 0.25, "policy": "keynorm"})
    again = plan_from_description(plan.describe())
    assert again.describe() == plan.describe() and again.fields() == plan.fields()
    desc = plan.describe()
    desc["streams"]["L1.v"]["params"]["keep"] = 0.5  # two decisions per token: ill-defined
    with pytest.raises(CkvError, match="same keep and policy"):
        plan_from_description(desc)


def test_kept_counts():
    n = np.array([0, 1, 2, 3, 10, 199])
    assert kept_counts(n, 1.0).tolist() == n.tolist()
    assert kept_counts(n, 0.5).tolist() == [0, 1, 1, 2, 5, 100]
    assert kept_counts(n, 0.25).tolist() == [0, 1, 1, 1, 3, 50]
    assert kept_counts(np.array([10, 100]), 0.7).tolist() == [7, 70]  # 0.7 x 10 = 7.000000000000001 in floats
    for k in (0.1, 0.3, 0.9):
        assert kept_counts(np.arange(30), k).tolist() == [math.ceil(round(k * m, 9)) for m in range(30)]


# ---------------------------------------------------------------- exactness and the mask


@pytest.mark.parametrize("policy", ["recent", "keynorm", "keynorm_high"])
def test_keep_one_is_plain_fp16(model, policy):
    flat, li, lt = _setup(model)
    _, plain = _roundtrip(model, _plan(model, "plain", {"dtype": "float16"}), flat)
    _, ev = _roundtrip(model, _plan(model, "evict", {"keep": 1.0, "policy": policy}), flat)
    assert ev.keep.all()
    assert plain.streams.keys() == ev.streams.keys()
    assert all(torch.equal(plain.streams[n], ev.streams[n]) for n in plain.streams)
    c_plain, h_plain = _append(model, plain, li, lt)
    c_ev, h_ev = _append(model, ev, li, lt)
    assert torch.equal(h_plain, h_ev)
    assert torch.equal(model.score_all(h_plain[:, -1]), model.score_all(h_ev[:, -1]))


def _expected_keep(policy, keep, flat, keys):
    out = np.zeros(len(flat.items), dtype=bool)
    for b in range(len(flat.offsets) - 1):
        lo, hi = int(flat.offsets[b]), int(flat.offsets[b + 1])
        k = math.ceil(round(keep * (hi - lo), 9))
        if policy == "recent":
            chosen = range(hi - k, hi)
        else:
            norms = keys[lo:hi].float().norm(dim=1).tolist()
            sign = 1 if policy == "keynorm" else -1
            chosen = sorted(range(lo, hi), key=lambda t: (sign * norms[t - lo], -t))[:k]
        out[list(chosen)] = True
    return out


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("policy, keep", [("recent", 0.5), ("recent", 0.25), ("keynorm", 0.5), ("keynorm_high", 0.3)])
def test_masks_the_expected_tokens_in_every_stream(model, policy, keep, recompute):
    flat, *_ = _setup(model)
    plan = _plan(model, "evict", {"keep": keep, "policy": policy}, recompute)
    enc, dec = _roundtrip(model, plan, flat)
    decider = 1 if recompute else 0  # the first layer whose streams evict stores
    want = _expected_keep(policy, keep, flat, flat.stream(f"L{decider}.k"))
    np.testing.assert_array_equal(dec.keep, want)
    np.testing.assert_array_equal(plan.keep_mask(flat), want)
    assert plan.kept_tokens(flat.offsets) == want.sum() == sum(math.ceil(round(keep * n, 9)) for n in LENGTHS)
    kept, drop = torch.from_numpy(want), torch.from_numpy(~want)
    item = model.recompute(["L0.k", "L0.v"], flat.ids, flat.offsets)[0]
    for layer in range(len(model.layers)):
        for kind in ("k", "v"):
            x = dec.stream(CachePlan.key(layer, kind))
            assert (x[drop] == 0).all()
            exact = item[f"L0.{kind}"] if (recompute and layer == 0) else flat.stream(f"L{layer}.{kind}").half().float()
            assert torch.equal(x[kept], exact[kept])
            if not (recompute and layer == 0):
                assert enc[f"L{layer}.{kind}/x"].shape == (want.sum(), x.shape[1])
    assert ("tokens/keep" in enc) == (policy != "recent")
    if policy != "recent":
        np.testing.assert_array_equal(enc["tokens/keep"], want.astype(np.uint8))
    # attention reads the mask: unflatten -> KVCache.keep -> valid_mask
    cache = unflatten(dec)
    assert cache.valid_mask()[cache.length_mask()].numpy().tolist() == want.tolist()


def test_dropped_tokens_cannot_influence_the_output(model):
    flat, li, lt = _setup(model)
    _, dec = _roundtrip(model, _plan(model, "evict", {"keep": 0.4, "policy": "keynorm"}), flat)
    _, h = _append(model, dec, li, lt)
    drop = torch.from_numpy(~dec.keep)
    g = torch.Generator().manual_seed(5)
    for name, x in list(dec.streams.items()):
        x = x.clone()
        x[drop] = 100 * torch.randn(int(drop.sum()), x.shape[1], generator=g)
        dec.streams[name] = x
    _, h2 = _append(model, dec, li, lt)
    assert torch.equal(h, h2)
    # ... while a kept token does
    dec.streams["L1.k"] = dec.streams["L1.k"].clone()
    dec.streams["L1.k"][torch.from_numpy(dec.keep)] += 1.0
    assert not torch.equal(h, _append(model, dec, li, lt)[1])


def test_extend_carries_the_mask(model):
    flat, li, lt = _setup(model, lengths=[6, 3])
    _, dec = _roundtrip(model, _plan(model, "evict", {"keep": 0.5}), flat)
    c1, _ = _append(model, dec, li, lt)
    # the new event is kept; the evicted tokens stay masked at their positions
    assert c1.keep[0, :7].tolist() == [False, False, False, True, True, True, True]
    assert c1.keep[1, :4].tolist() == [False, True, True, True]
    assert c1.lengths.tolist() == [7, 4]
    c2, h2 = model.extend(c1, li, lt + 1)
    assert c2.keep[0, :8].tolist() == [False, False, False, True, True, True, True, True]
    assert c2.valid_mask().sum(1).tolist() == [5, 4] and c2.length_mask().sum(1).tolist() == [8, 5]


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("policy", ["recent", "keynorm"])
def test_bytes_counted_are_bytes_stored(model, policy):
    flat, *_ = _setup(model)
    plan = _plan(model, "evict", {"keep": 0.5, "policy": policy})
    enc, _ = _roundtrip(model, plan, flat)
    declared = plan.fields()
    assert set(declared) == set(enc) | {"users/offsets"}
    stored = {name: packed_nbytes(len(enc[name]), f.bits) if f.bits else enc[name].nbytes
              for name, f in declared.items() if name != "users/offsets"}
    stored["users/offsets"] = flat.offsets.nbytes
    acct = accounting(plan, flat.offsets, full_width(model))
    assert acct["per_user_breakdown"] == stored
    n, kept = int(flat.offsets[-1]), int(sum(kept_counts(np.array(LENGTHS), 0.5)))
    d_k, d_v = model.kv_dims
    want = (packed_nbytes(n, 6) + 8 * (len(LENGTHS) + 1) + kept * (d_k + d_v) * 2
            + (4 * n if model.arch == "hstu" else 0) + (packed_nbytes(n, 1) if policy != "recent" else 0))
    assert acct["per_user_bytes"] == want and acct["shared_bytes"] == 0
    codec = plan.streams["L1.k"]
    assert isinstance(codec, EvictCodec) and codec.bytes_per_token() == 0.5 * d_k * 2


def test_accounting_refuses_an_evict_plan_without_offsets(model):
    plan = _plan(model, "evict", {})
    with pytest.raises(CkvError, match="needs the user offsets"):
        accounting(plan, None, full_width(model), counts=(3, 30))


# ---------------------------------------------------------------- refusals elsewhere


def test_artifact_and_ctr_refuse_evict(tmp_path):
    from ckv_cli.artifact import ArtifactWriter
    from ckv_cli.codecs.evict import refuse_artifact

    with pytest.raises(CkvError, match="ckv evaluate CHECKPOINT --sweep") as e:
        refuse_artifact("evict")
    assert "\n" not in str(e.value)
    refuse_artifact("plain")
    writer = ArtifactWriter(tmp_path / "a.safetensors", np.array([3, 2]), ["u1", "u2"])
    with pytest.raises(CkvError, match="artifact format"):
        writer.start(_plan(make_model("sasrec"), "evict", {}))
    writer.discard()
    assert list(tmp_path.iterdir()) == []

    from ckv_cli.models import REGISTRY
    from ckv_cli.pipeline.compress import CompressOptions, make_plan
    from ckv_cli.train.ctr import model_config

    cls, _ = REGISTRY["sim"]
    ctr_model = cls(model_config("sim", 30, 5, 3, {"d": 8, "max_len": 20}))
    with pytest.raises(CkvError, match="next-item models only"):
        make_plan(ctr_model, CompressOptions(codec="evict", params={}))


def test_cli_compress_refuses_evict(tmp_path):
    from conftest import untrained_checkpoint
    from ckv_cli.data import load
    from test_compress import one_line_error, run_ckv

    ckpt = untrained_checkpoint("sasrec", load("ml-100k"), tmp_path / "s.safetensors", 16)
    for extra in ([], ["--shard-size", "512", "-o", tmp_path / "e.index.json"]):
        args = ["compress", ckpt, "--data", "ml-100k", "--codec", "evict", "--param", "keep=0.5"]
        proc = run_ckv(*args, *(extra or ["-o", tmp_path / "e.ckv.safetensors"]), cwd=tmp_path)
        one_line_error(proc, "codec evict", "ckv evaluate CHECKPOINT --sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
