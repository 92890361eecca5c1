"""`ckv compress` end to end on ML-100K with tiny untrained models: byte accounting against the file on disk,
artifact decoding, determinism, distillation, integrity checks, and the command line."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import make_model
import ckv_cli.artifact.writer
from ckv_cli import __version__
from ckv_cli.artifact import FORMAT, FORMAT_VERSION, Artifact, ArtifactWriter, write_artifact
from ckv_cli.artifact.format import _sha, decode_meta, encode_meta, field_meta, stored_shape
from ckv_cli.codecs import CollectiveCodec, PlainCodec, RecomputeCodec
from ckv_cli.codecs.bits import pack
from ckv_cli.data import load
from ckv_cli.errors import CkvError
from ckv_cli.io.files import write_safetensors
from ckv_cli.io.safetensors import read_header
from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, CompressResult, compress, compress_to_artifact, fit_plan, make_plan
from ckv_cli.pipeline.distill import DistillOptions, distill
from ckv_cli.spec import FlatCache
from ckv_cli.tasks.next_item import iter_test_caches, teacher_cache_lengths

MAX_LEN = 16
OPTS = {  # pool sizes that are not powers of two leave room for an out-of-range index in the packed bits
    "sasrec": {"params": {"pool_size": 48, "user_dim": 2, "layout": "residual"}, "calib_users": 150},
    "hstu": {"params": {"pool_size": 40, "user_dim": 3, "layout": "concat", "user_dtype": "fp16"}, "calib_users": 150},
}


@pytest.fixture(scope="module")
def ds():
    return load("ml-100k")


@pytest.fixture(scope="module")
def checkpoints(ds, tmp_path_factory):
    """arch -> checkpoint path of a tiny untrained model over ML-100K's item vocabulary."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in OPTS:
        path = d / f"{arch}.safetensors"
        save_checkpoint(make_model(arch, n_items=ds.n_items, max_len=MAX_LEN), path, dataset=ds.name,
                        fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={"epochs": 0})
        out[arch] = path
    return out


@dataclass
class Built:
    arch: str
    model: torch.nn.Module
    meta: dict
    ckpt: Path
    opts: CompressOptions
    result: CompressResult
    path: Path  # the artifact written from `result`
    teacher: FlatCache  # every user's uncompressed cache, flat


@pytest.fixture(scope="module", params=list(OPTS))
def built(request, ds, checkpoints, tmp_path_factory):
    arch = request.param
    model, meta = load_checkpoint(checkpoints[arch])
    opts = CompressOptions(**OPTS[arch])
    result = compress(model, ds, opts)
    path = tmp_path_factory.mktemp(f"art-{arch}") / "a.safetensors"
    write_artifact(path, result.plan, result.fields, result.offsets, result.user_ids, {"seed": opts.seed})
    teacher = FlatCache.concat([model.flatten(b.cache) for b in iter_test_caches(model, ds, np.arange(ds.n_users), opts.batch_users)])
    return Built(arch, model, meta, checkpoints[arch], opts, result, path, teacher)


