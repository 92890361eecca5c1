"""Training next-item models with the generative-recommenders recipe: sampled softmax over cosine scores.

Every position of each user's training sequence predicts the next item; the loss contrasts it with
`n_negatives` items drawn uniformly for that position (as generative-recommenders' local negatives; accidental
hits masked) at temperature 0.05. `shared_negatives=True` draws once per user instead (cheaper, weaker).
Validation NDCG@10 after each epoch drives early stopping; the best epoch's weights are kept.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ckv_cli.data.batching import history_batch
from ckv_cli.data.sequences import SequenceData
from ckv_cli.errors import CkvError
from ckv_cli.memory import release_large_blocks, trim_heap
from ckv_cli.models import REGISTRY
from ckv_cli.tasks.next_item import PROTOCOL, SEEN_PROTOCOL, evaluate_model
from ckv_cli.threads import set_threads
from ckv_cli.train.common import (BestEpoch, check_loss, check_weights, interrupted_history, seed_everything,
                                  stop_after_interrupt)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    n_negatives: int = 128
    temperature: float = 0.05
    patience: int = 5
    seed: int = 0
    threads: int = 0  # 0 = the default (ckv_cli.threads.default_threads: every core, or OMP_NUM_THREADS)
    device: str = "cpu"
    max_seconds: float = 0.0  # > 0: stop after the epoch that passes this wall-clock budget
    shared_negatives: bool = False
    model: dict = field(default_factory=dict)  # overrides of the model config
    exclude_seen: bool = True  # validation (early stopping) and test rank without the window's items


def model_config(arch: str, n_items: int, overrides: dict):
    """The architecture's config, checked (a one-line CkvError on a bad value, e.g. a width the heads do not
    divide)."""
    try:
        return REGISTRY[arch][1](n_items=n_items, **overrides)
    except (TypeError, ValueError) as e:
        raise CkvError(f"invalid {arch} config: {e}") from None


class SampledDot(torch.autograd.Function):
    """`(h[..., None, :] * table[negs]).sum(-1)` for h (B, L, d), table (N, d), negs (B, L, n): the same float
    operations on a few users at a time, and a backward that gathers the rows again instead of keeping them:
    the (B, L, n, d) gathered rows, their product with h and the gradients of both (the one-shot expression
    holds several at once, ~0.8 GB each at B 128, L 200, n 128, d 64) never exist for the whole batch. Values
    and gradients are the one-shot expression's: each slice runs the same elementwise products and reductions,
    and the table's gradient is accumulated in the same order (`index_put_`, serial on the CPU;
    tests/test_train_memory.py checks both bit for bit)."""

    CHUNK_BYTES = 64 << 20

    @staticmethod
    def forward(ctx, h, table, negs):
        ctx.save_for_backward(h, table, negs)
        out = h.new_empty(negs.shape)  # (B, L, n)
        rows = SampledDot._rows(negs, h.shape[-1], h.element_size())
        for a in range(0, len(h), rows):
            out[a : a + rows] = (h[a : a + rows, ..., None, :] * table[negs[a : a + rows]]).sum(-1)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, table, negs = ctx.saved_tensors
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gt = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        rows = SampledDot._rows(negs, h.shape[-1], h.element_size())
        for a in range(0, len(h), rows):
            g = grad[a : a + rows, ..., None]  # (b, L, n, 1)
            if gh is not None:
                gh[a : a + rows] = (g * table[negs[a : a + rows]]).sum(-2)
            if gt is not None:
                gt.index_put_((negs[a : a + rows],), g * h[a : a + rows, ..., None, :], accumulate=True)
        return gh, gt, None

    @staticmethod
    def _rows(negs: torch.Tensor, d: int, size: int) -> int:
        per_user = max(1, negs[0].numel() * d * size)  # bytes of one user's gathered rows
        return max(1, SampledDot.CHUNK_BYTES // per_user)


class PickColumns(torch.autograd.Function):
    """`x.gather(-1, idx)` whose backward keeps only idx and x's shape. torch's gather keeps x itself until the
    backward reaches it: in the small-catalogue loss x is every item's score, (B, L, N + 1), 164 MB at B 128,
    L 200 and ML-100k's 1,683 items, alive beside the model's activations through the whole backward. The
    gradient is torch's own gather backward (zeros, then `scatter_add_` of the upstream gradient), so values and
    gradients are the same bit for bit (tests/test_train_memory.py)."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return x.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(-1, idx, grad), None


