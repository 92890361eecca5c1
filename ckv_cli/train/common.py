"""What both training loops share: early stopping on the best validation epoch, seeding."""
from __future__ import annotations

import numpy as np
import torch


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


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)
