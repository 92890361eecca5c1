"""Which distance should a SASRec pool be fitted in? A probe behind docs/fidelity.md ("Pools in the model's Fisher
metric"): the default plan (collective, pool 8192 at fp16, held-out calibration) with the L1 K and/or V pools
refitted in another metric, scored on the users held out of calibration.

Modes:
- `l2`: plain squared error (the pools `plan.fit` made);
- `k`, `v`, `kv`: a metric from the weights alone, for K the covariance of the queries the same hidden states issue
  (recomputed from the calibration keys through W_q W_k^-1; pre_ln SASRec), for V W_o^T W_o;
- `fisher`: the Fisher matrices `ckv compress` uses (`ckv_cli.tasks.fisher.data_grams`).

    .venv/bin/python scripts/metric_probe.py sample_checkpoints/sasrec-ml1m.safetensors --mode kv
Prints the held-out top-10 overlap, mean KL and reconstruction errors (about 4 minutes a mode on one thread).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ckv_cli.codecs.metric import factor, fit_pool, router
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress, make_plan
from ckv_cli.tasks import task_of
from ckv_cli.tasks.fisher import data_grams


def weight_grams(model, flat, layer: int) -> dict[str, torch.Tensor]:
    L = model.layers[layer]
    K = flat.streams[f"L{layer}.k"].double()
    Wk, bk, Wq, bq = (p.detach().double() for p in (L.k.weight, L.k.bias, L.q.weight, L.q.bias))
    Q = torch.linalg.solve(Wk, (K - bk).T).T @ Wq.T + bq  # the queries of the hidden states behind the keys
    Wo = L.o.weight.detach().double()
    return {f"L{layer}.k": Q.T @ Q / len(Q), f"L{layer}.v": Wo.T @ Wo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="ml-1m")
    ap.add_argument("--mode", choices=("l2", "k", "v", "kv", "fisher"), default="kv")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    task = task_of(model)
    ds = task.load(args.data, None, meta, model)
    opts = CompressOptions(params={"pool_size": 8192, "user_dim": 0, "layout": "residual", "pool_dtype": "fp16"},
                           calib_holdout=True)
    calib = task.calibration_users(ds, opts)
    flat, _ = task.calibration(model, ds, opts, calib)
    plan = make_plan(model, opts)
    plan.fit(flat, opts.seed)
    layer = model.config.n_layers - 1
    wanted = {"l2": "", "k": "k", "v": "v", "kv": "kv", "fisher": "kv"}[args.mode]
    names = [f"L{layer}.{s}" for s in wanted]
    if args.mode == "fisher":
        grams = data_grams(model, ds, calib, {n: (n,) for n in names}, opts.batch_users, opts.seed)
    else:
        grams = weight_grams(model, flat, layer)
    for name in names:
        codec = plan.streams[name]
        L = factor(grams[name])
        codec.metric_L = L  # routed in the metric from here on (the probe does not write an artifact)
        codec._set_pool(codec._stored(fit_pool(flat.stream(name).float(), codec.pool_size, opts.seed, codec.iters, L)))
        assert torch.equal(codec.router_w, router(codec.pool, L)[0])
    held = np.setdiff1d(np.arange(ds.n_users), calib)
    m = compress(model, ds, opts, plan=plan, users=held, keep_fields=False).metrics
    print(json.dumps({"mode": args.mode, "users": int(len(held)), **m["fidelity"],
                      "reconstruction_rel_mse": m["reconstruction_rel_mse"]}, indent=1))


if __name__ == "__main__":
    main()
