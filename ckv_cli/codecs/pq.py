"""Product quantisation (Jégou, Douze and Schmid 2011, "Product Quantization for Nearest Neighbor Search"): the
d channels are split into `subvectors` contiguous sub-vectors (widths differ by at most one), each with its own
global codebook of 2^bits centroids (k-means on the calibration vectors, shared by all users). Per token one
code per sub-vector, each in its own field bit-packed at `bits` bits: subvectors * bits / 8 bytes per token.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.codecs.kmeans import kmeans, nearest
from ckv_cli.errors import CkvError


class PQCodec(StreamCodec):
    """Product quantisation with global codebooks (Jégou et al. 2011)."""

    name = "pq"

    def __init__(self, d: int, subvectors: int = 8, bits: int = 8, iters: int = 20):
        self.d = check_positive_int("d", d)
        self.subvectors = check_positive_int("subvectors", subvectors)
        self.bits = check_positive_int("bits", bits)
        self.iters = check_positive_int("iters", iters)
        if self.subvectors > self.d:
            raise CkvError(f"subvectors ({subvectors}) cannot exceed the vector width ({d})")
        if self.bits > 16:
            raise CkvError(f"bits must be at most 16 (2^bits centroids per codebook), got {bits}")
        self.widths = [len(c) for c in np.array_split(np.arange(self.d), self.subvectors)]  # channels per sub-vector
        self.codebooks: list[torch.Tensor] | None = None  # per sub-vector (2^bits, width)

    def params(self) -> dict:
        return {"d": self.d, "subvectors": self.subvectors, "bits": self.bits}

    def fit(self, x: torch.Tensor, seed: int) -> None:
        x = x.detach().float()
        m = 1 << self.bits
        if x.shape[0] < m:  # k-means would return fewer centroids than the codes can address
            raise CkvError(f"2^{self.bits} = {m} centroids per codebook need at least as many calibration vectors, "
                           f"got {x.shape[0]} (use more calibration users or fewer bits)")
        self.codebooks = [kmeans(part, m, seed=seed + j, iters=self.iters)
                          for j, part in enumerate(x.split(self.widths, 1))]

    def fields(self) -> list[Field]:
        return [Field(f"code{j}", "token", bits=self.bits) for j in range(self.subvectors)]

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray) -> dict[str, np.ndarray]:
        if self.codebooks is None:
            raise CkvError("codec used before fit or load")
        parts = x.detach().float().split(self.widths, 1)
        return {f"code{j}": nearest(part, cb).numpy().astype(np.uint32)
                for j, (part, cb) in enumerate(zip(parts, self.codebooks))}

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> torch.Tensor:
        return torch.cat([cb[torch.from_numpy(np.asarray(fields[f"code{j}"], dtype=np.int64))]
                          for j, cb in enumerate(self.codebooks)], 1)  # (N, d)

    def shared(self) -> dict[str, torch.Tensor]:
        return {f"codebook{j}": cb for j, cb in enumerate(self.codebooks)}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        self.codebooks = [shared[f"codebook{j}"].float() for j in range(self.subvectors)]
        shapes = [tuple(cb.shape) for cb in self.codebooks]
        if shapes != [(1 << self.bits, w) for w in self.widths]:
            raise CkvError(f"codebooks have shapes {shapes}, the metadata says {1 << self.bits} x {self.widths}")
