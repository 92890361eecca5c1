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
