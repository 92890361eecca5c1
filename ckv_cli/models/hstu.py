"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions Speak Louder than Words", ICML 2024).

Pointwise SiLU attention (no softmax) normalised by the window length, a learned relative bias over position
distance and bucketed time gap, and U-gating: `Y = f2(LN(A V) * U)`. Each query's time bias uses the gap
between its own event and the cached event (the official code uses the *next* event's time, which would make
cached keys depend on the future and break `extend`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.models.base import AttentionSpec, SequentialRecommender


@dataclass
class HSTUConfig:
    n_items: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 1
    d_qk: int = 64  # per head
    d_v: int = 64  # per head
    max_len: int = 200
    dropout: float = 0.2
    time_buckets: int = 128


class _SmallTableLookup(torch.autograd.Function):
    """w[idx] for a small table w (a few hundred entries) and a large idx. The backward is a weighted bincount:
    indexing's own backward accumulates millions of gradients into those few entries one atomic add at a time,
    which made an HSTU epoch on ML-1M take 130 s on a GPU; a bincount builds the histogram per block first."""

    @staticmethod
    def forward(ctx, w, idx):
        ctx.save_for_backward(idx)
        ctx.n = w.shape[0]
        return w[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.n).to(grad.dtype), None


def small_table_lookup(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _SmallTableLookup.apply(w, idx)


class RelativeBias(nn.Module):
    """rab(i, j) = w_pos[i - j] + w_time[bucket(|t_i - t_j|)], bucket = floor(log(gap + 1) / 0.301)."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.max_len, self.buckets = cfg.max_len, cfg.time_buckets
        self.pos = nn.Parameter(torch.zeros(cfg.max_len))
        self.time = nn.Parameter(torch.zeros(cfg.time_buckets + 1))

    def forward(self, q_pos, k_pos, q_ts, k_ts):
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).clamp(0, self.max_len - 1)  # (B, T, Lk)
        gap = (q_ts[:, :, None] - k_ts[:, None, :]).abs().float()
        bucket = (torch.log1p(gap) / 0.301).floor().long().clamp(0, self.buckets)
        return small_table_lookup(self.pos, dist) + small_table_lookup(self.time, bucket)  # (B, T, Lk)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.h, self.dqk, self.dv = cfg.n_heads, cfg.d_qk, cfg.d_v
        self.d_k, self.d_v = cfg.n_heads * cfg.d_qk, cfg.n_heads * cfg.d_v
        self.max_len = cfg.max_len
        self.ln_in = nn.LayerNorm(cfg.d)
        self.f1 = nn.Linear(cfg.d, 2 * self.d_k + 2 * self.d_v)
        self.ln_attn = nn.LayerNorm(self.d_v)
        self.f2 = nn.Linear(self.d_v, cfg.d)
        self.bias = RelativeBias(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec("silu", self.h, 1.0, float(self.max_len), self.bias)

    def project(self, x):
        uvqk = F.silu(self.f1(self.ln_in(x)))  # (B, T, 2 d_v + 2 d_k)
        u, v, q, k = torch.split(uvqk, [self.d_v, self.d_v, self.d_k, self.d_k], dim=-1)
        return q, k, v, u

    def attend(self, q, K, V, key_valid, q_pos, k_pos, q_ts, k_ts):
        B, T, _ = q.shape
        Lk = K.shape[1]
        qh = q.view(B, T, self.h, self.dqk).transpose(1, 2)  # (B, h, T, dqk)
        kh = K.view(B, Lk, self.h, self.dqk).transpose(1, 2)
        vh = V.view(B, Lk, self.h, self.dv).transpose(1, 2)
        s = qh @ kh.transpose(-1, -2) + self.bias(q_pos, k_pos, q_ts, k_ts)[:, None]  # (B, h, T, Lk)
        w = F.silu(s) * key_valid[:, None].to(s.dtype) / self.max_len
        return (w @ vh).transpose(1, 2).reshape(B, T, self.d_v)  # (B, T, d_v)

    def finish(self, x, a, u):
        return x + self.drop(self.f2(self.ln_attn(a) * u))


class HSTU(SequentialRecommender):
    arch = "hstu"
    reads_time = True  # the time-gap bias: cached tokens keep their timestamps

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

