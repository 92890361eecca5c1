"""What both training loops share: early stopping on the best validation epoch, seeding, the checks that stop a
diverged run (a NaN or infinite loss or weight: one line, nothing written), and what an interrupted run keeps
(Ctrl-C, SIGTERM, SIGHUP: the best epoch so far, marked partial, and exit 128 + the signal)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ckv_cli.errors import CkvError
from ckv_cli.io.signals import Interrupted, pause


class BestEpoch:
    """Early stopping: keeps the weights of the epoch with the highest validation score (on the CPU) and says when
    `patience` epochs in a row have not beaten it."""

    def __init__(self, patience: int, score: float = -1.0, state: dict | None = None):
        self.patience, self.score, self.state, self.bad = patience, score, state, 0

    def update(self, model, score: float) -> bool:
        """Record an epoch's score; True when it is the best so far (its weights are then kept)."""
        if score > self.score:
            self.score, self.bad = score, 0
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def end_epoch(self, model, score: float, history: list, epoch: int, on_improve=None, max_seconds: float = 0.0,
                  start: float = 0.0) -> bool:
        """After an epoch's history entry: keep its weights if best (then `on_improve(model, history)`), pass the
        test hook's pause point, and say whether training stops (patience spent, or the time budget: recorded)."""
        if self.update(model, score) and on_improve:
            on_improve(model, history)
        pause(f"epoch {epoch}")
        if self.stop:
            return True
        if max_seconds and time.time() - start > max_seconds:
            history.append({"time_budget_spent": True, "seconds": round(time.time() - start, 1)})
            return True
        return False

    def record_interrupt(self, exc: BaseException, history: list, start: float) -> None:
        """Ctrl-C, SIGTERM, SIGHUP during training: it ends with the best epoch so far (recorded in `history`);
        with no epoch finished the interrupt goes on."""
        if self.state is None:
            raise exc
        history.append({"interrupted": True, "signal": getattr(exc, "signum", 2),
                        "seconds": round(time.time() - start, 1)})


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def check_loss(loss: torch.Tensor, epoch: int, batch: int, lr: float) -> float:
    """The loss as a float; a NaN or infinite one stops training with one line (nothing is written)."""
    value = loss.item()
    if not np.isfinite(value):
        raise CkvError(f"training diverged: the loss is {value} at epoch {epoch}, batch {batch}; nothing written "
                       f"(try a smaller --lr than {lr:g})")
    return value


def check_weights(model, epoch: int, lr: float) -> None:
    """A weight that became NaN or infinite stops training with one line (nothing is written)."""
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise CkvError(f"training diverged: weight '{bad}' is NaN or infinite after epoch {epoch}; nothing written "
                       f"(try a smaller --lr than {lr:g})")


def interrupted_history(history: list) -> dict | None:
    """The history entry an interrupted training loop appended, if any."""
    return next((h for h in history if h.get("interrupted")), None)


def stop_after_interrupt(exc: BaseException | None, history: list, model, save, partial_out, metric: str):
    """Raise `Interrupted` (exit 128 + signal) after saving the best epoch so far (`save(model, metrics, path)`,
    metrics marked partial) to `partial_out`, saying so; with no finished epoch or no `partial_out`, nothing."""
    signum = getattr(exc, "signum", None) or (interrupted_history(history) or {}).get("signal", 2)
    epochs = [h for h in history if h.get("epoch")]  # epochs run (an --init model's score is epoch 0)
    if model is None or not epochs or partial_out is None:
        raise Interrupted(signum, "no epoch had finished: nothing written" if not epochs else "nothing written")
    best = max((h for h in history if "epoch" in h), key=lambda h: h[metric])  # the weights `model` holds
    save(model, {metric: best[metric], "epochs": len(epochs), "best_epoch": best["epoch"], "partial": True,
                 "interrupted": True}, partial_out)
    raise Interrupted(signum, f"saved the best epoch so far (epoch {best['epoch']} of {len(epochs)} run, "
                              f"{metric} {best[metric]:.4f}) to {partial_out}, marked partial")
