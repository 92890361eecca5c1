"""Would a bf16 pre-screen speed up routing (issue 19)? A probe behind the stop-24 note: on real cached keys and
values and a real pool, the exact float32 router (`ckv_cli.codecs.nearest.linear_argmax`) against the first pass
a certified bf16 screen would need before any exact rescoring (a bf16 GEMM, its conversion to float32, the bias,
the maxima of blocks of 256 entries), and how many blocks per token such a screen leaves open when each approximate
score is widened by a bf16 error bound (2^-6 |x| max|w|, plus float32 rounding).

    .venv/bin/ckv compress sample_checkpoints/sasrec-ml1m.safetensors --data ml-1m -o /tmp/a.safetensors \
        --param metric=l2
    .venv/bin/python scripts/bf16_screen_probe.py sample_checkpoints/sasrec-ml1m.safetensors /tmp/a.safetensors
Process CPU seconds, one thread; users 2000-2999's caches.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from safetensors.torch import load_file

from ckv_cli.codecs.nearest import linear_argmax
from ckv_cli.models.checkpoint import load_checkpoint
from ckv_cli.pipeline.compress import CompressOptions
from ckv_cli.tasks import task_of

EPS_BF16 = 2.0**-6  # bf16 inputs (2 x 2^-8) and output (2^-8), with room
BLOCK, ROWS = 256, 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("artifact", help="an artifact of the checkpoint (its pools are read)")
    ap.add_argument("--data", default="ml-1m")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoint)
    task = task_of(model)
    ds = task.load(args.data, None, meta, model)
    flat, _ = task.calibration(model, ds, CompressOptions(), np.arange(2000, 3000))
    shared = load_file(args.artifact)
    for name in ("L1.k", "L1.v"):
        pool = shared[f"shared/{name}/pool"].float()
        w, b = 2 * pool, -(pool * pool).sum(1)
        x = flat.stream(name).float()
        t = time.process_time()
        linear_argmax(x, w, b)
        exact = time.process_time() - t
        t = time.process_time()
        wb, wmax, bmax = w.bfloat16(), float(w.norm(dim=1).max()), float(b.abs().max())
        nb = len(w) // BLOCK
        open_blocks = torch.empty(len(x), dtype=torch.long)
        for a in range(0, len(x), ROWS):
            xa = x[a : a + ROWS]
            s = torch.mm(xa.bfloat16(), wb.T).float().add_(b)  # (n, m) approximate scores
            blocks = s.view(len(xa), nb, BLOCK).amax(2)  # (n, nb)
            xn = xa.norm(dim=1)
            delta = EPS_BF16 * xn * wmax + (x.shape[1] + 2) * 2.0**-24 * (xn * wmax + bmax)
            open_blocks[a : a + ROWS] = (blocks >= (blocks.amax(1) - 2 * delta)[:, None]).sum(1)
        screen = time.process_time() - t
        share = {k: round(float((open_blocks == k).float().mean()), 3) for k in (1, 2, 3, 4)}
        print(f"{name}: {len(x):,} tokens, exact router {exact:.2f} s, screen pass alone {screen:.2f} s; "
              f"share of tokens with 1-4 open blocks {share}, more than 4: {float((open_blocks > 4).float().mean()):.3f}")


if __name__ == "__main__":
    main()
