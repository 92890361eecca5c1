#!/usr/bin/env python
"""The codec sweep of every sample checkpoint (issue 6 part 3): for each checkpoint in `sample_checkpoints/`

- next-item (`*-ml1m.safetensors`, SASRec / HSTU): the default grid of `ckv evaluate CHECKPOINT --data ml-1m
  --sweep default` (`ckv_cli.evaluate.sweep.run_sweep`; Pareto front and verdict on the NDCG@10 delta);
- CTR (`*-ml1m-ctr.safetensors`, SIM / ETA / SDIM / TWIN): the CTR grid of `ckv evaluate CHECKPOINT --data
  ml-1m-ctr --sweep default --sweep-users N` (`ckv_cli.evaluate.sweep.run_sweep`; on the AUC delta). A model that
  caches nothing per user (`nohistory`) gets a short section saying so;

(no artifact written) and writes

- `docs/sweep-<name>.json`, `docs/sweep-<name>.csv` and `docs/sweep-<name>.png` (the metric delta with its 95% CI
  against per-user bytes per token, log x-axis, collective highlighted);
- `docs/sweep.md`: a summary (does `collective` have the best delta at equal or smaller per-user bytes, per
  model), then one section per model: the Markdown table (rows sorted by per-user bytes, Pareto front starred), the
  verdict line for `collective` (and if it is not best, which baseline beats it and why), and how long it took.

Only the selected checkpoints are swept (`--only ctr|next-item`, `--checkpoints`); the other models' sections are
re-rendered from their JSON already in the output directory, so the CTR sections can be regenerated without
rerunning next-item. It prints how long each model took (ML-1M: minutes per model).

    python bench/sweep.py                                   # every sample checkpoint, ML-1M, into docs/
    python bench/sweep.py --only ctr                        # the CTR models only (next-item sections re-rendered)
    python bench/sweep.py --checkpoints sample_checkpoints/sdim-ml1m-ctr.safetensors   # one model
    python bench/sweep.py --render-only                     # docs/sweep.md from the JSONs, nothing swept
    python bench/sweep.py --data ml-100k --checkpoints /tmp/tiny/*.safetensors --out /tmp/sweep   # quick check
Runs from the repository root without installing ckv (it puts the root on sys.path): torch, numpy, rich,
matplotlib (the PNGs are skipped with a note when matplotlib is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ckv_cli.cli.render import write_json  # noqa: E402
from ckv_cli.errors import CkvError  # noqa: E402
from ckv_cli.evaluate import sweep  # noqa: E402
from ckv_cli.io.files import atomic_write  # noqa: E402
from ckv_cli.models import TASKS  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint, read_metadata  # noqa: E402
from ckv_cli.tasks import CTR, NEXT_ITEM, task_of as model_task  # noqa: E402
from ckv_cli.tasks.ctr import DEFAULT_SWEEP_USERS  # noqa: E402

TASK_NAMES = ("next-item", "ctr")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, nargs="+", default=None,
                   help="checkpoints to sweep (default: every sample_checkpoints/*-ml1m.safetensors and "
                        "*-ml1m-ctr.safetensors); sweep.md covers these and the sample models whose JSON is in --out")
    p.add_argument("--only", choices=TASK_NAMES, default=None, help="sweep the checkpoints of this task only")
    p.add_argument("--render-only", action="store_true", help="sweep nothing: rewrite sweep.md from the JSONs in --out")
    p.add_argument("--data", default="ml-1m", help="dataset of the next-item models (default ml-1m)")
    p.add_argument("--ctr-data", default=None, help="dataset of the CTR models (default: --data with -ctr)")
    p.add_argument("--spec", default="default", help="next-item sweep spec, as `ckv evaluate --sweep` (default: default)")
    p.add_argument("--ctr-spec", default="default", help="CTR sweep spec (default: default, the CTR grid)")
    p.add_argument("--sweep-users", type=int, default=DEFAULT_SWEEP_USERS,
                   help=f"CTR: seeded test users scored (default {DEFAULT_SWEEP_USERS}; 0 = all)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="output directory (default docs/)")
    p.add_argument("--calib-users", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


def default_checkpoints() -> list[Path]:
    d = ROOT / "sample_checkpoints"
    return sorted(d.glob("*-ml1m.safetensors")) + sorted(d.glob("*-ml1m-ctr.safetensors"))


def task_of(path: Path) -> str:
    return TASKS.get(read_metadata(path).get("arch"), "next-item")


def _name(path: Path) -> str:
    return path.name.removesuffix(".safetensors")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _command() -> str:
    return " ".join(["python", "bench/sweep.py"] + sys.argv[1:])


def _plot(payload: dict, path: Path, args, metric: str, name: str) -> None:
    if args.no_plot:
        return
    try:
        from ckv_cli.evaluate.plots import plot_sweep

        plot_sweep(payload["rows"], f"{payload['arch']} ({path.name}) on {payload['dataset']}: {metric} delta vs "
                   "per-user bytes", args.out / f"sweep-{name}.png", metric=metric)
    except CkvError as e:  # matplotlib missing
        print(f"  {name}: no plot ({e})", flush=True)


def sweep_one(path: Path, args) -> dict:
    """Sweep one checkpoint; writes its JSON, CSV and PNG; returns the payload (with `bench_seconds`)."""
    t = time.perf_counter()
    name = _name(path)
    task = task_of(path)
    model, meta = load_checkpoint(path)

    def on_spec(label: str) -> None:
        print(f"  {name}: {label} ({time.perf_counter() - t:.0f} s)", flush=True)

    head = {"checkpoint": _rel(path), "arch": meta["arch"], "task": task, "command": _command()}
    mtask = model_task(model)
    ds = mtask.load(args.ctr_data or f"{args.data}-ctr" if mtask is CTR else args.data, None, meta, model)
    if not model.cache_spec().streams:  # nohistory: nothing cached per user
        payload = {**head, "dataset": ds.name, "no_sweep": "the model caches nothing per user (no history is read): "
                   "there is nothing to compress", "bench_seconds": round(time.perf_counter() - t, 1)}
        write_json(args.out / f"sweep-{name}.json", payload)
        return payload
    payload = sweep.run_sweep(model, ds, sweep.parse_task_sweep(args.ctr_spec if mtask is CTR else args.spec, mtask),
                              calib_users=args.calib_users, seed=args.seed, bootstrap=args.bootstrap,
                              users=args.sweep_users, on_spec=on_spec)
    payload = {**head, **payload, "bench_seconds": round(time.perf_counter() - t, 1)}
    write_json(args.out / f"sweep-{name}.json", payload)
    sweep.write_csv(args.out / f"sweep-{name}.csv", payload)
    _plot(payload, path, args, mtask.pareto_metric, name)
    return payload


def is_ctr(payload: dict) -> bool:
    return payload.get("task") == "ctr"


def verdict(payload: dict) -> str:
    if "no_sweep" in payload:
        return "no sweep (caches nothing per user)"
    ran = [r for r in payload["rows"] if r["status"] == "ok"]
    if not any(r["codec"] == "collective" for r in ran):
        return "no collective row ran"
    best = sweep.collective_verdict(payload, "AUC" if is_ctr(payload) else "NDCG@10")["collective_best"]
    return "yes" if best else "no"


def section(name: str, payload: dict | None) -> list[str]:
    if payload is None:
        return [f"## {name}", "", f"Not swept yet: run `python bench/sweep.py --checkpoints sample_checkpoints/{name}.safetensors`.", ""]
    seconds = payload.get("bench_seconds", payload.get("seconds", 0.0))
    if "no_sweep" in payload:
        return [f"## {name} ({payload['arch']})", "",
                f"No sweep possible: this model has no history branch, so nothing is cached per user and there is "
                f"nothing to compress (`ckv compress`: \"{payload['no_sweep']}\"). Its predictions need no KV cache "
                "at all; it is the floor the history models are measured against.", ""]
    metric = "AUC" if is_ctr(payload) else "NDCG@10"
    payload = {"task": "ctr" if is_ctr(payload) else "next-item", "pareto_metric": metric, **payload}
    table, line = sweep.markdown_table(payload), sweep.verdict_line(payload, metric)
    lines = [f"## {name} ({payload['arch']})", "",
             f"![{metric} delta against per-user bytes](sweep-{name}.png)", "", table, "", line, ""]
    if is_ctr(payload) and verdict(payload) == "no":
        lines += [why_not_ctr(payload), ""]
    lines += [f"Time: {seconds:.0f} s (uncompressed reference {payload['teacher_seconds']:.0f} s). Made by "
              f"`{payload.get('command', 'python bench/sweep.py')}`. Data: [`sweep-{name}.json`](sweep-{name}.json), "
              f"[`sweep-{name}.csv`](sweep-{name}.csv).", ""]
    return lines


def why_not_ctr(payload: dict) -> str:
    """Why collective is not best on a CTR model, in one paragraph (what the rows show)."""
    parts = []
    payload = {"pareto_metric": "AUC", **payload}
    under = sweep.undercut(payload)
    if any(r["codec"] == "eventid" for r in under):
        e = next(r for r in under if r["codec"] == "eventid")
        parts.append(f"`eventid` is lossless at {e['bytes_per_token']:.2f} B/token, fewer bytes than the smallest "
                     "collective row, because in these models a token's K/V are a function of its event (item, rating "
                     "bucket, gap bucket): an index into the distinct events (95k of 1M tokens on ML-1M) is all a "
                     "cache needs, and a pool of 1024-4096 entries per stream is a lossy version of that index")
    v = sweep.collective_verdict(payload, "AUC")
    if v["beats"]:
        overlap = all(e["cis_overlap"] for e in v["beats"])
        parts.append("the baselines that beat collective at more bytes (" + ", ".join(f"`{e['baseline']}`" for e in v["beats"])
                     + ") do so by AUC differences " + ("inside overlapping 95% CIs" if overlap else
                                                       "some of which are outside the CIs"))
    return "Why not: " + "; ".join(parts) + "." if parts else ""


def markdown(names: list[str], payloads: dict[str, dict | None], tasks: dict[str, str]) -> str:
    lines = ["# Codec sweep of the sample checkpoints", "",
             f"Made by `python bench/sweep.py` ({platform.machine()}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch threads; each section names the command that made it); "
             "`ckv evaluate CHECKPOINT --data ml-1m --sweep default` (next-item) and `ckv evaluate CHECKPOINT --data "
             "ml-1m-ctr --sweep default` (CTR) give the same rows.", "",
             "| model | task | `collective` has the best delta at equal or smaller per-user bytes |", "|---|---|---|"]
    for n in names:
        p = payloads.get(n)
        lines.append(f"| {n} | {tasks.get(n, '?')} | {verdict(p) if p else 'not swept'} |")
    lines += ["",
              "Next-item protocol: test split; each user's history minus its last event is cached, compressed and "
              "decoded; the last event is appended with `extend` and its output ranks every item outside the history "
              "window; Pareto front and verdict on the NDCG@10 delta. Bytes (NOTES §4): per-user bytes count every "
              "per-token and per-user field, item ids and offsets included; for every codec the first layer is "
              "recomputed from the item ids, not stored. `itemid` is refused wherever a stored layer is not a "
              "function of the item alone.", "",
              "CTR protocol: each test sample of the scored users is scored by `model.score` over its history's cache "
              "(short window + long branch) with the K/V replaced by their decoded codes; the uncompressed scores of "
              "the same samples are the reference; Pareto front and verdict on the AUC delta; the CIs are the paired "
              "bootstrap over test users of `ckv compress`. Scored users: a seeded sample of `--sweep-users` test "
              "users (on ML-1M only 1,209 of the 6,040 users have test samples: the default 1500 scores them all); "
              "calibration and bytes cover every user. Bytes: every cached stream (short window and long branch K/V) "
              "of every token, item ids where stored (SIM) and offsets; ETA / SDIM signatures derived from the decoded "
              "cache (free). `eventid` stores each token's event ids (item, rating bucket, gap bucket; bit-packed) and "
              "recomputes the cache with the model: lossless. `evict` is refused on CTR caches.", ""]
    for n in names:
        lines += section(n, payloads.get(n))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    every = [p.resolve() for p in (args.checkpoints or default_checkpoints())]
    selected = set(every)
    if args.checkpoints:  # the other sample models keep their sections (from their JSON in --out; in docs/ always)
        defaults = [p.resolve() for p in default_checkpoints()]
        docs = args.out.resolve() == (ROOT / "docs").resolve()
        keep = [p for p in defaults if p in selected or docs or (args.out / f"sweep-{_name(p)}.json").exists()]
        every = keep + [p for p in every if p not in defaults]
    if not every:
        print("bench/sweep.py: no checkpoints found", file=sys.stderr)
        return 2
    results: dict[str, dict | None] = {}
    times = []
    try:
        if args.ctr_spec:
            sweep.parse_task_sweep(args.ctr_spec, CTR)  # bad specs fail before any work
        sweep.parse_task_sweep(args.spec, NEXT_ITEM)
        args.out.mkdir(parents=True, exist_ok=True)
        for path in every:
            name, task = _name(path), task_of(path)
            if args.render_only or (args.only and task != args.only) or path not in selected:
                prior = args.out / f"sweep-{name}.json"
                results[name] = json.loads(prior.read_text()) if prior.exists() else None
                continue
            print(f"{path.name}: sweeping ({task})", flush=True)
            payload = sweep_one(path, args)
            results[name] = payload
            times.append((name, payload["bench_seconds"]))
            print(f"{path.name}: {payload['bench_seconds']:.0f} s", flush=True)
            if "no_sweep" in payload:
                print(f"  no sweep: {payload['no_sweep']}", flush=True)
            else:
                line = sweep.verdict_line(payload)
                print(f"  {line}", flush=True)
        text = markdown([_name(p) for p in every], results, {_name(p): task_of(p) for p in every})
        atomic_write(args.out / "sweep.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    except CkvError as e:
        print(f"bench/sweep.py: error: {e}", file=sys.stderr)
        return 2
    for name, seconds in times:
        print(f"{name}: {seconds:.0f} s")
    print(f"wrote {args.out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
