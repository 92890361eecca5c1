"""The fast nearest-centroid search, router argmax and k-means give what the plain float32 code gave (issue 19):
the same index (first on ties), the same centroids bit for bit, the same runs twice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import clustered
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.kmeans import BoundedAssign, kmeans, kmeans_pp
from ckv_cli.codecs.nearest import argmax_rows, linear_argmax, linear_topk, nearest


# ---------------------------------------------------------------- the reference: the code at 0652c50


def ref_nearest(x, c):
    bias = (c * c).sum(1)
    chunk = max(1, (1 << 22) // len(c))
    return torch.cat([(2 * x[a : a + chunk] @ c.T - bias).argmax(1) for a in range(0, len(x), chunk)])


def ref_route(x, w, b):
    chunk = max(1, (1 << 22) // len(w))
    return torch.cat([(x[a : a + chunk] @ w.T + b).argmax(1) for a in range(0, len(x), chunk)])


def ref_kmeans(x, m, seed=0, iters=20, seed_sample=20000):
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    m = min(m, x.shape[0])
    sample = x[torch.randperm(x.shape[0], generator=gen)[: max(seed_sample, m)]]
    centroids = kmeans_pp(sample, m, gen) if m <= 512 else sample[:m].clone()
    for _ in range(iters):
        assign = ref_nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=m).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            err = ((x - centroids[assign]) ** 2).sum(1)
            centroids[empty] = x[err.topk(int(empty.sum())).indices]
    return centroids


# ---------------------------------------------------------------- argmax and nearest


@pytest.mark.parametrize("m", [3, 255, 256, 511, 512, 513, 1000, 4096])
def test_blocked_argmax_is_torch_argmax_with_ties(m):
    g = torch.Generator().manual_seed(m)
    s = torch.randint(-3, 4, (300, m), generator=g).float()  # many exact ties per row
    assert torch.equal(argmax_rows(s), s.argmax(1))
    s[5, m // 2] = float("nan")  # NaN counts as the maximum, as in torch
    assert torch.equal(argmax_rows(s), s.argmax(1))


@pytest.mark.parametrize("n, m, d", [(1, 300, 8), (513, 700, 16), (2049, 4100, 32), (3000, 2, 4)])
def test_nearest_equals_the_reference_with_ties(n, m, d):
    g = torch.Generator().manual_seed(n + m)
    x, c = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    c[m // 2] = c[0]  # duplicate centroids: exact ties, the first index wins
    x[: min(5, n, m)] = c[: min(5, n, m)]
    assert torch.equal(nearest(x, c), ref_nearest(x, c))
    xi, ci = torch.randint(-2, 3, (n, d), generator=g).float(), torch.randint(-2, 3, (m, d), generator=g).float()
    assert torch.equal(nearest(xi, ci), ref_nearest(xi, ci))  # integer data: ties everywhere


def test_one_row_chunks_give_the_same_index():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(37, 16, generator=g), torch.randn(600, 16, generator=g)
    assert torch.equal(nearest(x, c, chunk=1), nearest(x, c))


def test_untied_router_argmax_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(3000, 32, generator=g), torch.randn(1500, 32, generator=g), torch.randn(1500, generator=g)
    assert torch.equal(linear_argmax(x, w, b), ref_route(x, w, b))


def test_linear_topk_is_the_plain_topk_in_chunks():
    """The k best rows of the chunked scores are those of the plain expression (in chunks of 7 rows and of one,
    scaled or not); the first is the argmax; k past m is cut to m."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(300, 16, generator=g), torch.randn(90, 16, generator=g), torch.randn(90, generator=g)
    for chunk, scale in ((7, 1.0), (1, 2.0), (None, 1.0)):
        got = linear_topk(x, w, b, 5, chunk=chunk, x_scale=scale)
        want = torch.topk((scale * x) @ w.T + b, 5, dim=1).indices
        assert got.shape == (300, 5) and torch.equal(got, want), chunk
        assert torch.equal(got[:, 0], linear_argmax(x, w, b, x_scale=scale))
    assert linear_topk(x[:4], w, b, 500).shape == (4, 90)


def test_collective_router_tied_and_untied():
    x = clustered(6000, 16, 40, seed=3)
    codec = CollectiveCodec(16, pool_size=600, iters=4)
    codec.fit(x, seed=0)
    assert torch.equal(codec._route(x), ref_nearest(x, codec.pool))  # tied: the nearest pool entry
    g = torch.Generator().manual_seed(4)
    codec.router_w = codec.router_w + 0.3 * torch.randn(codec.router_w.shape, generator=g)  # distilled apart
    codec.router_b = codec.router_b + torch.randn(codec.router_b.shape, generator=g)
    codec.router_tied = False
    assert torch.equal(codec._route(x), ref_route(x, codec.router_w, codec.router_b))
    assert not torch.equal(codec._route(x), ref_nearest(x, codec.pool))  # the untied router is not the nearest


