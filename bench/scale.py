#!/usr/bin/env python
"""Issue 20's two targets, on synthetic logs, each figure from one run of `ckv compress` in a fresh process:

1. Driver memory: the peak resident set of the driver process (`peak_rss_mb` of `ckv compress --json`: the
   kernel's ru_maxrss of that process; Ray's raylet and workers are other processes) of `--engine ray` on a Parquet
   dataset of 10^6 and of 10^7 events, read two ways:
   - in the driver (`--shard-size N`, the range rule: the driver reads the whole log, builds the sequences and
     stages every user's window itself; what `--engine ray` did before this change), and
   - on the workers (`--shards S`, the hash rule: `ckv_cli.pipeline.ray_read`; the driver reads footers, one
     summary per shard and the calibration sample).
   Target: the distributed read's driver peak grows < 10% from 10^6 to 10^7 events (medians of `--repeats` runs:
   single runs of the same command have differed by up to 180 MB on this shared machine, a transient of Ray's
   driver-side machinery we could not pin down).
2. Update: `ckv compress --update` of the artifact of the 10^7-event log with a day of new events for 1% of its
   users (5 events each, after everything in the log) against `ckv compress` of the whole extended log (the same
   data: the log's files plus the new events' file), same options, in-process engine, hash rule, same machine,
   one run each, timed end to end (the process's wall time: imports, reading the log or the new events, the work,
   writing). Target: update < 10% of the full recompress. Also reported: the shards rewritten (with users touched
   uniformly at random, 1% of users reaches every shard of more than a few hundred users).

The log: `--users` users (events / `--mean-events`), `--items` items, each event a uniformly random user and
item, timestamps increasing with the row (a time-ordered log), user ids `u<n>`, item ids `i<n>`, cut into
`--files` Parquet files of row groups of 200,000 rows. The model: an untrained HSTU (d 16, 2 layers, window
`--max-len` 16: its artifacts keep event times, so the update checks order), collective pool 256, calibration 1,000
users. Encoding is not what is measured here (`bench/encode.py` is); a small window keeps it short.

    python bench/scale.py --json docs/bench/scale-cpu.json          # ~20 minutes on 2 cores
    python bench/scale.py --events 1000000 3000000 --workers 2
Runs from the repository root without installing ckv (it puts the root on sys.path). Linux (ru_maxrss in kB).
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

from bench._machine import machine as bench_machine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--mean-events", type=int, default=200, help="mean events per user (default 200)")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--touched", type=float, default=0.01, help="share of users the update touches (default 0.01)")
    p.add_argument("--new-events", type=int, default=5, help="new events per touched user (default 5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per memory figure (default 3); the growth is computed on the medians")
    p.add_argument("--skip", choices=["memory", "update"], action="append", default=[])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


def write_log(root: Path, events: int, users: int, items: int, files: int, seed: int = 0) -> Path:
    """The synthetic log of the module docstring as a Parquet dataset in `root`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if root.is_dir() and len(list(root.glob("part-*.parquet"))) == files:
        return root  # written by an earlier run with the same arguments (the log is seeded)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cuts = np.linspace(0, events, files + 1).astype(np.int64)
    for f in range(files):
        a, b = int(cuts[f]), int(cuts[f + 1])
        u = rng.integers(0, users, b - a)
        i = rng.integers(1, items + 1, b - a)
        table = pa.table({"user": pa.array(np.char.add("u", u.astype(str))), "item": pa.array(np.char.add("i", i.astype(str))),
                          "timestamp": pa.array(1_000_000_000 + np.arange(a, b, dtype=np.int64))})
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=200_000)
    return root


