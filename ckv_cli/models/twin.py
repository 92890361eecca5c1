"""TWIN: TWo-stage Interest Network for lifelong user behaviour modelling (Chang et al., KDD 2023).

Both stages use the same attention parameters (the paper's consistency): the first stage scores every token of
the long history with a cheap form of the target attention (the candidate's query against each cached key, one
dot product summed over heads, no softmax and no values) and keeps the top `top_k` (100 by default); the second
runs the full multi-head target attention on those. Plus the short window.
"""
from __future__ import annotations

from dataclasses import dataclass

from ckv_cli.models.target_attention import AttentionLongBranch, CTRConfig, top_k_tokens


@dataclass
class TWINConfig(CTRConfig):
    top_k: int = 100


class TWIN(AttentionLongBranch):
    arch = "twin"
    needs_keys = True

    def select(self, targets, target, items, valid, keys, codes):
        relevance = self.long.scores(self.long.q(target).detach(), keys).sum(1)  # (B, h, L) -> (B, L)
        return top_k_tokens(relevance, valid, self.config.top_k, recency_ties=False)