def sampled_softmax_loss(model, h, targets, valid, n_neg, temperature, gen, shared=False):
    """h (B, L, d) hidden states, targets (B, L) next items, valid (B, L) bool -> scalar loss."""
    table = model.item_table()  # (N + 1, d) normalised
    h = model.output(h)
    if n_neg <= 0:  # full softmax over every item
        logits = (h @ table[1:].T) / temperature  # (B, L, N)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), (targets - 1).clamp(min=0).reshape(-1), reduction="none")
        return (loss * valid.reshape(-1)).sum() / valid.sum().clamp(min=1)
    B, L = targets.shape
    shape = (B, 1, n_neg) if shared else (B, L, n_neg)
    negs = torch.randint(1, table.shape[0], shape, generator=gen).to(h.device)  # uniform over items
    pos = (h * table[targets]).sum(-1, keepdim=True)  # (B, L, 1)
    if shared:
        neg = h @ table[negs[:, 0]].transpose(1, 2)  # (B, L, n_neg)
    elif table.shape[0] <= 32 * n_neg:  # small catalogue: score every item once, then pick the sampled columns
        neg = PickColumns.apply(h @ table.T, negs)  # (B, L, N + 1) -> (B, L, n_neg)
    else:  # (h[..., None, :] * table[negs]).sum(-1), a few users at a time
        neg = SampledDot.apply(h, table, negs)  # (B, L, n_neg)
    neg = neg.masked_fill(negs == targets[..., None], float("-inf"))
    logits = torch.cat([pos, neg], dim=-1) / temperature  # (B, L, 1 + n_neg)
    loss = -F.log_softmax(logits, dim=-1)[..., 0]
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def training_batch(train_items, train_times, users, max_len: int, device: str = "cpu"):
    """The training batch of `users`: each one's last `max_len + 1` training events, every position predicting the
    next. (items, timestamps, lengths, targets, valid): (B, L) right-padded inputs, (B,) lengths, (B, L) next
    items and (B, L) bool real positions, on `device`."""
    seqs = [train_items[u][-(max_len + 1):] for u in users]
    times = [train_times[u][-(max_len + 1):] for u in users]
    items, ts, lengths = history_batch([s[:-1] for s in seqs], [t[:-1] for t in times], max_len)
    targets = history_batch([s[1:] for s in seqs], [t[1:] for t in times], max_len)[0]  # (B, L) next items
    items, ts, lengths, targets = (t.to(device) for t in (items, ts, lengths, targets))
    valid = torch.arange(items.shape[1], device=device)[None] < lengths[:, None]  # (B, L)
    return items, ts, lengths, targets, valid


