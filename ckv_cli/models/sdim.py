"""SDIM: Sampling is all you need on modeling long-term user behaviours for CTR prediction (Cao et al., CIKM 2022).

No attention in the long branch: `n_rounds` rounds of SimHash (each `round_bits` signs of fixed random
projections) bucket the behaviours; in each round the behaviours whose signature equals the candidate's are
summed and L2-normalised, and the rounds are averaged. This approximates target attention with a
locality-sensitive kernel at a cost independent of the candidate count. Plus the short window.
The long branch caches each token's values (its embedding) and signature; it has no keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ckv_cli.models.eta import simhash_planes
from ckv_cli.models.target_attention import BranchKV, CTRConfig, CTRModel
from ckv_cli.spec import Side


@dataclass
class SDIMConfig(CTRConfig):
    n_rounds: int = 16
    round_bits: int = 3
    hash_seed: int = 0


class SDIM(CTRModel):
    arch = "sdim"

    def __init__(self, cfg: SDIMConfig):
        super().__init__(cfg)
        self.register_buffer("planes", simhash_planes(cfg.d, cfg.n_rounds * cfg.round_bits, cfg.hash_seed))
        self.register_buffer("weights", 2 ** torch.arange(cfg.round_bits).repeat(cfg.n_rounds).view(cfg.n_rounds, -1))

    def long_width(self) -> int:
        return self.config.d

    def long_streams(self):
        return {"long.v": self.config.d}  # the token embeddings the branch sums; no keys

    def long_token_streams(self, tokens):
        return {"long.v": tokens}

    def side_fields(self):
        return (Side("codes", self.config.n_rounds, self.config.round_bits),)

    def token_side(self, tokens):
        return {"codes": self.signatures(tokens)}

    def derive_side(self, streams):
        return {"codes": self.signatures(streams["long.v"])}

    def signatures(self, x: torch.Tensor) -> torch.Tensor:
        bits = ((x.detach() @ self.planes) > 0).long()  # (..., rounds * bits)
        return (bits.view(*bits.shape[:-1], self.config.n_rounds, -1) * self.weights).sum(-1)  # (..., rounds)

    def aggregate(self, target, values, signatures, valid):
        """(B, d) candidates, (B, L, d) values, (B, L, rounds) signatures -> (B, d)."""
        same = (signatures == self.signatures(target)[:, None, :]) & valid[..., None]  # (B, L, rounds)
        pooled = same.transpose(1, 2).to(values.dtype) @ values  # (B, rounds, d)
        return F.normalize(pooled, dim=-1).mean(1)  # (B, d); a round with no match adds zeros

    def long_forward(self, targets, target, tokens, valid, b):
        return self.aggregate(target, tokens, self.signatures(tokens), valid)

    def long_prefill(self, tokens, valid, b) -> BranchKV:
        return BranchKV(None, tokens, b.lengths, codes=self.signatures(tokens))

    def long_score(self, targets, target, cache):
        br = cache.branches["long"]
        valid = torch.arange(br.values.shape[1], device=target.device)[None, :] < br.lengths[:, None]
        return self.aggregate(target, br.values, br.codes, valid)
