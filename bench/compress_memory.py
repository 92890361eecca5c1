#!/usr/bin/env python
"""Peak memory and throughput of `ckv compress` (the real `compress_to_artifact`) against the number of users
(issue 7: "peak memory of compress grows less than 10% from 100k to 1M users").

Each count of `--users` runs in a fresh Python process (so that the kernel's peak-RSS counter, VmHWM, starts
from nothing), which:
1. builds a synthetic `SequenceData`: `--items` items, history lengths 3 + Poisson(`--mean-len` - 3) events
   (mean 10), items uniform, timestamps increasing; user ids are integers, as ML-1M's;
2. builds a tiny SASRec with random weights (d 64, 2 layers, 2 heads, max_len 50) and saves it as a checkpoint;
3. records the resident set ("before": interpreter, torch, data, model; after `gc.collect` and glibc's
   `malloc_trim`), resets the peak (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and runs
   `compress_to_artifact` with the collective codec, pool `--pool` (1024), into a file in `--workdir`:
   calibration, encoding streamed into the artifact, decoding and scoring every user;
4. reports the peak resident set (VmHWM) of two phases and of the whole: "fit" (calibration caches of
   `--calib-users` users, k-means, the writer laying out the file and writing the user offsets and ids, the
   first batch of users; the peak is read and reset when the first batch is done) and "stream" (every later
   batch: prefill, encode, write, decode, score; then the metrics and the file's assembly), each also as its
   excess over "before"; the wall time, the cached tokens per second end to end (prefill, encode, decode and
   two scorings of every user, not the encoder alone: `bench/encode.py` times that), and the file size.

The input data is O(users) by nature (about 16 bytes per event plus the per-user ids and offsets), so the
process's absolute peak grows with the data it was given; "peak - before" is what compress itself adds. The fit
phase does not depend on the number of users (a fixed calibration sample) but its peak varies by tens of MB
between identical runs (allocator and library workspaces); `--repeats` runs each count several times. Under
glibc's dynamic mmap threshold, freeing the large arrays that built the data raises the threshold, so more of
compress's temporaries come from the heap (which fragments) at 1M users than at 100k; `--mmap-threshold`
fixes it (less noise, about half the throughput from the extra page faults).

    python bench/compress_memory.py                          # 100k and 1M users
    python bench/compress_memory.py --users 100000 300000 --json mem.json
    python bench/compress_memory.py --repeats 3 --mmap-threshold 1048576
Runs from the repository root without installing ckv (it puts the root on sys.path). Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import machine as bench_machine, reset_peak, resident_mb, window_peak_mb  # noqa: E402
from ckv_cli.memory import trim_heap  # noqa: E402  (the C heap's free memory back before counting)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--mean-len", type=float, default=10.0, help="mean events per user (default 10; at least 3)")
    p.add_argument("--pool", type=int, default=1024)
    p.add_argument("--batch-users", type=int, default=256)
    p.add_argument("--calib-users", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                   help="run the children with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=BYTES) instead of "
                        "its dynamic default, under which how the input data was built shifts what compress's "
                        "temporaries take from the heap")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per count (default 1); the growth is computed on the medians")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the checkpoint and artifact are written (default: a temporary folder under runs/)")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one count in this process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one count


def synthetic_data(n_users: int, n_items: int, mean_len: float, seed: int):
    import numpy as np

    from ckv_cli.data.sequences import SequenceData

    rng = np.random.default_rng(seed)
    lengths = 3 + rng.poisson(max(mean_len - 3, 0.0), n_users).astype(np.int64)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n_events = int(offsets[-1])
    items = rng.integers(1, n_items + 1, n_events, dtype=np.int64)
    timestamps = 978_300_000 + np.cumsum(rng.integers(1, 3600, n_events, dtype=np.int64))  # increasing per user
    item_ids = np.array(["<pad>"] + [f"item{i}" for i in range(1, n_items + 1)], dtype=object)
    return SequenceData(name=f"synthetic-{n_users}", user_ids=np.arange(1, n_users + 1, dtype=np.int64), item_ids=item_ids,
                        offsets=offsets, items=items, timestamps=timestamps, ratings=None,
                        genres=np.zeros((n_items + 1, 0), dtype=np.uint8), genre_names=[],
                        fingerprint=f"synthetic-{n_users}-{seed}")


def run_one(args) -> dict:
    import gc

    import torch

    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
    from ckv_cli.models import SASRec, SASRecConfig

    torch.set_num_threads(args.threads)
    n_users = args.one
    t0 = time.perf_counter()
    ds = synthetic_data(n_users, args.items, args.mean_len, args.seed)
    torch.manual_seed(args.seed)
    model = SASRec(SASRecConfig(n_items=args.items, d=64, n_layers=2, n_heads=2, max_len=50)).float().eval()
    data_s = time.perf_counter() - t0
    workdir = Path(tempfile.mkdtemp(prefix=f"compress-memory-{n_users}-", dir=args.workdir))
    ckpt, out = workdir / "sasrec.safetensors", workdir / "out.ckv.safetensors"
    save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={},
                    train={"epochs": 0})
    opts = CompressOptions(codec="collective", params={"pool_size": args.pool, "user_dim": 0, "layout": "residual"},
                           calib_users=args.calib_users, batch_users=args.batch_users, seed=args.seed)
    fit_phase = {}

    def advance(n, *rest):
        if not fit_phase:  # the first batch is done: close the fit phase's window
            fit_phase.update(peak=window_peak_mb(), rss=resident_mb())
            reset_peak()

    gc.collect()
    trim_heap()
    setup_peak = window_peak_mb()
    before = resident_mb()
    if not reset_peak():
        raise SystemExit("this kernel does not let the peak resident set be reset (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    report = compress_to_artifact(model, {"arch": "sasrec"}, ckpt, ds, opts, out, command="bench/compress_memory.py",
                                  advance=advance)
    seconds = time.perf_counter() - t0
    stream_peak = window_peak_mb()
    peak = max(fit_phase["peak"], stream_peak)
    tokens = report["accounting"]["tokens"]
    row = {"users": n_users, "events": int(ds.offsets[-1]), "tokens": tokens, "compress_s": seconds,
           "tokens_per_s": tokens / seconds, "data_s": data_s, "setup_peak_mb": setup_peak, "rss_before_mb": before,
           "fit_peak_mb": fit_phase["peak"], "stream_peak_mb": stream_peak, "compress_peak_mb": peak,
           "fit_extra_mb": fit_phase["peak"] - before, "stream_extra_mb": stream_peak - before,
           "compress_extra_mb": peak - before,
           "file_mb": report["file_bytes"] / 2**20, "bytes_per_token": report["accounting"]["bytes_per_token"]}
    for p in (out, ckpt):
        p.unlink()
    workdir.rmdir()
    return row


# ---------------------------------------------------------------------------------------------- driver


def print_table(rows: list[dict], title: str) -> None:
    cols = ["users", "events", "cached tokens", "compress s", "tokens/s", "RSS before MB", "fit peak MB",
            "stream peak MB", "compress peak MB", "fit - before", "stream - before", "peak - before", "artifact MB"]
    cells = [[f"{r['users']:,}", f"{r['events']:,}", f"{r['tokens']:,}", f"{r['compress_s']:.0f}",
              f"{r['tokens_per_s']:,.0f}", f"{r['rss_before_mb']:.0f}", f"{r['fit_peak_mb']:.0f}",
              f"{r['stream_peak_mb']:.0f}", f"{r['compress_peak_mb']:.0f}", f"{r['fit_extra_mb']:.0f}",
              f"{r['stream_extra_mb']:.0f}", f"{r['compress_extra_mb']:.0f}", f"{r['file_mb']:.1f}"] for r in rows]
    print(title)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.rjust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return 0
    if args.workdir is None:
        args.workdir = ROOT / "runs"
    args.workdir.mkdir(parents=True, exist_ok=True)
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for n in args.users:
        for _ in range(args.repeats):
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CKV_NO_PROGRESS": "1"}
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--workdir", str(args.workdir), "--one", str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {n:,} users: {r['compress_s']:.0f} s, {r['tokens_per_s']:,.0f} tokens/s, peak "
                  f"{r['compress_peak_mb']:.0f} MB (before {r['rss_before_mb']:.0f} MB)", file=sys.stderr)
    machine = {**bench_machine(), "torch_threads": args.threads}  # the driver's torch is idle: report the runs'
    title = (f"ckv compress (compress_to_artifact): SASRec d 64, 2 layers, max_len 50, random weights; {args.items} items, "
             f"mean {args.mean_len:g} events per user; collective pool {args.pool}, {args.batch_users} users per batch, "
             f"{args.calib_users} calibration users; {machine['cpu']}, {machine['cores']} cores, {args.threads} torch threads; "
             + (f"glibc mmap threshold fixed at {args.mmap_threshold:,} bytes" if args.mmap_threshold
                else "glibc's default (dynamic) mmap threshold"))
    print_table(rows, title)
    counts = sorted({r["users"] for r in rows})
    if len(counts) > 1:
        keys = ("compress_peak_mb", "compress_extra_mb", "fit_extra_mb", "stream_peak_mb", "stream_extra_mb")
        med = {n: {k: statistics.median(r[k] for r in rows if r["users"] == n) for k in keys} for n in (counts[0], counts[-1])}
        first, last = med[counts[0]], med[counts[-1]]

        def growth(key: str) -> str:
            return f"{(last[key] / first[key] - 1) * 100:+.1f}% ({first[key]:.0f} -> {last[key]:.0f} MB)"

        what = f"medians of {args.repeats} runs" if args.repeats > 1 else "one run each"
        print(f"growth {counts[0]:,} -> {counts[-1]:,} users ({what}):")
        print(f"  compress peak (process, input data included): {growth('compress_peak_mb')}")
        print(f"  compress peak - before (what compress adds):  {growth('compress_extra_mb')}")
        print(f"    fit phase - before:                         {growth('fit_extra_mb')}")
        print(f"    stream phase - before:                      {growth('stream_extra_mb')}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
