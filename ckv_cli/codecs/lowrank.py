"""Post-hoc low-rank projection shared by all users: the MLA / Palu idea without retraining (Palu: Chang et al.
2024, "Palu: Compressing KV-Cache with Low-Rank Projection"). x ~ mean + c B^T, with B (d, k) the top-k right
singular vectors of the centred calibration vectors and mean (d,) shared; per token the k coefficients
c = (x - mean) B are stored in fp16.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.errors import CkvError


class LowRankCodec(StreamCodec):
    """Rank-k PCA projection (Palu, Chang et al. 2024, without its retraining): k fp16 coefficients per token."""

    name = "lowrank"

    def __init__(self, d: int, rank: int = 8):
        self.d = check_positive_int("d", d)
        self.rank = check_positive_int("rank", rank)
        if self.rank >= self.d:
            raise CkvError(f"rank ({rank}) must be smaller than the vector width ({d})")
        self.mean = self.basis = None

    def params(self) -> dict:
        return {"d": self.d, "rank": self.rank}

    def fit(self, x: torch.Tensor, seed: int) -> None:
        x = x.detach().float()
        if x.shape[0] < self.rank:
            raise CkvError(f"rank {self.rank} needs at least as many calibration vectors, got {x.shape[0]}")
        self.mean = x.mean(0)  # (d,)
        self.basis = torch.linalg.svd(x - self.mean, full_matrices=False).Vh[: self.rank].T.contiguous()  # (d, k)

    def fields(self) -> list[Field]:
        return [Field("coef", "token", dtype="float16", width=self.rank)]

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray) -> dict[str, np.ndarray]:
        if self.basis is None:
            raise CkvError("codec used before fit or load")
        return {"coef": ((x.detach().float() - self.mean) @ self.basis).half().numpy()}  # (N, k)

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> torch.Tensor:
        coef = torch.from_numpy(np.asarray(fields["coef"], dtype=np.float32).reshape(-1, self.rank))  # (N, k)
        return coef @ self.basis.T + self.mean

    def shared(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "basis": self.basis}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        self.mean, self.basis = shared["mean"].float(), shared["basis"].float()
        if tuple(self.basis.shape) != (self.d, self.rank):
            raise CkvError(f"basis has shape {tuple(self.basis.shape)}, the metadata says ({self.d}, {self.rank})")