def write_new_events(path: Path, events: int, users: int, items: int, share: float, per_user: int, seed: int = 1):
    """`per_user` events for a `share` of the log's users, after everything in it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    touched = rng.choice(users, max(1, int(round(share * users))), replace=False)
    u = np.repeat(touched, per_user)
    i = rng.integers(1, items + 1, len(u))
    t = 1_000_000_000 + events + 86_400 + np.arange(len(u), dtype=np.int64)
    pq.write_table(pa.table({"user": pa.array(np.char.add("u", u.astype(str))), "item": pa.array(np.char.add("i", i.astype(str))),
                             "timestamp": pa.array(t)}), path)
    return len(touched), len(u)


def write_checkpoint(path: Path, items: int, max_len: int) -> None:
    import torch

    from ckv_cli.models import HSTU, HSTUConfig
    from ckv_cli.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = HSTU(HSTUConfig(n_items=items, d=16, n_layers=2, n_heads=2, d_qk=8, d_v=8, max_len=max_len)).eval()
    save_checkpoint(model, path, dataset="synthetic", fingerprint="0" * 16,
                    item_vocab=["<pad>"] + [f"i{k}" for k in range(1, items + 1)], metrics={}, train={})


# ---------------------------------------------------------------------------------------------- runs

COMMON = ["--pool-size", "256", "--calib-users", "1000", "--batch-users", "256", "--threads", "1"]


def ckv(args: list[str], cwd: Path) -> dict:
    """`ckv ARGS --json r.json` in a fresh process: (its report, its wall time in seconds)."""
    out = cwd / f"report-{time.time_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckv_cli.cli", *args, "--json", str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"ckv {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    out.unlink()
    return {"report": report, "wall_seconds": round(wall, 1)}


def memory_runs(a, work: Path, ckpt: Path) -> list[dict]:
    rows = []
    for n in a.events:
        users = n // a.mean_events
        log = write_log(work / f"log-{n}", n, users, a.items, a.files)
        for how, opts in (("driver read", ["--shard-size", str(256 * ((users // a.shards) // 256 + 1))]),
                          ("worker read", ["--shards", str(a.shards)])):
            out = work / f"mem-{n}-{how.split()[0]}"
            out.mkdir(exist_ok=True)
            runs = [ckv(["compress", str(ckpt), "--data", str(log), "-o", str(out / "x.index.json"), "--engine",
                         "ray", "--workers", str(a.workers), "--force", *opts, *COMMON], work)
                    for _ in range(a.repeats)]
            rep = runs[0]["report"]
            peaks = [r["report"]["peak_rss_mb"] for r in runs]
            rows.append({"events": n, "users": rep["accounting"]["users"], "read": how,
                         "driver_peak_rss_mb": statistics.median(peaks), "driver_peak_rss_mb_runs": peaks,
                         "wall_seconds_runs": [r["wall_seconds"] for r in runs], "shards": rep["engine"]["shards"],
                         "read_seconds_runs": [r["report"]["engine"].get("read_seconds") for r in runs],
                         "encode_seconds_runs": [r["report"]["engine"]["encode_seconds"] for r in runs]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def update_run(a, work: Path, ckpt: Path) -> dict:
    n = max(a.events)
    users = n // a.mean_events
    log = work / f"log-{n}"
    if not log.exists():
        write_log(log, n, users, a.items, a.files)
    new = work / "new" / "part-999.parquet"  # sorts after the log's files: the extended log is log + new
    new.parent.mkdir(exist_ok=True)
    touched, new_events = write_new_events(new, n, users, a.items, a.touched, a.new_events)
    ext = work / "extended"
    ext.mkdir(exist_ok=True)
    for p in list(log.glob("*.parquet")) + [new]:
        target = ext / p.name
        if not target.exists():
            os.symlink(p, target)
    base = ["--shards", str(a.shards), *COMMON]
    (work / "art").mkdir(exist_ok=True), (work / "full").mkdir(exist_ok=True)
    first = ckv(["compress", str(ckpt), "--data", str(log), "-o", str(work / "art/x.index.json"), "--force", *base], work)
    full = ckv(["compress", str(ckpt), "--data", str(ext), "-o", str(work / "full/x.index.json"), "--force", *base],
               work)
    upd = ckv(["compress", str(ckpt), "--update", str(work / "art/x.index.json"), "--data", str(new)], work)
    rep = upd["report"]
    out = {"events": n, "users": full["report"]["accounting"]["users"], "touched_users": touched,
           "new_events": new_events, "shards": rep["shards"], "shards_rewritten": len(rep["shards_rewritten"]),
           "compress_log_wall_seconds": first["wall_seconds"],
           "full_recompress_wall_seconds": full["wall_seconds"], "update_wall_seconds": upd["wall_seconds"],
           "ratio_wall": round(upd["wall_seconds"] / full["wall_seconds"], 4),
           "update_in_process_seconds": rep["seconds"], "full_recompress_in_process_seconds": full["report"]["seconds"],
           "target": "update_wall_seconds < 0.10 * full_recompress_wall_seconds"}
    out["met"] = out["ratio_wall"] < 0.10
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-", dir=ROOT / "runs" if (ROOT / "runs").exists() else None))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "hstu.safetensors"
    write_checkpoint(ckpt, a.items, a.max_len)
    result = {"bench": "scale", "machine": bench_machine(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                       for k, v in vars(a).items()},
              "load_average_at_start": os.getloadavg()}
    if "memory" not in a.skip:
        rows = memory_runs(a, work, ckpt)
        result["memory"] = rows
        peak = {(r["events"], r["read"]): r["driver_peak_rss_mb"] for r in rows}
        lo, hi = min(a.events), max(a.events)
        result["driver_rss_growth"] = {how: round(peak[(hi, how)] / peak[(lo, how)] - 1, 4)
                                       for how in ("driver read", "worker read")}
        result["driver_rss_target"] = f"worker read: growth from {lo:,} to {hi:,} events < 10%"
        result["driver_rss_met"] = result["driver_rss_growth"]["worker read"] < 0.10
        print(json.dumps(result["driver_rss_growth"]), flush=True)
    if "update" not in a.skip:
        result["update"] = update_run(a, work, ckpt)
    result["load_average_at_end"] = os.getloadavg()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
