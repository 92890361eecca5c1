"""`--pool-size auto` measured: per stream, the pool size chosen from held-out calibration error at each fidelity
target, and what the chosen plan gives end to end on users that calibrated nothing.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pool_sizing.py CKPT --data ml-1m --codec predictive \
        --targets 0.15,0.12,0.10,0.08 --out docs/fidelity/sizing-sasrec-ml1m.json

Calibration users (`reserve` rule of `ckv_cli.pipeline.holdout`) are split again, 80/20 by user, to size the pools
(`ckv_cli.pipeline.sizing.size_trials`, run once at the tightest target; the looser targets pick from the same trials);
the chosen plan is then fitted on every calibration user and scored on the reported users.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ckv_cli.data import load
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, make_plan, parse_params
from ckv_cli.pipeline.holdout import heldout_compress, reserve_split
from ckv_cli.pipeline.sizing import CANDIDATES, describe_choices, pick, size_trials, sized_plan, within_budget
from ckv_cli.tasks.next_item import Teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--codec", default="predictive")
    ap.add_argument("--param", action="append", default=[], help="codec KEY=VALUE besides pool_size")
    ap.add_argument("--time-bits", type=int, default=0)
    ap.add_argument("--targets", default="0.15,0.12,0.10,0.08")
    ap.add_argument("--candidates", default=",".join(map(str, CANDIDATES)))
    ap.add_argument("--max-bits", type=int, default=0, help="instead of targets: index bits per token over all "
                    "pooled streams, spent where the held-out error falls most (`ckv_cli.pipeline.sizing.within_budget`)")
    ap.add_argument("--calib-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(a.checkpoint)
    ds = load(a.data, item_vocab=meta["item_vocab"])
    teacher = Teacher.build(model, ds, 256)
    n_tokens = teacher.flat.n_tokens
    params = parse_params(a.param)
    if a.time_bits:
        params["time_bits"] = a.time_bits
    base = CompressOptions(codec=a.codec, params=params, calib_users=a.calib_users, seed=a.seed)

    def plan_for(m: int):
        return make_plan(model, CompressOptions(codec=a.codec, params={**params, "pool_size": m}, seed=a.seed))

    split = reserve_split(ds.n_users, a.calib_users, a.seed)
    targets = sorted((float(t) for t in a.targets.split(",")), reverse=True) if not a.max_bits else [0.0]
    t = time.perf_counter()
    trials = size_trials(plan_for, teacher.flat.select(split.calib), n_tokens, model, target=min(targets),
                         candidates=tuple(int(c) for c in a.candidates.split(",")), seed=a.seed,
                         progress=lambda s: print(s, flush=True))
    sizing_s = time.perf_counter() - t
    rows, done = [], {}
    for target in targets:
        choices = within_budget(trials, a.max_bits) if a.max_bits else pick(trials, target)
        key = tuple(sorted((n, c.pool_size) for n, c in choices.items()))
        t = time.perf_counter()
        if key not in done:
            done[key] = heldout_compress(model, teacher, base, plan_factory=lambda: sized_plan(plan_for, choices))
        res = done[key]
        n = res.ci["NDCG@10"]
        rows.append({"target": target, "max_bits": a.max_bits, "choices": describe_choices(choices), "accounting": res.accounting,
                     "ci": {k: list(v) for k, v in res.ci.items()}, "fidelity": res.fidelity, "recon": res.recon,
                     "seconds": round(time.perf_counter() - t, 1)})
        sizes = ", ".join(f"{k} {c.pool_size}{'' if c.met else ' (not met)'}" for k, c in choices.items())
        acc = res.accounting
        print(f"target {target:g}: {sizes}; per-user {acc['per_user_ratio_fp16']:.2%}, total {acc['total_ratio_fp16']:.2%} "
              f"(shared {acc['shared_bytes'] / 2**20:.2f} MB); dNDCG@10 {n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}]; "
              f"overlap {res.fidelity['top10_overlap']:.3f}; recon {', '.join(f'{k} {v:.3f}' for k, v in res.recon.items())}",
              flush=True)
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "data": a.data, "codec": a.codec,
                                           "params": params, "time_bits": a.time_bits, "rule": split.rule,
                                           "n_tokens": n_tokens, "sizing_seconds": round(sizing_s, 1),
                                           "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
