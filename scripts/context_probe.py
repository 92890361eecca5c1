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
import torch.nn.functional as F  # noqa: E402

from ckv_cli.codecs.predictive import causal_ema_flat  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint  # noqa: E402
from ckv_cli.tasks.next_item import iter_test_caches  # noqa: E402


def caches(model, ds, users: np.ndarray, layer: int):
    """(x (N, 2d) the layer's [K, V], c (N, c) the first layer's [K, V], items (N,), offsets (U + 1,), event times
    (N,)) of `users`."""
    xs, cs, items, lengths, times = [], [], [], [], []
    for b in iter_test_caches(model, ds, users, 250):
        kv = b.cache
        for u in range(len(b.users)):
            n = int(kv.lengths[u])
            xs.append(torch.cat([kv.keys[layer][u, :n], kv.values[layer][u, :n]], 1))
            cs.append(torch.cat([kv.keys[0][u, :n], kv.values[0][u, :n]], 1))
            items.append(kv.items[u, :n])
            times.append(kv.timestamps[u, :n])
            lengths.append(n)
    return (torch.cat(xs), torch.cat(cs), torch.cat(items), np.concatenate([[0], np.cumsum(lengths)]),
            torch.cat(times).double())


def time_decayed(c: torch.Tensor, offsets: np.ndarray, times: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """e_j = (1 - alpha) exp(-(t_j - t_{j-1}) / tau) e_{j-1} + alpha c_j per window: the moving average, also
    decayed by the time between events (a candidate context for models whose first layer weighs by time)."""
    out = torch.empty_like(c)
    for b in range(len(offsets) - 1):
        e, prev = torch.zeros(c.shape[1]), None
        for j in range(int(offsets[b]), int(offsets[b + 1])):
            d = (1 - alpha) * (1.0 if prev is None else float(np.exp(-max(float(times[j]) - prev, 0.0) / tau)))
            e = d * e + alpha * c[j]
            out[j], prev = e, float(times[j])
    return out


def causal_sum(c: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """sum_{i <= j} c_i over each window (N, c), divided by the longest window (a scale the least squares absorbs)."""
    lengths = torch.from_numpy(np.diff(offsets))
    start = torch.repeat_interleave(torch.from_numpy(np.asarray(offsets[:-1], np.int64)), lengths)
    total = torch.cat([torch.zeros(1, c.shape[1], dtype=torch.float64), c.double().cumsum(0)])  # (N + 1, c)
    return ((total[1:] - total[start]) / max(int(lengths.max()), 1)).float()


def residual_energy(x, feats, items, split: int, shrink: float = 5.0) -> float:
    """Held-out residual energy / variance after [feats, 1] W (least squares) and a per-item mean residual."""
    a = torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(a[:split], x[:split].double()).solution
    return _held_out_energy(x.double() - a @ w, x, items, split, shrink)


def _held_out_energy(r, x, items, split: int, shrink: float) -> float:
    """The residuals r (N, d) less each item's mean residual over the first `split` tokens (shrunk by `shrink`
    pseudo-tokens): their energy on the other tokens, relative to those tokens' variance of x."""
    n = int(items.max()) + 1
    sums = torch.zeros(n, x.shape[1], dtype=torch.float64).index_add_(0, items[:split], r[:split])
    counts = torch.bincount(items[:split], minlength=n).double()
    r = r - (sums / (counts[:, None] + shrink))[items]
    held = x[split:].double()
    return float((r[split:] ** 2).sum(1).mean() / ((held - held.mean(0)) ** 2).sum(1).mean())


SILU_KNEE = -1.2784645  # SiLU's minimum: it is increasing on [SILU_KNEE, inf), where `inverse_silu` inverts it


def inverse_silu(y: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """z >= SILU_KNEE with silu(z) = y (float64, Newton's method), for y >= silu(SILU_KNEE); lower y clamp to it.
    A value from SiLU's other branch (z < SILU_KNEE) maps to the same output on this one."""
    y = y.double().clamp(min=float(F.silu(torch.tensor(SILU_KNEE, dtype=torch.float64))))
    z = torch.where(y > 0, y + 0.5, torch.full_like(y, -0.5))
    for _ in range(steps):
        s = torch.sigmoid(z)
        z = (z - (z * s - y) / (s * (1 + z * (1 - s))).clamp(min=1e-3)).clamp(min=SILU_KNEE)
    return z


def silu_residual_energy(x, feats, items, split: int, gauss_newton: int = 0, shrink: float = 5.0) -> float:
    """`residual_energy` with the map applied before a SiLU, x ~ silu([feats, 1] W): the pooled layer's K/V are
    SiLU outputs, so a linear map of the pre-activation may fit better. W is fitted by least squares on
    `inverse_silu(x)`, then refined by `gauss_newton` Gauss-Newton steps on |x - silu([feats, 1] W)|^2 (per output
    column); the per-item mean residual is then taken after the SiLU."""
    a = torch.cat([feats.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    xd = x.double()
    w = torch.linalg.lstsq(a[:split], inverse_silu(x[:split])).solution
    for _ in range(gauss_newton):
        z = a[:split] @ w
        s = torch.sigmoid(z)
        grad, r = s * (1 + z * (1 - s)), xd[:split] - z * s  # d silu / dz, residual
        for j in range(w.shape[1]):
            w[:, j] += torch.linalg.lstsq(a[:split] * grad[:, j : j + 1], r[:, j : j + 1]).solution[:, 0]
    return _held_out_energy(xd - F.silu(a @ w), x, items, split, shrink)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", default="ml-1m")
    p.add_argument("--layer", type=int, default=1, help="the pooled layer (default 1)")
    p.add_argument("--users", type=int, default=2000, help="half fit, half scored")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.3, 0.15, 0.1, 0.05, 0.02])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-taus", type=float, nargs="*", default=[],
                   help="also a moving average decayed by the time between events, for each tau (seconds)")
    p.add_argument("--time-alpha", type=float, default=0.15, help="its rate per event (default 0.15)")
    p.add_argument("--cumsum", action="store_true",
                   help="also the running sum of the first-layer K/V over the window (HSTU's SiLU attention sums "
                        "its weighted values, it does not average them), alone and beside each moving average")
    p.add_argument("--silu", type=int, nargs="?", const=2, default=None, metavar="STEPS",
                   help="also the map before a SiLU (HSTU's K/V are SiLU outputs), fitted on the inverted targets, "
                        "then with STEPS Gauss-Newton steps (default 2), beside each moving average")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, meta = load_checkpoint(args.checkpoint)
    ds = load(args.data, item_vocab=meta["item_vocab"])
    users = np.random.default_rng(args.seed).permutation(ds.n_users)[: args.users]
    half = len(users) // 2
    print(f"teacher caches of {len(users):,} users ...", flush=True)
    fit = caches(model, ds, np.sort(users[:half]), args.layer)
    held = caches(model, ds, np.sort(users[half:]), args.layer)
    x, c, items = (torch.cat([a, b]) for a, b in zip(fit[:3], held[:3]))
    split = len(fit[0])
    ema = {a: torch.cat([causal_ema_flat(part[1], part[3], a) for part in (fit, held)]) for a in args.alphas}
    print(f"{args.checkpoint.name} layer {args.layer}: {split:,} fitting tokens, {len(x) - split:,} scored")
    print("context\tresidual energy / variance (held out)")
    print(f"item only\t{residual_energy(x, c[:, :0], items, split):.4f}", flush=True)
    print(f"first-layer K/V (linear+item)\t{residual_energy(x, c, items, split):.4f}", flush=True)
    for a in args.alphas:
        print(f"  + ema {a}\t{residual_energy(x, torch.cat([c, ema[a]], 1), items, split):.4f}", flush=True)
    if args.cumsum:
        cu = torch.cat([causal_sum(part[1], part[3]) for part in (fit, held)])
        print(f"  + running sum\t{residual_energy(x, torch.cat([c, cu], 1), items, split):.4f}", flush=True)
        for a in args.alphas:
            energy = residual_energy(x, torch.cat([c, ema[a], cu], 1), items, split)
            print(f"  + ema {a} + running sum\t{energy:.4f}", flush=True)
    if args.silu is not None:
        for a in args.alphas:
            feats = torch.cat([c, ema[a]], 1)
            print(f"  + ema {a}, before a SiLU\t{silu_residual_energy(x, feats, items, split):.4f}", flush=True)
            if args.silu:
                energy = silu_residual_energy(x, feats, items, split, args.silu)
                print(f"  + ema {a}, before a SiLU, {args.silu} Gauss-Newton steps\t{energy:.4f}", flush=True)
    for tau in args.time_taus:
        e = torch.cat([time_decayed(part[1], part[3], part[4], args.time_alpha, tau) for part in (fit, held)])
        energy = residual_energy(x, torch.cat([c, e], 1), items, split)
        print(f"  + ema {args.time_alpha}, time-decayed, tau {tau:g} s\t{energy:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
