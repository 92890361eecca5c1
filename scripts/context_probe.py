#!/usr/bin/env python
"""How much of a pooled layer's K/V the predictive codec's linear predictor leaves, with and without a moving
average of the first layer's K/V as context (`--param ema=A`, `ckv_cli.codecs.predictive.causal_ema`).

Teacher caches of 2,000 seeded users (the first 1,000 fit, the other 1,000 are scored); for each context the
least-squares map plus a per-item mean residual (shrink 5, as `linear+item`) is fitted on the first users, and the
printed figure is the residual energy left on the others, relative to their vectors' variance (lower: less left for
the pool to code). No pool is fitted: it ranks contexts, the codec's own benchmark (bench/index_coding.py) measures
what they do to the model.

    python scripts/context_probe.py sample_checkpoints/sasrec-ml1m.safetensors --data ml-1m --alphas 0.3 0.15 0.1 0.05
Runs from the repository root without installing ckv (it puts the root on sys.path).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ckv_cli.codecs.predictive import causal_ema_flat  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.tasks.next_item import iter_test_caches  # noqa: E402


def caches(model, ds, users: np.ndarray, layer: int):
    """(x (N, 2d) the layer's [K, V], c (N, c) the first layer's [K, V], items (N,), offsets (U + 1,)) of `users`."""
    xs, cs, items, lengths = [], [], [], []
    for b in iter_test_caches(model, ds, users, 250):
        kv = b.cache
        for u in range(len(b.users)):
            n = int(kv.lengths[u])
            xs.append(torch.cat([kv.keys[layer][u, :n], kv.values[layer][u, :n]], 1))
            cs.append(torch.cat([kv.keys[0][u, :n], kv.values[0][u, :n]], 1))
            items.append(kv.items[u, :n])
            lengths.append(n)
    return torch.cat(xs), torch.cat(cs), torch.cat(items), np.concatenate([[0], np.cumsum(lengths)])


def residual_energy(x, feats, items, split: int, shrink: float = 5.0) -> float:
    """Held-out residual energy / variance after [feats, 1] W (least squares) and a per-item mean residual."""
    a = torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(a[:split], x[:split].double()).solution
    r = x.double() - a @ w
    n = int(items.max()) + 1
    sums = torch.zeros(n, x.shape[1], dtype=torch.float64).index_add_(0, items[:split], r[:split])
    counts = torch.bincount(items[:split], minlength=n).double()
    r = r - (sums / (counts[:, None] + shrink))[items]
    held = x[split:].double()
    return float((r[split:] ** 2).sum(1).mean() / ((held - held.mean(0)) ** 2).sum(1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", default="ml-1m")
    p.add_argument("--layer", type=int, default=1, help="the pooled layer (default 1)")
    p.add_argument("--users", type=int, default=2000, help="half fit, half scored")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.3, 0.15, 0.1, 0.05, 0.02])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, meta = load_checkpoint(args.checkpoint)
    ds = load(args.data, item_vocab=meta["item_vocab"])
    users = np.random.default_rng(args.seed).permutation(ds.n_users)[: args.users]
    half = len(users) // 2
    fit, held = caches(model, ds, np.sort(users[:half]), args.layer), caches(model, ds, np.sort(users[half:]), args.layer)
    x, c, items = (torch.cat([a, b]) for a, b in zip(fit[:3], held[:3]))
    split = len(fit[0])
    ema = {a: torch.cat([causal_ema_flat(fit[1], fit[3], a), causal_ema_flat(held[1], held[3], a)]) for a in args.alphas}
    print(f"{args.checkpoint.name} layer {args.layer}: {split:,} fitting tokens, {len(x) - split:,} scored")
    print("context\tresidual energy / variance (held out)")
    print(f"item only\t{residual_energy(x, c[:, :0], items, split):.4f}")
    print(f"first-layer K/V (linear+item)\t{residual_energy(x, c, items, split):.4f}")
    for a in args.alphas:
        print(f"  + ema {a}\t{residual_energy(x, torch.cat([c, ema[a]], 1), items, split):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