def test_router_with_gradients_is_refused_nowhere():
    codec = CollectiveCodec(8, pool_size=64, iters=2)
    codec.fit(clustered(500, 8, 10, seed=5), seed=0)
    codec.trainable()  # leaves that require grad (distillation)
    x = torch.randn(100, 8)
    assert torch.equal(codec._route(x), ref_route(x, codec.router_w.detach(), codec.router_b.detach()))


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("n, m, d, iters", [(3000, 600, 8, 10), (12000, 1200, 16, 8), (5000, 100, 4, 5), (4000, 300, 6, 6)])
def test_kmeans_equals_plain_lloyd_bit_for_bit(n, m, d, iters):
    x = clustered(n, d, max(4, m // 3), seed=n + m)
    x[100:200] = x[:100]  # duplicate points
    stats: list[int] = []
    c, assign = kmeans(x, m, seed=3, iters=iters, return_assign=True, stats=stats)
    ref = ref_kmeans(x, m, seed=3, iters=iters)
    assert torch.equal(c, ref)
    assert torch.equal(assign, ref_nearest(x, ref))
    if m > 4 * 17:
        assert sum(stats[1:]) < (len(stats) - 1) * n  # the bounds did skip points


def test_kmeans_with_ties_everywhere():
    g = torch.Generator().manual_seed(6)
    x = torch.randint(-3, 4, (20000, 8), generator=g).float()  # integer points: exact ties between centroids
    assert torch.equal(kmeans(x, 1024, iters=6), ref_kmeans(x, 1024, iters=6))


def test_kmeans_is_deterministic():
    x = clustered(8000, 12, 50, seed=7)
    a, b = kmeans(x, 1500, seed=5, iters=6), kmeans(x, 1500, seed=5, iters=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(x, 1500, seed=6, iters=6))


def test_bounded_assign_follows_moving_centroids():
    x = clustered(5000, 10, 30, seed=8)
    g = torch.Generator().manual_seed(9)
    c = x[torch.randperm(5000, generator=g)[:700]].clone()
    assigner = BoundedAssign(x)
    for step in range(6):  # arbitrary moves, some centroids jump far
        assert torch.equal(assigner(c), ref_nearest(x, c))
        c = c + 0.05 * torch.randn(c.shape, generator=g)
        c[step * 7 : step * 7 + 5] = torch.randn(5, 10, generator=g) * 3
    assert sum(assigner.computed[1:]) < 5 * 5000


@pytest.mark.slow
def test_sasrec_sample_vectors_equal_the_reference():
    """Real vectors: the pooled streams of the SASRec sample's caches (120 users of ML-1M, ~12k tokens each)."""
    from pathlib import Path

    from ckv_cli.data import load
    from ckv_cli.models.base import flatten
    from ckv_cli.models.checkpoint import load_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, make_plan
    from ckv_cli.spec import FlatCache
    from ckv_cli.tasks.next_item import iter_test_caches

    ckpt = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "sasrec-ml1m.safetensors"
    model, meta = load_checkpoint(ckpt)
    ds = load("ml-1m", item_vocab=meta["item_vocab"])
    users = np.arange(0, ds.n_users, 50)[:120]
    flat = FlatCache.concat([flatten(b.cache) for b in iter_test_caches(model, ds, users, 128)])
    plan = make_plan(model, CompressOptions())
    assert plan.coded()
    for name in plan.coded():
        x = flat.stream(name).float()
        c, assign = kmeans(x, 1000, seed=1, iters=5, return_assign=True)
        ref = ref_kmeans(x, 1000, seed=1, iters=5)
        assert torch.equal(c, ref), name
        assert torch.equal(assign, ref_nearest(x, ref)), name


@pytest.mark.parametrize("pool_dtype", ["fp32", "fp16"])
def test_residual_basis_uses_the_stored_pools_assignment(pool_dtype):
    """The fit reuses k-means' assignment for the residual basis only where the stored pool is k-means' own
    (fp32); an fp16 pool is rounded, so its tokens are routed again (what encode will pick)."""
    x = clustered(4000, 8, 30, seed=11)
    codec = CollectiveCodec(8, pool_size=300, user_dim=2, iters=4, pool_dtype=pool_dtype)
    codec.fit(x, seed=0)
    res = x - codec.pool[ref_nearest(x, codec.pool)]
    basis = torch.linalg.svd(res, full_matrices=False).Vh[:2].T
    assert torch.allclose(basis.abs(), codec.basis.abs(), atol=1e-5)
