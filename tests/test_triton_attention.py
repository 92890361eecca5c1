"""The fused Triton kernel (ckv_cli/serve/triton_attention.py) equals decode-then-attend, run on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1). Skipped where triton is not installed (it is the optional extra ckv-cli[gpu]).
On a GPU, bench/gpu_attention.py checks the compiled kernel against the same reference."""
from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest
import torch

pytestmark = pytest.mark.slow  # ~1.5 minutes in the interpreter: the full tier (make test-all) runs it


def _interpreted_module():
    """The module with its kernels built for Triton's interpreter. TRITON_INTERPRET=1 must hold when triton itself
    is first imported (its library functions, tl.sum, tl.max, ..., are built then) and while the kernels run
    (triton checks it lazily), so it is set for the rest of the test process; nothing else in ckv uses triton."""
    built_for_gpu = sys.modules.get("triton") is not None and "TRITON_INTERPRET" not in os.environ
    if os.environ.get("TRITON_INTERPRET", "1") != "1" or built_for_gpu:
        pytest.skip("triton is (or will be) built for a GPU in this process (TRITON_INTERPRET unset at its import, or "
                    "not 1): these tests run the kernel in Triton's interpreter; run this file on its own",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    # 3.8: older interpreters cannot run a loop whose bounds are tensors (range(lo, hi) over a split)
    pytest.importorskip("triton", minversion="3.8", reason="triton is not installed (optional extra: pip install "
                                                           "'ckv-cli[gpu]'); the fused kernel's tests run it in "
                                                           "Triton's interpreter")
    import ckv_cli.serve.triton_attention as module
    return module if module.interpreting() else importlib.reload(module)


ta = _interpreted_module()

from conftest import load_script  # noqa: E402
from ckv_cli.serve.attention import (GATHER, SCATTER, SILU, SOFTMAX, CompressedStream,  # noqa: E402
                                     compressed_attention, decode_then_attend)

REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FORMS = [GATHER, SCATTER, "gather/scatter", "scatter/gather"]
# lengths (B users, L = max; 0 = no cached token), d_k, d_v, heads, queries T, pool m, user dim r, bias shape,
# index dtype, launch config overrides
CASES = {
    "ragged-1q": ([20, 7, 0, 13], 16, 16, 1, 1, 8, 0, "BTL", torch.int64, {}),
    "one-token": ([1], 16, 16, 2, 3, 64, 3, "BHTL", torch.int32, {}),
    "splits-tblocks": ([37, 5, 0], 32, 32, 1, 20, 20, 2, None, torch.int64, {"splits": 3, "block_l": 16, "block_t": 16}),
    "dk-ne-dv": ([9, 4, 12], 16, 24, 2, 2, 12, 0, "B1L", torch.int32, {}),  # head widths 8 and 12, bias over T
    "long-heads": ([70, 69, 1, 33, 0], 64, 64, 4, 1, 300, 4, "BTL", torch.int64, {"splits": 2, "block_l": 16}),
    "many-tiles": ([50, 33, 3], 16, 16, 1, 2, 40, 0, "BTL", torch.int32, {"splits": 1, "block_l": 16}),
}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def make_inputs(case: str, kind: str, dtype=torch.float32):
    """Random streams, queries, mask and bias; padding slots hold random valid indices (the mask hides them)."""
    lengths, dk, dv, H, T, m, r, bias_shape, idx_dtype, _ = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, kind)).encode()))
    B, L = len(lengths), max(lengths)

    def stream(d):
        pool = torch.randn(m, d, generator=gen)
        idx = torch.randint(0, m, (B, L), generator=gen).to(idx_dtype)
        if not r:
            return CompressedStream(pool.to(dtype), idx)
        basis = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q  # (d, r)
        return CompressedStream(pool.to(dtype), idx, 0.5 * torch.randn(B, L, r, generator=gen), basis.to(dtype))

    k, v = stream(dk), stream(dv)
    q = torch.randn(B, T, dk, generator=gen).to(dtype)
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    shape = {"BTL": (B, T, L), "BHTL": (B, H, T, L), "B1L": (B, 1, L), None: None}[bias_shape]
    bias = None if shape is None else torch.randn(*shape, generator=gen).to(dtype)
    kw = dict(kind=kind, bias=bias, n_heads=H, norm=50.0 if kind == SILU else None)
    return q, k, v, valid, kw