def tensor_layout(path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(header length, name -> [start, end) of its bytes in the data region), read from the raw file."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return n, {k: tuple(v["data_offsets"]) for k, v in header.items()}


def rel_mse(a, b):
    return float(((a - b) ** 2).sum() / (a**2).sum())


# ---------------------------------------------------------------- bytes


def test_bytes_on_disk_match_the_accounting(built, ds):
    acct = built.result.accounting
    n, layout = tensor_layout(built.path)
    sizes = {k: b - a for k, (a, b) in layout.items()}
    assert sum(sizes.values()) == built.path.stat().st_size - 8 - n  # nothing but tensors after the header
    per_user = acct["per_user_breakdown"]
    assert {k: sizes[k] for k in per_user} == per_user  # each per-user array as declared by its Field
    assert sum(sizes[k] for k in per_user) == acct["per_user_bytes"]
    shared = {k for k in sizes if k.startswith("shared/")}
    assert sum(sizes[k] for k in shared) == acct["shared_bytes"] > 0
    assert set(sizes) - set(per_user) - shared == {"users/id_bytes", "users/id_offsets"}
    assert not any(k.startswith("L0.") for k in sizes)  # the first layer is recomputed, never stored

    tokens = int(sum(min(length - 1, MAX_LEN) - 1 for length in ds.lengths()))  # test history minus the last event
    d_k, d_v = built.model.kv_dims
    assert acct["tokens"] == tokens == built.result.offsets[-1] == len(built.teacher.items)
    assert acct["users"] == ds.n_users
    assert acct["full_fp16_bytes"] == tokens * 2 * (d_k + d_v) * 2
    bits = built.result.plan.streams["L1.k"].bits
    assert sizes["L1.k/idx"] == (tokens * bits + 7) // 8
    assert 0 < acct["per_user_ratio_fp16"] < 1 and acct["per_user_ratio_fp32"] == pytest.approx(acct["per_user_ratio_fp16"] / 2)


# ---------------------------------------------------------------- the streaming writer


def reference_write_artifact(path, plan, fields, offsets, user_ids, metadata):
    """The artifact writer before it streamed: every tensor packed in memory, written by safetensors' `save_file`,
    header sorted. A streamed artifact must equal its file byte for byte."""
    declared = plan.fields()
    tensors, fmeta = {}, {}
    n_tokens = int(offsets[-1])
    for name, f in declared.items():
        if name == "users/offsets":
            continue
        arr = np.asarray(fields[name])
        count = n_tokens if f.per == "token" else len(offsets) - 1
        assert len(arr) == count
        tensors[name] = pack(arr, f.bits) if f.bits else np.ascontiguousarray(arr.reshape(stored_shape(name, f, count)))
        fmeta[name] = field_meta(f, count)
    tensors["users/offsets"] = offsets.astype(np.int64)
    fmeta["users/offsets"] = field_meta(declared["users/offsets"], len(offsets))
    ids = [str(u).encode() for u in user_ids]
    tensors["users/id_bytes"] = np.frombuffer(b"".join(ids), dtype=np.uint8) if ids else np.zeros(0, np.uint8)
    tensors["users/id_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in ids])]).astype(np.int64)
    for stream, codec in plan.streams.items():
        if not isinstance(codec, str):
            for name, t in codec.shared().items():
                tensors[f"shared/{stream}/{name}"] = t.detach().cpu().contiguous().numpy()
    meta = {k: encode_meta(v) for k, v in metadata.items()}
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "plan": json.dumps(plan.describe(), sort_keys=True),
                 "fields": json.dumps(fmeta, sort_keys=True), "ckv_version": __version__,
                 "checksums": json.dumps({k: _sha(v) for k, v in tensors.items()}, sort_keys=True)})
    write_safetensors(Path(path), save_file, tensors, meta)


WRITER_KEYS = ("format", "format_version", "plan", "fields", "ckv_version", "checksums")


def test_write_artifact_equals_the_in_memory_writer(built, tmp_path):
    ref = tmp_path / "ref.safetensors"
    r = built.result
    reference_write_artifact(ref, r.plan, r.fields, r.offsets, r.user_ids, {"seed": built.opts.seed})
    assert built.path.read_bytes() == ref.read_bytes()


