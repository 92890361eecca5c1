"""KV-cache semantics of SASRec and HSTU: prefill == prefill-a-prefix + extend, one event at a time, overflow."""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.data.batching import history_batch
from ckv_cli.models import REGISTRY, last_hidden

N_ITEMS = 50  # conftest's small models
TOL = 1e-5
MAX_LEN = 32


def histories(lengths, seed=0):
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, N_ITEMS + 1, n) for n in lengths]
    # increasing timestamps with gaps from seconds to months, so HSTU's time buckets vary; one tie included
    times = [1_000_000 + np.cumsum(rng.choice([0, 5, 600, 86_400, 3_000_000], n)) for n in lengths]
    return items, times


def batch(items, times, max_len=MAX_LEN):
    return history_batch(items, times, max_len)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_same_cache(c1, c2, tol=TOL):
    assert c1.n_layers == c2.n_layers
    assert torch.equal(c1.lengths, c2.lengths)
    assert torch.equal(c1.items, c2.items)
    assert torch.equal(c1.timestamps, c2.timestamps)
    for i in range(c1.n_layers):
        assert maxdiff(c1.keys[i], c2.keys[i]) <= tol
        assert maxdiff(c1.values[i], c2.values[i]) <= tol


def prefix_and_rest(items, times, prefix):
    head = [x[:p] for x, p in zip(items, prefix)], [t[:p] for t, p in zip(times, prefix)]
    tail = [x[p:] for x, p in zip(items, prefix)], [t[p:] for t, p in zip(times, prefix)]
    return head, tail


@torch.no_grad()
def test_prefix_then_extend_equals_prefill(model):
    lengths = [10, 1, 7, 20, 5, 3]
    prefix = [4, 0, 7, 1, 5, 2]  # user 1: a single event, all of it new; user 2: prefix is everything (0 new)
    items, times = histories(lengths)
    it, ts, L = batch(items, times)
    full_cache, h = model.prefill(it, ts, L)

    (hi, ht), (ti, tt) = prefix_and_rest(items, times, prefix)
    pi, pt, pl = batch(hi, ht)
    ni, nt, nl = batch(ti, tt)
    assert pl.tolist() == prefix and nl.tolist() == [6, 1, 0, 19, 0, 1]
    cache1, h1 = model.prefill(pi, pt, pl)
    cache2, h2 = model.extend(cache1, ni, nt, nl)

    assert cache2.lengths.tolist() == lengths
    assert_same_cache(cache2, full_cache)
    for b, (p, n) in enumerate(zip(prefix, nl.tolist())):  # every valid hidden state, not only the last
        assert maxdiff(h1[b, :p], h[b, :p]) <= TOL
        assert maxdiff(h2[b, :n], h[b, p:p + n]) <= TOL

    last_full = last_hidden(h, L)
    last_split = torch.where((nl > 0)[:, None], last_hidden(h2, nl), last_hidden(h1, pl))
    assert maxdiff(last_split, last_full) <= TOL
    s_full, s_split = model.score_all(last_full), model.score_all(last_split)
    assert maxdiff(s_split[:, 1:], s_full[:, 1:]) <= TOL
    # the comparison has teeth: different users really do get different scores
    assert maxdiff(s_full[0, 1:], s_full[3, 1:]) > 1e-3


@torch.no_grad()
def test_one_event_at_a_time_equals_prefill(model):
    lengths = [9, 1, 4, 12]
    items, times = histories(lengths, seed=1)
    it, ts, L = batch(items, times)
    full_cache, h = model.prefill(it, ts, L)

    cache = model.empty_cache(len(lengths))
    last = torch.zeros(len(lengths), h.shape[-1])
    for step in range(max(lengths)):
        active = torch.tensor([step < n for n in lengths])
        step_items = torch.tensor([[int(x[step]) if step < len(x) else 0] for x in items])
        step_times = torch.tensor([[int(t[step]) if step < len(t) else 0] for t in times])
        cache, hs = model.extend(cache, step_items, step_times, active.long())
        for b in range(len(lengths)):
            if active[b]:
                assert maxdiff(hs[b, 0], h[b, step]) <= TOL
        last = torch.where(active[:, None], hs[:, 0], last)
    assert_same_cache(cache, full_cache)
    assert maxdiff(model.score_all(last)[:, 1:], model.score_all(last_hidden(h, L))[:, 1:]) <= TOL


@torch.no_grad()
def test_cached_tokens_do_not_move_when_extending(model):
    lengths = [8, 3, 12]
    prefix = [5, 3, 2]
    items, times = histories(lengths, seed=2)
    (hi, ht), (ti, tt) = prefix_and_rest(items, times, prefix)
    cache1, _ = model.prefill(*batch(hi, ht))
    old_keys = [k.clone() for k in cache1.keys]
    old_values = [v.clone() for v in cache1.values]
    ni, nt, nl = batch(ti, tt)
    cache2, _ = model.extend(cache1, ni, nt, nl)
    for b, p in enumerate(prefix):
        assert torch.equal(cache2.items[b, :p], cache1.items[b, :p])
        assert torch.equal(cache2.timestamps[b, :p], cache1.timestamps[b, :p])
        for i in range(model.config.n_layers):
            assert torch.equal(cache2.keys[i][b, :p], old_keys[i][b, :p])  # bit-identical, same slots
            assert torch.equal(cache2.values[i][b, :p], old_values[i][b, :p])
            assert torch.equal(cache1.keys[i], old_keys[i])  # extend did not write into the old cache
        assert cache2.items[b, p:lengths[b]].tolist() == items[b][p:].tolist()  # new tokens appended after


