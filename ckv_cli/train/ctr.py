"""Training the CTR models (SIM, ETA, SDIM, TWIN, no-history) on the CTR view of a rating log.

Training: binary cross-entropy on the training split's events, Adam, mini-batches bucketed by history length
(batches of similar lengths pad less; batch order shuffled), validation AUC after each epoch for early stopping,
the best epoch's weights kept. `train_samples` > 0 trains on a seeded random subset of the training events
(the same subset every epoch); validation and test always use every event of their split.
Evaluation: `ckv_cli.tasks.ctr.evaluate_ctr` (AUC, gAUC, logloss).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ckv_cli.data.ctr import CTRData
from ckv_cli.errors import CkvError
from ckv_cli.models import REGISTRY
from ckv_cli.tasks.ctr import PROTOCOL, evaluate_ctr
from ckv_cli.train.common import BestEpoch, check_loss, check_weights, interrupted_history, stop_after_interrupt


@dataclass
class CTRTrainConfig:
    epochs: int = 1  # CTR models overfit after one pass over the data (the one-epoch phenomenon)
    batch_size: int = 256
    lr: float = 1e-3
    patience: int = 1
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    max_seconds: float = 0.0
    train_samples: int = 0  # 0 = every training event
    model: dict = field(default_factory=dict)  # overrides of the model config


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk: int = 64):
    """Shuffle, sort each chunk of `chunk` batches by length, cut into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    batches = []
    for a in range(0, len(order), batch_size * chunk):
        part = order[a : a + batch_size * chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def model_config(arch: str, n_items: int, n_users: int, n_genres: int, overrides: dict):
    """The architecture's config, checked (a one-line CkvError on a bad value)."""
    try:
        return REGISTRY[arch][1](n_items=n_items, n_users=n_users, n_genres=n_genres, **overrides)
    except (TypeError, ValueError) as e:
        raise CkvError(f"invalid {arch} config: {e}") from None


def build_model(data: CTRData, arch: str, overrides: dict):
    cfg = model_config(arch, data.seq.n_items, data.seq.n_users, len(data.seq.genre_names),
                       {"max_len": data.max_history, **overrides})
    model_cls = REGISTRY[arch][0]
    model = model_cls(cfg)
    model.emb.set_genres(torch.from_numpy(data.seq.genres))
    return model


def train_ctr(data: CTRData, arch: str, cfg: CTRTrainConfig, on_step=None, on_epoch=None, on_improve=None):
    """Returns (best model on CPU in eval mode, history, seconds)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(data, arch, cfg.model).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    events = data.samples("train")
    if 0 < cfg.train_samples < len(events):
        events = np.sort(rng.choice(events, cfg.train_samples, replace=False))
    lengths = data.hist_end[events] - data.hist_start[events]
    keeper, history, start = BestEpoch(cfg.patience), [], time.time()
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            losses = []
            for i, idx in enumerate(length_bucketed_batches(lengths, cfg.batch_size, rng)):
                b = data.batch(events[idx]).to(cfg.device)
                loss = F.binary_cross_entropy_with_logits(model(b), b.labels)
                losses.append(check_loss(loss, epoch, i + 1, cfg.lr))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if on_step:
                    on_step()
            check_weights(model, epoch, cfg.lr)
            val = evaluate_ctr(model, data, "valid")
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid_AUC": val["AUC"],
                            "valid_gAUC": val["gAUC"], "valid_logloss": val["logloss"],
                            "seconds": round(time.time() - start, 1)})
            if on_epoch:
                on_epoch(history[-1])
            if keeper.end_epoch(model, val["AUC"], history, epoch, on_improve, cfg.max_seconds, start):
                break
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: training ends, the best epoch so far is kept
        keeper.record_interrupt(e, history, start)
    model.load_state_dict(keeper.state)
    return model.cpu().eval(), history, time.time() - start, len(events)


def train_ctr_to_checkpoint(data: CTRData, arch: str, cfg: CTRTrainConfig, out, command: str = "", on_step=None,
                            on_epoch=None, partial_out=None) -> tuple[dict, list]:
    """Train, evaluate the best epoch on test, write the checkpoint (`ckv_cli.train.next_item.train_to_checkpoint`'s
    rules: nothing before training ends; an interrupt saves the best epoch so far, marked partial, to
    `partial_out` (default `out`) and raises `Interrupted`; a diverged loss writes nothing)."""
    from ckv_cli.models.checkpoint import save_checkpoint

    recipe = {**cfg.__dict__, "command": command}

    def save(model, metrics, path=out):
        save_checkpoint(model, path, dataset=data.name, fingerprint=data.fingerprint, item_vocab=data.seq.item_ids,
                        metrics=metrics, train=recipe, force=True, user_vocab=data.seq.user_ids)

    try:
        model, history, seconds, n_train = train_ctr(data, arch, cfg, on_step=on_step, on_epoch=on_epoch)
    except KeyboardInterrupt as e:  # before the first epoch ended
        stop_after_interrupt(e, [], None, save, None, "valid_AUC")
    if interrupted_history(history):
        stop_after_interrupt(None, history, model, save, partial_out or out, "valid_AUC")
    epochs = [h for h in history if "epoch" in h]
    best = max(epochs, key=lambda h: h["valid_AUC"])
    try:
        metrics = {"test": evaluate_ctr(model, data, "test"), "test_protocol": PROTOCOL, "valid_AUC": best["valid_AUC"],
                   "epochs": len(epochs), "best_epoch": best["epoch"], "train_samples": n_train,
                   "train_seconds": round(seconds, 1), "split": data.stats(), "interrupted": False,
                   "time_budget_spent": any(h.get("time_budget_spent") for h in history)}
    except KeyboardInterrupt as e:  # during the test evaluation: the model is the best epoch's
        stop_after_interrupt(e, history, model, save, partial_out or out, "valid_AUC")
    save(model, metrics)
    return metrics, history
