"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions Speak Louder than Words", ICML 2024).

Pointwise SiLU attention (no softmax) normalised by a fixed length N, a learned relative bias over position
distance and bucketed time gap, and U-gating: `Y = f2(LN(A V) * U)`.

ckv's own recipe (the defaults): N = max_len, the position bias `w[i - j]` over max_len entries, time buckets
floor(log1p(|gap|) / 0.301), and each query's gap measured from its own event (`query_time="own"`), so cached
keys never depend on the future. generative-recommenders' HSTU is configuration: LayerNorm without affine at eps
1e-6, no bias on the UVQK projection, N = max_len + 11, the position bias `w[N - 1 + j - i]` over 2N - 1 entries
(`rel_pos="toeplitz"`), buckets floor(log(max(|gap|, 1)) / 0.301) (`time_bucket="log_clamp1"`) and the gap from
the *next* event's time (`query_time="next"`: the newest cached token is provisional, `ckv_cli.models.base`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckv_cli.errors import CkvError
from ckv_cli.models.base import AttentionSpec, SequentialRecommender

REL_POS = ("causal", "toeplitz")
TIME_BUCKETS = ("log1p", "log_clamp1")
QUERY_TIMES = ("own", "next")


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
    ln_eps: float = 1e-5
    ln_affine: bool = True
    uvqk_bias: bool = True
    attn_norm: int | None = None  # N, the attention normaliser; None = max_len
    rel_pos: str = "causal"  # causal: w[i - j], max_len entries | toeplitz: w[N - 1 + j - i], 2N - 1 entries
    time_bucket: str = "log1p"  # log1p: floor(log1p(|dt|) / 0.301) | log_clamp1: floor(log(max(|dt|, 1)) / 0.301)
    query_time: str = "own"  # own: a query's gap from its own event | next: from the next event (the request)
    emb_scale: bool = True
    score: str = "cosine"
    temperature: float = 0.05
    n_positions: int | None = None  # rows of the position table; None = max_len

    def __post_init__(self):
        for name, allowed in (("rel_pos", REL_POS), ("time_bucket", TIME_BUCKETS), ("query_time", QUERY_TIMES),
                              ("score", ("cosine", "dot"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.attn_norm is not None and self.attn_norm < self.max_len:
            raise ValueError(f"attn_norm={self.attn_norm} is smaller than max_len={self.max_len}")
        if self.n_positions is not None and self.n_positions < self.max_len:
            raise ValueError(f"n_positions={self.n_positions} is smaller than max_len={self.max_len}")
        if not (self.ln_eps > 0 and self.temperature > 0):
            raise ValueError("ln_eps and temperature must be positive")


class _SmallTableLookup(torch.autograd.Function):
    """w[idx] for a small table w (a few hundred entries) and a large idx. The backward is a weighted bincount:
    indexing's own backward accumulates millions of gradients into those few entries one atomic add at a time,
    which made an HSTU epoch on ML-1M take 130 s on a GPU; a bincount builds the histogram per block first.
    The index is kept for the backward in the narrowest integer type that holds the table's rows: int16 for
    these tables, a quarter of int64's bytes (each layer keeps two (B, T, Lk) indices until its backward: 156 MB
    of HSTU's training peak at batch 128, L 200 in int64); the histogram is the same."""

    @staticmethod
    def forward(ctx, w, idx):
        ctx.save_for_backward(idx.to(_index_dtype(w.shape[0])))
        ctx.n = w.shape[0]
        return w[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.n).to(grad.dtype), None


def _index_dtype(n: int) -> torch.dtype:
    """The narrowest integer type that holds indices 0 .. n - 1."""
    return torch.int16 if n <= 1 << 15 else torch.int32 if n <= 1 << 31 else torch.int64


def small_table_lookup(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _SmallTableLookup.apply(w, idx)


class RelativeBias(nn.Module):
    """rab(i, j) = w_pos[i - j] (causal) or w_pos[N - 1 + j - i] (toeplitz) + w_time[bucket(|t_i - t_j|)], with
    t_i the query's time (own or next event: `SequentialRecommender.query_times`) and t_j the key event's time."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.max_len, self.buckets = cfg.max_len, cfg.time_buckets
        self.layout, self.bucket_fn = cfg.rel_pos, cfg.time_bucket
        self.n = cfg.attn_norm or cfg.max_len
        self.pos = nn.Parameter(torch.zeros(cfg.max_len if cfg.rel_pos == "causal" else 2 * self.n - 1))
        self.time = nn.Parameter(torch.zeros(cfg.time_buckets + 1))

    def forward(self, q_pos, k_pos, q_ts, k_ts):
        if self.layout == "causal":
            idx = (q_pos[:, :, None] - k_pos[:, None, :]).clamp(0, self.max_len - 1)  # (B, T, Lk)
        else:
            idx = (self.n - 1 + k_pos[:, None, :] - q_pos[:, :, None]).clamp(0, 2 * self.n - 2)
        gap = (q_ts[:, :, None] - k_ts[:, None, :]).abs().float()
        if self.bucket_fn == "log1p":
            bucket = (torch.log1p(gap) / 0.301).floor().long()
        else:
            bucket = (torch.log(gap.clamp(min=1)) / 0.301).long()
        bucket = bucket.clamp(0, self.buckets)
        return small_table_lookup(self.pos, idx) + small_table_lookup(self.time, bucket)  # (B, T, Lk)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.h, self.dqk, self.dv = cfg.n_heads, cfg.d_qk, cfg.d_v
        self.d_k, self.d_v = cfg.n_heads * cfg.d_qk, cfg.n_heads * cfg.d_v
        self.max_len = cfg.max_len
        self.attn_norm = cfg.attn_norm or cfg.max_len  # N: the attention weights are silu(s) / N
        self.ln_in = nn.LayerNorm(cfg.d, eps=cfg.ln_eps, elementwise_affine=cfg.ln_affine)
        self.f1 = nn.Linear(cfg.d, 2 * self.d_k + 2 * self.d_v, bias=cfg.uvqk_bias)
        self.ln_attn = nn.LayerNorm(self.d_v, eps=cfg.ln_eps, elementwise_affine=cfg.ln_affine)
        self.f2 = nn.Linear(self.d_v, cfg.d)
        self.bias = RelativeBias(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec("silu", self.h, 1.0, float(self.attn_norm), self.bias)

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
        w = F.silu(s) * key_valid[:, None].to(s.dtype) / self.attn_norm
        return (w @ vh).transpose(1, 2).reshape(B, T, self.d_v)  # (B, T, d_v)

    def finish(self, x, a, u):
        return x + self.drop(self.f2(self.ln_attn(a) * u))


class HSTU(SequentialRecommender):
    arch = "hstu"
    reads_time = True  # the time-gap bias: cached tokens keep their timestamps

    def time_bias_tables(self):
        """(layers, buckets) numpy: each layer's time-bias table w_time over log1p buckets, what the time codec
        (`ckv_cli.codecs.timecode`) fits its intervals to."""
        if self.config.time_bucket != "log1p":
            raise CkvError(f"time_bits: this model buckets time gaps by {self.config.time_bucket!r}; the time codec "
                           "fits HSTU's log1p buckets")
        return torch.stack([layer.bias.time.detach().float() for layer in self.layers]).numpy()

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.n_positions or cfg.max_len, cfg.d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @torch.no_grad()
    def first_layer_tables(self) -> dict | None:
        """K/V tables of the first layer (`form` "kv": K/V built from them by `ckv_cli.serve.next_item.tabled_kv`
        without running the layer). A cached token's first-layer input is x = a_i + p_j (item embedding x scale
        plus position embedding; HSTU has no embedding LayerNorm), so its K and V are silu(W LN(x) + b) over the
        K and V rows of f1, and with G = W diag(gamma):

            W (gamma (x - mu) r + beta) + b = r (G a_i + G p_j - mu G 1) + (W beta + b)

        with mu, r the LayerNorm mean and inverse deviation of a_i + p_j, tabulated for every (item, position)
        pair in float64 from the norms and the item x position Gram matrix (as SASRec's fold). Tables: items
        (n + 1, d_k + d_v) = a G^T, pos (max_len, d_k + d_v) = p G^T, g1 = G 1, c = W beta + b, stats
        ((n + 1) max_len, 2). A LayerNorm without affine folds with gamma = 1, beta = 0; a projection without
        bias with b = 0. Exact up to float rounding (the SiLU keeps K/V from folding into the attention, so they
        are built, but for the real tokens only and without a LayerNorm or a d x 4d projection per token)."""
        cfg, layer = self.config, self.layers[0]
        d, dk, dv = cfg.d, layer.d_k, layer.d_v
        f64 = torch.float64
        scale = math.sqrt(d) if getattr(cfg, "emb_scale", True) else 1.0  # what `embed` multiplies by
        a = (self.item_emb.weight * scale).detach().double()  # (n + 1, d)
        p = self.pos_emb.weight[: cfg.max_len].detach().double()  # (max_len, d): `embed` clamps to max_len - 1
        rows = torch.cat([torch.arange(2 * dv + dk, 2 * dv + 2 * dk), torch.arange(dv, 2 * dv)])  # f1: [u v q k]
        w = layer.f1.weight.detach().double()[rows]  # (d_k + d_v, d): the K rows, then the V rows
        b = layer.f1.bias.detach().double()[rows] if layer.f1.bias is not None else torch.zeros(len(rows), dtype=f64)
        ln = layer.ln_in
        gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(d, dtype=f64)
        beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(d, dtype=f64)
        g = w * gamma[None, :]  # (d_out, d)
        mu = a.mean(1)[:, None] + p.mean(1)[None, :]  # (n + 1, max_len)
        ex2 = ((a * a).sum(1)[:, None] + 2 * (a @ p.T) + (p * p).sum(1)[None, :]) / d
        r = 1.0 / torch.sqrt((ex2 - mu * mu).clamp(min=0) + ln.eps)
        return {"form": "kv", "act": "silu", "max_len": cfg.max_len, "d_k": dk,
                "items": (a @ g.T).float(), "pos": (p @ g.T).float(), "g1": g.sum(1).float(),
                "c": (w @ beta + b).float(), "stats": torch.stack([mu, r], -1).float().view(-1, 2)}
