"""Issue 18 parts 1-4 (ported from branch fidelity): held-out calibration, the predictive residual codec, fp16
pools, event times at a few bits, pool sizing and the --target search. Units on synthetic vectors; plans end to
end on ML-100K with tiny untrained models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.pipeline.compress import CompressOptions, compress
from ckv_cli.pipeline.holdout import fold_splits, heldout_compress, reserve_split, teacher_subset
from ckv_cli.tasks.next_item import Teacher


def rel(a, b):
    return float(((a - b) ** 2).sum() / (a**2).sum())


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def teachers(ds):
    out = {}
    for arch in ("sasrec", "hstu"):
        model = make_model(arch, n_items=ds.n_items, max_len=16)
        out[arch] = (model, Teacher.build(model, ds, 256))
    return out


# ---------------------------------------------------------------- held-out calibration (part 2)


def test_splits_are_disjoint_and_seeded():
    s = reserve_split(600, 1000, 0)
    assert len(s.calib) == 300 and not set(s.calib) & set(s.report) and len(s.calib) + len(s.report) == 600
    assert np.array_equal(reserve_split(600, 1000, 0).calib, s.calib)
    assert len(reserve_split(6040, 1000, 0).calib) == 1000
    folds = fold_splits(10, 2, 100, 0)
    for f in folds:
        assert not set(f.calib) & set(f.report)
    assert sorted(np.concatenate([f.report for f in folds]).tolist()) == list(range(10))
    with pytest.raises(CkvError):
        reserve_split(1, 10, 0)
    with pytest.raises(CkvError):
        fold_splits(10, 1, 5, 0)


def test_heldout_reports_only_users_it_did_not_fit_on(teachers):
    model, teacher = teachers["sasrec"]
    res = heldout_compress(model, teacher, CompressOptions(params={"pool_size": 32}, calib_users=100), bootstrap=50)
    n = teacher.n_users
    assert res.calib_users == 100 and res.report_users == n - 100
    assert res.accounting["users"] == n  # bytes of every user of the log
    sub = teacher_subset(teacher, np.array([3, 300, 700]))
    assert [int(u) for b in sub.batches for u in b.users] == [3, 300, 700]
    assert sub.flat.n_tokens == sum(b.tokens.n_tokens for b in sub.batches)


def test_compress_reports_the_held_out_users_apart(teachers, ds):
    """Default calibration on a 943-user log (calib_users 1000) is in-sample and says so; --calib-holdout fits on
    half of the users and reports the other half's metrics and reconstruction error, which is worse than the
    calibration users' (the in-sample error flatters)."""
    model, teacher = teachers["sasrec"]
    opts = CompressOptions(params={"pool_size": 256, "user_dim": 0, "layout": "residual"})
    insample = compress(model, ds, opts, teacher=teacher, keep_fields=False).metrics["calibration"]
    assert insample["in_sample"] and insample["held_out_users"] == 0 and "held_out" not in insample
    assert "in-sample" in insample["note"]
    held = compress(model, ds, CompressOptions(**{**opts.__dict__, "calib_holdout": True}), teacher=teacher,
                    keep_fields=False)
    cal = held.metrics["calibration"]
    assert cal["users"] == ds.n_users // 2 and cal["held_out_users"] == ds.n_users - ds.n_users // 2
    assert not cal["in_sample"] and cal["held_out"]["users"] == cal["held_out_users"]
    err_all, err_held = held.metrics["reconstruction_rel_mse"]["L1.k"], cal["held_out"]["reconstruction_rel_mse"]["L1.k"]
    assert err_held > err_all > 0  # the calibration users' tokens are coded better than the others'
    assert set(cal["held_out"]) >= {"uncompressed", "compressed", "delta", "fidelity"}


# ---------------------------------------------------------------- predictive codec (part 3)
from ckv_cli.codecs.collective import CollectiveCodec  # noqa: E402
from ckv_cli.codecs.plan import build_plan  # noqa: E402
from ckv_cli.codecs.predictive import PredictiveCodec, positions  # noqa: E402
from ckv_cli.codecs.joint import JointCodec  # noqa: E402
from ckv_cli.codecs.timecode import (BucketTimeCodec, anchors_and_gaps, candidate_gaps, fit_intervals,  # noqa: E402
                                     gap_bucket, query_delays)
from ckv_cli.pipeline.compress import accounting, full_width, make_plan, run_plan  # noqa: E402
from ckv_cli.tasks.next_item import Scored  # noqa: E402