def test_streamed_compress_equals_the_in_memory_writer(built, ds, tmp_path):
    """`compress_to_artifact` streams 10 batches (of 100 users: bit-packed fields start mid-byte) into the file;
    the in-memory writer, given every field of the same run at once, writes the same bytes."""
    opts = CompressOptions(**OPTS[built.arch], batch_users=100)
    out = tmp_path / "streamed.safetensors"
    report = compress_to_artifact(built.model, built.meta, built.ckpt, ds, opts, out, command="ckv compress test")
    result = compress(built.model, ds, opts)  # the same run, fields kept in memory
    _, raw = read_header(out)
    metadata = {k: decode_meta(v) for k, v in raw.items() if k not in WRITER_KEYS}
    assert metadata["accounting"] == report["accounting"] == result.accounting
    streaming = compress(built.model, ds, opts, sink=NullSink())  # nothing per user kept
    assert result.per_user and not streaming.per_user and streaming.offsets is None and not streaming.fields
    assert streaming.accounting == result.accounting and streaming.metrics == metadata["metrics"]
    streamed = metadata["metrics"]  # from running sums: the in-memory means up to float rounding
    for group in ("uncompressed", "compressed", "fidelity"):
        assert streamed[group].keys() == result.metrics[group].keys()
        for k, v in result.metrics[group].items():
            assert streamed[group][k] == (v if isinstance(v, int) else pytest.approx(v, rel=1e-6, abs=1e-12)), (group, k)
    assert streamed["reconstruction_rel_mse"] == result.metrics["reconstruction_rel_mse"]
    ref = tmp_path / "ref.safetensors"
    reference_write_artifact(ref, result.plan, result.fields, result.offsets, result.user_ids, metadata)
    assert out.read_bytes() == ref.read_bytes()
    art = Artifact.open(out)
    assert art.verify() == []
    with safe_open(str(out), "np") as f:  # safetensors itself reads the streamed header and every tensor
        assert set(f.keys()) == set(read_header(out)[0])
    np.testing.assert_array_equal(np.diff(art.offsets), teacher_cache_lengths(ds, built.model.config.max_len))


class NullSink:
    def start(self, plan):
        pass

    def add(self, fields, offsets):
        pass


def with_empty_users(flat: FlatCache, where: np.ndarray) -> FlatCache:
    """`flat` with a user of no tokens inserted before each user index in `where` (len(offsets) - 1: at the end)."""
    offsets = np.insert(flat.offsets, where, flat.offsets[where])
    return FlatCache(offsets, flat.streams, flat.ids)


def test_streamed_batches_with_empty_users_equal_one_batch(built, tmp_path, monkeypatch):
    """Batches of 1 to 7 users, some with no tokens (first, last, runs of them), per-user fields (int8 scales
    for SASRec) included, token counts asked 3 users at a time: the same bytes as the in-memory writer, and
    every user reads back."""
    monkeypatch.setattr(ArtifactWriter, "ID_CHUNK", 3)  # offsets and ids written in many pieces
    r = built.result
    flat = with_empty_users(slice_users(built.teacher, 0, 40), np.array([0, 0, 3, 17, 17, 17, 40, 40]))
    n_users = len(flat.offsets) - 1
    enc = r.plan.encode(flat)
    ids = [f"u{i}" for i in range(n_users)]
    ref = tmp_path / "ref.safetensors"
    reference_write_artifact(ref, r.plan, enc, flat.offsets, ids, {"seed": 0})

    out = tmp_path / "streamed.safetensors"
    lengths = np.diff(flat.offsets)
    asked = []

    def counts(a, b):
        asked.append((a, b))
        return lengths[a:b]

    writer = ArtifactWriter(out, counts, ids)
    writer.start(r.plan)
    assert asked[:2] == [(0, 3), (3, 6)] and max(b - a for a, b in asked) == 3
    rng = np.random.default_rng(0)
    a = 0
    while a < n_users:
        b = min(n_users, a + int(rng.integers(1, 8)))
        writer.add(r.plan.encode(slice_users(flat, a, b)), flat.offsets[a : b + 1])
        a = b
    writer.finish({"seed": 0})
    assert out.read_bytes() == ref.read_bytes()
    art = Artifact.open(out)
    lengths = np.diff(art.offsets)
    assert lengths[0] == lengths[-1] == lengths[-2] == 0 and (lengths == 0).sum() == 8
    fields, offsets = art.read_fields(np.arange(n_users))
    for k, v in enc.items():
        np.testing.assert_array_equal(fields[k].reshape(v.shape), v)
    empty, _ = art.read_fields(np.flatnonzero(lengths == 0))
    assert len(empty["tokens/items"]) == 0


def slice_users(flat: FlatCache, a: int, b: int) -> FlatCache:
    return flat.users(a, b)


