"""Item-id lookup: the baseline NOTES §3 asks for. In CollectiveKV's target-attention models (Li et al., ICLR
2026, arXiv 2601.19178) K/V depend on the item alone, so the "per-user" cache is a function of the item ids
every artifact stores anyway. This codec stores nothing per token: K/V come from a per-item table (shared),
the mean of each item's calibration vectors.

It is exact only where the stream is a function of the item: `fit` measures the largest distance of a token
from its item's mean, relative to the RMS norm of the vectors, and refuses the stream above `tolerance`;
`encode` checks the tokens it is given the same way. Items never seen in calibration are refused.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.errors import CkvError


def deviation(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max_t |x_t - ref_t| / RMS_t |x_t| over (N, d) vectors (0 for an all-zero stream)."""
    scale = float(x.pow(2).sum(1).mean().sqrt()) if len(x) else 0.0
    err = float((x - ref).norm(dim=1).max()) if len(x) else 0.0
    return err / scale if scale > 0 else err


class ItemIdCodec(StreamCodec):
    """Per-item table lookup (the item-id baseline for CollectiveKV, Li et al. 2026): 0 bytes per token."""

    name = "itemid"
    needs_items = True

    def __init__(self, d: int, tolerance: float = 1e-3):
        self.d = check_positive_int("d", d)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise CkvError(f"tolerance must be a number >= 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.table = self.seen = None  # (n_rows, d) mean vector per item id; (n_rows,) bool

    def params(self) -> dict:
        return {"d": self.d, "tolerance": self.tolerance}

    def fit(self, x: torch.Tensor, seed: int, items: np.ndarray) -> None:
        x = x.detach().double()  # identical copies average back to themselves bit for bit
        ids = torch.from_numpy(np.asarray(items, dtype=np.int64))
        counts = torch.bincount(ids)  # (n_rows,)
        if not (counts > 1).any():
            raise CkvError("itemid: no item occurs twice in the calibration tokens, so whether the stream is a "
                           "function of the item cannot be checked (use more calibration users)")
        sums = torch.zeros(len(counts), self.d, dtype=torch.float64).index_add_(0, ids, x)
        table = sums / counts.clamp(min=1)[:, None]  # (n_rows, d)
        dev = deviation(x, table[ids])
        if dev > self.tolerance:
            raise CkvError(f"itemid: this stream is not a function of the item alone (a calibration token lies "
                           f"{dev:.3g} from its item's mean, relative to the RMS norm; tolerance {self.tolerance:g}): "
                           "store it with another codec")
        self.table, self.seen = table.float(), counts > 0

    def _rows(self, items: np.ndarray) -> torch.Tensor:
        if self.table is None:
            raise CkvError("codec used before fit or load")
        ids = torch.from_numpy(np.asarray(items, dtype=np.int64))
        inside = (ids >= 0) & (ids < len(self.seen))
        known = torch.zeros(len(ids), dtype=torch.bool)
        known[inside] = self.seen[ids[inside]]
        if not known.all():
            missing = np.unique(ids[~known].numpy())
            raise CkvError(f"itemid: {len(missing)} item id(s) never seen in calibration (e.g. {missing[0]}), so their "
                           "K/V are unknown: calibrate on more users or use another codec")
        return ids

    def fields(self) -> list[Field]:
        return []

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        dev = deviation(x.detach().float(), self.table[self._rows(items)])
        if dev > self.tolerance:
            raise CkvError(f"itemid: these tokens are not a function of the item alone (one lies {dev:.3g} from its "
                           f"item's vector, relative to the RMS norm; tolerance {self.tolerance:g})")
        return {}

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray, items: np.ndarray) -> torch.Tensor:
        return self.table[self._rows(items)]  # (N, d)

    def shared(self) -> dict[str, torch.Tensor]:
        return {"table": self.table, "seen": self.seen}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        self.table, self.seen = shared["table"].float(), shared["seen"].bool()
        if self.table.shape[1:] != (self.d,) or len(self.seen) != len(self.table):
            raise CkvError(f"item table has shape {tuple(self.table.shape)} and {len(self.seen)} flags, the metadata "
                           f"says width {self.d}")
