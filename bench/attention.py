#!/usr/bin/env python
"""Attention from the compressed cache vs the full cache (CollectiveKV, arXiv 2601.19178; issue 7 part 3).

One attention layer, one head, queries (B, T, d) over B users' histories of L cached tokens:
- full: K and V materialised (B, L, d) each, `full_attention` (softmax through scaled_dot_product_attention);
- ckv: the same attention read from the compressed form, `compressed_attention`: a pool of m entries per
  stream and one index per token (plus r user values with --user-dim), K and V never built.
Both sides use the same dtype: fp32 on CPU, fp16 on CUDA (--dtype to change). Inputs are random (timing only);
every case also checks the two sides agree on a few users (decode-then-attend on those users).

Bytes, counted honestly per layer: full = B L 2 d at the dtype's width; ckv per-user = what is stored per token
(two indices packed at ceil(log2 m) bits, 2 r int8 user values) plus 2 fp16 scales per user with r > 0; the
pools (2 m d at the dtype's width) are shared by every user and reported apart. In memory the indices are read
as int32 (int64 where the device's gather needs it): the "read" column counts that, plus the pools.

    python bench/attention.py --device cpu --quick             # a few minutes on 2 cores
    python bench/attention.py --device cuda --json attn.json   # the whole grid
Runs from the repository root without installing ckv (it puts the root on sys.path): torch, numpy, rich.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._machine import machine  # noqa: E402

from ckv_cli.serve.attention import (SILU, SOFTMAX, CompressedStream, choose_form, compressed_attention,  # noqa: E402
                                  full_attention)

GRID = {"batch": [1, 64, 512], "history": [50, 200, 1000, 4000], "d": [64, 256], "pool": [1024, 10000]}
QUICK = {"batch": [1, 512], "history": [50, 1000], "d": [256], "pool": [1024, 10000]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECK_USERS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="both sides (default fp32 on cpu, fp16 on cuda)")
    p.add_argument("--quick", action="store_true", help=f"subset: {QUICK}")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--history", type=int, nargs="+")
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--pool", type=int, nargs="+")
    p.add_argument("--queries", type=int, nargs="+", default=[1],
                   help="queries per user: 1 scores one new event, 100 scores 100 candidates (default 1)")
    p.add_argument("--kind", choices=[SOFTMAX, SILU], nargs="+", default=[SOFTMAX])
    p.add_argument("--user-dim", type=int, default=0, help="r user-specific values per token (int8), default 0")
    p.add_argument("--form", choices=["auto", "gather", "scatter"], default="auto")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per case; the median is reported")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="calls per sample so one sample lasts this long")
    p.add_argument("--mem-cap-gb", type=float, help="skip cases whose full cache plus its scores exceed this "
                                                    "(default 2 on cpu, 40 on cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every row and the machine here")
    args = p.parse_args(argv)
    base = QUICK if args.quick else GRID
    for key in base:
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    args.mem_cap_gb = args.mem_cap_gb or (2.0 if args.device == "cpu" else 40.0)
    return args


# ---------------------------------------------------------------------------------------------- machine


def machine_line(m: dict) -> str:
    gpu = f"{m['gpu']}; host " if "gpu" in m else ""
    return f"{gpu}{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}"


def index_dtype(device: str) -> torch.dtype:
    """int32 where gather, scatter_add and embedding_bag all take it (halves the index bytes read), else int64."""
    try:
        i = torch.zeros(1, 2, dtype=torch.int32, device=device)
        x = torch.zeros(1, 3, device=device)
        torch.gather(x, 1, i), x.scatter_add(1, i, torch.ones(1, 2, device=device))
        ones = torch.ones(1, 2, device=device)
        torch.nn.functional.embedding_bag(i, torch.zeros(3, 2, device=device), per_sample_weights=ones, mode="sum")
        return torch.int32
    except (RuntimeError, TypeError):
        return torch.int64


# ---------------------------------------------------------------------------------------------- inputs


def make_stream(gen, B, L, d, m, r, dtype, idx_dtype, device) -> CompressedStream:
    pool = torch.randn(m, d, generator=gen).to(device, dtype)
    idx = torch.randint(0, m, (B, L), generator=gen).to(device, idx_dtype)
    if not r:
        return CompressedStream(pool, idx)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q.to(device, dtype)  # (d, r)
    return CompressedStream(pool, idx, (0.1 * torch.randn(B, L, r, generator=gen)).to(device, dtype), basis)


def full_bytes(B, L, d, dtype) -> int:
    return B * L * 2 * d * torch.empty(0, dtype=dtype).element_size()  # K and V


def ckv_bytes(B, L, d, m, r, dtype, idx_dtype) -> dict:
    bits = max(1, math.ceil(math.log2(m)))
    el = torch.empty(0, dtype=dtype).element_size()
    per_user = (2 * B * L * bits + 7) // 8 + 2 * B * L * r + (2 * 2 * B if r else 0)  # indices, int8 u, fp16 scales
    shared = 2 * m * d * el + 2 * d * r * el  # pools, bases
    read = 2 * B * L * torch.empty(0, dtype=idx_dtype).element_size() + 2 * B * L * r * el + shared
    return {"per_user": per_user, "shared": shared, "read_in_memory": read, "index_bits": bits}


def largest_temporary(B, L, T, dtype) -> int:
    """The full side's scores and weights (B, T, L) (the compressed side runs in chunks of users)."""
    return 3 * B * T * L * torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, min_sample_ms: float) -> float:
    """Median over `repeats` samples of the mean time per call; each sample runs enough calls to last
    `min_sample_ms` (one warm-up call first)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = (time.perf_counter() - t0) * 1e3
    calls = max(1, math.ceil(min_sample_ms / max(one, 1e-3)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(samples)


def check(q, k, v, valid, kind, form) -> float:
    """Max relative difference, compressed vs decode-then-attend, on the first CHECK_USERS users."""
    n = min(CHECK_USERS, q.shape[0])
    sub = lambda s: CompressedStream(s.pool, s.idx[:n], None if s.user is None else s.user[:n], s.basis)  # noqa: E731
    ks, vs = sub(k), sub(v)
    a = compressed_attention(q[:n], ks, vs, valid[:n], kind=kind, form=form).float()
    ref = full_attention(q[:n], ks.decode(), vs.decode(), valid[:n], kind=kind).float()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------- cases


def cases(args):
    for d in args.d:
        for B in args.batch:
            for L in args.history:
                for T in args.queries:
                    for kind in args.kind:
                        yield d, B, L, T, kind


@torch.no_grad()
def run_group(args, gen, d, B, L, T, kind, dtype, idx_dtype) -> list[dict]:
    """One full-cache timing and one compressed timing per pool size."""
    dev, cap = args.device, args.mem_cap_gb * 2**30
    rows, base = [], {"batch": B, "history": L, "d": d, "queries": T, "kind": kind}
    fb, tmp = full_bytes(B, L, d, dtype), largest_temporary(B, L, T, dtype)
    if fb + tmp > cap:
        return [{**base, "pool": m, "skipped": f"full cache + scores {(fb + tmp) / 2**30:.1f} GiB > cap {args.mem_cap_gb:g}"}
                for m in args.pool]
    q = torch.randn(B, T, d, generator=gen).to(dev, dtype)
    K = torch.randn(B, L, d, generator=gen).to(dev, dtype)
    V = torch.randn(B, L, d, generator=gen).to(dev, dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=dev)
    full_ms = median_ms(lambda: full_attention(q, K, V, valid, kind=kind), dev, args.repeats, args.min_sample_ms)
    del K, V
    for m in args.pool:
        k = make_stream(gen, B, L, d, m, args.user_dim, dtype, idx_dtype, dev)
        v = make_stream(gen, B, L, d, m, args.user_dim, dtype, idx_dtype, dev)
        ckv_ms = median_ms(lambda: compressed_attention(q, k, v, valid, kind=kind, form=args.form), dev,
                           args.repeats, args.min_sample_ms)
        cb = ckv_bytes(B, L, d, m, args.user_dim, dtype, idx_dtype)
        form = (f"{choose_form(L, m, T, 'scores', dev, B)}/{choose_form(L, m, T, 'values', dev, B)}"
                if args.form == "auto" else args.form)
        rows.append({**base, "pool": m, "form": form, "full_ms": full_ms, "ckv_ms": ckv_ms, "speedup": full_ms / ckv_ms,
                     "full_bytes": fb, "ckv_per_user_bytes": cb["per_user"], "ckv_shared_bytes": cb["shared"],
                     "ckv_read_bytes": cb["read_in_memory"], "index_bits": cb["index_bits"],
                     "byte_ratio": fb / cb["per_user"], "read_ratio": fb / cb["read_in_memory"],
                     "max_rel_err": check(q, k, v, valid, kind, args.form)})
        del k, v
    return rows


# ---------------------------------------------------------------------------------------------- output

COLUMNS = [("batch", "B"), ("history", "L"), ("d", "d"), ("pool", "m"), ("queries", "T"), ("kind", "kind"),
           ("form", "form (scores/values)"), ("full_ms", "full ms"), ("ckv_ms", "ckv ms"), ("speedup", "speedup"),
           ("full_bytes", "full MB"), ("ckv_per_user_bytes", "ckv per-user MB"), ("byte_ratio", "byte ratio"),
           ("ckv_read_bytes", "ckv MB read (+pools)"), ("read_ratio", "read ratio")]


def cell(key: str, row: dict) -> str:
    if "skipped" in row and key not in ("batch", "history", "d", "pool", "queries", "kind"):
        return row["skipped"] if key == "form" else ""
    val = row.get(key, "")
    if key.endswith("_bytes"):
        return f"{val / 1e6:,.2f}" if val >= 1e5 else f"{val / 1e6:.4f}"
    if key.endswith("_ms"):
        return f"{val:.3f}"
    if key in ("speedup", "byte_ratio", "read_ratio"):
        return f"{val:.1f}x"
    return str(val)


def print_table(rows: list[dict], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print("\t".join(h for _, h in COLUMNS))
        for r in rows:
            print("\t".join(cell(k, r) for k, _ in COLUMNS))
        return
    table = Table(title=title)
    for _, h in COLUMNS:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*(cell(k, r) for k, _ in COLUMNS))
    Console(width=220).print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/attention.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, idx_dtype = DTYPES[args.dtype], index_dtype(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    mach = machine(args.device)
    rows = []
    for d, B, L, T, kind in cases(args):
        try:
            rows += run_group(args, gen, d, B, L, T, kind, dtype, idx_dtype)
        except (RuntimeError, MemoryError) as e:  # out of memory or an op the device lacks: say so, go on
            msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows += [{"batch": B, "history": L, "d": d, "queries": T, "kind": kind, "pool": m, "skipped": msg}
                     for m in args.pool]
            if args.device == "cuda":
                torch.cuda.empty_cache()
        last = rows[-1]
        print(f"  B={B} L={L} d={d} T={T} {kind}: " + (last.get("skipped") or f"{last['speedup']:.1f}x"), file=sys.stderr)
    title = (f"attention, one layer, one head: full cache vs compressed ({args.dtype}, indices {str(idx_dtype)[6:]}, "
             f"user dim {args.user_dim}) on {machine_line(mach)}")
    print_table(rows, title)
    bad = [r for r in rows if r.get("max_rel_err", 0) > (1e-4 if args.dtype == "fp32" else 2e-2)]
    if bad:
        print(f"warning: {len(bad)} cases differ from decode-then-attend beyond tolerance", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "dtype": args.dtype, "index_dtype": str(idx_dtype),
                                         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