def synthetic(n=3000, d=8, c=6, n_items=40, seed=0):
    """x = linear(context) + item effect + one of 16 cluster offsets + small noise."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(n, c, generator=g)
    w = torch.randn(c, d, generator=g)
    items = torch.randint(1, n_items, (n,), generator=g).numpy()
    item_eff = torch.randn(n_items, d, generator=g)
    centers = 3 * torch.randn(16, d, generator=g)
    x = ctx @ w + item_eff[items] + centers[torch.randint(0, 16, (n,), generator=g)] + 0.01 * torch.randn(n, d, generator=g)
    offsets = np.arange(0, n + 1, 30)
    return x, ctx, items, offsets


def test_predictive_codes_the_residual_of_its_prediction():
    x, ctx, items, off = synthetic()
    lin = PredictiveCodec(d=8, pool_size=16, predictor="linear+item", dtype="fp32")
    lin.fit(x, 0, items=items, context=ctx, user_offsets=off)
    xh = lin.decode(lin.encode(x, off, items=items, context=ctx), off, items=items, context=ctx)
    plain = CollectiveCodec(d=8, pool_size=16)
    plain.fit(x, 0)
    xp = plain.decode(plain.encode(x, off), off)
    assert rel(x, xh) < 0.01 < rel(x, xp)  # 16 entries suffice once the prediction is subtracted, not without


@pytest.mark.parametrize("predictor", ["linear", "item", "item+pos", "linear+item"])
def test_predictive_round_trips_through_its_shared_tensors(predictor):
    x, ctx, items, off = synthetic()
    a = PredictiveCodec(d=8, pool_size=32, predictor=predictor)
    a.fit(x, 3, items=items, context=ctx, user_offsets=off)
    enc = a.encode(x, off, items=items, context=ctx)
    assert enc["idx"].max() < 32 and a.fields()[0].bits == 5
    b = PredictiveCodec(d=8, **{k: v for k, v in a.params().items() if k != "d"})
    b.load_shared({k: v.clone() for k, v in a.shared().items()})
    assert torch.equal(a.decode(enc, off, items=items, context=ctx), b.decode(enc, off, items=items, context=ctx))
    assert all(t.dtype in (torch.float16, torch.int32) for t in a.shared().values())  # fp16 by default
    assert ("base" in a.shared()) == (not predictor.startswith("linear"))  # the linear map's last row is its bias
    c = PredictiveCodec(d=8, pool_size=32, predictor=predictor)  # deterministic: same inputs and seed, same indices
    c.fit(x, 3, items=items, context=ctx, user_offsets=off)
    assert np.array_equal(c.encode(x, off, items=items, context=ctx)["idx"], enc["idx"])


def test_predictive_unseen_items_fall_back_and_tables_keep_frequent_rows():
    x, ctx, items, off = synthetic()
    codec = PredictiveCodec(d=8, pool_size=16, predictor="item", min_count=60)
    codec.fit(x, 0, items=items, context=None, user_offsets=off)
    counts = np.bincount(items)
    assert set(codec.rows.tolist()) == set(np.nonzero(counts >= 60)[0].tolist())
    unseen = np.full(5, 10_000)  # never seen: the global mean, no error
    out = codec.decode({"idx": np.zeros(5, np.uint32)}, np.array([0, 5]), items=unseen)
    assert torch.allclose(out, codec.base + codec.pool[0])


def test_predictive_fp16_costs_half_the_shared_bytes():
    x, ctx, items, off = synthetic()
    sizes = {}
    for dt in ("fp16", "fp32"):
        c = PredictiveCodec(d=8, pool_size=64, predictor="linear", dtype=dt)
        c.fit(x, 0, items=items, context=ctx, user_offsets=off)
        sizes[dt] = sum(t.numel() * t.element_size() for t in c.shared().values())
    assert sizes["fp16"] * 2 == sizes["fp32"]


def test_predictive_max_rows_keeps_the_most_frequent_items():
    """`max_rows` keeps that many table rows, the most frequent items' (ties: the lower id); "pool": the pool's
    entries. Items past the cap fall back to the prediction without a row."""
    from ckv_cli.codecs.predictive import PredictiveCodec

    x, ctx, items, off = synthetic()
    counts = np.bincount(items)
    for cap, want in ((5, 5), ("pool", 16)):
        c = PredictiveCodec(d=8, pool_size=16, predictor="item", max_rows=cap)
        c.fit(x, 0, items=items, user_offsets=off)
        rows = c.rows.numpy()
        assert len(rows) == want and np.all(np.diff(rows) > 0)
        order = np.lexsort((np.arange(len(counts)), -counts))  # by count, then id
        assert set(rows) == set(order[:want])
        again = PredictiveCodec(**c.params())
        again.load_shared(c.shared())
        assert torch.equal(again.decode(c.encode(x, off, items), off, items), c.decode(c.encode(x, off, items), off, items))
    with pytest.raises(CkvError, match="max_rows"):
        PredictiveCodec(d=8, max_rows=-1)


def test_predictive_is_token_local_unless_it_reads_positions():
    """A store appends to a predictive stream token by token, except with `item+pos` (positions in the user's
    window) or `ema` (earlier tokens), whose new tokens it codes from the whole window (`codes_tail`)."""
    from ckv_cli.codecs.predictive import PredictiveCodec
    from ckv_cli.serve.store import Store

    assert [Store._appendable(PredictiveCodec(8, 4, predictor=p)) for p in ("linear", "item", "linear+item", "item+pos")] \
        == [True, True, True, False]
    assert not Store._appendable(PredictiveCodec(8, 4, predictor="linear+item", ema=0.1))  # reads earlier tokens
    joint = JointCodec(8, 8, "L1.v", "predictive", {"pool_size": 4, "predictor": "item+pos"})
    assert not Store._appendable(joint) and joint.codes_tail


def test_causal_ema_is_the_recurrence_per_window():
    """`causal_ema` equals e_j = (1 - a) e_{j-1} + a x_j per window, across its chunk boundaries; the flat form
    restarts at each user and equals the padded one."""
    from ckv_cli.codecs.predictive import causal_ema, causal_ema_flat

    g = torch.Generator().manual_seed(0)
    lengths = [150, 1, 0, 64, 65]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x = torch.randn(int(offsets[-1]), 6, generator=g)
    for alpha in (0.1, 0.5):
        want = torch.empty_like(x)
        for b in range(len(lengths)):
            e = torch.zeros(6)
            for t in range(offsets[b], offsets[b + 1]):
                e = (1 - alpha) * e + alpha * x[t]
                want[t] = e
        got = causal_ema_flat(x, offsets, alpha)
        assert torch.allclose(got, want, atol=1e-5)
        padded = torch.zeros(len(lengths), 150, 6)
        for b in range(len(lengths)):
            padded[b, : lengths[b]] = x[offsets[b] : offsets[b + 1]]
        out = causal_ema(padded, alpha)
        assert all(torch.allclose(out[b, : lengths[b]], want[offsets[b] : offsets[b + 1]], atol=1e-5)
                   for b in range(len(lengths)))


def test_least_squares_in_blocks_is_the_one_block_solution(monkeypatch):
    """The predictor's normal equations summed over row blocks (memory bounded by a block) give the one-block
    solution, for N a multiple of the block, not a multiple, and under one block; the fit recovers a known map."""
    from ckv_cli.codecs import predictive

    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    for n in (96, 100, 20):
        feats = torch.randn(n, 6, generator=g)
        x = (torch.cat([feats.double(), torch.ones(n, 1, dtype=torch.float64)], 1) @ w).float()
        x += 0.01 * torch.randn(n, 4, generator=g)
        monkeypatch.setattr(predictive, "LSQ_ROWS", 1 << 20)
        whole = predictive.least_squares(feats, x)
        monkeypatch.setattr(predictive, "LSQ_ROWS", 32)
        blocks = predictive.least_squares(feats, x)
        assert whole.dtype == torch.float64 and whole.shape == (7, 4)
        assert torch.allclose(blocks, whole, rtol=1e-10, atol=1e-12), n
        assert torch.allclose(whole, w, atol=0.05)


def test_predictive_ema_context_predicts_what_the_token_alone_cannot():
    """Vectors that carry a moving average of the earlier tokens' context: the linear predictor with `ema` of that
    rate predicts them (a small pool then suffices), without it the residual keeps the history."""
    from ckv_cli.codecs.predictive import causal_ema_flat

    x, ctx, items, off = synthetic()
    w = torch.randn(ctx.shape[1], 8, generator=torch.Generator().manual_seed(5))
    y = x + 3 * causal_ema_flat(ctx, off, 0.2) @ w
    err = {}
    for ema in (0.0, 0.2):
        c = PredictiveCodec(d=8, pool_size=16, predictor="linear+item", dtype="fp32", ema=ema)
        c.fit(y, 0, items=items, context=ctx, user_offsets=off)
        err[ema] = rel(y, c.decode(c.encode(y, off, items=items, context=ctx), off, items=items, context=ctx))
        assert c.weight.shape[0] == ctx.shape[1] * (2 if ema else 1) + 1
    assert err[0.2] < 0.01 < err[0.0]
    again = PredictiveCodec(**c.params())
    again.load_shared(c.shared())
    enc = c.encode(y, off, items=items, context=ctx)
    assert torch.equal(again.decode(enc, off, items=items, context=ctx), c.decode(enc, off, items=items, context=ctx))


@pytest.mark.parametrize("predictor,ema", [("linear+item", 0.2), ("item+pos", 0.0)])
def test_predictive_codes_a_tail_as_the_whole_window_codes_it(predictor, ema):
    """`encode(..., tail=)`: each user's newest tokens coded alone, their prediction read off the whole window
    (the earlier tokens' context, their positions), give the codes the whole window's encode gives them; a tail
    longer than its window is refused."""
    from ckv_cli.codecs.predictive import _tail_rows

    x, ctx, items, off = synthetic()
    c = PredictiveCodec(d=8, pool_size=16, predictor=predictor, dtype="fp32", ema=ema)
    c.fit(x, 0, items=items, context=ctx if c.uses_context else None, user_offsets=off)
    kw = {"context": ctx} if c.uses_context else {}
    whole = c.encode(x, off, items=items, **kw)["idx"]
    tail = np.minimum(np.diff(off), np.arange(len(off) - 1) % 4)  # 0 to 3 newest tokens per user
    rows = _tail_rows(off, tail)
    assert len(rows) == tail.sum() and all(
        (rows[a:b] == torch.arange(off[u + 1] - tail[u], off[u + 1])).all()
        for u, (a, b) in enumerate(zip(np.cumsum(tail) - tail, np.cumsum(tail))))
    got = c.encode(x[rows], off, items=items, tail=tail, **kw)["idx"]
    assert np.array_equal(got, whole[rows.numpy()])
    with pytest.raises(CkvError, match="tail longer"):
        c.encode(x[rows], off, items=items, tail=np.diff(off) + 1, **kw)


@pytest.mark.parametrize("bad", [{"predictor": "mlp"}, {"dtype": "bf16"}, {"shrink": -1}, {"min_count": 0},
                                 {"pool_size": 1}, {"ema": 1.0}, {"ema": -0.1}, {"ema": "0.1"},
                                 {"ema": 0.1, "predictor": "item"}])
def test_predictive_refuses_bad_parameters(bad):
    with pytest.raises(CkvError):
        PredictiveCodec(d=8, **bad)


def test_predictive_linear_needs_the_context():
    x, ctx, items, off = synthetic()
    with pytest.raises(CkvError, match="first layer"):
        PredictiveCodec(d=8, pool_size=16).fit(x, 0, items=items, context=None, user_offsets=off)


def test_positions_restart_at_each_user():
    assert positions(np.array([0, 3, 3, 5])).tolist() == [0, 1, 2, 0, 1]
    assert positions(np.array([10, 12, 13])).tolist() == [0, 1, 0]  # a batch's offsets need not start at 0


def test_collective_fp16_pool_is_what_the_encoder_routes_to():
    x, *_ = synthetic()
    off = np.array([0, len(x)])
    c = CollectiveCodec(d=8, pool_size=64, pool_dtype="fp16")
    c.fit(x, 0)
    assert c.shared()["pool"].dtype == torch.float16 and c.params()["pool_dtype"] == "fp16"
    assert torch.equal(c.pool, c.pool.half().float())
    d = CollectiveCodec(d=8, pool_size=64)
    d.fit(x, 0)
    assert "pool_dtype" not in d.params() and d.shared()["pool"].dtype == torch.float32
    assert abs(rel(x, c.decode(c.encode(x, off), off)) - rel(x, d.decode(d.encode(x, off), off))) < 1e-3
    with pytest.raises(CkvError):
        CollectiveCodec(d=8, pool_dtype="int8")


# ---------------------------------------------------------------- event times (part 3)


def test_gap_buckets_and_candidate_representatives():
    assert gap_bucket(np.array([0, 1, 2, 10**12]), 128).tolist() == [0, 2, 3, 91]
    c = candidate_gaps(128)
    got = set(gap_bucket(c, 128).tolist())
    assert 0 in c and 1 not in got and set(range(2, 129)) <= got  # every bucket with a whole second has one


def test_query_delays_are_gaps_between_a_users_consecutive_events():
    ts = np.array([0, 10, 30, 1000, 1000, 1005])
    d = query_delays(ts, np.array([0, 3, 6]), n=4)
    assert set(d.tolist()) <= {10, 20, 0, 5} and len(d) == 4  # never across users (30 -> 1000)


def test_anchor_is_each_users_newest_event():
    ts = np.array([5, 7, 9, 100, 100, 150])
    anchor, gaps = anchors_and_gaps(ts, np.array([0, 3, 3, 6]))
    assert anchor.tolist() == [9, 0, 150] and gaps.tolist() == [4, 2, 0, 50, 50, 0]


def test_intervals_merge_flat_buckets_and_keep_varying_ones_apart():
    w = np.zeros((1, 21))
    w[0, :7] = np.arange(7) * 10.0  # varies on buckets 0..6, flat after
    gaps = np.concatenate([[0] * 50, np.round(np.expm1((np.arange(2, 21) + 0.5) * 0.301)).repeat(50)]).astype(np.int64)
    bounds, reps = fit_intervals(gaps, np.zeros(1, np.int64), w, 8, 20)
    assert bounds[0] == 0 and bounds[-1] == 21 and len(reps) <= 8
    code = np.searchsorted(bounds, np.array([0, 2, 3, 4, 5, 6]), side="right") - 1
    assert gap_bucket(reps[code], 20).tolist() == [0, 2, 3, 4, 5, 6]  # each varying bucket read back as itself


def test_time_codec_exact_at_enough_bits_and_better_with_more():
    rng = np.random.default_rng(0)
    off = np.arange(0, 2001, 20)
    ts = np.sort(rng.integers(0, 10**8, 2000).reshape(100, 20), axis=1).reshape(-1)
    anchor, gaps = anchors_and_gaps(ts, off)
    delays = query_delays(ts, off)
    err = {}
    for bits in (8, 3):
        tc = BucketTimeCodec(bits=bits)
        tc.fit(ts, off)
        enc = tc.encode(ts, off)
        assert enc["code"].max() < 2**bits and np.array_equal(enc["anchor"][:, 0], anchor)
        g_new = np.repeat(anchor, 20) - tc.decode(enc, off)
        if bits == 8:  # every bucket its own interval: a query at the anchor's time reads every bucket exactly
            assert np.array_equal(gap_bucket(g_new, 128), gap_bucket(gaps, 128))
        err[bits] = np.mean([np.abs(gap_bucket(d + g_new, 128) - gap_bucket(d + gaps, 128)).mean() for d in delays])
    assert err[8] <= err[3] and err[8] < 0.2
    with pytest.raises(CkvError):
        BucketTimeCodec(bits=0)


# ---------------------------------------------------------------- plans on ML-100K (tiny untrained models)


def test_plan_with_predictive_and_time_bits_round_trips(teachers):
    model, teacher = teachers["hstu"]
    opts = CompressOptions(codec="predictive", params={"pool_size": 64, "time_bits": 4}, calib_users=200)
    plan = make_plan(model, opts)
    assert plan.time is not None and plan.time_weights.shape == (2, 129)
    plan.fit(teacher.flat, 0)
    enc = plan.encode(teacher.flat)
    assert "tokens/timestamps" not in enc and enc["time/code"].max() < 16
    acct = accounting(plan, teacher.flat.offsets, full_width(model))
    assert acct["per_user_breakdown"]["time/code"] == (teacher.flat.n_tokens * 4 + 7) // 8
    assert "tokens/timestamps" not in acct["per_user_breakdown"]
    dec = plan.decode(enc, teacher.flat.offsets, model)
    assert rel(teacher.flat.stream("L1.k"), dec.stream("L1.k")) < 0.5
    assert plan.describe()["time"]["bits"] == 4 and plan.describe()["streams"]["L1.v"]["codec"] == "predictive"


def test_time_bits_keep_hstu_scores_close(teachers):
    model, teacher = teachers["hstu"]
    out = {}
    for bits in (0, 1, 8):
        plan = build_plan(model.cache_spec(), "plain", {"dtype": "float32", "time_bits": bits},
                          n_items=model.config.n_items, time_weights=model.time_bias_tables())
        plan.fit(teacher.flat, 0)
        scorer = Scored(None, keep_per_user=True)
        run_plan(model, plan, teacher.batches[:1], scorer, keep_fields=False)
        scorer.finish()
        out[bits] = scorer.per_user["top10_overlap"].mean()
    # int32 times are exact; 8 bits keep every bucket at the anchor's time (a later query may cross a bucket edge:
    # this tiny model's random bias tables make that costly), 1 bit keeps two intervals
    assert out[0] == 1.0 and out[8] > out[1] and out[8] >= 0.85


def test_time_bits_refused_for_models_without_event_times(teachers):
    model, _ = teachers["sasrec"]
    with pytest.raises(CkvError, match="no event times"):
        make_plan(model, CompressOptions(params={"pool_size": 64, "time_bits": 4}))
    with pytest.raises(CkvError, match="time_bits must be"):
        make_plan(teachers["hstu"][0], CompressOptions(params={"pool_size": 64, "time_bits": -1}))


def test_predictive_refused_without_a_recomputed_first_layer(teachers):
    model, teacher = teachers["sasrec"]
    plan = make_plan(model, CompressOptions(codec="predictive", params={"pool_size": 16}, recompute_item_layers=False))
    with pytest.raises(CkvError, match="L0.k: .*first layer"):
        plan.fit(teacher.flat, 0)


def test_predictive_artifact_decodes_as_the_plan(teachers, ds, tmp_path):
    """`ckv compress --codec predictive` writes an artifact whose reader decodes what the plan decoded."""
    from ckv_cli.artifact.reader import Artifact
    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.compress import compress_to_artifact

    model, _ = teachers["sasrec"]
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids),
                    metrics={}, train={})
    opts = CompressOptions(codec="predictive", params={"pool_size": 64, "predictor": "linear+item"}, calib_users=200)
    rep = compress_to_artifact(model, {"arch": "sasrec", "item_vocab": list(ds.item_ids)}, ckpt, ds, opts,
                               tmp_path / "a.safetensors")
    assert rep["plan"]["streams"]["L1.k"]["codec"] == "predictive" and rep["metrics"]["calibration"]["held_out_users"] > 0
    art = Artifact.open(tmp_path / "a.safetensors")
    assert "shared/L1.k/weight" in rep["accounting"]["shared_breakdown"]
    assert art.plan.describe() == rep["plan"] and art.plan.streams["L1.k"].predictor == "linear+item"
    users = np.array([0, 5, 942])
    res = compress(model, ds, opts, users=users)
    dec = art.decode(users, model)
    again = res.plan.decode(res.fields, res.offsets, model)
    for name in ("L1.k", "L1.v"):
        assert torch.allclose(dec.stream(name), again.stream(name), atol=1e-5)
        assert rel(res.plan.decode(res.fields, res.offsets, model).stream(name), dec.stream(name)) < 1e-8


# ---------------------------------------------------------------- pool sizing (part 1) and --target (part 4)
from ckv_cli.pipeline.sizing import choose_pool_sizes, shared_warning, user_split, within_budget  # noqa: E402
from ckv_cli.pipeline.target import Setting, parse_target, search  # noqa: E402


def test_user_split_is_disjoint():
    fit, val = user_split(10, 0.2, 0)
    assert len(val) == 2 and not set(fit) & set(val) and len(fit) == 8
    with pytest.raises(CkvError):
        user_split(1, 0.2, 0)


def test_sizing_picks_the_smallest_pool_meeting_the_target(teachers):
    model, teacher = teachers["sasrec"]

    def plan_for(m):
        return make_plan(model, CompressOptions(codec="predictive", params={"pool_size": m}))

    n_tok = teacher.flat.n_tokens
    loose = choose_pool_sizes(plan_for, teacher.flat, n_tok, model, target=1.0, candidates=(16, 64, 256))
    assert set(loose) == {"L1.k", "L1.v"}
    assert {c.pool_size for c in loose.values()} == {16} and all(c.met for c in loose.values())
    tight = choose_pool_sizes(plan_for, teacher.flat, n_tok, model, target=0.0, candidates=(16, 64))
    for c in tight.values():
        assert not c.met and len(c.trials) == 2 and "no size" in c.reason
        assert c.trials[0]["total_bytes"] < c.trials[1]["total_bytes"]


def test_pool_size_auto_in_compress(teachers, ds):
    """`--pool-size auto`: each stream gets its own size, recorded in the plan, and the report says why."""
    model, teacher = teachers["sasrec"]
    opts = CompressOptions(codec="predictive", params={"pool_size": "auto", "predictor": "item"}, calib_users=300)
    res = compress(model, ds, opts, teacher=teacher, keep_fields=False)
    sizing = res.calibration["pool_sizing"]
    assert set(sizing["streams"]) == {"L1.k", "L1.v"} and "held-out" in sizing["rule"]
    for name, choice in sizing["streams"].items():
        assert res.plan.streams[name].pool_size == choice["pool_size"] and choice["trials"]
        if choice["met"]:
            assert choice["trials"][-1]["error"] <= sizing["target_error"]


def test_shared_warning_only_when_shared_exceeds_per_user():
    acct = {"shared_bytes": 10, "per_user_bytes": 5, "users": 3, "total_ratio_fp16": 0.1, "per_user_ratio_fp16": 0.03}
    assert "exceed" in shared_warning(acct)
    assert shared_warning({**acct, "shared_bytes": 5}) is None


def test_budget_spends_bits_where_the_error_falls_most():
    trials = {"L1.k": [{"pool_size": 256, "error": 0.30}, {"pool_size": 512, "error": 0.20}],
              "L1.v": [{"pool_size": 256, "error": 0.10}, {"pool_size": 512, "error": 0.09}]}
    got = within_budget(trials, 17)
    assert got["L1.k"].pool_size == 512 and got["L1.v"].pool_size == 256  # the extra bit goes to K
    assert {c.pool_size for c in within_budget(trials, 18).values()} == {512}
    with pytest.raises(CkvError):
        within_budget(trials, 15)


def test_target_parsing():
    assert parse_target("overlap=0.9").metric == "overlap"
    t = parse_target("NDCG@10=1%")
    assert t.metric == "NDCG@10" and t.relative and abs(t.value - 0.01) < 1e-12
    for bad in ("overlap", "overlap=1.5", "foo=1", "NDCG@10=x", "kl=5%", "HR@10=-1"):
        with pytest.raises(CkvError):
            parse_target(bad)


def test_target_needs_its_measure_to_clear_it_by_a_margin_of_standard_errors():
    """A setting meets a target when its measure, moved `margin` standard errors of the mean toward failing,
    still meets it (the search keeps the cheapest of many noisy passes); margin 0 compares the mean alone."""
    from ckv_cli.pipeline.target import MARGIN

    over = np.array([0.8, 1.0] * 50)  # mean 0.9, standard error 0.01005
    se = over.std(ddof=1) / np.sqrt(len(over))
    t = parse_target("overlap=0.9")
    met, measured, bound = t.met({"top10_overlap": 0.9}, {}, {}, {"top10_overlap": over})
    assert not met and measured == 0.9 and bound == pytest.approx(0.9 - MARGIN * se)
    assert t.met({"top10_overlap": 0.9}, {}, {}, {"top10_overlap": over}, margin=0)[0]
    assert parse_target("overlap=0.885").met({"top10_overlap": 0.9}, {}, {}, {"top10_overlap": over})[0]
    assert t.met({"top10_overlap": 0.9}, {}, {})[:2] == (True, 0.9)  # no per-user values: the mean
    kl = parse_target("kl=0.02").met({"kl_mean": 0.019}, {}, {}, {"kl": np.array([0.009, 0.029] * 50)})
    assert not kl[0] and kl[2] > 0.019
    ref_r, new_r = np.ones(100), np.where(np.arange(100) % 10 == 0, 20.0, 1.0)  # 10 of 100 hits lost at rank 20
    per = {"rank_ref": ref_r, "rank_new": new_r}
    ref, new = {"HR@10": 1.0}, {"HR@10": 0.9}
    met, drop, bound = parse_target("HR@10=0.12").met({}, ref, new, per)
    lost = (new_r > 10).astype(float)  # the paired per-user drop of HR@10
    assert drop == pytest.approx(0.1) and bound == pytest.approx(0.1 + MARGIN * lost.std(ddof=1) / 10)
    assert not met and parse_target("HR@10=0.12").met({}, ref, new, per, margin=0)[0]
    rel = parse_target("HR@10=10%").met({}, ref, new, per)
    assert rel[1] == pytest.approx(0.1) and rel[2] == pytest.approx(bound)  # the reference is 1: relative = absolute


def test_target_search_keeps_the_smallest_setting_that_meets_it(teachers):
    model, teacher = teachers["sasrec"]
    settings = [Setting("collective", (("pool_size", 16),)), Setting("collective", (("pool_size", 256),)),
                Setting("predictive", (("pool_size", 16),))]
    calib = np.arange(0, 943, 3)
    res = search(model, teacher, calib, parse_target("overlap=0.01"), CompressOptions(), settings)
    assert res.chosen is not None and res.chosen.label.endswith("pool_size=16")
    skipped = [t for t in res.tried if t["status"].startswith("skipped")]
    assert skipped and skipped[0]["setting"] == "collective:pool_size=256"  # larger per-user bytes than the best total
    never = search(model, teacher, calib, parse_target("overlap=1.0"), CompressOptions(), settings[:1])
    assert never.chosen is None and never.tried[0]["met"] is False


@pytest.mark.slow  # ~30 s: every setting of the default grid is fitted (twice)
def test_target_options_on_a_calibration_teacher(teachers, ds):
    """What `ckv compress --target` runs: the search on the calibration users' teacher only, bytes over the log."""
    from ckv_cli.pipeline.target import target_options

    model, _ = teachers["sasrec"]
    opts, searched = target_options(model, ds, CompressOptions(calib_users=200), parse_target("overlap=0.01"))
    assert searched["chosen"] is not None and opts.codec in ("collective", "predictive")
    assert searched["fit_users"] + searched["validation_users"] == 200
    assert not any("time_bits" in r["setting"] for r in searched["tried"])
    with pytest.raises(CkvError, match="no setting"):
        target_options(model, ds, CompressOptions(calib_users=50), parse_target("kl=0"))


@pytest.mark.slow  # about a minute: the target search fits every setting of its grid
def test_cli_target_and_pool_size_auto(ds, tmp_path, subprocess_env):
    """`ckv compress --target` prints the settings tried and records the search; `--pool-size auto` records the
    size chosen per stream; `--calib-holdout` prints the held-out rows. One process each, ML-100K, tiny model."""
    import json
    import subprocess
    import sys

    from conftest import untrained_checkpoint

    ckpt = untrained_checkpoint("sasrec", ds, tmp_path / "m.safetensors", 16)

    def ckv(*args):
        return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                              env=subprocess_env, cwd=tmp_path, timeout=600)

    p = ckv("compress", ckpt, "--data", "ml-100k", "-o", "t.safetensors", "--target", "overlap=0.01",
            "--calib-users", "100", "--calib-holdout", "--json", "t.json")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["target_search"]["chosen"] in p.stdout and "--target overlap=0.01" in p.stdout
    assert rep["metrics"]["calibration"]["held_out_users"] == ds.n_users - 100 and "held out of calibration" in p.stdout
    p = ckv("compress", ckpt, "--data", "ml-100k", "-o", "a.safetensors", "--codec", "predictive", "--pool-size",
            "auto", "--param", "predictor=item", "--calib-users", "200", "--json", "a.json")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "a.json").read_text())
    sizes = {n: c["pool_size"] for n, c in rep["pool_sizing"]["streams"].items()}
    assert sizes == {n: rep["plan"]["streams"][n]["params"]["pool_size"] for n in sizes} and "pool size auto" in p.stdout
    assert "in-sample" not in p.stdout  # 200 of 943 users calibrate: the others are held out


