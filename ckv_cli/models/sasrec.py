"""SASRec: Self-Attentive Sequential Recommendation (Kang & McAuley, ICDM 2018).

Causal self-attention over the item history with learned absolute positions, pre-LayerNorm blocks, and the
generative-recommenders recipe for the output (cosine scores against the item table, temperature 0.05).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.models.base import AttentionSpec, SequentialRecommender


@dataclass
class SASRecConfig:
    n_items: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2

    def __post_init__(self):
        if self.n_heads < 1 or self.d % self.n_heads:
            raise ValueError(f"width {self.d} is not a multiple of the {self.n_heads} heads (SASRec splits its width "
                             "across the heads)")


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

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec("softmax", self.h, 1.0 / math.sqrt(self.d_k // self.h))

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

    @torch.no_grad()
    def first_layer_tables(self) -> dict:
        """The first layer over cached (item, position) tokens without its K/V: K_j = W_k LN(a_i + p_j) + b_k
        (a = item embedding x sqrt(d), p = position embedding), so q . K_j = r_j (q~ . a_i + q~ . p_j - mu_j
        sum(q~)) + q . c with q~ = (W_k diag(gamma))^T q and mu_j, r_j the token's LayerNorm mean and inverse
        deviation, tabulated for every (item, position) pair from the norms and the item x position Gram matrix in
        float64 (8 bytes a pair, shared like a pool). Values likewise (`ckv_cli.serve.next_item.ItemLayer`)."""
        layer = self.layers[0]
        d, H = self.config.d, layer.h
        a = (self.item_emb.weight * math.sqrt(d)).detach().float().contiguous()  # what `embed` adds, in float32
        p = self.pos_emb.weight.detach().float().contiguous()
        a64, p64 = a.double(), p.double()
        g, beta = layer.ln1.weight.detach(), layer.ln1.bias.detach()

        def fold(lin):  # W diag(gamma) per head (H, dh, d) and the constant W beta + b per head (H, dh)
            w = lin.weight.detach()
            return (w * g[None, :]).view(H, -1, d).contiguous(), (w @ beta + lin.bias.detach()).view(H, -1)

        ak, ck = fold(layer.k)
        av, cv = fold(layer.v)
        mu = a64.mean(1)[:, None] + p64.mean(1)[None, :]  # (n + 1, max_len)
        ex2 = ((a64 * a64).sum(1)[:, None] + 2 * (a64 @ p64.T) + (p64 * p64).sum(1)[None, :]) / d
        r = 1.0 / torch.sqrt((ex2 - mu * mu).clamp(min=0) + layer.ln1.eps)
        return {"a": a, "p": p, "max_len": p.shape[0], "stats": torch.stack([mu, r], -1).float().view(-1, 2),
                "ak": ak, "ck": ck, "av": av, "cv": cv}
