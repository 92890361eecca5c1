#!/usr/bin/env python
"""A dense cache side read by several heads: the block-diagonal bmm that reads it in place
(`ckv_cli.serve.next_item._dense_scores` / `_dense_values`) against the per-head products `qh @ x^T` / `w @ x`, which
copy a (B, L, d) cache into a per-head layout first. Random fp32 tensors; the median of --repeats calls each, the two
forms alternating; the largest difference between their results is printed too.

    python bench/dense_heads.py --threads 1                 # 512 users x 199 tokens, d 64, heads 1 2 4, one query
Runs from the repository root without installing ckv (it puts the root on sys.path).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._machine import machine  # noqa: E402
from ckv_cli.serve import next_item  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--history", type=int, default=199)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--queries", type=int, default=1, help="T, queries per user")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def timed(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, L, d, T = args.users, args.history, args.d, args.queries
    x = torch.randn(B, L, d, generator=g)
    rows = []
    for H in args.heads:
        qh = torch.randn(H, B, T, d // H, generator=g)
        w = torch.randn(H, B, T, L, generator=g)
        per_head = x.view(B, L, H, d // H).permute(2, 0, 1, 3)  # (H, B, L, dh), a view: matmul copies it
        ms = timed({"scores_per_head": lambda: qh @ per_head.transpose(-1, -2),
                    "scores_served": lambda: next_item._dense_scores(x, qh),
                    "values_per_head": lambda: w @ per_head, "values_served": lambda: next_item._dense_values(x, w)},
                   args.repeats)
        diff = max(float((qh @ per_head.transpose(-1, -2) - next_item._dense_scores(x, qh)).abs().max()),
                   float((w @ per_head - next_item._dense_values(x, w)).abs().max()))
        rows.append({"heads": H, **ms, "max_abs_diff": diff})
        print(f"H={H}: scores {ms['scores_per_head']:.2f} -> {ms['scores_served']:.2f} ms, values "
              f"{ms['values_per_head']:.2f} -> {ms['values_served']:.2f} ms (per-head product -> served; max |diff| "
              f"{diff:.1e})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
