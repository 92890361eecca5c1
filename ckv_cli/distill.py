"""Distillation of a fitted cache plan (CollectiveKV's training objective, model frozen).

The student is the unchanged model reading decoded caches; only the pools and routers learn. The teacher cache
is built by the full model on training histories (the validation split's: the test items are never seen).
Loss = KL(teacher || student) on the next-item distribution (temperature 0.05, as in training)
     + w_peak * peak loss  -mean(log sigmoid(top-1 router logit))
     + w_bal  * load balance  KL(mean softmax(router logits) || uniform),
both auxiliary terms over real tokens only (the flat layout holds no padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ckv_cli.codecs import CachePlan
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.errors import CkvError
from ckv_cli.kv.extract import FlatCache, flatten, last_event_batch, unflatten


@dataclass
class DistillOptions:
    steps: int = 200
    batch_users: int = 64
    lr: float = 1e-3
    w_peak: float = 0.01
    w_bal: float = 1.0
    temperature: float = 0.05
    balance_tokens: int = 2048
    seed: int = 0


def distill(model, ds, plan: CachePlan, opts: DistillOptions, on_step: Callable[[int, float], None] | None = None) -> list[dict]:
    """Trains the plan's collective streams in place; returns the loss history."""
    streams = {n: c for n, c in plan.streams.items() if isinstance(c, CollectiveCodec)}
    if not streams:
        raise CkvError("distillation needs at least one 'collective' stream in the plan")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    params = [t for c in streams.values() for t in c.trainable()]
    opt = torch.optim.Adam(params, lr=opts.lr)
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    eligible = np.flatnonzero(ds.lengths() >= 4)  # a validation history of at least two events
    hist_items, hist_times, _ = ds.split("valid")  # once: the targets (validation items) are never used
    history = []
    try:
        for step in range(opts.steps):
            users = np.sort(rng.choice(eligible, size=min(opts.batch_users, len(eligible)), replace=False))
            items, times, lengths, last_i, last_t = last_event_batch(hist_items, hist_times, users, model.config.max_len)
            with torch.no_grad():
                cache, _ = model.prefill(items, times, lengths)
                _, h_t = model.extend(cache, last_i, last_t)
                p_t = F.softmax(model.score_all(h_t[:, 0])[:, 1:] / opts.temperature, dim=-1)
            flat = flatten(cache)
            student = FlatCache(flat.offsets, list(flat.keys), list(flat.values), flat.items, flat.timestamps)
            peak = bal = torch.zeros(())
            for name, codec in streams.items():
                x = flat.stream(name)
                x_hat, top = codec.gated_decode(x)
                student.set_stream(name, x_hat)
                peak = peak - F.logsigmoid(top).mean()
                pick = torch.randint(len(top), (min(opts.balance_tokens, len(top)),), generator=gen)
                mean_p = F.softmax(codec.router_logits(x[pick]), dim=-1).mean(0)  # (m,)
                bal = bal + (mean_p * (mean_p.clamp(min=1e-12) * mean_p.numel()).log()).sum()
            _, h_s = model.extend(unflatten(student), last_i, last_t)
            log_p_s = F.log_softmax(model.score_all(h_s[:, 0])[:, 1:] / opts.temperature, dim=-1)
            kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
            loss = kl + opts.w_peak * peak + opts.w_bal * bal
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": loss.item(), "kl": kl.item(), "peak": peak.item(), "balance": bal.item()})
            if on_step:
                on_step(step + 1, kl.item())
    finally:
        for c in streams.values():
            c.freeze()  # the router keeps its trained weights (no longer tied to the pool)
    return history
