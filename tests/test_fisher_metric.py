"""Pools fitted and routed in the model's Fisher metric (`--param metric=fisher`: `ckv_cli.codecs.metric`,
`ckv_cli.tasks.fisher`): the router picks the entry nearest in the metric, the fit lowers the metric's error, the
Fisher matrix is the second-order KL of the evaluated distribution, and artifacts hold the factor, read back,
append and refuse damage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from conftest import make_model, rewrite, untrained_checkpoint
from ckv_cli import CacheStore
from ckv_cli.artifact import Artifact
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.metric import factor, fit_pool, router
from ckv_cli.codecs.nearest import linear_argmax as route
from ckv_cli.codecs.predictive import PredictiveCodec
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.spec import FlatCache
from ckv_cli.tasks.fisher import data_grams
from ckv_cli.tasks.next_item import iter_test_caches, scores_after_last_event, temperature_of


def _gram(d: int, seed: int, spread: float = 30.0) -> torch.Tensor:
    """A random SPD matrix whose eigenvalues span `spread`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, np.log10(spread), d, dtype=torch.float64)) @ q.T


def test_router_picks_the_entry_nearest_in_the_metric():
    g = torch.Generator().manual_seed(1)
    x, pool = torch.randn(500, 12, generator=g), torch.randn(64, 12, generator=g)
    L = factor(_gram(12, 2))
    got = route(x, *router(pool, L))
    d2 = (((x[:, None, :] - pool[None]).double() @ L.double()) ** 2).sum(2)  # (N, m) in float64
    best = d2.min(1).values
    assert torch.all(d2[torch.arange(len(x)), got] <= best * (1 + 1e-5))
    assert not torch.equal(got, route(x, *router(pool, None)))  # the metric changes choices
    assert torch.equal(route(x, *router(pool, None)), (((x[:, None] - pool[None]) ** 2).sum(2)).argmin(1))


def test_metric_pool_is_the_metric_kmeans_mapped_back():
    """fit_pool in a (non-diagonal) metric: the pool in metric coordinates is k-means there (z = x L, pool = z L^-1)."""
    from ckv_cli.codecs.kmeans import kmeans

    x = torch.randn(800, 6, generator=torch.Generator().manual_seed(4))
    L = factor(_gram(6, 5))
    pool = fit_pool(x, 16, seed=0, iters=5, L=L)
    torch.testing.assert_close(pool @ L, kmeans(x @ L, 16, seed=0, iters=5), rtol=1e-4, atol=1e-5)


def test_metric_fit_lowers_the_metric_error_and_stores_the_pool_in_x():
    """On anisotropic data with a metric that weighs other directions, the metric fit wins in the metric and loses
    in plain squared error (the trade it makes); decode returns pool rows in x's coordinates."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6000, 8, generator=g) * torch.tensor([4.0, 3, 2, 1, 0.5, 0.5, 0.3, 0.2])
    fit, test = x[:4000], x[4000:]
    gram = torch.diag(torch.tensor([0.01, 0.01, 0.1, 1, 10, 10, 20, 20], dtype=torch.float64))
    L = factor(gram)
    errs = {}
    for metric in ("l2", "fisher"):
        c = CollectiveCodec(d=8, pool_size=64, metric=metric, pool_dtype="fp16")
        c.fit(fit, seed=0, fisher=gram if metric == "fisher" else None)
        off = np.array([0, len(test)])
        dec = c.decode(c.encode(test, off), off)
        assert torch.equal(dec, c.pool[torch.from_numpy(c.encode(test, off)["idx"].astype(np.int64))])
        e = dec - test
        errs[metric] = (float((e ** 2).sum()), float(((e @ L) ** 2).sum()))
    assert errs["fisher"][1] < 0.7 * errs["l2"][1]
    assert errs["fisher"][0] > errs["l2"][0]


def test_parameters_and_missing_fisher_are_refused():
    with pytest.raises(CkvError, match="metric must be one of"):
        CollectiveCodec(d=8, metric="cosine")
    with pytest.raises(CkvError, match="residual layout"):
        CollectiveCodec(d=8, metric="fisher", layout="concat", user_dim=2)
    with pytest.raises(CkvError, match="needs the model's Fisher matrix"):
        CollectiveCodec(d=8, pool_size=4, metric="fisher").fit(torch.randn(50, 8), seed=0)
    with pytest.raises(CkvError, match="8-wide"):
        PredictiveCodec(d=4, pool_size=4, predictor="item", metric="fisher").fit(
            torch.randn(50, 4), seed=0, items=np.ones(50, dtype=np.int64), fisher=_gram(8, 0))
    with pytest.raises(CkvError, match="is zero"):
        factor(torch.zeros(4, 4))


# ---------------------------------------------------------------- the Fisher matrix of a real model (ML-100K)


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


def test_fisher_is_the_second_order_kl_of_the_scores(ds):
    """With one cached token per user (window 2), e^T F e over the users equals 2 sum KL(p || p_e) / eps^2 for a
    small error eps e on that token's L1 key (F estimated from items drawn from p; 10% tolerance)."""
    torch.manual_seed(0)
    model = make_model("sasrec", n_items=ds.n_items, max_len=2)
    with torch.no_grad():  # sharper scores than the untrained init, so the KL is not flat
        model.item_emb.weight.mul_(20.0)
    users = np.arange(40)
    from ckv_cli.tasks import fisher as fisher_mod

    grams = fisher_mod.fisher_grams(model, fisher_mod._without_grad(iter_test_caches(model, ds, users, 40)),
                                    {"L1.k": ("L1.k",)}, samples=400, seed=0)
    e = torch.randn(model.config.d, generator=torch.Generator().manual_seed(5))
    e = e / e.norm()
    quad = float(e.double() @ grams["L1.k"] @ e.double()) / 400  # per sample: the gram sums the draws
    T, eps = temperature_of(model), 1e-2
    kl = 0.0
    with torch.no_grad():
        for b in iter_test_caches(model, ds, users, 40):
            flat = model.flatten(b.cache)
            assert flat.n_tokens == len(users)  # one cached token per user
            logp = F.log_softmax(scores_after_last_event(model, b.cache, b)[:, 1:].double() / T, -1)  # float64: KL ~ 1e-6
            moved = FlatCache(flat.offsets, dict(flat.streams), dict(flat.ids))
            moved.set_stream("L1.k", flat.stream("L1.k") + eps * e)
            logq = F.log_softmax(scores_after_last_event(model, model.unflatten(moved), b)[:, 1:].double() / T, -1)
            p = logp.exp()
            kl += float(torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum())
    assert quad > 0
    assert abs(2 * kl / eps**2 - quad) < 0.1 * quad


