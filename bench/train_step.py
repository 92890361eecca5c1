"""Training-step time of SASRec and HSTU, and of HSTU's relative bias gathered two ways (benchmark, not a test).

    python bench/train_step.py [--device cpu|cuda] [--steps 20] [--json PATH]

One step = forward over a batch of 128 users x 200 events, per-position sampled softmax (128 negatives),
backward, Adam. The bias rows time the forward+backward of HSTU's rab(i, j) lookup for the same shape: indexing a
parameter (`w[idx]`, whose backward accumulates one atomic add per element) against the bincount backward
HSTU uses (`small_table_lookup`). Prints the median of `--steps` steps after 3 warm-ups.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench._machine import machine  # noqa: E402
from ckv_cli.models import REGISTRY  # noqa: E402
from ckv_cli.models.hstu import small_table_lookup  # noqa: E402
from ckv_cli.train.next_item import sampled_softmax_loss  # noqa: E402


def timed(fn, device: str, steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def train_step_ms(arch: str, device: str, steps: int, B=128, L=200, n_items=3706) -> float:
    model_cls, cfg_cls = REGISTRY[arch]
    model = model_cls(cfg_cls(n_items=n_items)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, n_items + 1, (B, L + 1), generator=g).to(device)
    ts = (torch.arange(L + 1)[None].expand(B, -1) * 3600).contiguous().to(device)
    lengths = torch.full((B,), L, device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)

    def step():
        h = model(items[:, :-1], ts[:, :-1], lengths)
        loss = sampled_softmax_loss(model, h, items[:, 1:], valid, 128, 0.05, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, device, steps)


def bias_ms(device: str, steps: int, B=128, L=200) -> dict[str, float]:
    w = torch.zeros(L, device=device, requires_grad=True)
    dist = (torch.arange(L)[:, None] - torch.arange(L)[None]).clamp(min=0).expand(B, L, L).contiguous().to(device)

    def by_index():
        w[dist].sum().backward()

    def by_bincount():
        small_table_lookup(w, dist).sum().backward()

    return {"index": timed(by_index, device, steps), "bincount": timed(by_bincount, device, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    m = machine(args.device)
    out = {"machine": m.get("gpu", f"{m['cpu']}, {m['torch_threads']} threads"), "device": args.device, "torch": torch.__version__,
           "train_step_ms": {a: train_step_ms(a, args.device, args.steps) for a in ("sasrec", "hstu")},
           "hstu_bias_fwd_bwd_ms": bias_ms(args.device, args.steps)}
    print(f"# training step, batch 128 x 200 events, median of {args.steps}: {out['machine']}, torch {out['torch']}")
    for a, ms in out["train_step_ms"].items():
        print(f"{a}\t{ms:.1f} ms/step")
    b = out["hstu_bias_fwd_bwd_ms"]
    print(f"hstu bias lookup fwd+bwd\tindexing {b['index']:.2f} ms\tbincount {b['bincount']:.2f} ms"
          f"\tratio {b['index'] / b['bincount']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
