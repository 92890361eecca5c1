#!/usr/bin/env python
"""The codec sweep of every sample checkpoint (issue 6 part 3): for each `sample_checkpoints/*-ml1m.safetensors`
runs the default grid of `ckv evaluate CHECKPOINT --data ml-1m --sweep default` (`ckv_cli.sweep.run_sweep`: no
artifact written) and writes

- `docs/sweep-<name>.json`, `docs/sweep-<name>.csv` and `docs/sweep-<name>.png` (NDCG@10 delta with its 95% CI
  against per-user bytes per token, log x-axis, collective highlighted);
- `docs/sweep.md`: one Markdown table per model (rows sorted by per-user bytes, Pareto front starred), a line
  saying whether `collective` has the best NDCG@10 delta at equal or smaller per-user bytes than every baseline
  (and if not, which baseline beats it), and how long each model took.

It prints how long each model took. On ML-1M expect minutes per model (17 grid entries over 6,040 users).

    python bench/sweep.py                                   # every sample checkpoint, ML-1M, into docs/
    python bench/sweep.py --data ml-100k --checkpoints /tmp/tiny/*.safetensors --out /tmp/sweep   # quick check
    python bench/sweep.py --spec 'collective:pool_size=1024;int8'                                   # another grid
Runs from the repository root without installing ckv (it puts the root on sys.path): torch, numpy, rich,
matplotlib (the PNGs are skipped with a note when matplotlib is missing).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ckv_cli.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.errors import CkvError  # noqa: E402
from ckv_cli.report import write_json  # noqa: E402
from ckv_cli.sweep import markdown_table, parse_sweep, run_sweep, verdict_line, write_csv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, nargs="+", default=None,
                   help="checkpoints to sweep (default: sample_checkpoints/*-ml1m.safetensors)")
    p.add_argument("--data", default="ml-1m", help="dataset (default ml-1m)")
    p.add_argument("--spec", default="default", help="sweep spec, as `ckv evaluate --sweep` (default: default)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="output directory (default docs/)")
    p.add_argument("--calib-users", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


def sweep_one(path: Path, args, specs) -> tuple[dict, float]:
    t = time.perf_counter()
    model, meta = load_checkpoint(path)
    ds = load(args.data, item_vocab=meta["item_vocab"])
    name = path.name.removesuffix(".safetensors")

    def on_spec(label: str) -> None:
        print(f"  {name}: {label} ({time.perf_counter() - t:.0f} s)", flush=True)

    payload = run_sweep(model, ds, specs, calib_users=args.calib_users, seed=args.seed, bootstrap=args.bootstrap,
                        on_spec=on_spec)
    payload = {"checkpoint": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "arch": meta["arch"],
               "command": " ".join(["python", "bench/sweep.py"] + sys.argv[1:]), **payload}
    write_json(args.out / f"sweep-{name}.json", payload)
    write_csv(args.out / f"sweep-{name}.csv", payload)
    if not args.no_plot:
        try:
            from ckv_cli.plots import plot_sweep

            plot_sweep(payload["rows"], f"{meta['arch']} ({path.name}) on {ds.name}: NDCG@10 delta vs per-user bytes",
                       args.out / f"sweep-{name}.png")
        except CkvError as e:  # matplotlib missing
            print(f"  {name}: no plot ({e})", flush=True)
    return payload, time.perf_counter() - t


def markdown(results: list[tuple[str, dict, float]], args) -> str:
    lines = ["# Codec sweep of the sample checkpoints", "",
             f"Made by `python bench/sweep.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
             f"({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
             f"`ckv evaluate CHECKPOINT --data {args.data} --sweep {args.spec}` gives the same rows.", "",
             "Protocol: test split; each user's history minus its last event is cached, compressed and decoded; the "
             "last event is appended with `extend` and its output ranks every item outside the history window. Bytes "
             "(NOTES §4): per-user bytes count every per-token and per-user field, item ids and offsets included; for "
             "every codec the first layer is recomputed from the item ids, not stored. `evict` (keep a fraction of "
             "the tokens) is not implemented; `itemid` is refused wherever a stored layer is not a function of the "
             "item alone.", ""]
    for name, payload, seconds in results:
        lines += [f"## {name} ({payload['arch']})", "",
                  f"![NDCG@10 delta against per-user bytes](sweep-{name}.png)", "",
                  markdown_table(payload), "", verdict_line(payload), "",
                  f"Time: {seconds:.0f} s (teacher caches and reference scores {payload['teacher_seconds']:.0f} s). "
                  f"Data: [`sweep-{name}.json`](sweep-{name}.json), [`sweep-{name}.csv`](sweep-{name}.csv).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = args.checkpoints or sorted((ROOT / "sample_checkpoints").glob("*-ml1m.safetensors"))
    if not paths:
        print("bench/sweep.py: no checkpoints found", file=sys.stderr)
        return 2
    try:
        specs = parse_sweep(args.spec)
        args.out.mkdir(parents=True, exist_ok=True)
        results = []
        for path in paths:
            path = path.resolve()
            print(f"{path.name}: sweeping {len(specs)} entries on {args.data}", flush=True)
            payload, seconds = sweep_one(path, args, specs)
            name = path.name.removesuffix(".safetensors")
            results.append((name, payload, seconds))
            print(f"{path.name}: {seconds:.0f} s", flush=True)
            print(f"  {verdict_line(payload)}", flush=True)
        text = markdown(results, args)
        atomic_write(args.out / "sweep.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    except CkvError as e:
        print(f"bench/sweep.py: error: {e}", file=sys.stderr)
        return 2
    for name, _, seconds in results:
        print(f"{name}: {seconds:.0f} s")
    print(f"wrote {args.out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
