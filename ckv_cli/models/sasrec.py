"""SASRec: Self-Attentive Sequential Recommendation (Kang & McAuley, ICDM 2018).

Causal self-attention over the item history with learned absolute positions. ckv's own recipe (the defaults):
pre-LayerNorm blocks with a final LayerNorm, sqrt(d)-scaled item embeddings, a d -> d GELU FFN, and the
generative-recommenders output (cosine scores against the item table, temperature 0.05).

The other layouts imported checkpoints use are configuration (`ckv_cli.importers`), not copies of the model:
- `block="post_ln"` (RecBole, BERT): y = LN1(x + O(attn(x))), out = LN2(y + FFN(y)); Q, K, V from x.
- `block="query_ln"` (generative-recommenders' SASRec): Q from LN1(x), K and V from x itself,
  y = LN2(LN1(x) + O(attn)), out = y + FFN(y).
and the FFN width/activation, LayerNorm eps/affine, QKV bias, embedding scaling and LayerNorm, dot-product vs
cosine scores. In every layout the first layer's K/V are a function of (item, position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.models.base import AttentionSpec, SequentialRecommender

BLOCKS = ("pre_ln", "post_ln", "query_ln")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
SCORES = ("cosine", "dot")


@dataclass
class SASRecConfig:
    n_items: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    block: str = "pre_ln"  # pre_ln | post_ln | query_ln (module docstring)
    ffn_dim: int | None = None  # FFN inner width; None = d
    ffn_act: str = "gelu"  # gelu (erf) | relu | silu | tanh | sigmoid
    ln_eps: float = 1e-5
    ln_affine: bool = True
    qkv_bias: bool = True
    emb_scale: bool = True  # item embedding x sqrt(d) before adding the position
    emb_ln: bool = False  # LayerNorm (ln_eps, ln_affine) of item + position
    final_ln: bool = True  # LayerNorm of the last layer's output (pre_ln's final norm)
    score: str = "cosine"  # cosine | dot (raw inner product with the item table)
    temperature: float = 0.05  # softmax(score / temperature) is the next-item distribution (fidelity KL)
    n_positions: int | None = None  # rows of the position table; None = max_len (a longer table is kept whole)

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        if self.ffn_act not in ACTIVATIONS:
            raise ValueError(f"ffn_act must be one of {', '.join(ACTIVATIONS)}, got {self.ffn_act!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if type(self.d) is int and type(self.n_heads) is int and self.n_heads > 0 and self.d % self.n_heads:
            raise ValueError(f"width {self.d} is not a multiple of the {self.n_heads} heads (SASRec splits its width "
                             "across the heads)")
        if self.n_positions is not None and self.n_positions < self.max_len:
            raise ValueError(f"n_positions={self.n_positions} is smaller than max_len={self.max_len}")
        if not (self.ln_eps > 0 and self.temperature > 0):
            raise ValueError("ln_eps and temperature must be positive")


def _ln(cfg: SASRecConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.d, eps=cfg.ln_eps, elementwise_affine=cfg.ln_affine)


class SASRecLayer(nn.Module):
    """One block (`cfg.block`); K and V are what the cache holds."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.h, self.d_k, self.d_v = cfg.n_heads, cfg.d, cfg.d
        self.block = cfg.block
        self.ln1, self.ln2 = _ln(cfg), _ln(cfg)
        self.q, self.k, self.v = (nn.Linear(cfg.d, cfg.d, bias=cfg.qkv_bias) for _ in range(3))
        self.o = nn.Linear(cfg.d, cfg.d)
        inner = cfg.ffn_dim or cfg.d
        self.ffn = nn.Sequential(nn.Linear(cfg.d, inner), ACTIVATIONS[cfg.ffn_act](), nn.Dropout(cfg.dropout),
                                 nn.Linear(inner, cfg.d))
        self.drop = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def project(self, x):
        if self.block == "pre_ln":
            xn = self.ln1(x)
            return self.q(xn), self.k(xn), self.v(xn), None  # 3 x (B, T, d)
        if self.block == "post_ln":
            return self.q(x), self.k(x), self.v(x), None
        xq = self.ln1(x)  # query_ln: the query side is normalised, K/V read x itself
        return self.q(xq), self.k(x), self.v(x), xq

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
        if self.block == "pre_ln":
            x = x + self.drop(self.o(a))
            return x + self.drop(self.ffn(self.ln2(x)))
        if self.block == "post_ln":
            y = self.ln1(x + self.drop(self.o(a)))
            return self.ln2(y + self.drop(self.ffn(y)))
        y = self.ln2(extra + self.drop(self.o(a)))  # query_ln
        return y + self.drop(self.ffn(y))