def run_epoch(model, opt, cfg: TrainConfig, train_items, train_times, order, gen, on_step=None,
              epoch: int = 0) -> list[float]:
    """One pass over the users in `order`: every position of each user's last `max_len + 1` training events
    predicts the next one. A NaN or infinite loss or weight stops it with one line (`check_loss`)."""
    model.train()
    losses = []
    for a in range(0, len(order), cfg.batch_size):
        items, ts, lengths, targets, valid = training_batch(train_items, train_times, order[a : a + cfg.batch_size],
                                                            model.config.max_len, cfg.device)
        h = model(items, ts, lengths)  # (B, L, d)
        loss = sampled_softmax_loss(model, h, targets, valid, cfg.n_negatives, cfg.temperature, gen,
                                    cfg.shared_negatives)
        losses.append(check_loss(loss, epoch, a // cfg.batch_size + 1, cfg.lr))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trim_heap()  # the step's freed heap memory back to the kernel (ckv_cli.memory); results unchanged
        if on_step:
            on_step()
    check_weights(model, epoch, cfg.lr)
    return losses


def train_model(data: SequenceData, arch: str, cfg: TrainConfig,
                on_epoch: Callable[[int, float, float], None] | None = None,
                on_step: Callable[[], None] | None = None,
                on_improve: Callable[[object, list], None] | None = None, init_state: dict | None = None):
    """Returns (best model, history list of dicts, seconds). `on_improve(model, history)` runs after each
    epoch that improves validation NDCG@10 (e.g. to save the best checkpoint so far)."""
    gen = seed_everything(cfg.seed)
    set_threads(cfg.threads or None)
    release_large_blocks()  # RSS near the live tensors (ckv_cli.memory); results unchanged
    model = REGISTRY[arch][0](model_config(arch, data.n_items, cfg.model))
    if init_state is not None:  # continue from a checkpoint's weights (same architecture and config)
        model.load_state_dict(init_state)
    model.to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_items, train_times, _ = data.split("train")
    users = np.array([u for u, s in enumerate(train_items) if len(s) >= 2])
    rng = np.random.default_rng(cfg.seed)
    keeper, history = BestEpoch(cfg.patience), []
    if init_state is not None:  # training only replaces the initial weights when it beats them on validation
        keeper = BestEpoch(cfg.patience, evaluate_model(model, data, "valid", cfg.exclude_seen)["NDCG@10"],
                           copy.deepcopy(model.state_dict()))
        history.append({"epoch": 0, "valid_NDCG@10": keeper.score, "init": True})
    start = time.time()
    try:
        for epoch in range(1, cfg.epochs + 1):
            losses = run_epoch(model, opt, cfg, train_items, train_times, rng.permutation(users), gen, on_step,
                               epoch=epoch)
            val = evaluate_model(model, data, "valid", cfg.exclude_seen)["NDCG@10"]
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid_NDCG@10": val,
                            "seconds": round(time.time() - start, 1)})
            if on_epoch:
                on_epoch(epoch, float(np.mean(losses)), val)
            if keeper.end_epoch(model, val, history, epoch, on_improve, cfg.max_seconds, start):
                break
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: training ends, the best epoch so far is kept
        keeper.record_interrupt(e, history, start)
    model.load_state_dict(keeper.state)
    return model.cpu().eval(), history, time.time() - start


def train_to_checkpoint(data: SequenceData, arch: str, cfg: TrainConfig, out, command: str = "",
                        init_state: dict | None = None, on_step=None, on_epoch=None,
                        partial_out=None) -> tuple[dict, list]:
    """Train, evaluate the best epoch on the test split and write the checkpoint with its metrics. Returns
    (metrics, history). Nothing is written before training ends; an interrupt (Ctrl-C, SIGTERM, SIGHUP) after
    at least one epoch writes the best epoch so far, marked partial, to `partial_out` (default `out`) and
    raises `Interrupted` saying so; a diverged loss raises a one-line CkvError and writes nothing."""
    from ckv_cli.models.checkpoint import save_checkpoint

    recipe = {**cfg.__dict__, "command": command}

    def save(model, metrics, path=out):
        save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.item_ids,
                        metrics=metrics, train=recipe, force=True)

    try:
        model, history, seconds = train_model(data, arch, cfg, on_epoch=on_epoch, on_step=on_step,
                                              init_state=init_state)
    except KeyboardInterrupt as e:  # before the first epoch ended
        stop_after_interrupt(e, [], None, save, None, "valid_NDCG@10")
    if interrupted_history(history):
        stop_after_interrupt(None, history, model, save, partial_out or out, "valid_NDCG@10")
    epochs = [h for h in history if "epoch" in h]
    best = max(epochs, key=lambda h: h["valid_NDCG@10"])
    try:
        metrics = {"test": evaluate_model(model, data, "test", cfg.exclude_seen),
                   "test_protocol": PROTOCOL if cfg.exclude_seen else SEEN_PROTOCOL,
                   "valid_NDCG@10": best["valid_NDCG@10"], "epochs": sum(h["epoch"] > 0 for h in epochs),
                   "best_epoch": best["epoch"], "train_seconds": round(seconds, 1), "interrupted": False,
                   "time_budget_spent": any(h.get("time_budget_spent") for h in history)}
    except KeyboardInterrupt as e:  # during the test evaluation: the model is the best epoch's
        stop_after_interrupt(e, history, model, save, partial_out or out, "valid_NDCG@10")
    save(model, metrics)
    return metrics, history