def upcast(s: CompressedStream) -> CompressedStream:
    return CompressedStream(s.pool.float(), s.idx, None if s.user is None else s.user.float(),
                            None if s.basis is None else s.basis.float())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_decode_then_attend(case, kind, form):
    q, k, v, valid, kw = make_inputs(case, kind)
    out = ta.compressed_attention_triton(q, k, v, valid, form=form, config=CASES[case][-1], **kw)
    ref = decode_then_attend(q, k, v, valid, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= REL[torch.float32]
    empty = valid.sum(1) == 0
    assert not out[empty].any()  # a user with no cached token attends to nothing


BF16_INTERPRETER = pytest.mark.skip(reason="Triton 3.9's interpreter holds bf16 tiles as raw uint16 bits and tl.dot "
                                          "multiplies those integers (garbage); bf16 is checked on a GPU only")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_INTERPRETER)])
@pytest.mark.parametrize("form", [GATHER, SCATTER])
@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
@pytest.mark.parametrize("case", ["ragged-1q", "long-heads"])
def test_half_pools_accumulate_in_fp32(case, kind, form, dtype):
    """fp16/bf16 pools and queries, fp32 accumulation: within 1e-3 (fp16) / 1e-2 (bf16) of the fp32 reference on
    the same rounded inputs."""
    q, k, v, valid, kw = make_inputs(case, kind, dtype)
    out = ta.compressed_attention_triton(q, k, v, valid, form=form, config=CASES[case][-1], **kw)
    kw32 = {**kw, "bias": None if kw["bias"] is None else kw["bias"].float()}
    ref = decode_then_attend(q.float(), upcast(k), upcast(v), valid, **kw32)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= REL[dtype]


@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
def test_strided_inputs_and_default_config(kind):
    """Index, mask and bias as strided views (no copies made by the caller), the default launch config."""
    q, k, v, valid, kw = make_inputs("long-heads", kind)
    B, L = valid.shape
    wide = torch.zeros(B, 2 * L, dtype=k.idx.dtype)
    wide[:, ::2] = k.idx
    k2 = CompressedStream(k.pool, wide[:, ::2], k.user, k.basis)  # idx stride 2 along L
    wide_valid = torch.zeros(2 * L, B, dtype=torch.bool)
    wide_valid[::2] = valid.T
    valid2 = wide_valid[::2].T  # (B, L), transposed strides
    bias2 = kw["bias"].transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, L) with permuted strides
    out = ta.compressed_attention_triton(q, k2, v, valid2, **{**kw, "bias": bias2})
    assert rel_err(out, decode_then_attend(q, k, v, valid, **kw)) <= REL[torch.float32]


@pytest.mark.parametrize("B,L", [(2, 0), (0, 5)])
def test_nothing_to_attend(B, L):
    k = CompressedStream(torch.randn(8, 16), torch.zeros(B, L, dtype=torch.long))
    q = torch.randn(B, 3, 16)
    for form in (GATHER, SCATTER, "auto"):
        out = ta.compressed_attention_triton(q, k, k, torch.zeros(B, L, dtype=torch.bool), form=form)
        assert out.shape == (B, 3, 16) and not out.any()


def test_all_masked_split_and_row():
    """A split whose keys are all padding, and a user whose only keys carry weight -inf bias: zeros, no NaN."""
    q, k, v, valid, kw = make_inputs("splits-tblocks", SOFTMAX)
    bias = torch.zeros(valid.shape[0], q.shape[1], valid.shape[1])
    bias[1] = float("-inf")  # user 1: every key scored -inf -> softmax over nothing -> zeros (nan_to_num)
    out = ta.compressed_attention_triton(q, k, v, valid, kind=SOFTMAX, bias=bias, config={"splits": 3, "block_l": 16})
    ref = decode_then_attend(q, k, v, valid, kind=SOFTMAX, bias=bias)
    assert not out.isnan().any() and not out[1].any()
    assert rel_err(out, ref) <= REL[torch.float32]


