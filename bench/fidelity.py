"""Codecs and options against today's defaults, calibrated out of sample, with paired-bootstrap 95% CIs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py CKPT --data ml-1m \
        --specs 'collective:pool_size=8192;predictive:pool_size=1024' --rule reserve --out docs/fidelity/x.json

Every user's teacher cache and reference scores are built once (`ckv_cli.tasks.next_item.Teacher`); each spec is fitted
on calibration users and scored on other users (`ckv_cli.pipeline.holdout`: `--rule reserve`, `folds2`, or `insample` for
today's protocol). A spec is `codec[:key=value,...]` as in `ckv evaluate --sweep`, plus the plan-level keys
`calib_users`; `time_bits` (HSTU event times at that many bits, 0 = int32) is a codec parameter the plan takes. Writes JSON (every row) and
prints a Markdown table. Wall times are from a shared 2-core machine: upper bounds.
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
from ckv_cli.pipeline.compress import CompressOptions, parse_params
from ckv_cli.pipeline.holdout import heldout_compress, insample_compress
from ckv_cli.tasks.next_item import Teacher

PLAN_KEYS = ("calib_users",)


def parse_spec(spec: str) -> tuple[str, dict, dict]:
    codec, _, rest = spec.partition(":")
    params = parse_params([p for p in rest.split(",") if p]) if rest else {}
    plan = {k: params.pop(k) for k in PLAN_KEYS if k in params}
    return codec.strip(), params, plan


def row(spec: str, res, seconds: float) -> dict:
    a = res.accounting
    return {"spec": spec, "rule": res.rule, "calib_users": res.calib_users, "report_users": res.report_users,
            "bytes_per_token": a["bytes_per_token"], "per_user_ratio_fp16": a["per_user_ratio_fp16"],
            "shared_bytes": a["shared_bytes"], "total_ratio_fp16": a["total_ratio_fp16"],
            "per_user_breakdown": a["per_user_breakdown"], "shared_breakdown": a["shared_breakdown"],
            "reference": res.reference, "compressed": res.compressed,
            "ci": {k: list(v) for k, v in res.ci.items()}, "fidelity": res.fidelity, "recon": res.recon,
            "plan": res.plans[0].describe(), "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    out = ["| spec | B/token | per-user / fp16 | shared | total / fp16 | dNDCG@10 [95% CI] | dHR@10 [95% CI] | "
           "top-10 overlap | KL | flips | recon (held out) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, h = r["ci"]["NDCG@10"], r["ci"]["HR@10"]
        rec = " ".join(f"{k}:{v:.3f}" for k, v in sorted(r["recon"].items()) if not k.startswith("L0"))
        out.append(f"| `{r['spec']}` | {r['bytes_per_token']:.2f} | {r['per_user_ratio_fp16']:.2%} | "
                   f"{r['shared_bytes'] / 2**20:.2f} MB | {r['total_ratio_fp16']:.2%} | "
                   f"{n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}] | {h[0]:+.4f} [{h[1]:+.4f}, {h[2]:+.4f}] | "
                   f"{r['fidelity']['top10_overlap']:.3f} | {r['fidelity']['kl_mean']:.4f} | "
                   f"{r['fidelity']['hit10_flips']} | {rec} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--specs", required=True, help="';'-separated codec[:k=v,...] entries")
    ap.add_argument("--rule", default="reserve", choices=("reserve", "folds2", "insample"))
    ap.add_argument("--calib-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(a.checkpoint)
    ds = load(a.data, item_vocab=meta["item_vocab"])
    t = time.perf_counter()
    teacher = Teacher.build(model, ds, 256)
    teacher_s = time.perf_counter() - t
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in [s.strip() for s in a.specs.split(";") if s.strip()]:
        codec, params, plan = parse_spec(spec)
        opts = CompressOptions(codec=codec, params=params, seed=a.seed,
                               calib_users=int(plan.get("calib_users", a.calib_users)))
        t = time.perf_counter()
        if a.rule == "insample":
            res = insample_compress(model, teacher, opts, bootstrap=a.bootstrap)
        else:
            res = heldout_compress(model, teacher, opts, folds=2 if a.rule == "folds2" else 0, bootstrap=a.bootstrap)
        rows.append(row(spec, res, time.perf_counter() - t))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        payload = {"checkpoint": a.checkpoint, "data": a.data, "users": ds.n_users,
                   "tokens": int(teacher.flat.offsets[-1]), "rule": a.rule, "seed": a.seed,
                   "teacher_seconds": round(teacher_s, 1), "command": " ".join(sys.argv), "rows": rows}
        out.write_text(json.dumps(payload, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
