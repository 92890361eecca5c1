"""Artifacts written by an earlier release (commit 0652c50, format version 1; `scripts/fixtures/make_v1_artifacts.py`
made them) still read: every tensor checks out, every user decodes to what that release decoded, and the metrics
`ckv evaluate` gives against the same data are those that release's `ckv compress` recorded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from ckv_cli.artifact import open_artifact, verify_path
from ckv_cli.evaluate.compare import compare_artifact
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.tasks import task_of

HERE = Path(__file__).parent / "fixtures" / "v1"


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """The synthetic log the fixtures were made from, written again (seeded)."""
    return load_script("scripts/fixtures/make_v1_artifacts.py").write_log(tmp_path_factory.mktemp("v1log"))


@pytest.mark.parametrize("arch", ["sasrec", "hstu", "sim", "eta"])
def test_v1_artifacts_read_and_decode_as_written(arch):
    model, _ = load_checkpoint(HERE / f"{arch}.safetensors")
    want = np.load(HERE / f"{arch}.decoded.npz")
    problems, summary = verify_path(HERE / f"{arch}.ckv.safetensors")
    assert problems == [] and summary["users"] == 60
    with open_artifact(HERE / f"{arch}.ckv.safetensors") as art:
        art.check_model(model)
        flat = art.decode(np.arange(art.n_users), model)
    np.testing.assert_array_equal(flat.offsets, want["offsets"])
    for name, x in flat.streams.items():
        np.testing.assert_allclose(x.numpy(), want[name], rtol=0, atol=1e-6, err_msg=name)
    if "codes" in want:
        np.testing.assert_array_equal(flat.side["codes"].numpy(), want["codes"])


@pytest.mark.parametrize("arch", ["sasrec", "hstu", "sim", "eta"])
def test_v1_artifacts_evaluate_to_their_recorded_metrics(arch, log):
    model, meta = load_checkpoint(HERE / f"{arch}.safetensors")
    task = task_of(model)
    ds = task.load(str(log), None, meta, model)
    with open_artifact(HERE / f"{arch}.ckv.safetensors") as art:
        c = compare_artifact(model, ds, art, bootstrap=20, speed_batch=0)
    recorded = art.meta["metrics"]
    for side in ("uncompressed", "compressed"):
        for k in task.metrics:
            assert c.metrics[side][k] == pytest.approx(recorded[side][k], abs=1e-9), (side, k)
    assert c.equals_compress_report