def test_falls_back_to_torch():
    q, k, v, valid, kw = make_inputs("ragged-1q", SOFTMAX)
    q64 = q.double()
    assert "share one of" in ta.why_not(q64, k, v, valid)
    kd = CompressedStream(k.pool.double(), k.idx)
    vd = CompressedStream(v.pool.double(), v.idx)
    out = ta.compressed_attention_triton(q64, kd, vd, valid, **{**kw, "bias": kw["bias"].double()})
    assert out.dtype == torch.float64  # the torch path ran (the kernel takes no fp64)
    assert rel_err(out, decode_then_attend(q64, kd, vd, valid, **{**kw, "bias": kw["bias"].double()})) <= 1e-12
    qg = q.clone().requires_grad_()
    assert "autograd" in ta.why_not(qg, k, v, valid)
    out = ta.compressed_attention_triton(qg, k, v, valid, **{**kw, "kind": SILU})
    out.sum().backward()  # the torch path ran: differentiable (silu; its softmax has an in-place nan_to_num_)
    assert qg.grad is not None
    assert "bias must be" in ta.why_not(q, k, v, valid, torch.zeros(1, 1, 1, 1, 1))
    assert ta.why_not(q, k, v, valid, kw["bias"]) is None


def test_bad_arguments():
    q, k, v, valid, _ = make_inputs("ragged-1q", SOFTMAX)
    with pytest.raises(ValueError, match="form"):
        ta.compressed_attention_triton(q, k, v, valid, form="rows")
    with pytest.raises(ValueError, match="form"):
        ta.compressed_attention_triton(q, k, v, valid, form="gather/bins")
    with pytest.raises(ValueError, match="kind"):
        ta.compressed_attention_triton(q, k, v, valid, kind="relu")
    with pytest.raises(ValueError, match="heads"):
        ta.compressed_attention_triton(q, k, v, valid, n_heads=3)


def test_choose_forms_rule():
    # one query per user, long history: the score table and the value bins (the paper's regime)
    assert ta.choose_triton_forms(1000, 1024, 1024, 1, 256, 256) == (SCATTER, SCATTER)
    assert ta.choose_triton_forms(4000, 10000, 10000, 1, 256, 256) == (SCATTER, SCATTER)
    # short history, big pool: rows
    assert ta.choose_triton_forms(20, 10000, 10000, 1, 64, 64) == (GATHER, GATHER)
    # 100 queries share each gathered row; a 10000-entry pool per query costs more than the rows
    assert ta.choose_triton_forms(1000, 10000, 10000, 100, 256, 256) == (GATHER, GATHER)
    # bins that would not fit: rows for the values
    assert ta.choose_triton_forms(4000, 10000, 10000, 100, 256, 256, n_users=4096)[1] == GATHER
    torch.use_deterministic_algorithms(True)
    try:  # no atomics while torch is asked for determinism
        assert ta.choose_triton_forms(1000, 1024, 1024, 1, 256, 256)[1] == GATHER
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_matches_torch_path():
    """`auto` through the kernel equals the torch compressed path (both forms of each side are exact)."""
    q, k, v, valid, kw = make_inputs("long-heads", SILU)
    out = ta.compressed_attention_triton(q, k, v, valid, **kw)
    assert rel_err(out, compressed_attention(q, k, v, valid, **kw)) <= REL[torch.float32]


def test_bench_script_runs_on_the_interpreter(tmp_path):
    """bench/gpu_attention.py end to end on tiny shapes (CPU, interpreter): every variant agrees with
    decode-then-attend, the JSON and the table are written."""
    import json

    bench = load_script("bench/gpu_attention.py", "bench_gpu_attention")
    argv = ["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--history", "24", "--d", "16", "--pool", "8",
            "--kind", "softmax", "silu", "--forms", "gather/gather", "scatter/scatter", "auto", "--repeats", "1",
            "--min-sample-ms", "0", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "gpu_attention.json").read_text())["rows"]
    variants = {(r["kind"], r["variant"]) for r in rows}
    assert ("softmax", "sdpa") in variants and ("silu", "sdpa (softmax)") in variants
    assert {("silu", "torch-ckv"), ("silu", "triton scatter/scatter"), ("softmax", "triton auto")} <= variants
    assert all(r["ok"] is not False and "error" not in r for r in rows)
    assert all(r["vs_sdpa"] > 0 for r in rows)
    assert "triton gather/gather" in (tmp_path / "gpu_attention.txt").read_text()


def test_kernels_compile_for_sm90():
    """bench/kernel_resources.py --quick: the kernels lower to a cubin for sm_90 with Triton's bundled ptxas, on
    CPU (a subprocess: this process has TRITON_INTERPRET=1)."""
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "bench" / "kernel_resources.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--arch", "90"], capture_output=True, text=True,
                         env={**env, "TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 3 and all("regs=" in line for line in lines)  # attn + merge, attn
