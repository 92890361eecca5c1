#!/usr/bin/env python
"""`ckv compress` with its defaults, the code at a baseline commit against this tree, in one run (issue 19).

Both sides run the same command, `ckv compress CHECKPOINT --data DATA` (defaults: collective, pool 8192, k and v
of the pooled layer), in fresh processes with the same thread count (OMP_NUM_THREADS / MKL_NUM_THREADS and
torch.set_num_threads), same venv: the baseline from a checkout of it (--baseline-tree, default
/tmp/ckv-0652c50 where it exists; else `git archive BASELINE` unpacked into a temporary folder) put first on
PYTHONPATH (the script checks that the process imported it from there), the current side from this tree. The sides alternate (baseline, current, baseline, current, ...) for --repeats rounds, so load from other
processes on a shared machine falls on both alike. Reported per side: wall seconds, CPU seconds of the process
(user + system, from wait4: less sensitive to other processes than wall time), peak RSS; the ratio of medians
(baseline / current) of both; the metrics each run reported (NDCG@10 and HR@10 without and with compression,
top-10 overlap, KL); whether the two artifacts hold identical tensors (then every metric is identical too).
With --evaluate, `ckv evaluate` runs on both artifacts for the paired-bootstrap 95% CI of each NDCG@10 delta.
With --param KEY=VALUE (repeatable) a third side, "options", runs this tree with those `--param`s after each round's
current side (e.g. `--param probes=8`, the approximate cell search) and is reported against both.

    python bench/compress_speed.py                                   # SASRec sample, ML-1M, 1 thread, 1 round
    python bench/compress_speed.py --repeats 3 --json docs/bench/compress-speed-cpu.json
    python bench/compress_speed.py --param probes=8 --param iters=10 --evaluate   # and the approximate search
Runs from the repository root (needs the baseline checkout, or git and the baseline commit in this repository's
history). The machine's load average is recorded before and after (other processes slow both sides alike, but
they make wall times upper bounds).
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

from bench._machine import machine  # noqa: E402

DEFAULT_TREE = Path("/tmp/ckv-0652c50")

RUNNER = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import ckv_cli
from ckv_cli.cli import main
print("ckv_cli from", ckv_cli.__file__, file=sys.stderr)
sys.argv = ["ckv"] + sys.argv[2:]
main()
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "sample_checkpoints" / "sasrec-ml1m.safetensors")
    p.add_argument("--data", default="ml-1m")
    p.add_argument("--baseline", default="0652c50", help="commit to compare against (default 0652c50)")
    p.add_argument("--baseline-tree", type=Path, default=DEFAULT_TREE if DEFAULT_TREE.is_dir() else None,
                   help="a checkout of the baseline commit (default /tmp/ckv-0652c50 where it exists; else git archive)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="rounds (each runs both sides); medians reported")
    p.add_argument("--out-dir", type=Path, help="where artifacts go (default: a temporary folder)")
    p.add_argument("--evaluate", action="store_true", help="also `ckv evaluate` both artifacts (bootstrap CIs)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a third side: this tree with these `ckv compress --param`s (repeatable)")
    p.add_argument("--json", type=Path, help="write every run and the summary here")
    return p.parse_args(argv)


def baseline_tree(commit: str, dest: Path) -> Path:
    """`git archive COMMIT` unpacked into dest (no worktree metadata is added to the repository)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def baseline_of(args, tmp: Path) -> Path:
    """`--baseline-tree`, or the `--baseline` commit unpacked under `tmp`."""
    if args.baseline_tree is not None:
        return args.baseline_tree.resolve()
    (tmp / "baseline").mkdir()
    return baseline_tree(args.baseline, (tmp / "baseline").resolve())


