#!/usr/bin/env python
"""Where a next-item training step's memory goes (issue 19 part 3; Linux only): peak RSS per phase, and what autograd
keeps for the backward (benchmark, not a test).

    python bench/train_step_memory.py --arch hstu                  # ML-100k, batch 128, 3 steps, 1 thread
    python bench/train_step_memory.py --arch sasrec --threshold 65536 --no-trim   # every freed block returned at once

Each step runs as `ckv train` does (`ckv_cli.train.next_item`): forward, sampled-softmax loss, backward, Adam, then
`trim_heap()` unless `--no-trim`; the peak resident set (VmHWM, reset through /proc/self/clear_refs before each
phase) and the resident set after it are printed per phase, then a validation pass. `--threshold` is glibc's mmap
threshold (`ckv_cli.memory.release_large_blocks`; training uses 8 MB): a small one returns every freed block at
once, so the resident set after a step is what is live. Last, the tensors autograd saves in one forward and loss
(each storage once, over 1 MB), largest first, by the line of ckv_cli that saved them.
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench._machine import machine, reset_peak, resident_mb, window_peak_mb, write_json  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.memory import release_large_blocks, trim_heap  # noqa: E402
from ckv_cli.models import REGISTRY  # noqa: E402
from ckv_cli.tasks.next_item import evaluate_model  # noqa: E402
from ckv_cli.train.next_item import TrainConfig, model_config, sampled_softmax_loss, training_batch  # noqa: E402


def phase(rows: list, name: str, fn):
    reset_peak()  # the peak restarts from the current resident set
    out = fn()
    peak, now = window_peak_mb(), resident_mb()
    rows.append({"phase": name, "peak_mb": round(peak), "after_mb": round(now)})
    print(f"{name:24s} peak {peak:7.0f} MB   after {now:7.0f} MB", flush=True)
    return out


def saved_tensors(fn) -> list[dict]:
    """What autograd saves while fn() runs: MB per (ckv_cli line, shape, dtype), each storage counted once (every
    saved tensor is held until the end, so no freed storage's address is taken for a later one's)."""
    seen, where, held = set(), collections.Counter(), []

    def pack(t):
        held.append(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() > 1 << 20:
            seen.add(storage.data_ptr())
            frames = [f for f in traceback.extract_stack()[:-1] if "ckv_cli" in f.filename]
            at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            where[(at, tuple(t.shape), str(t.dtype).removeprefix("torch."))] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return [{"at": at, "shape": list(shape), "dtype": dtype, "mb": round(b / 2**20, 1)}
            for (at, shape, dtype), b in where.most_common()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="hstu", choices=["sasrec", "hstu"])
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threshold", type=int, default=8 << 20, help="glibc mmap threshold, bytes (training: 8 MB)")
    p.add_argument("--no-trim", action="store_true", help="no trim_heap() after each step")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    release_large_blocks(args.threshold)
    rows, cfg = [], TrainConfig()
    ds = phase(rows, "read data", lambda: load(args.data))
    torch.manual_seed(cfg.seed)
    model = phase(rows, "model", lambda: REGISTRY[args.arch][0](model_config(args.arch, ds.n_items, {})).train())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_items, train_times, _ = ds.split("train")
    users = np.array([u for u, s in enumerate(train_items) if len(s) >= 2])
    max_len = model.config.max_len

    def batch(a: int):
        return training_batch(train_items, train_times, users[a : a + cfg.batch_size], max_len)

    def loss_of(b):
        items, ts, lengths, targets, valid = b
        return sampled_softmax_loss(model, model(items, ts, lengths), targets, valid, cfg.n_negatives,
                                    cfg.temperature, gen)

    for step in range(args.steps):
        b = batch(step * cfg.batch_size)
        loss = phase(rows, f"step {step} forward+loss", lambda: loss_of(b))
        phase(rows, f"step {step} backward", lambda: (opt.zero_grad(), loss.backward()))
        loss = None  # nothing of the step stays referenced
        phase(rows, f"step {step} adam+trim", lambda: (opt.step(), args.no_trim or trim_heap()))
    phase(rows, "validation pass", lambda: evaluate_model(model, ds, "valid"))
    saved = saved_tensors(lambda: loss_of(batch(0)))
    print(f"saved for the backward: {sum(r['mb'] for r in saved):.0f} MB")
    for r in saved[:12]:
        print(f"  {r['mb']:7.1f} MB  {r['at']:18s} {r['dtype']:8s} {tuple(r['shape'])}")
    out = {"machine": machine(), "arch": args.arch, "data": args.data, "threshold": args.threshold,
           "trim": not args.no_trim, "phases": rows, "saved": saved}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
