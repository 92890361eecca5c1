"""Ranking metrics on hand-worked ranks; AUC, gAUC and logloss against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ckv_cli.metrics import (auc, gauc, hit_rate, logloss, mrr, ndcg, per_user_ranking, ranking_metrics,
                             ranks_from_scores)

RANKS = np.array([0, 3, 9, 10, 49, 50])


def test_hit_rate():
    assert hit_rate(RANKS, 10).tolist() == [1, 1, 1, 0, 0, 0]
    assert hit_rate(RANKS, 50).tolist() == [1, 1, 1, 1, 1, 0]
    assert hit_rate(RANKS, 1).tolist() == [1, 0, 0, 0, 0, 0]


def test_ndcg():
    expected10 = [1.0, 1 / math.log2(5), 1 / math.log2(11), 0, 0, 0]
    np.testing.assert_allclose(ndcg(RANKS, 10), expected10, rtol=0, atol=1e-15)
    expected50 = [1.0, 1 / math.log2(5), 1 / math.log2(11), 1 / math.log2(12), 1 / math.log2(51), 0]
    np.testing.assert_allclose(ndcg(RANKS, 50), expected50, rtol=0, atol=1e-15)


def test_mrr():
    np.testing.assert_allclose(mrr(RANKS), [1, 1 / 4, 1 / 10, 1 / 11, 1 / 50, 1 / 51], rtol=0, atol=1e-15)


def test_ranking_metrics_are_means():
    out = ranking_metrics(RANKS, ks=(10, 50))
    assert set(out) == {"HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR"}
    assert out["HR@10"] == pytest.approx(3 / 6)
    assert out["HR@50"] == pytest.approx(5 / 6)
    assert out["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 6)
    assert out["MRR"] == pytest.approx((1 + 1 / 4 + 1 / 10 + 1 / 11 + 1 / 50 + 1 / 51) / 6)
    per_user = per_user_ranking(RANKS)
    for k, v in out.items():
        assert len(per_user[k]) == len(RANKS) and per_user[k].mean() == pytest.approx(v)


def test_ranks_from_scores_ties_go_to_the_target():
    scores = np.array([[0.1, 0.5, 0.5, 0.2],
                       [0.1, 0.5, 0.5, 0.2],
                       [0.1, 0.5, 0.5, 0.2],
                       [0.3, 0.3, 0.3, 0.3]])
    assert ranks_from_scores(scores, np.array([1, 2, 3, 0])).tolist() == [0, 0, 2, 0]
    assert ranks_from_scores(scores[:1], np.array([0])).tolist() == [3]


def test_ranks_from_scores_matches_a_loop():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(40, 12)).astype(np.float32)  # many ties
    targets = rng.integers(0, 12, size=40)
    expected = [sum(scores[i, j] > scores[i, targets[i]] for j in range(12)) for i in range(40)]
    assert ranks_from_scores(scores, targets).tolist() == expected


def brute_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_against_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 120))
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[0], labels[1] = True, False  # both classes present
    scores = np.round(rng.random(n), 1)  # ten distinct values: many ties, across and within classes
    assert auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    assert auc(labels.astype(np.float32), scores.tolist()) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_auc_extremes():
    assert auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_gauc_hand_worked():
    # user 7: labels 1,0,0 scores .9,.5,.95 -> AUC 1/2, 3 samples
    # user 3: labels 1,1,0,0 scores .8,.3,.5,.3 -> pairs 1 + 1 + 0 + 1/2 = 2.5 of 4 -> 0.625, 4 samples
    # user 5: only positives, user 9: one negative -> skipped (no weight)
    rows = [(7, 1, .9), (3, 1, .8), (5, 1, .1), (7, 0, .5), (3, 1, .3), (9, 0, .7), (3, 0, .5), (7, 0, .95),
            (5, 1, .2), (3, 0, .3)]
    users, labels, scores = (np.array(c) for c in zip(*rows))
    expected = (0.5 * 3 + 0.625 * 4) / 7
    assert gauc(users, labels, scores) == pytest.approx(expected, abs=1e-12)
    # not the plain mean of the per-user AUCs, and not the pooled AUC
    assert abs(expected - (0.5 + 0.625) / 2) > 1e-3
    assert abs(gauc(users, labels, scores) - auc(labels, scores)) > 1e-3


def test_gauc_against_per_user_brute_force():
    rng = np.random.default_rng(11)
    users = rng.integers(0, 15, 300)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.random(300), 1)
    total = weight = 0.0
    for u in np.unique(users):
        m = users == u
        if labels[m].all() or not labels[m].any():
            continue
        total += brute_auc(labels[m], scores[m]) * m.sum()
        weight += m.sum()
    assert gauc(users, labels, scores) == pytest.approx(total / weight, abs=1e-12)


def test_gauc_with_no_two_class_user_is_nan():
    assert math.isnan(gauc(np.array([1, 1, 2]), np.array([1, 1, 0]), np.array([0.2, 0.3, 0.4])))


def test_logloss_against_formula():
    rng = np.random.default_rng(5)
    y = (rng.random(200) < 0.5).astype(np.float64)
    p = rng.uniform(0.01, 0.99, 200)
    direct = -np.mean([math.log(pi) if yi else math.log(1 - pi) for yi, pi in zip(y, p)])
    assert logloss(y, p) == pytest.approx(direct, rel=1e-12)
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))


def test_logloss_clips_certain_mistakes():
    value = logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert math.isfinite(value) and value == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert logloss(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