def run_fresh(name: str, tree: Path, threads: int, argv: list[str], log: Path) -> dict:
    """`ckv ARGV` with the ckv_cli of `tree` in a fresh process (stdout and stderr to `log`): wall and CPU seconds,
    peak RSS; exits naming `name` when the command fails or imported ckv_cli from elsewhere."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(threads), *argv], env=env, cwd=str(tree),
                                stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if code:
        raise SystemExit(f"{name} failed ({code}):\n{text[-3000:]}")
    origin = next((line.split("from", 1)[1].strip() for line in text.splitlines() if line.startswith("ckv_cli from")), "")
    if not origin.startswith(str(tree)):
        raise SystemExit(f"{name}: imported ckv_cli from {origin}, not from {tree}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "imported_from": origin}


def run_side(name: str, tree: Path, args, out: Path, params: list[str] = ()) -> dict:
    """One `ckv compress` (with `--param`s) in a fresh process; wall and CPU seconds, peak RSS, its JSON report."""
    report = out.with_suffix(".json")
    extra = [a for kv in params for a in ("--param", kv)]
    run = run_fresh(name, tree, args.threads, ["compress", str(args.checkpoint), "--data", args.data, "-o", str(out),
                                               "--force", "--json", str(report), *extra], out.with_suffix(".log"))
    rep = json.loads(report.read_text())
    return {"side": name, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_mb": run["peak_rss_mb"],
            "metrics": rep["metrics"], "artifact": str(out), "imported_from": run["imported_from"]}


def same_tensors(a: Path, b: Path) -> tuple[bool, list[str]]:
    import numpy as np
    from safetensors import safe_open

    fa, fb = safe_open(str(a), "np"), safe_open(str(b), "np")
    if set(fa.keys()) != set(fb.keys()):
        return False, sorted(set(fa.keys()) ^ set(fb.keys()))
    diff = [k for k in sorted(fa.keys()) if not np.array_equal(fa.get_tensor(k), fb.get_tensor(k))]
    return not diff, diff


def evaluate(args, artifacts: list[Path], out: Path) -> dict:
    """`ckv evaluate` (this tree) on both artifacts: NDCG@10 delta vs uncompressed with its paired 95% CI."""
    cmd = [sys.executable, "-c", RUNNER, str(args.threads), "evaluate", str(args.checkpoint), *map(str, artifacts),
           "--data", args.data, "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, env=env, cwd=str(ROOT), check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def key_metrics(m: dict) -> dict:
    return {"NDCG@10 uncompressed": m["uncompressed"]["NDCG@10"], "NDCG@10 compressed": m["compressed"]["NDCG@10"],
            "HR@10 uncompressed": m["uncompressed"]["HR@10"], "HR@10 compressed": m["compressed"]["HR@10"],
            **{f"fidelity {k}": v for k, v in m["fidelity"].items() if isinstance(v, (int, float))}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckv-compress-speed-") as tmp:
        tmp = Path(tmp)
        out_dir = args.out_dir or tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        base = baseline_of(args, tmp)
        load_before = os.getloadavg()
        runs = []
        sides = [("baseline", base, []), ("current", ROOT, [])] + ([("options", ROOT, args.param)] if args.param else [])
        names = [name for name, _, _ in sides]
        for r in range(args.repeats):
            for name, tree, params in sides:
                run = run_side(name, tree, args, out_dir / f"{name}-{r}.safetensors", params)
                runs.append(run)
                print(f"round {r + 1} {name}: wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s, "
                      f"peak {run['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        med = {s: {k: statistics.median(x[k] for x in runs if x["side"] == s) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
               for s in names}
        identical, differing = same_tensors(out_dir / "baseline-0.safetensors", out_dir / "current-0.safetensors")
        reruns_identical = (same_tensors(out_dir / "current-0.safetensors", out_dir / "current-1.safetensors")[0]
                            if args.repeats > 1 else None)
        summary = {
            "machine": machine(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "baseline_tree": str(base), "threads": args.threads, "checkpoint": str(args.checkpoint), "data": args.data,
            "baseline_commit": args.baseline, "repeats": args.repeats,
            "command": f"ckv compress {args.checkpoint.name} --data {args.data} (defaults)",
            "median": med, "ratio_wall": med["baseline"]["wall_s"] / med["current"]["wall_s"],
            "ratio_cpu": med["baseline"]["cpu_s"] / med["current"]["cpu_s"],
            "artifacts_identical_tensors": identical, "differing_tensors": differing,
            "current_reruns_identical_tensors": reruns_identical,
            "metrics": {s: key_metrics(next(x for x in runs if x["side"] == s)["metrics"]) for s in names},
            "runs": runs,
        }
        if args.param:
            summary.update(params=args.param, ratio_cpu_options=med["baseline"]["cpu_s"] / med["options"]["cpu_s"],
                           ratio_wall_options=med["baseline"]["wall_s"] / med["options"]["wall_s"],
                           ratio_cpu_current_over_options=med["current"]["cpu_s"] / med["options"]["cpu_s"])
        if args.evaluate:
            ev = evaluate(args, [out_dir / f"{name}-0.safetensors" for name in names], tmp / "eval.json")
            summary["evaluate"] = ev
    print(f"baseline {args.baseline}: wall {med['baseline']['wall_s']:.1f} s, cpu {med['baseline']['cpu_s']:.1f} s | "
          f"current: wall {med['current']['wall_s']:.1f} s, cpu {med['current']['cpu_s']:.1f} s | "
          f"ratio wall {summary['ratio_wall']:.2f}x, cpu {summary['ratio_cpu']:.2f}x ({args.threads} thread(s))")
    print(f"load average (1, 5, 15 min) before {summary['load_avg_before']}, after {summary['load_avg_after']}")
    if args.param:
        print(f"options {' '.join(args.param)}: wall {med['options']['wall_s']:.1f} s, cpu {med['options']['cpu_s']:.1f} s"
              f" | ratio to baseline cpu {summary['ratio_cpu_options']:.2f}x, current / options cpu "
              f"{summary['ratio_cpu_current_over_options']:.2f}x")
    print(f"artifacts hold identical tensors: {identical}" + (f" (differ: {differing})" if differing else ""))
    for k in summary["metrics"]["baseline"]:
        print(f"  {k}: " + "  ".join(f"{name} {summary['metrics'][name][k]:.4f}" for name in names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