@torch.no_grad()
def test_overflowing_extend_slides_the_window(model):
    lengths = [45, 12, 33, 70]
    prefix = [30, 12, 32, 10]  # user 1 fits, user 2 starts full, user 3 adds more than a whole window
    items, times = histories(lengths, seed=3)
    (hi, ht), (ti, tt) = prefix_and_rest(items, times, prefix)
    cache1, _ = model.prefill(*batch(hi, ht))
    ni, nt, nl = batch(ti, tt, max_len=100)
    cache2, h2 = model.extend(cache1, ni, nt, nl)
    assert cache2.lengths.tolist() == [MAX_LEN, 12, MAX_LEN, MAX_LEN]

    wi, wt, wl = batch(items, times)  # prefill of the most recent MAX_LEN events
    window_cache, hw = model.prefill(wi, wt, wl)
    assert_same_cache(cache2, window_cache)
    new = nl > 0
    assert new.tolist() == [True, False, True, True]
    assert maxdiff(last_hidden(h2, nl)[new], last_hidden(hw, wl)[new]) <= TOL
    # the window really moved: the cache now starts at event 13 (45 - 32) for user 0, not at its first event
    assert cache2.items[0].tolist() == items[0][-MAX_LEN:].tolist() != items[0][:MAX_LEN].tolist()


@torch.no_grad()
def test_overflow_one_event_at_a_time(model):
    n = MAX_LEN + 7
    items, times = histories([n], seed=4)
    cache, _ = model.prefill(*batch([items[0][:MAX_LEN]], [times[0][:MAX_LEN]]))
    for step in range(MAX_LEN, n):
        cache, hs = model.extend(cache, torch.tensor([[int(items[0][step])]]), torch.tensor([[int(times[0][step])]]))
        assert int(cache.lengths[0]) == MAX_LEN
        wi, wt, wl = batch([items[0][: step + 1]], [times[0][: step + 1]])
        window_cache, hw = model.prefill(wi, wt, wl)
        assert maxdiff(hs[0, 0], hw[0, -1]) <= TOL
    assert_same_cache(cache, window_cache)
    assert cache.items[0].tolist() == items[0][-MAX_LEN:].tolist()


@torch.no_grad()
def test_batch_of_one_matches_its_row_in_a_batch(model):
    lengths = [6, 11, 2]
    items, times = histories(lengths, seed=5)
    it, ts, L = batch(items, times)
    _, h = model.prefill(it, ts, L)
    scores = model.score_all(last_hidden(h, L))

    one_i, one_t, one_l = batch(items[1:2], times[1:2])
    cache, h1 = model.prefill(one_i[:, :7], one_t[:, :7], torch.tensor([7]))
    cache, h1b = model.extend(cache, one_i[:, 7:], one_t[:, 7:])
    assert cache.lengths.tolist() == [11] and h1b.shape == (1, 4, model.config.d)
    s1 = model.score_all(h1b[:, -1])
    assert s1.shape == (1, N_ITEMS + 1)
    assert maxdiff(s1[:, 1:], scores[1:2, 1:]) <= TOL


@torch.no_grad()
def test_score_all(model):
    items, times = histories([5, 3])
    it, ts, L = batch(items, times)
    s = model.score_all(last_hidden(model.prefill(it, ts, L)[1], L))
    assert s.shape == (2, N_ITEMS + 1)
    assert torch.isneginf(s[:, 0]).all()  # padding can never be recommended
    assert torch.isfinite(s[:, 1:]).all() and s[:, 1:].abs().max() <= 1 + 1e-5  # cosine scores
    assert torch.equal(model(it, ts, L), model.prefill(it, ts, L)[1])  # forward is the prefill path


def test_eval_is_deterministic_and_train_mode_uses_dropout(model):
    m = model
    items, times = histories([10, 4])
    it, ts, L = batch(items, times)
    with torch.no_grad():
        assert torch.equal(m.prefill(it, ts, L)[1], m.prefill(it, ts, L)[1])
        m.train()
        torch.manual_seed(1)
        a = m.prefill(it, ts, L)[1]
        torch.manual_seed(2)
        b = m.prefill(it, ts, L)[1]
    assert maxdiff(a, b) > 0


def test_registry():
    from ckv_cli.models import TASKS

    assert set(REGISTRY) == set(TASKS) == {"sasrec", "hstu", "sim", "eta", "sdim", "twin", "nohistory"}
    for name, (cls, cfg_cls) in REGISTRY.items():
        cfg = cfg_cls(n_items=3) if TASKS[name] == "next-item" else cfg_cls(n_items=3, n_users=2, n_genres=1)
        assert cls.arch == name and cfg.n_items == 3


def test_last_hidden():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert last_hidden(h, torch.tensor([2, 4])).tolist() == [h[0, 1].tolist(), h[1, 3].tolist()]


def test_small_table_lookup_matches_indexing():
    from ckv_cli.models.hstu import small_table_lookup

    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, requires_grad=True)
    idx = torch.randint(0, 7, (3, 5, 4), generator=g)
    upstream = torch.randn(3, 5, 4, generator=g)
    (w[idx] * upstream).sum().backward()
    expected, w.grad = w.grad.clone(), None
    out = small_table_lookup(w, idx)
    (out * upstream).sum().backward()
    assert torch.equal(out, w.detach()[idx])
    assert torch.allclose(w.grad, expected, atol=1e-6)
