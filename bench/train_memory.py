#!/usr/bin/env python
"""Peak RSS and time of `ckv train`, the code at a baseline commit against this tree, in one run (issue 19 part 3).

For each --arch (with --data, or --ctr-data for the CTR models) both sides run
`ckv train --arch A --data D -o OUT --epochs E --threads T` in fresh processes (same venv; the baseline from
the checkout at --baseline-tree or `git archive`, as bench/compress_speed.py does), alternating. Reported per
run: peak RSS (ru_maxrss from wait4), CPU seconds (user + system) and wall seconds; per arch, whether the two
checkpoints hold identical tensors and identical metadata once the timing fields (train_seconds, per-epoch
seconds, the command) are set aside: same seed, same results.

    python bench/train_memory.py                      # sasrec, hstu on ml-100k; sim on ml-100k-ctr; 2 epochs, 1 thread
    python bench/train_memory.py --json docs/bench/train-memory-cpu.json
Runs from the repository root (needs the baseline checkout, or git and the baseline commit).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import machine, write_json  # noqa: E402
from bench.compress_speed import DEFAULT_TREE, baseline_of, run_fresh  # noqa: E402

CTR_ARCHS = {"sim", "eta", "sdim", "twin", "nohistory"}
TIMING = {"train_seconds", "seconds", "command"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["sasrec", "hstu", "sim"])
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--ctr-data", default="ml-100k-ctr")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", default="0652c50")
    p.add_argument("--baseline-tree", type=Path, default=DEFAULT_TREE if DEFAULT_TREE.is_dir() else None,
                   help="a checkout of the baseline commit (default /tmp/ckv-0652c50 where it exists; else git archive)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def run(tree: Path, args, arch: str, out: Path) -> dict:
    data = args.ctr_data if arch in CTR_ARCHS else args.data
    run = run_fresh(f"{arch} at {tree}", tree, args.threads,
                    ["train", "--arch", arch, "--data", data, "-o", str(out), "--epochs", str(args.epochs),
                     "--threads", str(args.threads), "--force"], out.with_suffix(".log"))
    return {"arch": arch, "data": data, "peak_rss_mb": run["peak_rss_mb"], "cpu_s": run["cpu_s"],
            "wall_s": run["wall_s"], "checkpoint": str(out)}


def _strip(v):
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k not in TIMING}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def same_checkpoint(a: Path, b: Path) -> dict:
    import numpy as np
    from safetensors import safe_open

    fa, fb = safe_open(str(a), "np"), safe_open(str(b), "np")
    tensors = set(fa.keys()) == set(fb.keys()) and all(np.array_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    ma, mb = fa.metadata(), fb.metadata()
    meta = {}
    for k in set(ma) | set(mb):
        try:
            va, vb = _strip(json.loads(ma.get(k, "null"))), _strip(json.loads(mb.get(k, "null")))
        except json.JSONDecodeError:
            va, vb = ma.get(k), mb.get(k)
        meta[k] = va == vb
    return {"identical_tensors": tensors, "metadata_equal_but_timing": all(meta.values()),
            "metadata_keys_differing": sorted(k for k, v in meta.items() if not v)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckv-train-memory-") as tmp:
        tmp = Path(tmp)
        base = baseline_of(args, tmp)
        load_before = os.getloadavg()
        for arch in args.archs:
            sides = {name: run(tree, args, arch, tmp / f"{arch}-{name}.safetensors")
                     for name, tree in (("baseline", base), ("current", ROOT))}
            same = same_checkpoint(Path(sides["baseline"]["checkpoint"]), Path(sides["current"]["checkpoint"]))
            row = {"arch": arch, "data": sides["current"]["data"], **same,
                   **{f"{s}_{k}": v[k] for s, v in sides.items() for k in ("peak_rss_mb", "cpu_s", "wall_s")}}
            rows.append(row)
            print(f"{arch} ({row['data']}): peak RSS {row['baseline_peak_rss_mb']:.0f} -> {row['current_peak_rss_mb']:.0f} MB, "
                  f"cpu {row['baseline_cpu_s']:.1f} -> {row['current_cpu_s']:.1f} s, identical tensors "
                  f"{row['identical_tensors']}, metadata equal but timing {row['metadata_equal_but_timing']}", flush=True)
    out = {"machine": machine(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "threads": args.threads, "epochs": args.epochs, "baseline_commit": args.baseline,
           "rows": rows}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