def test_fisher_grams_are_symmetric_psd_and_seeded(ds):
    model = make_model("hstu", n_items=ds.n_items, max_len=16)
    groups = {"L1.k": ("L1.k", "L1.v"), "L1.v": ("L1.v",)}
    a = data_grams(model, ds, np.arange(30), groups, batch_users=16, seed=3)
    b = data_grams(model, ds, np.arange(30), groups, batch_users=16, seed=3)
    assert a["L1.k"].shape == (32, 32) and a["L1.v"].shape == (16, 16)  # HSTU: 2 heads x 8 for K and for V
    for k in a:
        assert torch.equal(a[k], b[k])
        assert torch.allclose(a[k], a[k].T) and float(torch.linalg.eigvalsh(a[k]).min()) > -1e-9 * float(a[k].trace())
    assert torch.allclose(a["L1.k"][-16:, -16:], a["L1.v"])  # the joint block of V is V's own Fisher


# ---------------------------------------------------------------- artifacts (ML-100K, untrained models)

MAX_LEN = 16


@pytest.fixture(scope="module")
def written(ds, tmp_path_factory):
    d = tmp_path_factory.mktemp("fisher")
    ckpt = untrained_checkpoint("sasrec", ds, d / "sasrec.safetensors", MAX_LEN)
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(params={"pool_size": 32, "user_dim": 0, "layout": "residual", "metric": "fisher",
                                   "pool_dtype": "fp16"}, calib_users=150, calib_holdout=True)
    path = d / "a.safetensors"
    report = compress_to_artifact(model, meta, ckpt, ds, opts, path)
    return ckpt, path, model, meta, report, opts


def test_artifact_holds_the_factor_and_reads_as_compress_saw_it(written, ds, tmp_path):
    from ckv_cli.evaluate.compare import compare_artifact

    ckpt, path, model, meta, report, opts = written
    tensors = load_file(path)
    for s in ("L1.k", "L1.v"):
        L = tensors[f"shared/{s}/metric"]
        assert L.shape == (16, 16) and np.all(np.triu(L, 1) == 0) and np.all(np.diag(L) > 0)
    assert report["fisher"]["streams"] == {"L1.k": ["L1.k"], "L1.v": ["L1.v"]}
    shared = report["accounting"]["shared_breakdown"]
    assert shared["shared/L1.k/metric"] == 16 * 16 * 4
    with Artifact.open(path) as art:
        assert art.plan.streams["L1.k"].params()["metric"] == "fisher"
        c = compare_artifact(model, ds, art, bootstrap=20, speed_batch=8, repeats=1)
    assert c.equals_compress_report
    again = tmp_path / "again.safetensors"
    compress_to_artifact(model, meta, ckpt, ds, opts, again)
    assert again.read_bytes() == Path(path).read_bytes()


