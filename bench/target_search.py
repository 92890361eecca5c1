"""`ckv compress --target` measured: the search (`ckv_cli.pipeline.target.search`) on held-out calibration users, then the
chosen setting fitted on every calibration user and scored on the users that calibrated nothing.

    OMP_NUM_THREADS=1 .venv/bin/python bench/target_search.py CKPT --data ml-1m --target overlap=0.9 \
        --out docs/fidelity/target-sasrec-ml1m.json [--settings 'predictive:pool_size=1024;collective:pool_size=4096']

Settings default to `ckv_cli.pipeline.target.default_settings`; `--settings` takes `codec:k=v,...` entries (`time_bits=N`
allowed) separated by ';'. Prints every setting tried (bytes, measured value, met) and the check on reported users.
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
from ckv_cli.pipeline.holdout import heldout_compress, reserve_split
from ckv_cli.pipeline.target import Setting, parse_target, search
from ckv_cli.tasks.next_item import Teacher


def parse_settings(spec: str) -> list[Setting]:
    out = []
    for entry in [e.strip() for e in spec.split(";") if e.strip()]:
        codec, _, rest = entry.partition(":")
        params = parse_params([p for p in rest.split(",") if p]) if rest else {}
        tb = int(params.pop("time_bits", 0))
        out.append(Setting(codec.strip(), tuple(params.items()), tb))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--settings", default="")
    ap.add_argument("--calib-users", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    target = parse_target(a.target)
    model, meta = load_checkpoint(a.checkpoint)
    ds = load(a.data, item_vocab=meta["item_vocab"])
    teacher = Teacher.build(model, ds, 256)
    split = reserve_split(ds.n_users, a.calib_users, a.seed)
    base = CompressOptions(calib_users=a.calib_users, seed=a.seed)
    t = time.perf_counter()
    res = search(model, teacher, split.calib, target, base, parse_settings(a.settings) if a.settings else None,
                 progress=lambda s: print("trying", s, flush=True))
    search_s = time.perf_counter() - t
    for r in res.tried:
        if r["status"] == "ok":
            print(f"  {r['setting']}: per-user {r['per_user_ratio_fp16']:.2%}, total {r['total_ratio_fp16']:.2%}, "
                  f"measured {r['measured']:.4f}, {'met' if r['met'] else 'not met'}")
        else:
            print(f"  {r['setting']}: {r['status']}")
    check = None
    if res.chosen is not None:
        s = res.chosen
        opts = s.options(base)
        h = heldout_compress(model, teacher, opts)
        check = {"setting": s.label, "accounting": h.accounting, "ci": {k: list(v) for k, v in h.ci.items()},
                 "fidelity": h.fidelity, "recon": h.recon, "report_users": h.report_users}
        n = h.ci["NDCG@10"]
        print(f"chosen {s.label}: on {h.report_users} reported users per-user {h.accounting['per_user_ratio_fp16']:.2%}, "
              f"total {h.accounting['total_ratio_fp16']:.2%}, overlap {h.fidelity['top10_overlap']:.3f}, "
              f"dNDCG@10 {n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}]")
    else:
        print("no setting met the target")
    Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "data": a.data, "target": a.target,
                                       "fit_users": res.fit_users, "val_users": res.val_users,
                                       "chosen": res.chosen.label if res.chosen else None, "tried": res.tried,
                                       "search_seconds": round(search_s, 1), "check": check,
                                       "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    main()
