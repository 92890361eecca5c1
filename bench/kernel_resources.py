#!/usr/bin/env python
"""Compile the fused compressed-attention kernels for a GPU architecture without a GPU, and report what each
variant uses per thread and block (registers, spill stack, shared memory). Issue 19 part 5.

Triton's wheel carries ptxas and cuobjdump, so the kernels that `compressed_attention_triton` would launch
(every kind x form x splits x user part the dispatcher can pick) are lowered to PTX and assembled to a cubin for
sm_<arch> here on CPU: a compile error, a shared-memory budget overrun or a register spill shows before any
GPU time is spent. The launches are the real ones: `_launch` builds them from small CPU inputs of the given d.

    python bench/kernel_resources.py                  # sm_90 (H100/H200), d 256, every variant (about a minute)
    python bench/kernel_resources.py --quick --arch 80
Exits 1 when a variant fails to compile, 2 when triton is missing or TRITON_INTERPRET=1 is set (the kernels are
then built for the interpreter, not a GPU).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ckv_cli.serve.attention import SILU, SOFTMAX, CompressedStream  # noqa: E402

FORMS = ["gather/gather", "scatter/scatter", "scatter/gather", "gather/scatter"]
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8"}
SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    p.add_argument("--d", type=int, default=256, help="model width (one head)")
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--quick", action="store_true", help="two variants only (the tests use this)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def variants(quick: bool):
    """(kind, form, splits, user dim, bias) the dispatcher can launch."""
    if quick:
        return [(SOFTMAX, "gather/gather", 2, 0, False), (SILU, "scatter/scatter", 1, 8, True)]
    out = []
    for kind, form, splits, r in itertools.product([SOFTMAX, SILU], FORMS, [1, 2], [0, 8]):
        if splits > 1 and form.endswith("scatter"):
            continue  # value bins run in one split
        out.append((kind, form, splits, r, r > 0))
    return out


def signature_type(a) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + TYPES[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {type(a).__name__}")


def resources(cubin: bytes) -> dict:
    """Registers, spill stack and static shared memory per thread/block from cuobjdump (shipped with triton)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((s for s in text.splitlines() if "REG:" in s), "")
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {"registers": int(fields.get("REG", -1)), "spill_stack_bytes": int(fields.get("STACK", -1))}


def compile_launch(kernel, args, kwargs, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature = {name: signature_type(a) for name, a in zip(kernel.arg_names, args)}
    signature.update({name: "constexpr" for name in kwargs})
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, kwargs), target=GPUTarget("cuda", arch, 32), options=options)
    return {"kernel": kernel.__name__, "shared_bytes": compiled.metadata.shared, **resources(compiled.asm["cubin"]),
            "compile_s": time.perf_counter() - t0, **options,
            **{k: kwargs[k] for k in ("BLOCK_T", "BLOCK_L") if k in kwargs}}


def launches(ta, kind, form, splits, r, bias, d, T, dtype) -> list:
    """The kernel launches `compressed_attention_triton` makes for these inputs (captured, not run)."""
    gen = torch.Generator().manual_seed(0)
    B, L, m = 2, 96, 64

    def stream():
        pool = torch.randn(m, d, generator=gen).to(dtype)
        idx = torch.randint(0, m, (B, L), generator=gen, dtype=torch.int32)
        if not r:
            return CompressedStream(pool, idx)
        return CompressedStream(pool, idx, torch.randn(B, L, r, generator=gen).to(dtype),
                                torch.randn(d, r, generator=gen).to(dtype))

    k, v = stream(), stream()
    q = torch.randn(B, T, d, generator=gen).to(dtype)
    valid = torch.ones(B, L, dtype=torch.bool)
    b = torch.randn(B, T, L, generator=gen).to(dtype) if bias else None
    forms = ta._forms(form, q, k, v, kind, 1)
    cfg = {**ta.default_config(B, T, L, d, d, forms, 1, "cpu", user=r > 0), "splits": splits}
    captured = []
    ta._launch(q, k, v, valid, 1.0, kind, b, 1.0 / L, forms, 1, cfg,
               launch=lambda kernel, grid, args, kwargs: captured.append((kernel, args, kwargs)))
    return captured


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/kernel_resources.py: TRITON_INTERPRET=1 builds the kernels for the interpreter; unset it")
        return 2
    from ckv_cli.serve import triton_attention as ta
    if not ta.available():
        print("bench/kernel_resources.py: triton is not installed (pip install 'ckv-cli[gpu]')")
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows, failed = [], 0
    for kind, form, splits, r, bias in variants(args.quick):
        base = {"kind": kind, "form": form, "splits": splits, "user_dim": r, "bias": bias}
        for kernel, kargs, kwargs in launches(ta, kind, form, splits, r, bias, args.d, args.queries, dtype):
            try:
                row = {**base, **compile_launch(kernel, kargs, kwargs, args.arch)}
            except Exception as e:  # the compiler's message, first line
                failed += 1
                row = {**base, "kernel": kernel.__name__, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            rows.append(row)
            print(f"sm_{args.arch} {kind:7s} {form:15s} splits={splits} r={r} bias={int(bias)} {row['kernel']:13s} "
                  + (row["error"] if "error" in row else
                     f"BLOCK_L={row.get('BLOCK_L', '-')} warps={row['num_warps']} regs={row.get('registers')} "
                     f"spill={row.get('spill_stack_bytes')}B shared={row['shared_bytes']}B "
                     f"({row['compile_s']:.1f}s)"), flush=True)
    over = [r for r in rows if r.get("shared_bytes", 0) > SMEM.get(args.arch, 1 << 30)]
    if over:
        print(f"{len(over)} variants need more shared memory than sm_{args.arch} gives a block")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "d": args.d, "dtype": args.dtype, "rows": rows}, indent=1))
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
