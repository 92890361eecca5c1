"""The no-history baseline: user embedding and target features into the same MLP head, no behaviour sequence.
What the history models must beat to show that reading the history (and so caching it) is worth anything."""
from __future__ import annotations

from dataclasses import dataclass

from ckv_cli.models.target_attention import CTRConfig, CTRModel


@dataclass
class NoHistoryConfig(CTRConfig):
    short_len: int = 0


class NoHistory(CTRModel):
    arch = "nohistory"

    def __init__(self, cfg: NoHistoryConfig):
        if cfg.short_len:
            raise ValueError("the no-history baseline reads no history: short_len must be 0")
        super().__init__(cfg)