def test_distillation_keeps_fp16_pools(teachers, ds):
    """A distilled collective pool is rounded back to fp16 when frozen (what the artifact holds); a predictive plan
    has nothing to distil (refused in one line)."""
    from ckv_cli.pipeline.compress import fit_and_distill

    model, teacher = teachers["sasrec"]
    opts = CompressOptions(params={"pool_size": 64, "user_dim": 0, "layout": "residual", "pool_dtype": "fp16"},
                           calib_users=100, distill_steps=2, batch_users=32)
    plan, history, _ = fit_and_distill(model, ds, opts, teacher=teacher)
    pool = plan.streams["L1.k"].pool
    assert len(history) == 2 and torch.equal(pool, pool.half().float())
    opts = CompressOptions(codec="predictive", params={"pool_size": 64}, calib_users=100, distill_steps=1, batch_users=32)
    with pytest.raises(CkvError, match="collective"):
        fit_and_distill(model, ds, opts, teacher=teacher)


def test_store_serves_and_appends_to_a_predictive_artifact(teachers, ds, tmp_path):
    """`CacheStore` over a predictive artifact: compressed-domain and decoded attention agree, and an appended event
    is encoded with its first-layer context, as compressing the longer history would."""
    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.compress import compress_to_artifact
    from ckv_cli.serve.next_item import CacheStore

    model, _ = teachers["sasrec"]
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids),
                    metrics={}, train={})
    opts = CompressOptions(codec="predictive", params={"pool_size": 64, "predictor": "linear+item"}, calib_users=200)
    compress_to_artifact(model, {"arch": "sasrec", "item_vocab": list(ds.item_ids)}, ckpt, ds, opts,
                         tmp_path / "p.safetensors")
    users = [str(u) for u in ds.user_ids[:5]]
    with CacheStore.open(tmp_path / "p.safetensors", model) as store:
        fast = store.rank_next(users, k=10)
        exact = store.rank_next(users, k=10, attention="decoded")
        assert np.array_equal(fast.items, exact.items)
        before = store.fetch_flat(users[:1])
        n = before.n_tokens
        assert n < model.config.max_len  # room for one more: the new token is merged, old ones kept
        store.append(users[0], [1])
        after = store.fetch_flat(users[:1])
        assert after.n_tokens == n + 1
        for name in ("L1.k", "L1.v"):
            assert torch.allclose(after.stream(name)[:n], before.stream(name), atol=1e-5)
        assert store._appendable(store.plan.streams["L1.k"])  # token-local: the old tokens' codes are kept
        # the new token as the plan codes it with its first layer: re-encoding the user gives the same record
        again = store.plan.decode(store.plan.encode(after), after.offsets, model)
        assert torch.allclose(again.stream("L1.k"), after.stream("L1.k"), atol=1e-5)
