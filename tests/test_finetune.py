"""`ckv compress --distill-steps N --finetune` (issue 4): the student trains, the teacher never changes and still
builds every cache the student reads through the codec; the control leaves the codec out; the artifact names its
student, which `ckv evaluate` and `CacheStore` require. Tiny untrained models on ML-100K."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import untrained_checkpoint
from ckv_cli.artifact import Artifact
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.codecs import CollectiveCodec, RecomputeCodec
from ckv_cli.evaluate.compare import check_source, compare_artifact
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact, fit_plan, student_path, weights_sha256
from ckv_cli.data import load
from ckv_cli.io.files import sha256_file
from ckv_cli.pipeline.distill import DistillOptions, distill, make_student
from ckv_cli.errors import CkvError
from ckv_cli.models.base import flatten, item_layer_kv
from ckv_cli.serve.next_item import CacheStore
from ckv_cli.tasks.next_item import last_event_batch

MAX_LEN = 16
OPTS = {"params": {"pool_size": 48, "user_dim": 0, "layout": "residual"}, "calib_users": 150}


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def ckpt(ds, tmp_path_factory):
    return untrained_checkpoint("sasrec", ds, tmp_path_factory.mktemp("ft") / "teacher.safetensors", MAX_LEN)


@pytest.fixture(scope="module", params=["sasrec", "hstu"])
def any_ckpt(request, ds, tmp_path_factory):
    return untrained_checkpoint(request.param, ds, tmp_path_factory.mktemp("ft") / f"{request.param}.safetensors", MAX_LEN)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def capture_reads(student):
    """Record the cache each `student.extend` call reads (the distillation step's appended event)."""
    reads, extend = [], student.extend

    def spy(cache, *args, **kw):
        reads.append(([k.detach().clone() for k in cache.keys], [v.detach().clone() for v in cache.values], cache.lengths.clone()))
        return extend(cache, *args, **kw)

    student.extend = spy
    return reads


def first_batch(teacher, ds, opts: DistillOptions):
    """The teacher's cache of the first distillation batch, rebuilt from the same seed."""
    rng = np.random.default_rng(opts.seed)
    eligible = np.flatnonzero(ds.lengths() >= 4)
    users = np.sort(rng.choice(eligible, size=min(opts.batch_users, len(eligible)), replace=False))
    hist_items, hist_times, _ = ds.split("valid")
    items, times, lengths, _, _ = last_event_batch(hist_items, hist_times, users, teacher.config.max_len)
    with torch.no_grad():
        return teacher.prefill(items, times, lengths)[0]


def test_finetune_trains_the_student_and_reads_codec_of_teacher_kv(ds, any_ckpt):
    teacher, _ = load_checkpoint(any_ckpt)
    before = state(teacher)
    plan = fit_plan(teacher, ds, CompressOptions(**OPTS))
    plan0 = copy.deepcopy(plan)  # the codec as the first step reads it
    student = make_student(teacher)
    reads = capture_reads(student)
    opts = DistillOptions(steps=2, batch_users=16, seed=3, finetune=True, model_lr=1e-2)
    history = distill(teacher, ds, plan, opts, student=student)
    assert [h["step"] for h in history] == [1, 2] and all(h["task"] > 0 for h in history)
    assert same_state(state(teacher), before)  # the teacher never changes
    assert not same_state(state(student), before)  # the student did train
    assert not any(p.requires_grad for p in student.parameters())
    assert len(reads) == 2

    # step 1: the student read codec(teacher K/V) for pooled streams and recomputed the first layer itself
    cache = first_batch(teacher, ds, opts)
    flat = flatten(cache)
    keys, values, lengths = reads[0]
    assert torch.equal(lengths, cache.lengths)
    valid = cache.valid_mask()
    assert isinstance(plan.streams["L0.k"], RecomputeCodec) and isinstance(plan.streams["L1.k"], CollectiveCodec)
    with torch.no_grad():
        for name, got in (("L1.k", keys[1]), ("L1.v", values[1])):
            want, _ = plan0.streams[name].gated_decode(flat.stream(name))
            torch.testing.assert_close(got[valid], want, rtol=0, atol=1e-6)
            assert not torch.allclose(got[valid], flat.stream(name), atol=1e-4)  # not the teacher's exact K/V
        k0, v0 = item_layer_kv(teacher, cache.items, torch.arange(cache.items.shape[1])[None].expand_as(cache.items))
    torch.testing.assert_close(keys[0][valid], k0[valid], rtol=0, atol=1e-6)  # student == teacher at step 1
    torch.testing.assert_close(values[0][valid], v0[valid], rtol=0, atol=1e-6)


def test_control_reads_the_exact_teacher_cache(ds, ckpt):
    teacher, _ = load_checkpoint(ckpt)
    before = state(teacher)
    student = make_student(teacher)
    reads = capture_reads(student)
    opts = DistillOptions(steps=1, batch_users=16, seed=3, finetune=True, compress=False, model_lr=1e-2)
    history = distill(teacher, ds, None, opts, student=student)  # no plan: no codec
    assert history[0]["peak"] == 0 and history[0]["balance"] == 0
    assert same_state(state(teacher), before) and not same_state(state(student), before)
    cache = first_batch(teacher, ds, opts)
    keys, values, _ = reads[0]
    for got, want in zip(keys + values, cache.keys + cache.values):
        assert torch.equal(got, want)
    with pytest.raises(CkvError, match="finetune"):
        distill(teacher, ds, None, DistillOptions(steps=1, compress=False), student=make_student(teacher))


def test_finetune_is_deterministic(ds, ckpt):
    teacher, _ = load_checkpoint(ckpt)
    out = []
    for _ in range(2):
        plan = fit_plan(teacher, ds, CompressOptions(**OPTS))
        student = make_student(teacher)
        distill(teacher, ds, plan, DistillOptions(steps=2, batch_users=16, seed=5, finetune=True), student=student)
        out.append((state(student), {n: c.pool.clone() for n, c in plan.streams.items() if isinstance(c, CollectiveCodec)}))
    assert same_state(out[0][0], out[1][0])
    assert same_state(out[0][1], out[1][1])


@pytest.fixture(scope="module")
def finetuned(ds, ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("ftart")
    teacher, meta = load_checkpoint(ckpt)
    opts = CompressOptions(**OPTS, distill_steps=2, finetune=True)
    out = d / "a.ckv.safetensors"
    report = compress_to_artifact(teacher, meta, ckpt, ds, opts, out, command="test")
    return out, report


def test_artifact_records_the_student(finetuned, ckpt, ds):
    out, report = finetuned
    st = student_path(out)
    assert st.name == "a.ckv.student.safetensors" and st.exists()
    with Artifact.open(out) as art:  # closed at the end (an open map left to the GC warns in a later test)
        assert art.meta["student_checkpoint"] == str(st) and art.meta["student_sha256"] == sha256_file(st)
        assert art.meta["checkpoint_sha256"] == sha256_file(ckpt) and art.verify() == []
        student, _ = load_checkpoint(st)
        teacher, _ = load_checkpoint(ckpt)
        assert art.meta["student_weights_sha256"] == weights_sha256(student) != weights_sha256(teacher)
        assert report["metrics"]["distillation"]["finetune"] is True

        check_source(art, sha256_file(st))  # the student is accepted
        with pytest.raises(CkvError, match="fine-tuned student") as e:
            check_source(art, sha256_file(ckpt))
        assert str(st) in str(e.value) and "\n" not in str(e.value)

        # the teacher cannot read it through the store either, given as a model or as a checkpoint
        for model, kw in ((teacher, {}), (ckpt, {}), (teacher, {"checkpoint": ckpt})):
            with pytest.raises(CkvError, match="fine-tuned student"):
                CacheStore.open(out, model, **kw).close()
        CacheStore.open(out, student).close()
        CacheStore.open(out, st).close()

        # evaluate with the student reproduces what compress measured: teacher reference, student compressed
        c = compare_artifact(student, ds, art, bootstrap=20, speed_batch=8, repeats=1)
        for k in ("NDCG@10", "HR@10"):
            assert c.reference[k] == pytest.approx(report["metrics"]["uncompressed"][k], abs=1e-9)
            assert c.compressed[k] == pytest.approx(report["metrics"]["compressed"][k], abs=1e-9)


def run_ckv(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckv: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_finetune_errors(finetuned, ckpt, tmp_path):
    out, _ = finetuned
    new = tmp_path / "x.safetensors"
    one_line_error(run_ckv("compress", ckpt, "--data", "ml-100k", "-o", new, "--finetune", cwd=tmp_path),
                   "--finetune needs --distill-steps")
    assert not new.exists() and not student_path(new).exists()
    one_line_error(run_ckv("compress", ckpt, "--data", "ml-100k", "-o", tmp_path / "x.index.json", "--shard-size", "256",
                           "--distill-steps", "1", "--finetune", cwd=tmp_path), "--finetune", "--shard-size")
    one_line_error(run_ckv("evaluate", ckpt, out, "--data", "ml-100k", cwd=tmp_path),
                   "fine-tuned student", str(student_path(out)))
