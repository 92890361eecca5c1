#!/usr/bin/env python
"""Fused compressed-domain attention (Triton) vs fp16 SDPA over the full cache on one GPU (CollectiveKV, arXiv
2601.19178; issue 19 part 5). Target: the fused kernel >= 3x SDPA at batch 512, history >= 1000, d 256.

One attention layer (one head by default), one query per user (--queries), B users with L cached tokens each:
- sdpa: `F.scaled_dot_product_attention` over the full (B, L, d) fp16 K and V, no mask (all tokens valid: the
  flash backend, the fastest full-cache read torch has);
- full: `full_attention`, the models' path (softmax: SDPA with the validity mask; silu: HSTU's torch ops);
- torch-ckv: the current compressed path `compressed_attention` (torch ops, form auto);
- triton <form>: `compressed_attention_triton`, forms scores/values: gather/gather (rows gathered in the kernel),
  scatter/scatter (score table q P_k^T, value bins, two cuBLAS products), scatter/gather, gather/scatter, and
  auto (the rule's pick).
K and V of the full side are the decoded compressed cache, so every output must agree: each is checked against
decode-then-attend in fp32 on the first users. Timing: CUDA events, warm-up calls first (Triton compiles), the
median over --repeats samples of the mean of enough calls to last --min-sample-ms. The compressed sides rotate
over several independent sets of users' indices (together > 2x the L2 cache), so that per-user bytes come from
HBM as in serving; the pools (shared by all users) stay cached, as they would.

    python bench/gpu_attention.py --out OUT_DIR            # the grid below, a few minutes on one H100/H200
    python bench/gpu_attention.py --out OUT_DIR --tune     # also tries launch configs per case (longer)
Writes OUT_DIR/gpu_attention.json and OUT_DIR/gpu_attention.txt. Without a GPU it prints one line and exits 0.
Runs from the repository root without installing ckv: torch, triton (rich for the table if present).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._machine import machine  # noqa: E402
from ckv_cli.serve.attention import (SILU, SOFTMAX, CompressedStream, compressed_attention,  # noqa: E402
                                  decode_then_attend, full_attention)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TRITON_FORMS = ["gather/gather", "scatter/scatter", "scatter/gather", "gather/scatter", "auto"]
CHECK_USERS = 8
TOL = {"fp16": 1e-2, "bf16": 5e-2, "fp32": 1e-4}  # max |out - ref| / max |ref| against fp32 decode-then-attend
TUNE = {"block_l": [16, 32, 64, 128, 256], "num_warps": [4, 8], "splits": [1, 2, 4]}  # 128+: no row tiles


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for gpu_attention.json and gpu_attention.txt")
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--history", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--d", type=int, nargs="+", default=[256])
    p.add_argument("--pool", type=int, nargs="+", default=[1024, 10000])
    p.add_argument("--kind", choices=[SOFTMAX, SILU], nargs="+", default=[SOFTMAX, SILU])
    p.add_argument("--queries", type=int, default=1, help="queries per user (default 1: one new event)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="fp16 (default); fp32 for --device cpu")
    p.add_argument("--forms", nargs="+", default=TRITON_FORMS, choices=TRITON_FORMS, help="Triton forms to time")
    p.add_argument("--no-torch-ckv", action="store_true", help="skip the torch compressed path")
    p.add_argument("--tune", action="store_true", help=f"also try launch configs per case and form: {TUNE}")
    p.add_argument("--repeats", type=int, default=15, help="timed samples per variant; the median is reported")
    p.add_argument("--min-sample-ms", type=float, default=5.0, help="calls per sample so one sample lasts this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only with TRITON_INTERPRET=1, tiny shapes, to test this script (timings meaningless)")
    args = p.parse_args(argv)
    if min(args.batch + args.history + args.d + args.pool + [args.queries, args.heads, args.repeats]) < 1:
        p.error("sizes, --queries, --heads and --repeats must be >= 1")
    if any(d % args.heads for d in args.d):
        p.error(f"every --d must split into --heads {args.heads}")
    return args


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sample_ms(fn, calls: int, device: str) -> float:
    """Mean ms per call over `calls` calls: CUDA events on a GPU, the wall clock otherwise."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) * 1e3 / calls


def median_ms(fn, device: str, repeats: int, min_sample_ms: float) -> float:
    """Warm-up (compiles), then the median of `repeats` samples; fn(i) gets a call counter (input rotation)."""
    for i in range(3):
        fn(i)
    sync(device)
    one = sample_ms(fn, 3, device)
    calls = max(1, min(1000, math.ceil(min_sample_ms / max(one, 1e-3))))
    return statistics.median(sample_ms(fn, calls, device) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------- inputs


def l2_bytes(device: str) -> int:
    if device != "cuda":
        return 1 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 64 << 20)


