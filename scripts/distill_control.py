"""What distillation buys, against the right control (issue 4).

    OMP_NUM_THREADS=1 python scripts/distill_control.py CKPT --data ml-1m --steps 200 --seed 0 --out DIR

On the same seeded batches (`ckv_cli.pipeline.distill`: the validation split's histories, the validation item as the
fine-tuning label; the test items are never trained on), measures the test metrics (the protocol of
`ckv compress`) of
  - teacher: the checkpoint on its exact cache;
  - post-hoc: the teacher reading the cache compressed by the gradient-free initialisation (`--distill-steps 0`);
  - distilled, frozen: pools and routers distilled for S steps, model frozen (`--distill-steps S`);
  - distilled, fine-tuned: pools, routers and a copy of the model trained S steps (`--distill-steps S --finetune`);
  - control: a copy of the model fine-tuned S steps with the same batches and loss but no codec (and no
    auxiliary losses), reading the exact teacher cache: what the extra training alone buys;
  - control + post-hoc codec: the control model reading the post-hoc compressed cache (the control's weights
    with no distillation of the codec).
Each row's delta against the teacher and against the control carries a paired-bootstrap 95% CI
(`ckv_cli.metrics.paired_bootstrap`, as `ckv evaluate`); so does what distillation buys over the same weights
reading the post-hoc codec (frozen vs post-hoc; fine-tuned vs control + post-hoc codec). Writes
DIR/distill_control.json, DIR/distill_control.md and the per-user target ranks (DIR/distill_control.ranks.npz),
rewritten after each row (a run cut short leaves the rows it finished). The plan is fitted once; every trained
variant starts from a copy of it.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, fit_plan, run_plan
from ckv_cli.data import load
from ckv_cli.pipeline.distill import DistillOptions, distill, make_student
from ckv_cli.tasks.next_item import PROTOCOL, Scored, Teacher, score_fidelity, scores_after_last_event
from ckv_cli.metrics import paired_bootstrap, per_user_ranking

SHOWN = ("NDCG@10", "HR@10")


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def exact_scores(reader, teacher: Teacher) -> Scored:
    """`reader` appending the last event through each user's exact teacher cache (no codec)."""
    scored = Scored(len(teacher.flat.offsets) - 1)
    for tb in teacher.batches:
        cache = reader.unflatten(tb.flat)
        s = scores_after_last_event(reader, cache, tb.cache_batch(cache))
        scored.add(tb.flat.offsets, score_fidelity(tb.ref_scores, s, tb.targets))
    scored.finish()
    return scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=200, help="distillation / fine-tuning steps (DistillOptions.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pool-size", type=int, default=8192, help="ckv compress's default for next-item models: 8192")
    ap.add_argument("--calib-users", type=int, default=1000)
    ap.add_argument("--batch-users", type=int, default=256, help="users per scoring batch")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    model, meta = load_checkpoint(args.checkpoint)
    ds = load(args.data, item_vocab=meta["item_vocab"])
    opts = CompressOptions(params={"pool_size": args.pool_size, "user_dim": 0, "layout": "residual",
                                   "user_dtype": "int8"},
                           calib_users=args.calib_users, batch_users=args.batch_users, seed=args.seed)
    teacher = Teacher.build(model, ds, args.batch_users)
    log(f"teacher caches: {ds.n_users:,} users, {int(teacher.flat.offsets[-1]):,} tokens", t0)
    base = DistillOptions(steps=args.steps, seed=args.seed)
    timing, histories = {}, {}
    torch.manual_seed(args.seed)
    posthoc = fit_plan(model, ds, opts, teacher=teacher)  # fitted once (seeded): each trained variant starts from a copy
    timing["fit plan"] = round(time.time() - t0, 1)
    log("post-hoc plan fitted", t0)
    order = ["post-hoc (no distillation)", "control: fine-tuned, no compression", "distilled, fine-tuned (--finetune)",
             "distilled, model frozen", "control model + post-hoc codec"]
    result = {"checkpoint": str(args.checkpoint), "data": ds.name, "users": ds.n_users, "steps": args.steps,
              "seed": args.seed, "pool_size": args.pool_size, "calib_users": args.calib_users,
              "distill_options": base.__dict__, "protocol": f"test split; {PROTOCOL}", "bootstrap": args.bootstrap,
              "threads": torch.get_num_threads(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "rows": {}}
    kept: dict[str, Scored] = {}
    pairs = {"distilled, model frozen": "post-hoc (no distillation)",  # distillation's gain, same model weights
             "distilled, fine-tuned (--finetune)": "control model + post-hoc codec"}
    control = "control: fine-tuned, no compression"

    def compare(a: str, b: str) -> dict:
        """Row b minus row a per metric, with the paired-bootstrap 95% CI."""
        pa, pb = (per_user_ranking(kept[n].per_user["rank_new"]) for n in (a, b))
        ci = paired_bootstrap(pa, pb, n=args.bootstrap, seed=args.seed)
        return {k: {"delta": float(pb[k].mean() - pa[k].mean()), "ci": list(ci[k])} for k in pb}

    def record(name, scored: Scored) -> None:
        """One more row; every row's metrics and CIs recomputed, the JSON, the per-user ranks and the table
        rewritten (a partial run leaves what it has)."""
        kept[name] = scored
        ref = next(iter(kept.values())).per_user["rank_ref"]
        assert np.array_equal(scored.per_user["rank_ref"], ref), name  # one teacher reference for every row
        ref_pu = per_user_ranking(ref)
        result["rows"] = {"teacher": {"metrics": {k: float(v.mean()) for k, v in ref_pu.items()}}}
        for n in [o for o in order if o in kept]:
            _, new, fid = kept[n].metrics()
            new_pu = per_user_ranking(kept[n].per_user["rank_new"])
            vs_t = paired_bootstrap(ref_pu, new_pu, n=args.bootstrap, seed=args.seed)
            row = {"metrics": new, "fidelity": fid,
                   "vs_teacher": {k: {"delta": new[k] - float(ref_pu[k].mean()), "ci": list(vs_t[k])} for k in new}}
            if control in kept and n != control:
                row["vs_control"] = compare(control, n)
            if n in pairs and pairs[n] in kept:
                row["distillation_gain"] = {"vs": pairs[n], **compare(pairs[n], n),
                                            "top10_overlap": fid["top10_overlap"] - kept[pairs[n]].metrics()[2]["top10_overlap"]}
            result["rows"][n] = row
        result["distill_history"] = histories
        result["seconds"] = timing
        result["wall_seconds"] = round(time.time() - t0, 1)
        (args.out / "distill_control.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        np.savez_compressed(args.out / "distill_control.ranks.npz", teacher=ref,
                            **{n: kept[n].per_user["rank_new"] for n in kept})
        (args.out / "distill_control.md").write_text(table() + "\n")

    def ci(d: dict | None) -> str:
        return f"{d['delta']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else ""

    def table() -> str:
        lines = [f"`{result['command']}` ({ds.n_users:,} users, pool {args.pool_size}, {args.steps} steps, seed "
                 f"{args.seed}, {torch.get_num_threads()} thread(s), {result['wall_seconds']:.0f} s; 95% CIs: paired "
                 f"bootstrap, {args.bootstrap} resamples)", "",
                 "| model | " + " | ".join(f"{k} | d{k} vs teacher [95% CI] | d{k} vs control [95% CI]" for k in SHOWN)
                 + " | top-10 overlap with teacher |",
                 "|---|" + "---|---|---|" * len(SHOWN) + "---|"]
        tm = result["rows"]["teacher"]["metrics"]
        lines.append("| teacher | " + " | ".join(f"{tm[k]:.4f} | | " for k in SHOWN) + " | 1 |")
        for name in order:
            r = result["rows"].get(name)
            if r is not None:
                cells = [f"{r['metrics'][k]:.4f} | {ci(r['vs_teacher'][k])} | {ci(r.get('vs_control', {}).get(k))}"
                         for k in SHOWN]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['fidelity']['top10_overlap']:.3f} |")
        gains = [(n, result["rows"][n]["distillation_gain"]) for n in order
                 if "distillation_gain" in result["rows"].get(n, {})]
        if gains:
            lines += ["", "What distillation buys over the same weights reading the post-hoc codec:", "",
                      "| distilled | against | " + " | ".join(f"d{k} [95% CI]" for k in SHOWN) + " | d top-10 overlap |",
                      "|---|---|" + "---|" * len(SHOWN) + "---|"]
            for n, g in gains:
                lines.append(f"| {n} | {g['vs']} | " + " | ".join(ci(g[k]) for k in SHOWN) + f" | {g['top10_overlap']:+.3f} |")
        lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in timing.items())]
        return "\n".join(lines)

    def plan_row(name, plan, reader):
        t = time.time()
        scored = Scored(ds.n_users)
        run_plan(reader, plan, teacher.batches, scored, keep_fields=False)
        scored.finish()
        timing[name + " (score)"] = round(time.time() - t, 1)
        record(name, scored)
        log(f"{name}: scored", t0)

    def trained(name, fn):
        t = time.time()
        out = fn()
        timing[name + " (train)"] = round(time.time() - t, 1)
        histories[name] = {"first": out[0], "last": out[-1]} if out else None
        log(f"{name}: {args.steps} steps in {timing[name + ' (train)']} s", t0)

    plan_row("post-hoc (no distillation)", copy.deepcopy(posthoc), model)

    control_model = make_student(model)
    name = control
    trained(name, lambda: distill(model, ds, None, DistillOptions(steps=args.steps, seed=args.seed, finetune=True,
                                                                  compress=False), student=control_model))
    t = time.time()
    scored = exact_scores(control_model, teacher)
    timing[name + " (score)"] = round(time.time() - t, 1)
    record(name, scored)
    log(f"{name}: scored", t0)

    name = "distilled, fine-tuned (--finetune)"
    ft_plan, ft_student = copy.deepcopy(posthoc), make_student(model)
    trained(name, lambda: distill(model, ds, ft_plan, DistillOptions(steps=args.steps, seed=args.seed, finetune=True),
                                  student=ft_student))
    plan_row(name, ft_plan, ft_student)

    name = "distilled, model frozen"
    frozen = copy.deepcopy(posthoc)
    trained(name, lambda: distill(model, ds, frozen, base))
    plan_row(name, frozen, model)

    plan_row("control model + post-hoc codec", copy.deepcopy(posthoc), control_model)
    print(table())


if __name__ == "__main__":
    main()
