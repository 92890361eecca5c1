"""The CTR task and models (SIM, ETA, SDIM, TWIN, no-history): data rules, cache = no cache, edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckv_cli.tasks.ctr import evaluate_ctr, predict
from ckv_cli.train.ctr import CTRTrainConfig, build_model, length_bucketed_batches, train_ctr
from ckv_cli.data.ctr import N_GAPS, build_ctr, gap_buckets
from ckv_cli.data.readers import Log
from ckv_cli.data.sequences import build
from ckv_cli.models import REGISTRY, TASKS
from ckv_cli.models.target_attention import last_window, top_k_tokens

CTR_ARCHS = [a for a, t in TASKS.items() if t == "ctr"]
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def synthetic_log(seed: int = 0, long_user_events: int = 1500) -> Log:
    """Users of very different lengths (one of 3 events, one longer than 1000), ratings 1..5, same-second ties."""
    rng = np.random.default_rng(seed)
    users, items, times, ratings = [], [], [], []
    for u, n in enumerate([3, 4, 8, 40, 120, long_user_events]):
        t = np.sort(rng.integers(0, 10_000, n)) * 60  # many same-minute ties
        t[1::7] = t[0::7][: len(t[1::7])]  # and some exact same-second ties
        t = np.sort(t)
        users += [f"u{u}"] * n
        items += [f"m{k}" for k in rng.integers(0, 30, n)]
        times += list(t)
        ratings += list(rng.integers(1, 6, n))
    genres = {f"m{k}": [GENRES[k % 4]] + ([GENRES[(k // 4) % 4]] if k % 3 == 0 else []) for k in range(30)}
    return Log(np.array(users, dtype=object), np.array(items, dtype=object), np.array(times, dtype=np.int64),
               np.array(ratings, dtype=np.float32), genres)


@pytest.fixture(scope="module")
def ctr():
    return build_ctr(build(synthetic_log(), "synthetic"), max_history=1000)


def small_model(ctr, arch, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(ctr, arch, {"d": 16, "d_attn": 32, "n_heads": 4, "short_len": 5, "top_k": 7, **overrides}
                        if arch != "nohistory" else {"d": 16, "d_attn": 32, "n_heads": 4, **overrides})
    with torch.no_grad():  # random rating/gap tables so that a wrong side feature changes the output
        model.emb.rating.weight.normal_()
        model.emb.gap.weight.normal_()
    return model.eval()


# -- the data rules --------------------------------------------------------------------------------------------
def test_history_is_strictly_earlier_and_capped(ctr):
    seq = ctr.seq
    for e in range(len(seq.items)):
        a, b = ctr.hist_start[e], ctr.hist_end[e]
        u = ctr.users[e]
        assert seq.offsets[u] <= a <= b <= e
        assert b - a <= 1000
        assert (seq.timestamps[a:b] < seq.timestamps[e]).all()  # nothing of the same second or later
        # and nothing strictly earlier is left out, except beyond the 1000 cap
        earlier = np.flatnonzero((np.arange(len(seq.items)) >= seq.offsets[u]) & (np.arange(len(seq.items)) < seq.offsets[u + 1])
                                 & (seq.timestamps < seq.timestamps[e]))
        assert b - a == min(len(earlier), 1000)
    assert (ctr.hist_end - ctr.hist_start).max() == 1000  # the long user reaches the cap


def test_time_split_is_global(ctr):
    t = ctr.seq.timestamps
    train, valid, test = (t[ctr.samples(s)] for s in ("train", "valid", "test"))
    assert train.max() < valid.min() and valid.max() < test.min()
    assert len(train) > len(valid) > 0 and len(test) > 0
    assert ctr.labels.tolist() == (ctr.seq.ratings >= 4).astype(np.float32).tolist()


def test_gap_buckets():
    t = np.array([100, 100, 101, 1_000_000_000, 5, 6], dtype=np.int64)
    first = np.array([True, False, False, False, True, False])
    assert gap_buckets(t, first).tolist() == [1, 2, 3, min(2 + 29, N_GAPS - 1), 1, 3]


def test_batch_carries_per_event_features(ctr):
    events = ctr.samples("test")[:9]
    b = ctr.batch(events)
    for i, e in enumerate(events):
        n = int(b.lengths[i])
        span = slice(ctr.hist_start[e], ctr.hist_end[e])
        assert b.items[i, :n].tolist() == ctr.seq.items[span].tolist()
        assert b.ratings[i, :n].tolist() == ctr.rating_bucket[span].tolist()
        assert b.gaps[i, :n].tolist() == ctr.gap_bucket[span].tolist()
        assert (b.items[i, n:] == 0).all() and b.targets[i] == ctr.seq.items[e]


def test_needs_ratings():
    from ckv_cli.errors import CkvError

    log = synthetic_log()
    log.ratings = None
    with pytest.raises(CkvError, match="needs a rating column"):
        build_ctr(build(log, "x"))


# -- models: the cache equals no cache, on every shape that broke the authors' code ----------------------------
@pytest.mark.parametrize("arch", CTR_ARCHS)
def test_cache_scores_equal_forward(ctr, arch):
    model = small_model(ctr, arch)
    events = np.arange(len(ctr.seq.items))
    for chunk in (events[:1], events[3:4], events[:64], events[-300:], events[-1:], events[::37]):
        b = ctr.batch(chunk)
        with torch.no_grad():
            direct = model(b)
            cache = model.prefill(b)
            cached = model.score(cache, b.users, b.targets)
        assert direct.shape == (len(chunk),) and torch.isfinite(direct).all()
        assert (direct - cached).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", [a for a in CTR_ARCHS if a != "nohistory"])
def test_prefill_names_every_history_branch(ctr, arch):
    model = small_model(ctr, arch)
    events = ctr.samples("test")[-4:]
    b = ctr.batch(events)
    cache = model.prefill(b)
    assert set(cache.branches) == {"short", "long"}
    short, long = cache.branches["short"], cache.branches["long"]
    assert short.lengths.tolist() == b.lengths.clamp(max=5).tolist()
    assert long.lengths.tolist() == b.lengths.tolist() and long.values.shape[1] == b.items.shape[1]
    if arch == "sdim":
        assert long.keys is None and long.codes.shape[:2] == b.items.shape
    else:
        assert long.keys.shape == (4, b.items.shape[1], 32)
    # per-event K/V: the same item with another rating gets other keys
    b2 = ctr.batch(events)
    b2.ratings = torch.where(b2.ratings > 0, 6 - b2.ratings, 0)
    other = model.prefill(b2).branches["short"]
    changed = b2.ratings[:, -5:] != b.ratings[:, -5:]
    if changed.any():
        assert not torch.allclose(short.keys, other.keys)


@pytest.mark.parametrize("arch", CTR_ARCHS)
def test_scores_depend_on_the_history(ctr, arch):
    """A history model reads the history; the baseline must not."""
    model = small_model(ctr, arch)
    b = ctr.batch(ctr.samples("test")[-8:])
    with torch.no_grad():
        full = model(b)
        b.lengths = torch.zeros_like(b.lengths)
        empty = model(b)
    assert torch.equal(full, empty) == (arch == "nohistory")


def test_last_window_and_top_k():
    idx, valid = last_window(torch.tensor([0, 2, 9]), 4)
    assert idx.shape == (3, 4) and valid.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]
    assert idx[2].tolist() == [5, 6, 7, 8] and idx[1, :2].tolist() == [0, 1]
    key = torch.tensor([[0, 1, 1, 0, 1]])
    i, v = top_k_tokens(key, torch.tensor([[True, True, True, True, False]]), 2)
    assert sorted(i[0].tolist()) == [1, 2] and v.all()  # token 4 is invalid; ties go to the more recent
    i, v = top_k_tokens(torch.zeros(1, 3), torch.tensor([[True, False, False]]), 5)
    assert i.shape == (1, 3) and v.tolist() == [[True, False, False]]


def test_sim_reads_same_genre_tokens_only(ctr):
    model = small_model(ctr, "sim")
    b = ctr.batch(ctr.samples("test")[-3:])
    valid = torch.arange(b.items.shape[1])[None] < b.lengths[:, None]
    idx, v = model.select(b.targets, None, b.items, valid, None, None)
    g = model.emb.genres > 0
    for r in range(3):
        picked = b.items[r, idx[r][v[r]]]
        assert (g[picked] & g[b.targets[r]]).any(-1).all()
        assert v[r].sum() == min(7, int(((g[b.items[r]] & g[b.targets[r]]).any(-1) & valid[r]).sum()))


def test_twin_stage_one_uses_the_attention_keys(ctr):
    model = small_model(ctr, "twin")
    b = ctr.batch(ctr.samples("test")[-2:])
    cache = model.prefill(b)
    target = model.emb.target(b.targets)
    valid = torch.arange(b.items.shape[1])[None] < b.lengths[:, None]
    idx, v = model.select(b.targets, target, b.items, valid, cache.branches["long"].keys, None)
    rel = model.long.scores(model.long.q(target), cache.branches["long"].keys).sum(1)
    for r in range(2):
        chosen = rel[r, idx[r][v[r]]]
        rest = rel[r][valid[r]]
        assert chosen.min() >= torch.topk(rest, min(7, len(rest))).values.min() - 1e-6


# -- training and evaluation ------------------------------------------------------------------------------------
def test_length_bucketed_batches_cover_each_event_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 1000, 1000)
    batches = length_bucketed_batches(lengths, 32, rng, chunk=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))


def test_training_is_seeded_and_learns(ctr):
    cfg = CTRTrainConfig(epochs=2, batch_size=32, lr=3e-3, train_samples=0, patience=2,
                         model={"d": 16, "d_attn": 32, "n_heads": 4, "short_len": 5, "top_k": 7})
    m1, h1, _, n = train_ctr(ctr, "sim", cfg)
    m2, h2, _, _ = train_ctr(ctr, "sim", cfg)
    assert n == len(ctr.samples("train"))
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert h1[-1]["loss"] < 0.7  # below chance (log 2 = 0.693) on its own training events
    metrics = evaluate_ctr(m1, ctr, "test")
    assert set(metrics) == {"AUC", "gAUC", "logloss", "samples", "users"} and metrics["samples"] == len(ctr.samples("test"))


def test_predict_keeps_input_order(ctr):
    model = small_model(ctr, "eta")
    events = ctr.samples("test")
    p = predict(model, ctr, events, batch_size=7)
    q = np.array([predict(model, ctr, events[i : i + 1])[0] for i in range(0, len(events), 25)])
    assert np.allclose(p[::25], q, atol=1e-6)


def test_registry_has_every_ctr_arch():
    assert set(CTR_ARCHS) == {"sim", "eta", "sdim", "twin", "nohistory"}
    for arch in CTR_ARCHS:
        cls, _ = REGISTRY[arch]
        assert cls.__doc__ or cls.__module__