def test_store_appends_route_in_the_metric(written, ds):
    ckpt, path, model, _, _, _ = written
    uid = str(ds.user_ids[7])
    with CacheStore.open(path, ckpt) as store:
        before, off = store.read([uid])
        n_old = int(off[-1])
        item = int(ds.sequence(7)[0][-1])
        new_cache, _ = model.extend(store.fetch([uid]), torch.tensor([[item]]), torch.tensor([[0]]))
        whole = model.flatten(new_cache)
        store.append(uid, [item], [0])
        after, _ = store.read([uid])
        for s in ("L1.k", "L1.v"):
            codec = store.plan.streams[s]
            np.testing.assert_array_equal(after[f"{s}/idx"][:n_old], before[f"{s}/idx"])
            x = whole.stream(s)[n_old:]
            assert int(after[f"{s}/idx"][n_old]) == int(route(x, *router(codec.pool, codec.metric_L))[0])
        a = store.rank_next([uid], k=10, attention="compressed")
        b = store.rank_next([uid], k=10, attention="decoded")
        np.testing.assert_allclose(a.scores, b.scores, atol=2e-5)


def test_joint_predictive_fisher_round_trip(ds, tmp_path):
    ckpt = untrained_checkpoint("hstu", ds, tmp_path / "hstu.safetensors", MAX_LEN)
    model, meta = load_checkpoint(ckpt)
    opts = CompressOptions(codec="predictive", params={"pool_size": 32, "predictor": "item", "joint": "kv",
                                                       "metric": "fisher"}, calib_users=150, calib_holdout=True)
    path = tmp_path / "a.safetensors"
    report = compress_to_artifact(model, meta, ckpt, ds, opts, path)
    assert report["fisher"]["streams"] == {"L1.k": ["L1.k", "L1.v"]}
    assert load_file(path)["shared/L1.k/metric"].shape == (32, 32)  # [k; v]: 16 + 16 wide
    from ckv_cli.evaluate.compare import compare_artifact

    with Artifact.open(path) as art:
        assert compare_artifact(model, ds, art, bootstrap=20, speed_batch=8, repeats=1).equals_compress_report


@pytest.mark.parametrize("change, fragment", [
    (lambda L: L.T.copy(), "not lower-triangular"),
    (lambda L: L[:8, :8].copy(), "expected (16, 16)"),
    (None, "lacks shared tensor 'metric'"),
])
def test_damaged_factor_is_refused(written, tmp_path, change, fragment):
    _, path, _, _, _, _ = written
    tensors = load_file(path)
    out = tmp_path / "bad.safetensors"
    if change is None:
        from safetensors.numpy import save_file

        from ckv_cli.io.safetensors import read_header

        save_file({k: v for k, v in tensors.items() if k != "shared/L1.k/metric"}, str(out), metadata=read_header(path)[1])
    else:
        rewrite(path, out, tensors={**tensors, "shared/L1.k/metric": change(tensors["shared/L1.k/metric"])})
    with pytest.raises(CkvError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Artifact.open(out)


def test_auto_pool_size_refuses_the_metric(written, ds):
    _, _, model, meta, _, _ = written
    from ckv_cli.pipeline.compress import fit

    opts = CompressOptions(params={"pool_size": "auto", "metric": "fisher"}, calib_users=60)
    with pytest.raises(CkvError, match="does not take metric=fisher"):
        fit(model, ds, opts)


def test_search_fits_on_the_fisher_of_the_rows_it_fits(written, ds):
    """`fit_plan_on` (what --target and held-out sweeps fit with) takes teacher rows; on a calibration teacher (users
    100..139, not in dataset positions) the Fisher matrices it caches are those of the users in those rows."""
    from ckv_cli.pipeline.holdout import fit_plan_on, teacher_subset
    from ckv_cli.pipeline.target import calibration_teacher
    from ckv_cli.tasks.fisher import fisher_grams

    _, _, model, _, _, opts = written
    teacher = calibration_teacher(model, ds, np.arange(100, 140), batch_users=16)
    cache: dict = {}
    plan = fit_plan_on(model, teacher, np.arange(0, 40, 2), opts, fisher_cache=cache)  # rows: users 100, 102, ...
    (grams,) = cache.values()
    want = fisher_grams(model, teacher_subset(teacher, np.arange(100, 140, 2)).batches,
                        {"L1.k": ("L1.k",), "L1.v": ("L1.v",)}, seed=opts.seed)
    for s in ("L1.k", "L1.v"):
        assert torch.equal(grams[s], want[s])
        assert plan.streams[s].metric_L is not None


def test_pool_coordinates_are_kept_until_the_pool_or_metric_changes():
    """`pool_coords`: one (m, d) x (d, d) product per pool and metric, not per encode call (an append codes a token
    at a time); a pool changed in place (distillation's optimiser) or replaced is computed again."""
    from ckv_cli.codecs.metric import pool_coords

    class Owner:
        pass

    g = torch.Generator().manual_seed(0)
    owner, pool, L = Owner(), torch.randn(5, 3, generator=g), torch.randn(3, 3, generator=g)
    first = pool_coords(owner, pool, L)
    assert torch.equal(first, pool @ L) and pool_coords(owner, pool, L) is first
    pool.add_(1.0)  # in place: the version counter moves
    assert torch.allclose(pool_coords(owner, pool, L), pool @ L)
    other = pool.clone()
    assert pool_coords(owner, other, None) is other  # no metric: the pool itself
    L.mul_(2.0)
    assert torch.allclose(pool_coords(owner, pool, L), pool @ L)
