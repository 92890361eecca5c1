"""SASRec: Self-Attentive Sequential Recommendation (Kang & McAuley, ICDM 2018).

Causal self-attention over the item history with learned absolute positions, pre-LayerNorm blocks, and the
generative-recommenders recipe for the output (cosine scores against the item table, temperature 0.05).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.models.base import SequentialRecommender


@dataclass
class SASRecConfig:
    n_items: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2


class SASRecLayer(nn.Module):
    """One pre-LN block; K and V are what the cache holds."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.h, self.d_k, self.d_v = cfg.n_heads, cfg.d, cfg.d
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d), nn.LayerNorm(cfg.d)
        self.q, self.k, self.v = (nn.Linear(cfg.d, cfg.d) for _ in range(3))
        self.o = nn.Linear(cfg.d, cfg.d)
        self.ffn = nn.Sequential(nn.Linear(cfg.d, cfg.d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.d, cfg.d))
        self.drop = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def project(self, x):
        xn = self.ln1(x)
        return self.q(xn), self.k(xn), self.v(xn), None  # 3 x (B, T, d)

    def heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.h, -1).transpose(1, 2)  # (B, h, T, d/h)

    def attend(self, q, K, V, key_valid, q_pos, k_pos, q_ts, k_ts):
        mask = key_valid[:, None]  # (B, 1, T, Lk)
        a = F.scaled_dot_product_attention(self.heads(q), self.heads(K), self.heads(V), attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)  # (B, h, T, d/h)
        a = torch.nan_to_num(a)  # rows with no valid key (padding queries) give NaN
        return a.transpose(1, 2).reshape(q.shape)  # (B, T, d)

    def finish(self, x, a, extra):
        x = x + self.drop(self.o(a))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(SequentialRecommender):
    arch = "sasrec"

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(SASRecLayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def final(self, x):
        return self.ln_f(x)
