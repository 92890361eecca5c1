"""ETA: End-to-end Target Attention over long user behaviour sequences (Chen et al., 2021, arXiv 2108.04468).

The search is locality-sensitive hashing: SimHash signatures of the embeddings (signs of fixed random projections,
drawn from the config's seed and never trained), the top-k behaviours by Hamming distance to the candidate's
signature (ties to the more recent), then multi-head target attention over them. Plus the short window.
The cache keeps each token's signature beside its K/V: scoring a new candidate hashes only the candidate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ckv_cli.models.target_attention import AttentionLongBranch, CTRConfig, top_k_tokens
from ckv_cli.spec import Side


@dataclass
class ETAConfig(CTRConfig):
    n_bits: int = 64  # signature length
    hash_seed: int = 0


def simhash_planes(d: int, n_bits: int, seed: int) -> torch.Tensor:
    return torch.randn(d, n_bits, generator=torch.Generator().manual_seed(seed))  # (d, n_bits)


class ETA(AttentionLongBranch):
    arch = "eta"

    def __init__(self, cfg: ETAConfig):
        super().__init__(cfg)
        self.register_buffer("planes", simhash_planes(cfg.d, cfg.n_bits, cfg.hash_seed))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return (x.detach() @ self.planes) > 0  # (..., n_bits) bool

    def side_fields(self):
        return (Side("codes", self.config.n_bits, 1),)

    def side_values(self, name, values):
        return values.bool()

    def derive_side(self, streams):
        """The signatures of the least-squares token embedding behind the decoded long K and V:
        x = pinv([W_k; W_v]) [K - b_k; V - b_v] (the compression error carries into the search)."""
        W = torch.cat([self.long.k.weight, self.long.v.weight]).detach().double()  # (2 d_attn, d)
        pinv = torch.linalg.pinv(W).float()  # (d, 2 d_attn): a millisecond, per batch
        y = torch.cat([streams["long.k"] - self.long.k.bias, streams["long.v"] - self.long.v.bias], dim=1)
        return {"codes": self.codes(y.detach() @ pinv.T)}

    def select(self, targets, target, items, valid, keys, codes):
        hamming = (codes != self.codes(target)[:, None, :]).sum(-1)  # (B, L)
        return top_k_tokens(-hamming, valid, self.config.top_k)