def make_sets(gen, B, L, d, m, T, dtype, device, n_sets):
    """Shared pools, then `n_sets` independent batches of users: (q, k stream, v stream, valid) each."""
    pk = torch.randn(m, d, generator=gen).to(device, dtype)
    pv = torch.randn(m, d, generator=gen).to(device, dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, T, d, generator=gen).to(device, dtype)
        ik = torch.randint(0, m, (B, L), generator=gen, dtype=torch.int32).to(device)
        iv = torch.randint(0, m, (B, L), generator=gen, dtype=torch.int32).to(device)
        sets.append((q, CompressedStream(pk, ik), CompressedStream(pv, iv), valid))
    return sets


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def reference(q, k, v, valid, kind, heads) -> torch.Tensor:
    """fp32 decode-then-attend on the first CHECK_USERS users."""
    n = CHECK_USERS
    up = lambda s: CompressedStream(s.pool.float(), s.idx[:n])  # noqa: E731
    return decode_then_attend(q[:n].float(), up(k), up(v), valid[:n], kind=kind, n_heads=heads)


# ---------------------------------------------------------------------------------------------- one case


def full_side(add, q, k, v, valid, kind, H) -> None:
    """The full-cache baselines over the decoded cache (B, L, d), freed on return: SDPA without a mask (softmax;
    with silu timed as the full-cache read bound, not checked: SDPA computes softmax) and the models' path."""
    B, T, d = q.shape
    K, V = k.decode(), v.decode()  # (B, L, d) each: the full cache = the decoded compressed one
    qh = lambda x: x.view(B, x.shape[1], H, d // H).transpose(1, 2)  # noqa: E731  (B, H, *, dh)
    sdpa = lambda: F.scaled_dot_product_attention(qh(q), qh(K), qh(V))  # noqa: E731
    check = sdpa().transpose(1, 2).reshape(B, T, d) if kind == SOFTMAX else None
    add("sdpa" if kind == SOFTMAX else "sdpa (softmax)", lambda i: sdpa(), check, rotating=False)
    full = lambda: full_attention(q, K, V, valid, kind=kind, n_heads=H)  # noqa: E731
    add("full", lambda i: full(), full(), rotating=False)



def tune_configs(form: str) -> list[dict]:
    rows = "gather" in form.split("/") or form == "auto"
    configs = []
    for bl, w, s in itertools.product(TUNE["block_l"], TUNE["num_warps"], TUNE["splits"]):
        if (bl >= 128 and rows) or (s > 1 and form.endswith("/scatter")):
            continue
        configs.append({"block_l": bl, "num_warps": w, "splits": s})
    return configs


@torch.no_grad()
def run_case(args, ta, gen, B, L, d, m, kind) -> list[dict]:
    dev, dtype, T, H = args.device, DTYPES[args.dtype], args.queries, args.heads
    per_set = 2 * B * L * 4 + B * T * d * torch.empty(0, dtype=dtype).element_size()  # indices + queries
    n_sets = max(1, min(64, math.ceil(2 * l2_bytes(dev) / per_set)))
    sets = make_sets(gen, B, L, d, m, T, dtype, dev, n_sets)
    q0, k0, v0, valid = sets[0]
    ref = reference(q0, k0, v0, valid, kind, H)
    base = {"batch": B, "history": L, "d": d, "pool": m, "kind": kind, "queries": T, "heads": H, "index_sets": n_sets}
    rows = []

    def add(name, fn, out, config=None, form=None, rotating=True):
        ms = median_ms(fn, dev, args.repeats, args.min_sample_ms)
        err = None if out is None else rel_err(out[:CHECK_USERS], ref)
        rows.append({**base, "variant": name, "ms": ms, "max_rel_err": err, "ok": None if err is None else
                     err <= TOL[args.dtype], "form": form, "config": config, "rotating_inputs": rotating})

    full_side(add, q0, k0, v0, valid, kind, H)
    if not args.no_torch_ckv:
        torch_ckv = lambda i: compressed_attention(*sets[i % n_sets], kind=kind, n_heads=H)  # noqa: E731
        add("torch-ckv", torch_ckv, torch_ckv(0))
    for form in args.forms:
        forms = ta._forms(form, q0, k0, v0, kind, H)
        cfg = ta.default_config(B, T, L, d // H, d // H, forms, H, dev)
        candidates = [cfg] + ([{**cfg, **c} for c in tune_configs(form)] if args.tune else [])
        times = {}  # config index -> ms (tuning: fewer repeats); the best is timed again below
        for j, c in enumerate(candidates):
            fn = lambda i, c=c: ta.compressed_attention_triton(*sets[i % n_sets], kind=kind, form=form,  # noqa: E731
                                                              n_heads=H, config=c)
            try:
                times[j] = median_ms(fn, dev, max(3, args.repeats // 3), args.min_sample_ms) if args.tune else None
            except Exception as e:  # a config the GPU cannot run (shared memory, registers): say so, go on
                if j == 0:
                    rows.append({**base, "variant": f"triton {form}", "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
        if not times:
            continue
        best = min(times, key=lambda j: times[j] if times[j] is not None else 0.0)
        fn = lambda i, c=candidates[best]: ta.compressed_attention_triton(*sets[i % n_sets], kind=kind,  # noqa: E731
                                                                           form=form, n_heads=H, config=c)
        add(f"triton {form}", fn, fn(0), config=candidates[best], form="/".join(forms))
        if args.tune:
            rows[-1]["default_config_tuning_ms"] = times.get(0)
            rows[-1]["configs_tried"] = len(times)
    sdpa_ms = rows[0]["ms"]
    full_ms = next(r["ms"] for r in rows if r["variant"] == "full")
    for r in rows:
        if "ms" in r:
            r["vs_sdpa"], r["vs_full"] = sdpa_ms / r["ms"], full_ms / r["ms"]
    return rows


# ---------------------------------------------------------------------------------------------- output

COLUMNS = [("batch", "B"), ("history", "L"), ("d", "d"), ("pool", "m"), ("kind", "kind"), ("variant", "variant"),
           ("form", "form"), ("ms", "ms"), ("vs_sdpa", "x sdpa"), ("vs_full", "x full"), ("max_rel_err", "rel err"),
           ("config", "config")]


def cell(key: str, row: dict) -> str:
    val = row.get(key)
    if key == "ms" and "error" in row:
        return row["error"]
    if val is None:
        return ""
    if key == "ms":
        return f"{val:.3f}"
    if key in ("vs_sdpa", "vs_full"):
        return f"{val:.2f}x"
    if key == "max_rel_err":
        return f"{val:.1e}" + ("" if row.get("ok") else " FAIL")
    if key == "config":
        return " ".join(f"{k}={v}" for k, v in val.items() if k in ("block_t", "block_l", "num_warps", "splits"))
    return str(val)


def table_text(rows: list[dict], title: str) -> str:
    cells = [[h for _, h in COLUMNS]] + [[cell(k, r) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_attention.py: no CUDA GPU visible to torch; nothing measured")
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench/gpu_attention.py: --device cpu needs TRITON_INTERPRET=1 (the kernel then runs in Triton's interpreter)")
        return 2
    from ckv_cli.serve import triton_attention as ta
    if not ta.available():
        print("bench/gpu_attention.py: triton is not installed (pip install 'ckv-cli[gpu]'); nothing measured")
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    mach = machine(args.device)
    import triton
    mach["triton"] = triton.__version__
    rows = []
    for d, B, L, m, kind in itertools.product(args.d, args.batch, args.history, args.pool, args.kind):
        try:
            case = run_case(args, ta, gen, B, L, d, m, kind)
        except torch.cuda.OutOfMemoryError as e:
            case = [{"batch": B, "history": L, "d": d, "pool": m, "kind": kind, "variant": "all",
                     "error": f"out of memory: {str(e).splitlines()[0][:100]}"}]
        rows += case
        if args.device == "cuda":
            torch.cuda.empty_cache()
        best = min((r for r in case if r.get("variant", "").startswith("triton") and "ms" in r),
                   key=lambda r: r["ms"], default=None)
        print(f"  B={B} L={L} d={d} m={m} {kind}: best triton "
              + (f"{best['variant']} {best['ms']:.3f} ms, {best['vs_sdpa']:.2f}x sdpa" if best else "none"),
              file=sys.stderr)
    title = (f"one attention layer, {args.heads} head(s), {args.queries} query/user, {args.dtype}: full cache vs "
             f"compressed (int32 indices) on {mach.get('gpu', mach['cpu'])}; torch {mach['torch']}, triton "
             f"{mach['triton']}")
    text = table_text(rows, title)
    print(text)
    bad = [r for r in rows if r.get("ok") is False or "error" in r]
    if bad:
        print(f"warning: {len(bad)} rows failed the check against decode-then-attend or did not run", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_attention.txt").write_text(text + "\n")
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "gpu_attention.json").write_text(json.dumps({"machine": mach, "args": meta, "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
