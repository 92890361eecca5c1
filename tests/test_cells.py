"""The approximate cell search (ckv_cli.codecs.cells, `--param probes=N`): what it promises and what it does not."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO, clustered, load_script, untrained_checkpoint
from ckv_cli.codecs import cells
from ckv_cli.codecs.cells import CellIndex
from ckv_cli.codecs.kmeans import kmeans
from ckv_cli.codecs.nearest import nearest
from ckv_cli.codecs.predictive import PredictiveCodec
from ckv_cli.data import load
from ckv_cli.errors import CkvError


@pytest.fixture(scope="module")
def pool_and_points():
    x = clustered(6000, 16, 300, 0, spread=0.4)
    return kmeans(x[:4000], 1024, iters=3), x


def sq_err(x, pool, idx):
    return float(((x - pool[idx]) ** 2).sum(1).mean())


def test_all_cells_probed_is_the_exact_search(pool_and_points):
    pool, x = pool_and_points
    index = CellIndex(pool, probes=16)  # 1024 entries: 16 cells
    assert index.cells == 16 and index.exact
    assert torch.equal(index.search(x), nearest(x, pool))
    assert CellIndex(pool[:200], probes=1).exact  # 3 cells: fewer than MIN_CELLS, exact


def test_the_answer_is_the_best_entry_of_the_probed_cells(pool_and_points):
    pool, x = pool_and_points
    index = CellIndex(pool, probes=3)
    got = index.search(x)
    coarse = 2 * x @ index.centroids.T - (index.centroids**2).sum(1)
    probed = coarse.topk(3, 1).indices  # (N, 3)
    cell_of = torch.empty(len(pool), dtype=torch.long)
    for c in range(index.cells):
        cell_of[index.order[index.bounds[c] : index.bounds[c + 1]]] = c
    assert (probed == cell_of[got][:, None]).any(1).all()  # the answer lies in a probed cell
    scores = 2 * x @ pool.T - (pool**2).sum(1)  # (N, m)
    allowed = (cell_of[None, :, None] == probed[:, None, :]).any(2)  # (N, m) entries of the probed cells
    best = scores.masked_fill(~allowed, float("-inf")).max(1).values
    assert torch.allclose(scores.gather(1, got[:, None]).squeeze(1), best, rtol=0, atol=1e-4)
    exact = nearest(x, pool)
    assert (got == exact).float().mean() > 0.9  # clustered data: the nearest entry is mostly in a near cell
    assert sq_err(x, pool, got) < 1.05 * sq_err(x, pool, exact)


def test_deterministic_and_independent_of_the_chunk(pool_and_points, monkeypatch):
    pool, x = pool_and_points
    a = CellIndex(pool, probes=2, seed=5).search(x)
    assert torch.equal(a, CellIndex(pool.clone(), probes=2, seed=5).search(x))
    monkeypatch.setattr(cells, "CHUNK", 777)
    assert torch.equal(a, CellIndex(pool, probes=2, seed=5).search(x))


def test_kmeans_with_every_cell_probed_is_plain_kmeans():
    x = clustered(3000, 8, 40, 1, spread=0.4)
    assert torch.equal(kmeans(x, 256, seed=2, iters=4, probes=4), kmeans(x, 256, seed=2, iters=4))  # 4 cells


def test_kmeans_with_few_probes_fits_nearly_as_well():
    x = clustered(8000, 16, 400, 2, spread=0.4)
    exact, ea = kmeans(x, 1024, seed=0, iters=8, return_assign=True)
    approx, aa = kmeans(x, 1024, seed=0, iters=8, return_assign=True, probes=3)
    assert not torch.equal(exact, approx)  # it is an approximation
    assert sq_err(x, approx, aa) < 1.05 * sq_err(x, exact, ea)
    assert torch.equal(approx, kmeans(x, 1024, seed=0, iters=8, probes=3))  # seeded


def synthetic(n=3000, d=8, n_items=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(n, 6, generator=g)
    items = torch.randint(1, n_items, (n,), generator=g).numpy()
    x = ctx @ torch.randn(6, d, generator=g) + clustered(n, d, 200, seed + 1, spread=0.4)
    return x, ctx, items, np.arange(0, n + 1, 30)


@pytest.mark.parametrize("metric", ["l2", "fisher"])
def test_predictive_probes_round_trip_and_stay_close(metric):
    x, ctx, items, off = synthetic()
    fisher = None
    if metric == "fisher":
        a = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
        fisher = a @ a.T + torch.eye(8)
    kw = dict(d=8, pool_size=512, predictor="linear+item", dtype="fp32", metric=metric)
    exact, approx = PredictiveCodec(**kw), PredictiveCodec(**kw, probes=2)
    for c in (exact, approx):
        c.fit(x, 0, items=items, context=ctx, user_offsets=off, fisher=fisher)
    assert "probes" not in exact.params() and approx.params()["probes"] == 2
    assert not approx._cell_index().exact  # 8 cells of the 512 entries, 2 probed
    enc = approx.encode(x, off, items=items, context=ctx)
    again = PredictiveCodec(**approx.params())  # what a reader or an append builds from the artifact
    again.load_shared({k: v.clone() for k, v in approx.shared().items()})
    assert np.array_equal(again.encode(x, off, items=items, context=ctx)["idx"], enc["idx"])

    def err(c, e):
        return float(((c.decode(e, off, items=items, context=ctx) - x) ** 2).sum())

    assert err(approx, enc) < 1.1 * err(exact, exact.encode(x, off, items=items, context=ctx))


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True])
def test_probes_must_be_a_count(bad):
    with pytest.raises(CkvError, match="probes"):
        PredictiveCodec(d=8, probes=bad)
    with pytest.raises(CkvError, match="probes"):
        CellIndex(torch.zeros(300, 4), probes=bad if bad != -1 else 0)  # the index needs at least one probe


def test_bench_compress_speed_runs_an_options_side(tmp_path):
    """bench/compress_speed.py --param: a third side, this tree with the options, in its own fresh process (here the
    "baseline" is this tree too, on an untrained model of ML-100K: the plumbing, not the speed)."""
    ckpt = untrained_checkpoint("sasrec", load("ml-100k"), tmp_path / "sasrec.safetensors", 16)
    bench = load_script("bench/compress_speed.py", "bench_compress_speed")
    out = tmp_path / "speed.json"
    summary = bench.main(["--checkpoint", str(ckpt), "--data", "ml-100k", "--baseline-tree", str(REPO), "--param",
                          "probes=2", "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert [r["side"] for r in summary["runs"]] == ["baseline", "current", "options"]
    assert summary["artifacts_identical_tensors"]  # the same tree and command: the same artifact
    report = json.loads((tmp_path / "runs" / "options-0.json").read_text())
    assert report["params"]["probes"] == 2 and "probes" not in json.loads((tmp_path / "runs" / "current-0.json")
                                                                          .read_text())["params"]
    assert summary["ratio_cpu_options"] > 0 and json.loads(out.read_text())["params"] == ["probes=2"]
