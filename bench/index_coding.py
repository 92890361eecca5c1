#!/usr/bin/env python
"""Item-conditioned index coding, measured end to end on a next-item checkpoint (issue 21; docs/index-coding.md).

For each spec (`codec:k=v,...`, as `ckv evaluate --sweep` takes them) the plan is fitted on the seeded calibration
users (`--calib-users`, as `ckv compress`), every user is encoded, decoded and scored (`ckv_cli.pipeline.compress`)
from one teacher pass, and the row reports:

- bytes as `ckv compress` counts them over every user (bytes/token, per-user % of fp16, shared bytes), and the
  per-user bytes of the held-out users alone (escapes are rarer on the calibration users' own tokens);
- held-out metrics: NDCG@10 / HR@10 deltas with 95% paired-bootstrap CIs, top-10 overlap, mean KL and hit@10
  flips over the users *not* used for calibration (the calibration users' metrics are in the all-users block,
  which is what `ckv compress` / `ckv evaluate` report);
- per item-coded stream: the list width, the escape rate on held-out and on calibration tokens, the held-out tokens
  and escapes by their item's list (none, room left below the width, full), the entries listed.

Specs that differ only in the index coding (`index`, `index_bits`, `escape_tol`, `index_lists`, `index_fill`)
share one fitted pool: the first is fitted, the others take its pool and fit only their lists
(`IndexCoding.set_index` + `fit_index`), so a sweep of widths and tolerances costs one k-means. The JSON goes to `--out`; a Markdown table is printed.

    python bench/index_coding.py sample_checkpoints/sasrec-ml1m.safetensors --data ml-1m \\
        --specs "collective:pool_size=8192;collective:pool_size=8192,index=item,escape_tol=0.3" \\
        --out docs/index-coding/sasrec-ml1m.json
Runs from the repository root without installing ckv (it puts the root on sys.path).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _machine import machine  # noqa: E402
from ckv_cli.errors import CkvError  # noqa: E402
from ckv_cli.evaluate.sweep import parse_task_sweep  # noqa: E402
from ckv_cli.metrics import paired_bootstrap, per_user_ranking, ranking_metrics  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.pipeline.compress import CompressOptions, compress  # noqa: E402
from ckv_cli.tasks import task_of  # noqa: E402
from ckv_cli.tasks.next_item import fidelity_summary  # noqa: E402

INDEX_PARAMS = ("index", "index_bits", "escape_tol", "index_lists", "index_fill")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", default="ml-1m")
    p.add_argument("--specs", required=True, help="';'-separated codec:k=v,... entries")
    p.add_argument("--out", type=Path, required=True, help="JSON output (rows are added to an existing file's)")
    p.add_argument("--calib-users", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-users", type=int, default=256)
    p.add_argument("--cache", type=Path, default=None,
                   help="directory keeping fitted pools between runs (keyed by checkpoint, spec, calibration, seed)")
    return p.parse_args(argv)


def cached_plan(args, key: str):
    """A plan fitted by an earlier run with the same checkpoint, pool parameters, calibration and seed, or None."""
    path = plan_path(args, key)
    return torch.load(path, weights_only=False) if path is not None and path.exists() else None


def plan_path(args, key: str) -> Path | None:
    if args.cache is None:
        return None
    import hashlib

    tag = json.dumps([str(args.checkpoint.resolve()), args.data, key, args.calib_users, args.seed], sort_keys=True)
    return args.cache / f"plan-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.pt"


def pool_key(codec: str, params: dict) -> str:
    """What the fitted pool depends on: everything but the index coding."""
    return json.dumps([codec, {k: v for k, v in params.items() if k not in INDEX_PARAMS}], sort_keys=True)


def variant(base_plan, params: dict, calib) -> object:
    """A copy of a fitted plan whose coded streams take another index coding, fitted on the calibration tokens."""
    plan = copy.deepcopy(base_plan)
    for name, codec in plan.coded().items():
        if not hasattr(codec, "set_index"):
            continue
        codec.set_index(params.get("index", "flat"), params.get("index_bits", "auto"), params.get("escape_tol", 0.0),
                        params.get("index_lists", "count"), params.get("index_fill", 0))
        ctx = plan.context(calib.streams) if getattr(codec, "needs_context", False) else None  # predictive
        codec.fit_index(plan.codec_input(calib, name) if hasattr(plan, "codec_input") else calib.stream(name),
                        calib.items, calib.offsets, ctx)
    return plan


def held_out_bytes(plan, fields: dict, offsets: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """(per-user bytes of `users`, their tokens): every declared field's rows of those users at its stored width
    (bit-packed fields at their bits, without the partial last byte)."""
    lengths = np.diff(offsets)
    tokens = int(lengths[users].sum())
    total = 0.0
    for name, f in plan.fields().items():
        row = f.bits / 8 if f.bits else f.width * np.dtype(f.dtype).itemsize
        if f.per == "token":
            total += tokens * row
        elif f.per == "ragged":
            counts = np.asarray(fields[f.counts], np.int64).reshape(-1)
            total += int(counts[users].sum()) * row
        else:
            total += len(users) * row
    return total, tokens


def escapes(plan, fields: dict, offsets: np.ndarray, users: np.ndarray, calib: np.ndarray) -> dict:
    """Per item-coded stream: width, share of escaped tokens among held-out and calibration users, entries listed."""
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    held, cal = np.isin(owner, users), np.isin(owner, calib)
    out = {}
    for name, codec in plan.coded().items():
        index = getattr(codec, "index", None)
        if index is None or f"{name}/pos" not in fields:
            continue
        esc = np.asarray(fields[f"{name}/pos"]) == index.escape
        lengths = np.diff(index.offsets)[index._rows(fields["tokens/items"])]  # (N,) each token's list length
        parts = {"no list": lengths == 0, "room left": (lengths > 0) & (lengths < index.capacity),
                 "full": lengths >= index.capacity}
        split = {k: {"tokens": int((held & m).sum()), "escapes": int((esc & held & m).sum())} for k, m in parts.items()}
        out[name] = {"index_bits": index.bits, "escape_rate_held_out": float(esc[held].mean()),
                     "escape_rate_calibration": float(esc[cal].mean()) if cal.any() else None,
                     "held_out_by_list": split, "list_entries": int(len(index.entries)),
                     "selection": index.selection or None}
    return out


def held_out_metrics(per_user: dict, users: np.ndarray, bootstrap: int, seed: int) -> dict:
    sub = {k: v[users] for k, v in per_user.items()}
    ref, new = ranking_metrics(sub["rank_ref"]), ranking_metrics(sub["rank_new"])
    ci = paired_bootstrap(per_user_ranking(sub["rank_ref"]), per_user_ranking(sub["rank_new"]), n=bootstrap, seed=seed)
    return {"users": int(len(users)), "reference": ref, "compressed": new,
            "delta": {k: {"delta": new[k] - ref[k], "ci_low": ci[k][0], "ci_high": ci[k][1]} for k in ref},
            "fidelity": fidelity_summary(sub)}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    model, meta = load_checkpoint(args.checkpoint)
    task = task_of(model)
    ds = task.load(args.data, None, meta, model)
    specs = parse_task_sweep(args.specs, task)  # refused before the teacher pass
    t0 = time.perf_counter()
    teacher = task.teacher(model, ds, args.batch_users)
    print(f"teacher caches: {time.perf_counter() - t0:.0f} s", flush=True)
    base_opts = CompressOptions(calib_users=args.calib_users, batch_users=args.batch_users, seed=args.seed,
                                bootstrap=args.bootstrap)
    calib_users = task.calibration_users(ds, base_opts)
    held = np.setdiff1d(np.arange(ds.n_users), calib_users)
    calib = None
    fitted: dict[str, object] = {}
    rows = []
    for spec in specs:
        params = dict(spec.params)
        opts = replace(base_opts, codec=spec.codec, params=params)
        t = time.perf_counter()
        print(f"{spec.label} ...", flush=True)
        try:
            key = pool_key(spec.codec, params)
            if key not in fitted and cached_plan(args, key) is not None:
                fitted[key] = cached_plan(args, key)
                print("  (pool from --cache)", flush=True)
            if key in fitted:
                if calib is None:
                    calib = task.calibration(model, ds, opts, calib_users, teacher=teacher)[0]
                plan = variant(fitted[key], params, calib)
                result = compress(model, ds, opts, plan=plan, teacher=teacher)
            else:
                result = compress(model, ds, opts, teacher=teacher)
                fitted[key] = result.plan
                if plan_path(args, key) is not None:
                    args.cache.mkdir(parents=True, exist_ok=True)
                    torch.save(result.plan, plan_path(args, key))
        except CkvError as e:
            print(f"  refused: {e}", flush=True)
            rows.append({"spec": spec.label, "refused": str(e)})
            continue
        acct = result.accounting
        hb, ht = held_out_bytes(result.plan, result.fields, result.offsets, held)
        full = acct["full_fp16_bytes_per_token"]
        row = {"spec": spec.label, "codec": spec.codec, "params": params, "plan": result.plan.describe(),
               "bytes_per_token": acct["bytes_per_token"], "per_user_ratio_fp16": acct["per_user_ratio_fp16"],
               "shared_bytes": acct["shared_bytes"], "total_ratio_fp16": acct["total_ratio_fp16"],
               "per_user_breakdown": acct["per_user_breakdown"], "shared_breakdown": acct["shared_breakdown"],
               "held_out_bytes_per_token": hb / ht, "held_out_ratio_fp16": hb / ht / full,
               "all_users": {"metrics": result.metrics["delta"], "fidelity": result.metrics["fidelity"]},
               "held_out": held_out_metrics(result.per_user, held, args.bootstrap, args.seed),
               "recon": result.metrics["reconstruction_rel_mse"],
               "index": escapes(result.plan, result.fields, result.offsets, held, calib_users),
               "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        h = row["held_out"]
        d = h["delta"]["NDCG@10"]
        print(f"  {row['bytes_per_token']:.3f} B/token ({row['per_user_ratio_fp16']:.3%}; held-out "
              f"{row['held_out_ratio_fp16']:.3%}), shared {row['shared_bytes'] / 2**20:.2f} MiB, overlap "
              f"{h['fidelity']['top10_overlap']:.3f}, KL {h['fidelity']['kl_mean']:.4f}, dNDCG@10 {d['delta']:+.4f} "
              f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], {row['seconds']:.0f} s", flush=True)
        for s, e in row["index"].items():
            by = ", ".join(f"{k} {v['escapes']:,}/{v['tokens']:,}" for k, v in e["held_out_by_list"].items())
            print(f"    {s}: {e['index_bits']} bits, escapes {e['escape_rate_held_out']:.3f} held out / "
                  f"{e['escape_rate_calibration']:.3f} calibration, {e['list_entries']:,} entries; held-out "
                  f"escapes/tokens by list: {by}", flush=True)
    return {"checkpoint": str(args.checkpoint), "data": args.data, "users": int(ds.n_users),
            "calib_users": int(len(calib_users)), "held_out_users": int(len(held)), "seed": args.seed,
            "bootstrap": args.bootstrap, "machine": machine(),
            "command": " ".join(["python", "bench/index_coding.py"] + sys.argv[1:]), "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    payload = run(args)
    if args.out.exists():  # rows of earlier runs are kept (same checkpoint), a spec measured again replaced
        old = json.loads(args.out.read_text())
        labels = {r["spec"] for r in payload["rows"]}
        payload["rows"] = [r for r in old.get("rows", []) if r["spec"] not in labels] + payload["rows"]
        payload["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
