"""SIM: Search-based user Interest Modeling with lifelong sequential behaviour data (Pi et al., CIKM 2020).

A general search unit (GSU) picks, per candidate, the top-k behaviours of the long history; an exact search unit
(ESU) reads them with multi-head target attention. The GSU here is SIM's **hard search** by category, the variant
the paper deployed online: behaviours that share at least one genre with the candidate, the most recent `top_k`
of them. (Soft search, by embedding inner product, is what ETA and TWIN refine.) Plus the short window.

On a log without genres (`n_genres` 0: a user's own CSV of user, item, timestamp, rating) every behaviour is in
the candidate's category, so the hard search keeps the most recent `top_k` behaviours of the long history.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ckv_cli.models.target_attention import AttentionLongBranch, CTRConfig, top_k_tokens


@dataclass
class SIMConfig(CTRConfig):
    pass


class SIM(AttentionLongBranch):
    arch = "sim"
    reads_items = True  # the category search reads the history's item ids

    def select(self, targets, target, items, valid, keys, codes):
        if self.config.n_genres == 0:  # no categories: every behaviour matches, the most recent top_k are read
            return top_k_tokens(torch.zeros_like(items), valid, self.config.top_k)
        g = self.emb.genres > 0  # (n_items + 1, n_genres)
        match = (g[items] & g[targets][:, None, :]).any(-1) & valid  # (B, L): shares a genre with the candidate
        return top_k_tokens(torch.zeros_like(items), match, self.config.top_k)  # the most recent matches