def test_writer_refuses_batches_it_was_not_laid_out_for(built, tmp_path):
    r = built.result
    flat = with_empty_users(slice_users(built.teacher, 0, 10), np.array([1]))  # 15, 0, 15, ... tokens
    writer = ArtifactWriter(tmp_path / "a.safetensors", np.diff(flat.offsets), [str(i) for i in range(11)])
    try:
        writer.start(r.plan)
        with pytest.raises(CkvError, match="token counts"):
            writer.add(r.plan.encode(slice_users(flat, 1, 3)), flat.offsets[1:4])  # users 1, 2 where 0, 1 are due
        writer.add(r.plan.encode(slice_users(flat, 0, 4)), flat.offsets[:5])
        with pytest.raises(CkvError, match="4 of 11 users"):
            writer.finish({})
    finally:
        writer.discard()
    assert list(tmp_path.iterdir()) == []


def open_files_under(folder: Path) -> list[str]:
    """Files this process holds open in `folder` (a deleted temporary shows as 'name (deleted)')."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
@pytest.mark.parametrize("built", ["hstu"], indirect=True)
def test_interrupt_mid_stream_leaves_nothing(built, ds, tmp_path):
    """Ctrl-C after the second batch is streamed: the old output is intact, no temporary file is left or open."""
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"old output")
    calls = []

    def advance(n, *a):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    opts = CompressOptions(**OPTS[built.arch], batch_users=100)
    with pytest.raises(KeyboardInterrupt):
        compress_to_artifact(built.model, built.meta, built.ckpt, ds, opts, out, force=True, advance=advance)
    assert len(calls) == 2
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert open_files_under(tmp_path) == []


@pytest.mark.parametrize("built", ["sasrec"], indirect=True)
def test_disk_full_mid_stream(built, tmp_path, monkeypatch):
    """A write of the temporary data file fails (ENOSPC): a one-line error, no file, nothing left open."""
    import errno

    r = built.result
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(ckv_cli.artifact.writer.os, "pwrite", pwrite)
    with pytest.raises(CkvError, match="could not write .*a.safetensors: No space left on device"):
        write_artifact(tmp_path / "a.safetensors", r.plan, r.fields, r.offsets, r.user_ids, {})
    assert list(tmp_path.iterdir()) == [] and open_files_under(tmp_path) == []


# ---------------------------------------------------------------- decoding


def assert_flat_equal(a: FlatCache, b: FlatCache, recomputed_atol=0.0):
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.streams.keys() == b.streams.keys()
    for name in a.streams:
        tol = recomputed_atol if name.startswith("L0.") else 0.0  # layer 0 is recomputed through the model
        assert torch.allclose(a.stream(name), b.stream(name), rtol=0, atol=tol), name


def test_artifact_decode_equals_plan_decode(built, ds):
    art = Artifact.open(built.path)
    assert art.n_users == ds.n_users and art.user_ids == [str(u) for u in ds.user_ids]
    assert art.plan.describe() == built.result.plan.describe()
    everyone = art.decode(np.arange(art.n_users), built.model)
    ref = built.result.plan.decode(built.result.fields, built.result.offsets, built.model)
    assert_flat_equal(everyone, ref)

    rng = np.random.default_rng(0)
    users = np.concatenate([[art.n_users - 1, 0], rng.choice(np.arange(1, art.n_users - 1), 35, replace=False)])
    rng.shuffle(users)
    some = art.decode(users, built.model)
    for j, u in enumerate(users):
        assert_flat_equal(some.users(j, j + 1), everyone.users(u, u + 1), recomputed_atol=1e-6)

    uid = str(ds.user_ids[123])
    assert art.user_index(uid) == 123
    with pytest.raises(CkvError, match="not in"):
        art.user_index("no-such-user")
    with pytest.raises(CkvError, match="out of range"):
        art.read_fields(np.array([art.n_users]))


def test_recomputed_layer_and_timestamps_match_the_teacher(built):
    art = Artifact.open(built.path)
    dec = art.decode(np.arange(art.n_users), built.model)
    t = built.teacher
    np.testing.assert_array_equal(dec.offsets, t.offsets)
    np.testing.assert_array_equal(dec.items, t.items)
    assert isinstance(built.result.plan.streams["L0.k"], RecomputeCodec)
    assert torch.allclose(dec.stream("L0.k"), t.stream("L0.k"), rtol=0, atol=1e-5)
    assert torch.allclose(dec.stream("L0.v"), t.stream("L0.v"), rtol=0, atol=1e-5)
    if built.arch == "hstu":
        assert "tokens/timestamps" in art.fields
        np.testing.assert_array_equal(dec.timestamps, t.timestamps)
    else:
        assert "tokens/timestamps" not in art.fields
    # the stored layers are approximations, and the reported reconstruction error is theirs
    for name in ("L1.k", "L1.v"):
        err = rel_mse(t.stream(name), dec.stream(name))
        assert 1e-6 < err < 1
        assert err == pytest.approx(built.result.metrics["reconstruction_rel_mse"][name], rel=1e-3)


# ---------------------------------------------------------------- compress_to_artifact


@pytest.fixture(scope="module")
def sasrec(ds, checkpoints):
    model, meta = load_checkpoint(checkpoints["sasrec"])
    return model, meta, checkpoints["sasrec"]


def test_compress_to_artifact_is_deterministic(sasrec, ds, tmp_path):
    model, meta, ckpt = sasrec
    out = tmp_path / "a.safetensors"
    opts = CompressOptions(**OPTS["sasrec"])
    report = compress_to_artifact(model, meta, ckpt, ds, opts, out, command="ckv compress test")
    n, layout = tensor_layout(out)
    assert report["file_bytes"] == out.stat().st_size
    assert report["stored_tensor_bytes"] == sum(b - a for a, b in layout.values()) == out.stat().st_size - 8 - n
    assert Artifact.open(out).meta["accounting"] == report["accounting"]
    first = out.read_bytes()
    os.replace(out, tmp_path / "first.safetensors")
    compress_to_artifact(model, meta, ckpt, ds, opts, out, command="ckv compress test")
    assert out.read_bytes() == first

    other = tmp_path / "seed1.safetensors"
    compress_to_artifact(model, meta, ckpt, ds, CompressOptions(**OPTS["sasrec"], seed=1), other,
                         command="ckv compress test")
    assert other.read_bytes() != first
    with safe_open(str(out), "np") as a, safe_open(str(other), "np") as b:
        assert not np.array_equal(a.get_tensor("shared/L1.k/pool"), b.get_tensor("shared/L1.k/pool"))


def test_compress_to_artifact_with_default_command_opens(sasrec, ds, tmp_path):
    """An empty metadata string (command="") is a plain string, not corrupted JSON."""
    model, meta, ckpt = sasrec
    out = tmp_path / "a.safetensors"
    compress_to_artifact(model, meta, ckpt, ds, CompressOptions(**OPTS["sasrec"]), out)
    assert Artifact.open(out).meta["command"] == ""


def test_existing_output_is_left_alone_without_force(sasrec, ds, built, tmp_path):
    model, meta, ckpt = sasrec
    out = tmp_path / "a.safetensors"
    shutil.copy(built.path, out)
    before = out.read_bytes()
    with pytest.raises(CkvError, match="exists"):
        compress_to_artifact(model, meta, ckpt, ds, CompressOptions(**OPTS["sasrec"], seed=5), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left behind
    compress_to_artifact(model, meta, ckpt, ds, CompressOptions(**OPTS["sasrec"], seed=5), out, force=True)
    assert out.read_bytes() != before and Artifact.open(out).meta["seed"] == "5"


def test_pool_larger_than_the_calibration_set_is_refused(sasrec, ds, tmp_path):
    model, meta, ckpt = sasrec
    opts = CompressOptions(params={"pool_size": 64, "user_dim": 0, "layout": "residual"}, calib_users=2)
    with pytest.raises(CkvError, match="calibration vectors"):
        compress_to_artifact(model, meta, ckpt, ds, opts, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_share_k_keeps_v_at_fp16(built, ds):
    opts = CompressOptions(**{**OPTS[built.arch], "share": ("k",)})
    result = compress(built.model, ds, opts)
    plan = result.plan
    assert isinstance(plan.streams["L1.k"], CollectiveCodec) and isinstance(plan.streams["L1.v"], PlainCodec)
    mse = result.metrics["reconstruction_rel_mse"]
    assert mse["L1.v"] < 1e-6 and mse["L0.v"] < 1e-6
    assert mse["L1.k"] > 1e-4
    dec = plan.decode(result.fields, result.offsets, built.model)
    assert torch.equal(dec.stream("L1.v"), built.teacher.stream("L1.v").half().float())
    assert result.accounting["per_user_breakdown"]["L1.v/x"] == result.accounting["tokens"] * built.model.kv_dims[1] * 2
    assert result.accounting["per_user_bytes"] > built.result.accounting["per_user_bytes"]


# ---------------------------------------------------------------- distillation


def test_distill_trains_pool_and_router(built, ds, tmp_path):
    model, _ = load_checkpoint(built.ckpt)
    opts = CompressOptions(**OPTS[built.arch])
    plan = fit_plan(model, ds, opts)
    codecs = {n: c for n, c in plan.streams.items() if isinstance(c, CollectiveCodec)}
    pools = {n: c.pool.clone() for n, c in codecs.items()}
    assert all("router_w" not in c.shared() for c in codecs.values())
    history = distill(model, ds, plan, DistillOptions(steps=3, batch_users=32, lr=1e-2))
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) and h["kl"] >= -1e-6 for h in history)
    for n, c in codecs.items():
        assert not torch.equal(c.pool, pools[n]), n
        assert not c.router_tied and not c.pool.requires_grad
        shared = c.shared()
        assert "router_w" in shared and "router_b" in shared
        assert not torch.equal(shared["router_w"], 2 * shared["pool"])  # trained apart from the pool

    flat = model.flatten(next(iter_test_caches(model, ds, np.arange(64), 64)).cache)
    enc = plan.encode(flat)
    dec = plan.decode(enc, flat.offsets, model)
    assert {n: k.shape for n, k in dec.streams.items()} == {n: k.shape for n, k in flat.streams.items()}
    assert all(torch.isfinite(k).all() for k in dec.streams.values())

    # the trained router travels with the artifact: a reader encodes exactly as the writer did
    path = tmp_path / "d.safetensors"
    write_artifact(path, plan, enc, flat.offsets, [str(u) for u in ds.user_ids[:64]], {})
    art = Artifact.open(path)
    assert "shared/L1.k/router_w" in set(safe_open(str(path), "np").keys())
    again = art.plan.encode(flat)
    assert set(again) == set(enc)
    for k in enc:
        np.testing.assert_array_equal(again[k], enc[k])
    assert_flat_equal(art.decode(np.arange(64), model), dec, recomputed_atol=1e-6)


def test_distill_needs_a_collective_stream(built, ds):
    plan = make_plan(built.model, CompressOptions(codec="plain", params={}))
    with pytest.raises(CkvError, match="collective"):
        distill(built.model, ds, plan, DistillOptions(steps=1))


# ---------------------------------------------------------------- integrity


def test_verify_names_the_damaged_tensor(built, tmp_path):
    assert Artifact.open(built.path).verify() == []
    n, layout = tensor_layout(built.path)
    for name in ("L1.k/idx", "shared/L1.v/pool", "users/offsets"):
        copy = tmp_path / "copy.safetensors"
        raw = bytearray(built.path.read_bytes())
        a, b = layout[name]
        raw[8 + n + (a + b) // 2] ^= 0x01  # one bit in the middle of the tensor's bytes
        copy.write_bytes(bytes(raw))
        assert Artifact.open(copy).verify() == [name]


def test_open_rejects_what_is_not_an_artifact(tmp_path, checkpoints, built):
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "cut.safetensors").write_bytes(built.path.read_bytes()[:-50])
    cases = [(tmp_path / "missing.safetensors", "not found"), (tmp_path, "directory"),
             (tmp_path / "random.safetensors", "not a readable safetensors file"),
             (tmp_path / "cut.safetensors", "not a readable safetensors file"),
             (checkpoints["sasrec"], "not a ckv artifact")]
    for path, fragment in cases:
        with pytest.raises(CkvError, match=fragment) as e:
            Artifact.open(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def rewrite(src, dst, edit):
    """Copy an artifact with `edit(tensors)` applied, keeping its metadata (and hence its stale checksums)."""
    with safe_open(str(src), "np") as f:
        tensors = {k: f.get_tensor(k).copy() for k in f.keys()}
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("built", ["sasrec"], indirect=True)
def test_out_of_range_pool_index_and_item_id(built, tmp_path):
    assert built.result.plan.streams["L1.k"].pool_size == 48  # 6 bits: 63 is representable but out of range

    def bad_index(t):
        t["L1.k/idx"][0] = 0xFF  # user 0's first token -> index 0b111111 = 63

    art = Artifact.open(rewrite(built.path, tmp_path / "idx.safetensors", bad_index))
    with pytest.raises(CkvError, match=r"L1.k pool index 63 out of range \(pool 48\)"):
        art.decode([0], built.model)
    art.decode([1], built.model)  # other users read fine
    assert art.verify() == ["L1.k/idx"]

    def bad_item(t):
        t["tokens/items"][:2] = 0xFF  # 11-bit item ids: the first one becomes 2047 > 1682

    art = Artifact.open(rewrite(built.path, tmp_path / "items.safetensors", bad_item))
    with pytest.raises(CkvError, match="item id 2047 out of range"):
        art.decode([0], built.model)


# ---------------------------------------------------------------- command line


def run_ckv(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckv: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


CLI_ARGS = ("--pool-size", "32", "--calib-users", "100")


@pytest.fixture(scope="module")
def cli_run(checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    proc = run_ckv("compress", checkpoints["sasrec"], "--data", "ml-100k", "-o", d / "out.safetensors", *CLI_ARGS,
                   "--json", d / "r.json", cwd=d)
    return d, proc


def test_cli_compress(cli_run):
    d, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "per-user ratio" in proc.stdout
    report = json.loads((d / "r.json").read_text())
    assert 0 < report["accounting"]["per_user_ratio_fp16"] < 1
    assert set(report["metrics"]["delta"]) >= {"NDCG@10", "HR@10"}
    assert report["params"]["pool_size"] == 32 and report["calib_users"] == 100
    art = Artifact.open(d / "out.safetensors")
    assert art.meta["accounting"] == report["accounting"] and art.verify() == []
    assert art.plan.streams["L1.k"].pool_size == 32 and "ckv compress" in art.meta["command"]


def test_cli_compress_errors(cli_run, checkpoints):
    d, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    out = d / "out.safetensors"
    before = out.read_bytes()
    one_line_error(run_ckv("compress", checkpoints["sasrec"], "--data", "ml-100k", "-o", out, *CLI_ARGS, cwd=d),
                   "exists", "--force")
    assert out.read_bytes() == before
    for opt, value, fragment in (("--layout", "bogus", "bogus"), ("--share", "q", "--share")):
        new = d / f"{value}.safetensors"
        one_line_error(run_ckv("compress", checkpoints["sasrec"], "--data", "ml-100k", "-o", new, *CLI_ARGS,
                               opt, value, cwd=d), fragment)
        assert not new.exists()


def test_cli_compress_generic_csv(cli_run, checkpoints, ds):
    """ML-100K's events as a CSV with custom column names: the same dataset, hence the same artifact tensors."""
    d, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    users = ds.user_ids[np.repeat(np.arange(ds.n_users), ds.lengths())]
    items = ds.item_ids[ds.items]
    with open(d / "events.csv", "w") as f:
        f.write("uid,iid,ts,stars\n")
        f.writelines(f"{u},{i},{t},{r:g}\n" for u, i, t, r in zip(users, items, ds.timestamps, ds.ratings))
    out = d / "csv.safetensors"
    p = run_ckv("compress", checkpoints["sasrec"], "--data", d / "events.csv", "--columns",
                "user=uid,item=iid,timestamp=ts,rating=stars", "-o", out, *CLI_ARGS, "--json", d / "csv.json", cwd=d)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    report = json.loads((d / "csv.json").read_text())
    reference = json.loads((d / "r.json").read_text())
    assert report["dataset"] == "events.csv" and report["data_fingerprint"] == ds.fingerprint == reference["data_fingerprint"]
    assert report["accounting"] == reference["accounting"]
    assert Artifact.open(out).meta["checksums"] == Artifact.open(d / "out.safetensors").meta["checksums"]