class SASRec(SequentialRecommender):
    arch = "sasrec"

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.n_positions or cfg.max_len, cfg.d)
        self.emb_ln = _ln(cfg) if cfg.emb_ln else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(SASRecLayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = _ln(cfg) if cfg.final_ln else None
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def final(self, x):
        return self.ln_f(x) if self.ln_f is not None else x

    def item_ln_form(self):
        """(item scale, LayerNorm) when the first layer's K/V are `W LN(scale * item + position) + b` (what
        `first_layer_tables` folds), else None."""
        cfg = self.config
        scale = math.sqrt(cfg.d) if cfg.emb_scale else 1.0  # what `embed` multiplies by
        if cfg.block == "pre_ln" and self.emb_ln is None:
            return scale, self.layers[0].ln1
        if cfg.block in ("post_ln", "query_ln") and self.emb_ln is not None:
            return scale, self.emb_ln
        return None

    @torch.no_grad()
    def first_layer_tables(self) -> dict | None:
        """The first layer over cached (item, position) tokens without its K/V: K_j = W_k LN(a_i + p_j) + b_k
        (a = item embedding x scale, p = position embedding, LN the layer's or the embedding's LayerNorm:
        `item_ln_form`; None where the layout has no such form), so q . K_j = r_j (q~ . a_i + q~ . p_j - mu_j
        sum(q~)) + q . c with q~ = (W_k diag(gamma))^T q and mu_j, r_j the token's LayerNorm mean and inverse
        deviation, tabulated for every (item, position) pair from the norms and the item x position Gram matrix in
        float64 (8 bytes a pair, shared like a pool). Values likewise (`ckv_cli.serve.next_item.ItemLayer`).
        A LayerNorm without affine folds with gamma = 1, beta = 0; a projection without bias with b = 0."""
        form = self.item_ln_form()
        if form is None:
            return None
        scale, ln = form
        layer = self.layers[0]
        d, H = self.config.d, layer.h
        a = (self.item_emb.weight * scale).detach().float().contiguous()  # what `embed` adds, in float32
        p = self.pos_emb.weight.detach().float().contiguous()
        a64, p64 = a.double(), p.double()
        g = ln.weight.detach() if ln.weight is not None else torch.ones(d)
        beta = ln.bias.detach() if ln.bias is not None else torch.zeros(d)

        def fold(lin):  # W diag(gamma) per head (H, dh, d) and the constant W beta + b per head (H, dh)
            w = lin.weight.detach()
            b = lin.bias.detach() if lin.bias is not None else torch.zeros(w.shape[0])
            return (w * g[None, :]).view(H, -1, d).contiguous(), (w @ beta + b).view(H, -1)

        ak, ck = fold(layer.k)
        av, cv = fold(layer.v)
        mu = a64.mean(1)[:, None] + p64.mean(1)[None, :]  # (n + 1, n_positions)
        ex2 = ((a64 * a64).sum(1)[:, None] + 2 * (a64 @ p64.T) + (p64 * p64).sum(1)[None, :]) / d
        r = 1.0 / torch.sqrt((ex2 - mu * mu).clamp(min=0) + ln.eps)
        return {"a": a, "p": p, "max_len": p.shape[0], "stats": torch.stack([mu, r], -1).float().view(-1, 2),
                "ak": ak, "ck": ck, "av": av, "cv": cv}
