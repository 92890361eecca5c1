"""Attention that reads the compressed cache directly (CollectiveKV, Li et al., ICLR 2026, arXiv 2601.19178).

A collective (residual layout) stream stores, per cached token j, an index idx_j into a pool P shared by all
users and optionally r user-specific numbers u_j on a shared basis B (d, r): K_j = P_k[idx_j] + B_k u_j. So

    q . K_j = (q P_k^T)[idx_j] + (q B_k) . u_j        one product with the pool, a gather, an r-dim term;
    sum_j w_j V_j = sum_j w_j P_v[idx_j] + (w u_v) B_v^T

and the cache K, V is never materialised. Each side has two exact forms:
- `scatter` (through the pool): scores = one product q P_k^T (B T, m) and a gather; values = the weights added
  into m pool bins (`scatter_add` over idx_v), then one product bins @ P_v;
- `gather` (each token's pool row): scores = sampled dot products q . P_k[idx_j] (`sampled_addmm` on CPU) or,
  with several queries per user, chunks of gathered rows (a few MB at a time, never the whole cache) that the
  T queries share; values = `embedding_bag` of P_v rows weighted by the attention weights (one query) or the
  same row chunks.
`choose_form` picks per side by L vs m (the rule and its measurements are in its docstring). The `concat`
layout maps to this form exactly: x = mu + R [P[idx]; u] = (mu + P R_pool^T)[idx] + R_user u
(`stream_from_codec`).

Two nonlinearities: `softmax` (SASRec: softmax(scale q.k + bias) over valid keys) and `silu` (HSTU: pointwise
silu(scale q.k + bias) over valid keys divided by a fixed `norm`, no softmax; `ckv_cli.models.hstu` uses
scale 1, norm = max_len, and a relative position/time bias added before the nonlinearity).

`decode_then_attend` has the same signature, materialises K/V and runs the standard path (`full_attention`):
the reference the compressed forms are tested against.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SOFTMAX, SILU = "softmax", "silu"
GATHER, SCATTER, AUTO = "gather", "scatter", "auto"
SCORES, VALUES = "scores", "values"

# Costs of the gather forms per query and per (token x dim), in units of one multiply-add of the pool product;
# measured on the 2-core CPU (fp32, d 256, batch 512, one thread; bench/attention.py and choose_form's docstring).
SDDMM_COST = 3.5  # scores: sampled dot products q . P[idx_j] (torch.sparse.sampled_addmm, CPU only)
BAG_COST = 1.75  # values of one query: embedding_bag of the pool rows weighted by the attention weights
ROW_COST = 12.0  # gathering a token's pool row into a chunk of rows, once for the T queries that read it
MANY_POOL_COST = 1.25  # the pool forms with several queries per user (bins fill, scatter, gather over T)
POOL_READ_COST = 4.0  # streaming the pool once per call, shared by the B T queries (dominates at batch 1)
ROW_CHUNK_BYTES = 8 << 20  # CPU: gathered rows are built this many bytes at a time (cache-sized, no page faults)
ROW_CHUNK_BYTES_GPU = 256 << 20  # GPU: large chunks, few kernel launches
ATTN_CHUNK_BYTES = 16 << 20  # CPU: users per call so that scores, weights and pool bins stay near this size
ATTN_CHUNK_BYTES_GPU = 2 << 30


@dataclass
class CompressedStream:
    """One layer's K or V of a batch of users in compressed form, right-padded to L tokens.

    Padding tokens must hold a valid pool index (0 is fine) and finite user values; the validity mask given to
    the attention functions decides what they contribute (nothing)."""

    pool: torch.Tensor  # (m, d)
    idx: torch.Tensor  # (B, L) int32 or int64
    user: torch.Tensor | None = None  # (B, L, r) float, dequantised
    basis: torch.Tensor | None = None  # (d, r)

    @property
    def has_user(self) -> bool:
        return self.user is not None and self.user.shape[-1] > 0

    def decode(self) -> torch.Tensor:
        """The materialised vectors (B, L, d): P[idx] + u B^T."""
        x = F.embedding(self.idx, self.pool)  # (B, L, d)
        return x + self.user @ self.basis.T if self.has_user else x


def _sampled(device: torch.device | str, n_queries: int, n_keys: int, pool_size: int,
             dtype: torch.dtype = torch.float32) -> bool:
    """Scores of the gather form through sampled dot products (CPU, few queries) rather than gathered rows.
    `sampled_addmm` refuses a row with more entries than columns, hence L <= m, and half types on a CPU."""
    few = n_queries * SDDMM_COST < ROW_COST + n_queries
    full = dtype in (torch.float32, torch.float64)
    return torch.device(device).type == "cpu" and full and few and n_keys <= pool_size


def choose_form(n_keys: int, pool_size: int, n_queries: int = 1, side: str = VALUES, device="cpu",
                n_users: int = 512) -> str:
    """`scatter` (through the pool: q P^T then a gather for the scores; weights added into m pool bins then
    @ P_v for the values) when the pool is small next to the history L, else `gather` (each token's pool row).

    Per query and dim, the pool form costs m (x MANY_POOL_COST with T > 1 queries per user) plus reading the
    pool, m x POOL_READ_COST shared by the B T queries of the call; the gather form
    costs L x SDDMM_COST (scores, CPU, few queries) or L x BAG_COST (values, one query) or L (1 + ROW_COST / T)
    (rows gathered once for the T queries). `scatter` iff the pool cost is not larger. Measured, one query,
    batch 512, d 256: L 1000 m 1024 -> scores 3.4 ms pool vs 10.9 sampled, values 3.2 scatter vs 5.6 bag;
    L 1000 m 10000 -> scores 32.5 vs 14.9, values 31.6 vs 8.8; L 200 m 1024 -> scores 2.9 vs 2.1."""
    T = max(n_queries, 1)
    rows = 1.0 + ROW_COST / T
    if side == SCORES:
        gather = SDDMM_COST if _sampled(device, T, n_keys, pool_size) else rows
    else:
        gather = BAG_COST if T == 1 else rows
    pool = pool_size * ((1.0 if T == 1 else MANY_POOL_COST) + POOL_READ_COST / (max(n_users, 1) * T))
    return SCATTER if pool <= n_keys * gather else GATHER


# ---------------------------------------------------------------------------------------------- helpers


def _heads_first(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, d = x.shape
    return x.view(B, T, n_heads, d // n_heads).permute(2, 0, 1, 3)  # (H, B, T, dh)


def _pool_heads(pool: torch.Tensor, n_heads: int) -> torch.Tensor:
    m, d = pool.shape
    return pool.view(m, n_heads, d // n_heads).transpose(0, 1)  # (H, m, dh)


def _basis_heads(basis: torch.Tensor, n_heads: int) -> torch.Tensor:
    d, r = basis.shape
    return basis.view(n_heads, d // n_heads, r)  # (H, dh, r)


def _bias_heads(bias: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None:
        return None
    return bias[None] if bias.dim() == 3 else bias.transpose(0, 1)  # (1 or H, B, T, L)


def _check(q: torch.Tensor, d: int, n_heads: int, kind: str) -> None:
    if q.dim() != 3 or q.shape[-1] != d:
        raise ValueError(f"queries must be (B, T, {d}), got {tuple(q.shape)}")
    if d % n_heads:
        raise ValueError(f"width {d} does not split into {n_heads} heads")
    if kind not in (SOFTMAX, SILU):
        raise ValueError(f"kind must be '{SOFTMAX}' or '{SILU}', got {kind!r}")


def _scale(scale: float | None, kind: str, d_head: int) -> float:
    if scale is not None:
        return scale
    return 1.0 / math.sqrt(d_head) if kind == SOFTMAX else 1.0


def attention_weights(s: torch.Tensor, valid: torch.Tensor, kind: str, norm: float | None) -> torch.Tensor:
    """Scores (H, B, T, L) (scaled, bias added) -> weights; invalid keys get weight 0, a row without a valid
    key gets all zeros (softmax) like SASRec's nan_to_num. silu divides by `norm` (default L)."""
    mask = valid[None, :, None, :]  # (1, B, 1, L)
    if kind == SOFTMAX:
        return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num()  # (H, B, T, L)
    return F.silu(s) * mask.to(s.dtype) / float(norm if norm is not None else s.shape[-1])


# ---------------------------------------------------------------------------------------------- compressed


def _chunk_users(stream: CompressedStream) -> int:
    """Users per chunk of gathered rows (c, L, d), so that one chunk stays near ROW_CHUNK_BYTES."""
    B, L = stream.idx.shape
    row_bytes = max(1, L * stream.pool.shape[1] * stream.pool.element_size())
    budget = ROW_CHUNK_BYTES if stream.pool.device.type == "cpu" else ROW_CHUNK_BYTES_GPU
    return max(1, min(B, budget // row_bytes))


def _rows(stream: CompressedStream, a: int, b: int, n_heads: int) -> torch.Tensor:
    """Pool rows of users [a, b)'s tokens, split into heads: (H, b - a, L, dh). A transient chunk, not the cache."""
    rows = F.embedding(stream.idx[a:b], stream.pool)  # (c, L, d)
    c, L, d = rows.shape
    return rows.view(c, L, n_heads, d // n_heads).permute(2, 0, 1, 3)  # (H, c, L, dh)


def _scores_pool(qh: torch.Tensor, k: CompressedStream, n_heads: int) -> torch.Tensor:
    """(q P^T)[idx]: one product with the pool, then a gather. q (H, B, T, dh) -> (H, B, T, L)."""
    H, B, T, dh = qh.shape
    L = k.idx.shape[1]
    pool = _pool_heads(k.pool, n_heads)  # (H, m, dh)
    qp = torch.bmm(qh.reshape(H, B * T, dh), pool.transpose(1, 2))  # (H, B*T, m)
    return torch.gather(qp.view(H, B, T, -1), 3, k.idx[None, :, None, :].expand(H, B, T, L))  # (H, B, T, L)


def _scores_sampled(qh: torch.Tensor, k: CompressedStream, n_heads: int) -> torch.Tensor:
    """q . P[idx_j] as sampled dot products: a CSR pattern with row (b, t) holding user b's indices, and
    `sampled_addmm` computes q P^T only at those entries. q (H, B, T, dh) -> (H, B, T, L)."""
    H, B, T, dh = qh.shape
    L = k.idx.shape[1]
    n = B * T * L
    col = k.idx[:, None, :].expand(B, T, L).reshape(n)  # (B*T*L,) the entries each query row needs
    crow = torch.arange(0, n + 1, L, dtype=col.dtype, device=col.device)  # (B*T + 1,)
    pool = _pool_heads(k.pool, n_heads)  # (H, m, dh)
    out = []
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        for h in range(H):  # a handful of heads
            pattern = torch.sparse_csr_tensor(crow, col, qh.new_zeros(n), (B * T, pool.shape[1]), check_invariants=False)
            out.append(torch.sparse.sampled_addmm(pattern, qh[h].reshape(B * T, dh), pool[h].T, beta=0.0).values())
    return (out[0] if H == 1 else torch.stack(out)).view(H, B, T, L)  # (H, B, T, L)


def _scores_rows(qh: torch.Tensor, k: CompressedStream, n_heads: int) -> torch.Tensor:
    """q . P[idx_j] over chunks of users' gathered rows. q (H, B, T, dh) -> (H, B, T, L)."""
    H, B, T, _ = qh.shape
    s = qh.new_empty(H, B, T, k.idx.shape[1])  # (H, B, T, L)
    step = _chunk_users(k)
    for a in range(0, B, step):
        s[:, a : a + step] = qh[:, a : a + step] @ _rows(k, a, a + step, n_heads).transpose(-1, -2)  # (H, c, T, L)
    return s


def compressed_scores(qh: torch.Tensor, k: CompressedStream, n_heads: int, form: str) -> torch.Tensor:
    """q (H, B, T, dh) -> raw scores q . K_j (H, B, T, L): pool part by `form`, plus (q B) u^T."""
    H, B, T, dh = qh.shape
    if form == SCATTER:
        s = _scores_pool(qh, k, n_heads)
    else:
        sampled = _sampled(qh.device, T, k.idx.shape[1], k.pool.shape[0], qh.dtype)
        s = _scores_sampled(qh, k, n_heads) if sampled else _scores_rows(qh, k, n_heads)
    if k.has_user:
        qb = torch.bmm(qh.reshape(H, B * T, dh), _basis_heads(k.basis, n_heads)).view(H, B, T, -1)  # (H, B, T, r)
        s = s + torch.einsum("hbtr,blr->hbtl", qb, k.user.to(qb.dtype))  # (H, B, T, L)
    return s


def _values_scatter(w: torch.Tensor, v: CompressedStream, n_heads: int) -> torch.Tensor:
    """Weights (H, B, T, L) -> sum_j w_j P_v[idx_j] (H, B, T, dh) through m pool bins."""
    H, B, T, L = w.shape
    pool = _pool_heads(v.pool, n_heads)  # (H, m, dh)
    m = pool.shape[1]
    bins = w.new_zeros(H, B, T, m).scatter_add_(3, v.idx[None, :, None, :].expand(H, B, T, L), w)  # (H, B, T, m)
    return torch.bmm(bins.view(H, B * T, m), pool).view(H, B, T, -1)  # (H, B, T, dh)


def _values_bag(w: torch.Tensor, v: CompressedStream, n_heads: int) -> torch.Tensor:
    """One query: a weighted bag of pool rows per (head, user), no (B, L, d) temporary. -> (H, B, 1, dh)."""
    H, B, _, L = w.shape
    m, d = v.pool.shape
    if H == 1:
        return F.embedding_bag(v.idx, v.pool, per_sample_weights=w.reshape(B, L), mode="sum").view(1, B, 1, d)
    table = _pool_heads(v.pool, n_heads).reshape(H * m, d // H)  # (H*m, dh): head h's rows start at h*m
    bags = v.idx[None] + (torch.arange(H, device=w.device) * m).to(v.idx.dtype)[:, None, None]  # (H, B, L)
    out = F.embedding_bag(bags.reshape(H * B, L), table, per_sample_weights=w.reshape(H * B, L), mode="sum")
    return out.view(H, B, 1, d // H)  # (H, B, 1, dh)


def _values_rows(w: torch.Tensor, v: CompressedStream, n_heads: int) -> torch.Tensor:
    """Several queries share each chunk of gathered rows. Weights (H, B, T, L) -> (H, B, T, dh)."""
    H, B, T, _ = w.shape
    out = w.new_empty(H, B, T, v.pool.shape[1] // n_heads)  # (H, B, T, dh)
    step = _chunk_users(v)
    for a in range(0, B, step):
        out[:, a : a + step] = w[:, a : a + step] @ _rows(v, a, a + step, n_heads)  # (H, c, T, dh)
    return out


def compressed_values(w: torch.Tensor, v: CompressedStream, n_heads: int, form: str) -> torch.Tensor:
    """Weights (H, B, T, L) -> attention output (H, B, T, dh): pool part by `form` plus (w u) B^T."""
    if form == SCATTER:
        out = _values_scatter(w, v, n_heads)
    else:
        out = _values_bag(w, v, n_heads) if w.shape[2] == 1 else _values_rows(w, v, n_heads)
    if v.has_user:
        wu = torch.einsum("hbtl,blr->hbtr", w, v.user.to(w.dtype))  # (H, B, T, r)
        out = out + torch.einsum("hbtr,hdr->hbtd", wu, _basis_heads(v.basis, n_heads))  # (H, B, T, dh)
    return out


def _forms(form: str, k: CompressedStream, v: CompressedStream, T: int) -> tuple[str, str]:
    if form == AUTO:
        (B, L), dev = k.idx.shape, k.pool.device
        return (choose_form(L, k.pool.shape[0], T, SCORES, dev, B), choose_form(L, v.pool.shape[0], T, VALUES, dev, B))
    if form not in (GATHER, SCATTER):
        raise ValueError(f"form must be '{GATHER}', '{SCATTER}' or '{AUTO}', got {form!r}")
    return form, form


def _users(stream: CompressedStream, a: int, b: int) -> CompressedStream:
    return CompressedStream(stream.pool, stream.idx[a:b], None if stream.user is None else stream.user[a:b], stream.basis)


def _batch_chunk(q: torch.Tensor, k: CompressedStream, v: CompressedStream, n_heads: int) -> int:
    """Users per call so that the per-user temporaries (scores, weights, pool bins: T x max(L, m) per head)
    stay near ATTN_CHUNK_BYTES."""
    B, T, _ = q.shape
    width = max(k.idx.shape[1], k.pool.shape[0], v.pool.shape[0])
    per_user = max(1, n_heads * T * width * q.element_size())
    budget = ATTN_CHUNK_BYTES if q.device.type == "cpu" else ATTN_CHUNK_BYTES_GPU
    return max(1, min(B, budget // per_user))


def _attend(q, k, v, valid, scale, kind, bias, norm, forms, n_heads) -> torch.Tensor:
    """compressed_attention on one chunk of users, forms already chosen."""
    B, T, _ = q.shape
    qh = _heads_first(q * scale, n_heads)  # (H, B, T, dh), scaled once per query
    s = compressed_scores(qh, k, n_heads, forms[0])  # (H, B, T, L)
    b = _bias_heads(bias)
    if b is not None:
        s = s + b.to(s.dtype)
    w = attention_weights(s, valid, kind, norm)  # (H, B, T, L)
    out = compressed_values(w, v, n_heads, forms[1])  # (H, B, T, dh)
    return out.permute(1, 2, 0, 3).reshape(B, T, -1)  # (B, T, H*dh)


def compressed_attention(q: torch.Tensor, k: CompressedStream, v: CompressedStream, valid: torch.Tensor,
                         scale: float | None = None, kind: str = SOFTMAX, bias: torch.Tensor | None = None,
                         norm: float | None = None, form: str = AUTO, n_heads: int = 1) -> torch.Tensor:
    """Attention of queries q (B, T, d) over compressed keys/values -> (B, T, d_v), the cache never built.

    valid (B, L) bool marks real tokens; `scale` multiplies q.k (default 1/sqrt(d_head) for softmax, 1 for
    silu); `bias` (B, T, L) or (B, H, T, L) is added after scaling, before the nonlinearity; `norm` is silu's
    divisor (default L; HSTU uses max_len); `form` is `gather`, `scatter` (both sides) or `auto` (each side by
    `choose_form`); `n_heads` splits d into heads that share each token's pool index. Large batches run in
    chunks of users (ATTN_CHUNK_BYTES of temporaries each)."""
    d = k.pool.shape[1]
    _check(q, d, n_heads, kind)
    if q.shape[0] == 0 or k.idx.shape[1] == 0:  # nobody, or no cached token: nothing to attend to
        return q.new_zeros(q.shape[0], q.shape[1], v.pool.shape[1])
    forms = _forms(form, k, v, q.shape[1])
    args = (_scale(scale, kind, d // n_heads), kind)
    B, step = q.shape[0], _batch_chunk(q, k, v, n_heads)
    if step >= B:
        return _attend(q, k, v, valid, *args, bias, norm, forms, n_heads)
    return torch.cat([_attend(q[a : a + step], _users(k, a, a + step), _users(v, a, a + step), valid[a : a + step],
                              *args, None if bias is None else bias[a : a + step], norm, forms, n_heads)
                      for a in range(0, B, step)])  # (B, T, d_v)


# ---------------------------------------------------------------------------------------------- reference


def full_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, valid: torch.Tensor,
                   scale: float | None = None, kind: str = SOFTMAX, bias: torch.Tensor | None = None,
                   norm: float | None = None, n_heads: int = 1) -> torch.Tensor:
    """The standard path over a materialised cache K (B, L, d), V (B, L, d_v) -> (B, T, d_v).
    softmax runs through `scaled_dot_product_attention` (as SASRec does); silu as HSTU's `attend`."""
    _check(q, K.shape[-1], n_heads, kind)
    B, T, _ = q.shape
    sc = _scale(scale, kind, K.shape[-1] // n_heads)
    qh, kh, vh = (x.view(B, x.shape[1], n_heads, -1).transpose(1, 2) for x in (q, K, V))  # (B, H, *, dh)
    b = None if bias is None else (bias[:, None] if bias.dim() == 3 else bias).to(q.dtype)  # (B, 1 or H, T, L)
    if kind == SOFTMAX:
        mask = valid[:, None, None, :]  # (B, 1, 1, L)
        if b is not None:
            mask = b.masked_fill(~mask, float("-inf"))  # (B, 1 or H, T, L)
        a = torch.nan_to_num(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=sc))  # (B, H, T, dh)
    else:
        s = (qh @ kh.transpose(-1, -2)) * sc  # (B, H, T, L)
        s = s + b if b is not None else s
        w = F.silu(s) * valid[:, None, None, :].to(s.dtype) / float(norm if norm is not None else K.shape[1])
        a = w @ vh  # (B, H, T, dh)
    return a.transpose(1, 2).reshape(B, T, -1)  # (B, T, d_v)


def decode_then_attend(q: torch.Tensor, k: CompressedStream, v: CompressedStream, valid: torch.Tensor,
                       scale: float | None = None, kind: str = SOFTMAX, bias: torch.Tensor | None = None,
                       norm: float | None = None, form: str = AUTO, n_heads: int = 1) -> torch.Tensor:
    """Reference with `compressed_attention`'s signature: decode K and V, then `full_attention` (`form` unused)."""
    return full_attention(q, k.decode(), v.decode(), valid, scale, kind, bias, norm, n_heads)


# ---------------------------------------------------------------------------------------------- codecs


def pool_and_basis(codec) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted `CollectiveCodec` -> (pool (m, d), basis (d, r)) in the residual form x = pool[idx] + basis u.
    `concat` (x = mu + R [P[idx]; u] with coordinates permuted) folds exactly: pool = mu + P R_pool^T, basis
    = R_user."""
    if codec.layout == "residual":
        return codec.pool, codec.basis[:, : codec.user_dim]
    R = codec.basis  # (d, d) rotation
    return codec.mean + codec.pool @ R[:, codec.pool_coords].T, R[:, codec.user_coords].contiguous()


def stream_from_codec(codec, fields: dict[str, np.ndarray], offsets: np.ndarray,
                      items: np.ndarray | None = None) -> tuple[CompressedStream, torch.Tensor]:
    """A `CollectiveCodec`'s encoded fields for a batch of users (flat, `offsets` (B + 1,); `items` (N,) the tokens'
    item ids, which an item-coded index needs) -> a right-padded `CompressedStream` (int64 pool indices,
    dequantised user parts) and the validity mask (B, L)."""
    from ckv_cli.codecs.base import dequantize_per_user

    lengths = torch.from_numpy(np.diff(offsets))
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    idx = torch.zeros(B, L, dtype=torch.long)
    idx[valid] = torch.from_numpy(codec.indices(fields, offsets, items))
    pool, basis = pool_and_basis(codec)
    user = None
    if codec.user_dim:
        flat = (dequantize_per_user(fields["user"], fields["scale"], offsets) if codec.user_dtype == "int8"
                else torch.from_numpy(np.asarray(fields["user"], dtype=np.float32)))  # (N, r)
        user = torch.zeros(B, L, codec.user_dim)
        user[valid] = flat
    return CompressedStream(pool, idx, user, basis), valid
