"""Distillation of a fitted cache plan (CollectiveKV's training objective), the model frozen or fine-tuned.

The teacher is the full model, frozen: it builds every cache (on training histories: the validation split's
histories, i.e. every event before the validation item, so the test items are never seen) and the target
distribution. The student reads the teacher's cache passed through the plan (training-time gated top-1 decode
for `collective` streams, encode/decode for the other codecs, first layers recomputed from item ids by the
student's own weights, as an artifact's reader does) and appends the last event with `extend`.

Frozen (default): the student is the teacher's model object, unchanged; only the pools and routers learn.
Fine-tuned (`finetune`): the student is a separate copy of the teacher whose parameters train too (learning
rate `model_lr`); its weights compute the appended event, the queries, every later layer and the scores (and the
recomputed first layers); the cached K/V it reads are still codec(teacher K/V). The teacher object is never
modified.

Loss = KL(teacher || student) on the next-item distribution (temperature 0.05, as in training)
     + w_peak * peak loss  -mean(log sigmoid(top-1 router logit))
     + w_bal  * load balance  KL(mean softmax(router logits) || uniform)
     + w_task * cross-entropy of the true next item (fine-tuned only),
both auxiliary terms over real tokens only (the flat layout holds no padding).

The task label is the validation item: the event that follows the appended last event in each user's
sequence. It is not a test item: `ds.split("valid")` returns the histories that end before the validation item
and the validation items as targets; the test item (the last event of each sequence) comes only from
`ds.split("test")`, which this module never reads. The teacher's own training read the training split only
(everything but the last two events), so the fine-tuned student sees one extra event per user that the teacher
did not train on: the control (`compress=False`) gets exactly the same extra data.

Control (`compress=False`, with `finetune`): the same batches, steps and loss without the codec (the student
reads the teacher's exact cache) and without the auxiliary losses: it measures what the extra training alone
buys, against which the fine-tuned compressed student is compared.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ckv_cli.codecs import CachePlan
from ckv_cli.codecs.collective import CollectiveCodec
from ckv_cli.codecs.plan import _context, _items
from ckv_cli.errors import CkvError
from ckv_cli.spec import FlatCache
from ckv_cli.tasks import NEXT_ITEM, task_of
from ckv_cli.tasks.next_item import last_event_batch


@dataclass
class DistillOptions:
    steps: int = 200
    batch_users: int = 64
    lr: float = 1e-3  # pools and routers
    w_peak: float = 0.01
    w_bal: float = 1.0
    temperature: float = 0.05
    balance_tokens: int = 2048
    seed: int = 0
    finetune: bool = False  # the student's model parameters train too (a copy of the teacher)
    model_lr: float = 1e-4  # the student model's learning rate (finetune)
    w_task: float = 1.0  # weight of the next-item cross-entropy (finetune)
    compress: bool = True  # False: the control (no codec, no auxiliary losses; needs finetune)


def make_student(model):
    """A trainable copy of the teacher (the teacher object stays as it is)."""
    student = copy.deepcopy(model)
    student.eval()  # no dropout: the student is compared with the teacher's deterministic outputs
    return student


def distill(model, ds, plan: CachePlan | None, opts: DistillOptions,
            on_step: Callable[[int, float], None] | None = None, student=None) -> list[dict]:
    """Trains the plan's collective streams in place (and, with `opts.finetune`, `student`: a copy of `model`
    from `make_student`, trained in place); returns the loss history. `model`, the teacher, is left unchanged.
    With `opts.compress=False` (the control) `plan` is not read and only `student` trains."""
    if task_of(model) is not NEXT_ITEM:
        raise CkvError("distillation is for next-item models (it trains on the next item); CTR models do not take it yet")
    if opts.finetune and student is None:
        raise CkvError("internal: fine-tuning needs a student (make_student(model))")
    if student is model:
        raise CkvError("internal: the student must be a copy of the teacher, not the teacher itself")
    if not opts.compress and not opts.finetune:
        raise CkvError("internal: the control (no compression) trains the model: it needs finetune")
    streams = {}
    if opts.compress:
        if plan is None:
            raise CkvError("internal: distillation needs a plan")
        streams = {n: c for n, c in plan.streams.items() if isinstance(c, CollectiveCodec)}
        if not streams:
            raise CkvError("distillation needs at least one 'collective' stream in the plan")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    reader = student if opts.finetune else model
    groups = []
    if streams:
        groups.append({"params": [t for c in streams.values() for t in c.trainable()], "lr": opts.lr})
    if opts.finetune:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(True)
        groups.append({"params": [p for p in student.parameters()], "lr": opts.model_lr})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    eligible = np.flatnonzero(ds.lengths() >= 4)  # a validation history of at least two events
    hist_items, hist_times, valid_items = ds.split("valid")  # never the test items (see the module docstring)
    recompute = plan.recomputed_streams if opts.compress and opts.finetune else []
    others = {n: c for n, c in plan.coded().items() if n not in streams} if opts.compress else {}
    history = []
    try:
        for step in range(opts.steps):
            users = np.sort(rng.choice(eligible, size=min(opts.batch_users, len(eligible)), replace=False))
            items, times, lengths, last_i, last_t = last_event_batch(hist_items, hist_times, users, model.config.max_len)
            with torch.no_grad():
                cache, _ = model.prefill(items, times, lengths)  # the teacher's cache
                _, h_t = model.extend(cache, last_i, last_t)
                p_t = F.softmax(model.score_all(h_t[:, 0])[:, 1:] / opts.temperature, dim=-1)
            flat = model.flatten(cache)
            read = FlatCache(flat.offsets, dict(flat.streams), dict(flat.ids))
            peak = bal = torch.zeros(())
            if opts.compress:
                if recompute:  # through the student, with gradients: what its reader recomputes from item ids
                    for name, x in student.recompute(recompute, flat.ids, flat.offsets)[0].items():
                        read.set_stream(name, x)
                ctx = plan.context(flat.streams) if others else None  # the first layer (`predictive`)
                for name, codec in others.items():  # fixed codecs: their decoded teacher K/V (no gradient)
                    with torch.no_grad():
                        kw = {**_items(codec, flat.items), **_context(codec, ctx)}
                        x = flat.stream(name)
                        read.set_stream(name, codec.decode(codec.encode(x, flat.offsets, **kw), flat.offsets, **kw).float())
                for name, codec in streams.items():
                    x = flat.stream(name)
                    x_hat, top = codec.gated_decode(x)
                    read.set_stream(name, x_hat)
                    peak = peak - F.logsigmoid(top).mean()
                    pick = torch.randint(len(top), (min(opts.balance_tokens, len(top)),), generator=gen)
                    mean_p = F.softmax(codec.router_logits(x[pick]), dim=-1).mean(0)  # (m,)
                    bal = bal + (mean_p * (mean_p.clamp(min=1e-12) * mean_p.numel()).log()).sum()
            _, h_s = reader.extend(reader.unflatten(read), last_i, last_t)
            logits = reader.score_all(h_s[:, 0])[:, 1:] / opts.temperature
            log_p_s = F.log_softmax(logits, dim=-1)
            kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
            loss = kl + opts.w_peak * peak + opts.w_bal * bal if opts.compress else kl
            task = torch.zeros(())
            if opts.finetune:
                task = F.cross_entropy(logits, torch.from_numpy(valid_items[users] - 1))
                loss = loss + opts.w_task * task
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": loss.item(), "kl": kl.item(), "peak": peak.item(),
                            "balance": bal.item(), "task": task.item()})
            if on_step:
                on_step(step + 1, kl.item())
    finally:
        for c in streams.values():
            c.freeze()  # the router keeps its trained weights (no longer tied to the pool)
        if opts.finetune:
            for p in student.parameters():
                p.requires_grad_(False)
            student.eval()
    return history
