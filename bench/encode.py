#!/usr/bin/env python
"""Encode throughput and peak memory of the collective codec vs the number of users (CollectiveKV, arXiv
2601.19178; issue 7 part 3).

One process fits one `CollectiveCodec` (pool 1024, d 256 by default) on synthetic calibration vectors, then
streams synthetic users through `CollectiveCodec.encode` in batches of `--batch-users` up to the largest count
of `--users`, reporting at each count (100k and 1M by default). Each batch's vectors are generated, encoded and
dropped, so nothing grows with the number of users except what `--hold` keeps of the output:
- `disk` (default): each batch's fields are bit-packed (indices at ceil(log2 m) bits, as the artifact stores
  them; each batch padded to a byte) and appended to a temporary file, as a streaming writer would;
- `memory`: the same packed bytes appended to one in-memory buffer;
- `raw`: `encode`'s arrays kept as returned (uint32 indices) in a list, as `ckv compress` holds them today;
- `none`: dropped (the encode path alone).
Synthetic vectors: a mixture of 4096 random centres plus noise; history lengths ~ 1 + Poisson(mean - 1).

Timing counts only `encode` (vector generation and packing are outside it): tokens/s = tokens / encode seconds.
Memory: "after fit" is the resident set just before the first batch (VmRSS); "encode peak" is the
peak resident set since then, up to that count (Linux: VmHWM from /proc/self/status, reset after the fit by
writing 5 to /proc/self/clear_refs): it includes the interpreter, torch and the codec, not the fit. "process
peak" is `resource.getrusage(RUSAGE_SELF).ru_maxrss` (fit included). No tracemalloc: it misses torch's memory.
All counts come from one process because the resident size of identical runs in separate processes varied by
up to 100 MB on the 2-core machine (the kernel's proactive reclaim, kdamond, trims cold pages).

    python bench/encode.py                                   # 100k and 1M users, mean history 10
    python bench/encode.py --users 100000 1000000 --hold raw --json enc.json
Runs from the repository root without installing ckv (it puts the root on sys.path): torch, numpy, rich.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._machine import machine as bench_machine, reset_peak, resident_mb, window_peak_mb  # noqa: E402

from ckv_cli.codecs.bits import pack  # noqa: E402
from ckv_cli.codecs.collective import CollectiveCodec  # noqa: E402

CENTRES = 4096


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--mean-len", type=float, default=10.0, help="mean cached tokens per user (default 10)")
    p.add_argument("--pool", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--user-dim", type=int, default=0)
    p.add_argument("--layout", choices=["residual", "concat"], default="residual")
    p.add_argument("--batch-users", type=int, default=2048, help="users per encode call (default 2048)")
    p.add_argument("--calib", type=int, default=20_000, help="calibration vectors for fit (default 20000)")
    p.add_argument("--iters", type=int, default=5, help="k-means iterations of fit (default 5; fit is not timed)")
    p.add_argument("--hold", choices=["disk", "memory", "raw", "none"], default="disk")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- streaming


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux (bytes on macOS)
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10


def synthetic(gen: torch.Generator, centres: torch.Tensor, n: int) -> torch.Tensor:
    pick = torch.randint(0, len(centres), (n,), generator=gen)
    return centres[pick] + 0.5 * torch.randn(n, centres.shape[1], generator=gen)  # (n, d)


def batch_lengths(rng: np.random.Generator, n_users: int, mean_len: float) -> np.ndarray:
    return 1 + rng.poisson(max(mean_len - 1.0, 0.0), n_users)  # (U,) at least one token each


def fit_codec(args, centres: torch.Tensor) -> tuple[CollectiveCodec, float]:
    codec = CollectiveCodec(d=args.d, pool_size=args.pool, user_dim=args.user_dim, layout=args.layout, iters=args.iters)
    calib = synthetic(torch.Generator().manual_seed(args.seed + 1), centres, args.calib)
    t0 = time.perf_counter()
    codec.fit(calib, seed=args.seed)
    return codec, time.perf_counter() - t0


class Sink:
    """Where the encoded output goes (`--hold`); `add` returns the bytes kept for one batch."""

    def __init__(self, mode: str, bits: int):
        self.mode, self.bits = mode, bits
        self.raw: list[dict[str, np.ndarray]] = []
        self.buffer = bytearray()
        self.file = tempfile.TemporaryFile() if mode == "disk" else None

    def packed(self, enc: dict[str, np.ndarray]) -> bytes:
        return b"".join((pack(a, self.bits) if name == "idx" else np.ascontiguousarray(a)).tobytes()
                        for name, a in sorted(enc.items()))

    def add(self, enc: dict[str, np.ndarray]) -> int:
        if self.mode == "raw":
            self.raw.append(enc)
            return sum(a.nbytes for a in enc.values())
        if self.mode == "none":
            return 0
        data = self.packed(enc)
        if self.file is not None:
            self.file.write(data)
        else:
            self.buffer += data
        return len(data)


def batches(checkpoints: list[int], batch_users: int):
    """(batch number, first user, users) up to the last checkpoint, never straddling one."""
    start, b = 0, 0
    for stop in checkpoints:
        while start < stop:
            n = min(batch_users, stop - start)
            yield b, start, n
            start, b = start + n, b + 1


@torch.no_grad()
def stream(args) -> list[dict]:
    """Fit, then encode users batch by batch; one row per count in args.users."""
    checkpoints = sorted(set(args.users))
    centres = torch.randn(CENTRES, args.d, generator=torch.Generator().manual_seed(args.seed))
    codec, fit_s = fit_codec(args, centres)
    rss_after_fit = resident_mb()
    windowed = reset_peak()
    sink = Sink(args.hold, codec.bits)
    held = tokens = 0
    encode_s = 0.0
    rows = []
    for b, start, n in batches(checkpoints, args.batch_users):
        lengths = batch_lengths(np.random.default_rng([args.seed, b]), n, args.mean_len)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        x = synthetic(torch.Generator().manual_seed(args.seed * 1_000_003 + b), centres, int(offsets[-1]))  # (N, d)
        t0 = time.perf_counter()
        enc = codec.encode(x, offsets)
        encode_s += time.perf_counter() - t0
        tokens += int(offsets[-1])
        held += sink.add(enc)
        del x, enc
        if start + n in checkpoints:
            rows.append({"users": start + n, "tokens": tokens, "encode_s": encode_s, "tokens_per_s": tokens / encode_s,
                         "fit_s": fit_s, "rss_after_fit_mb": rss_after_fit, "process_peak_mb": peak_rss_mb(),
                         "encode_peak_mb": window_peak_mb() if windowed else float("nan"), "held_mb": held / 2**20})
            print(f"  {start + n:,} users: {tokens / encode_s:,.0f} tokens/s", file=sys.stderr)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    key = "encode_peak_mb" if rows[0]["encode_peak_mb"] == rows[0]["encode_peak_mb"] else "process_peak_mb"  # NaN?
    base = rows[0][key]
    cols = ["users", "tokens", "tokens/s", "encode s", "after fit MB", "encode peak MB", "process peak MB",
            f"{key.split('_')[0]} peak vs first", "held MB"]
    cells = [[f"{r['users']:,}", f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['encode_s']:.1f}",
              f"{r['rss_after_fit_mb']:.0f}", f"{r['encode_peak_mb']:.0f}", f"{r['process_peak_mb']:.0f}",
              f"{(r[key] / base - 1) * 100:+.1f}%", f"{r['held_mb']:.1f}"] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for line in [cols] + cells:
            print("\t".join(line))
        return
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right")
    for c in cells:
        table.add_row(*c)
    Console(width=200).print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = stream(args)
    machine = bench_machine()
    title = (f"CollectiveCodec.encode: pool {args.pool}, d {args.d}, user dim {args.user_dim}, {args.layout}, mean "
             f"history {args.mean_len:g}, {args.batch_users} users per batch, output held: {args.hold}; "
             f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads")
    print_table(rows, title)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
