"""Fused compressed-domain attention in Triton (CollectiveKV, Li et al., ICLR 2026, arXiv 2601.19178).

The torch path (`ckv_cli.serve.attention.compressed_attention`) reads the compressed cache through ~10 small
kernels; this module does the same attention in one Triton kernel per call (plus, for the pool forms, one cuBLAS
product), gathering pool rows by index inside the kernel: K_j = P_k[idx_k[b, j]] (+ B_k u_k[b, j]) and
V_j = P_v[idx_v[b, j]] (+ B_v u_v[b, j]) are read tile by tile and never written out.

Per (user b, head h, block of queries) the kernel streams the user's L tokens in tiles of BLOCK_L:
- scores, form `gather`: gather the tile's K rows from P_k and `tl.dot` them with the queries (as FlashAttention,
  with rows fetched by index); form `scatter` (the score-side trick): one product q P_k^T (B T, H, m) before the
  kernel, and the kernel gathers scalars (q P_k^T)[idx] instead of d-wide rows;
- plus the user part (q B_k) . u_j (q B_k computed in the kernel), the scale, an additive bias (B, T, L) or
  (B, H, T, L), the validity mask (B, L);
- `softmax` (online, FlashAttention-style running max and sum; a row with no valid key gives zeros like SASRec's
  nan_to_num) or `silu` (HSTU: silu(s) / norm over valid keys, no normalisation across keys);
- values, form `gather`: the tile's V rows gathered from P_v, p @ V accumulated in fp32; form `scatter`: the
  weights are added (fp32 atomics) into m pool bins per query and one product bins @ P_v follows (softmax then
  takes two passes over the scores: max and sum first, weights second).
Long histories with few users are split over several programs (FlashDecoding); a small second kernel merges the
splits. fp16 / bf16 / fp32 pools, fp32 accumulation; fp32 pools use exact (ieee) dots.

`compressed_attention_triton` has `compressed_attention`'s signature and semantics and falls back to it for what
the kernel does not do (no Triton, tensors on a device Triton cannot run, mixed dtypes, autograd). Inference only.
The `scatter` value form uses atomics: its low bits vary between runs (like torch's CUDA scatter_add); it is
not chosen by `auto` while `torch.are_deterministic_algorithms_enabled()`.

Triton is an optional extra (`pip install ckv-cli[gpu]`); nothing in ckv imports this module unless asked. With
TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors in Triton's interpreter
(numpy; slow, for tests).
"""
from __future__ import annotations

import contextlib
import math

import torch

from ckv_cli.serve.attention import (AUTO, GATHER, SCATTER, SILU, SOFTMAX, CompressedStream, _check, _scale,
                                  compressed_attention)

try:  # optional: ckv-cli[gpu]
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

FORMS = (GATHER, SCATTER)
BINS_BYTES = 1 << 30  # the scatter value form's (B, T, H, m) fp32 bins must stay under this
TABLE_BYTES = 1 << 30  # the scatter score form's (H, B T, m_k) fp32 table must stay under this
PROGRAMS_PER_SM = 4  # split long histories until the grid has about this many programs per multiprocessor


def available() -> bool:
    """Triton is importable (the kernels may still need a GPU or TRITON_INTERPRET=1; see `supports`)."""
    return triton is not None


def interpreting() -> bool:
    """The kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return triton is not None and type(_attn_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _scores(b, h, offs_t, t_ok, offs_l, l_ok, q, qb,
                ik_ptr, sik_b, sik_l, pk_ptr, spk_m, tab_ptr, stab_h, stab_b, stab_t,
                uk_ptr, suk_b, suk_l, valid_ptr, sva_b, sva_l, bias_ptr, sbi_b, sbi_h, sbi_t, sbi_l,
                scale, DK,
                SCORE_TABLE: tl.constexpr, HAS_UK: tl.constexpr, HAS_BIAS: tl.constexpr,
                DK_P: tl.constexpr, RK_P: tl.constexpr, RK: tl.constexpr, PREC: tl.constexpr):
        """Scores (BLOCK_T, BLOCK_L) fp32 of one tile of keys (scaled, bias added) and the keys' validity."""
        ik = tl.load(ik_ptr + b * sik_b + offs_l * sik_l, mask=l_ok, other=0)  # (BLOCK_L,) pool indices
        if SCORE_TABLE:  # (q P_k^T)[idx]: scalars from the table, not rows
            tab = tab_ptr + h * stab_h + b * stab_b + offs_t[:, None] * stab_t + ik[None, :]
            s = tl.load(tab, mask=t_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32) * scale
        else:  # gather the tile's K rows (BLOCK_L, DK_P) from the pool
            offs_d = tl.arange(0, DK_P)
            rows = pk_ptr + ik[:, None] * spk_m + h * DK + offs_d[None, :]
            k = tl.load(rows, mask=l_ok[:, None] & (offs_d < DK)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_T, BLOCK_L), q already scaled
        if HAS_UK:  # + (q B_k) . u_j
            offs_r = tl.arange(0, RK_P)
            u = tl.load(uk_ptr + b * suk_b + offs_l[:, None] * suk_l + offs_r[None, :],
                        mask=l_ok[:, None] & (offs_r < RK)[None, :], other=0.0)  # (BLOCK_L, RK_P)
            s += tl.dot(qb, tl.trans(u.to(qb.dtype)), input_precision=PREC)
        if HAS_BIAS:
            bias = bias_ptr + b * sbi_b + h * sbi_h + offs_t[:, None] * sbi_t + offs_l[None, :] * sbi_l
            s += tl.load(bias, mask=t_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
        ok = tl.load(valid_ptr + b * sva_b + offs_l * sva_l, mask=l_ok, other=0) != 0  # (BLOCK_L,)
        return s, ok & l_ok

    @triton.jit
    def _attn_kernel(
        q_ptr, sq_b, sq_t,  # queries (B, T, H*DK)
        ik_ptr, sik_b, sik_l, pk_ptr, spk_m, tab_ptr, stab_h, stab_b, stab_t,  # K: indices (B, L), pool, table
        uk_ptr, suk_b, suk_l, bk_ptr, sbk_d,  # K user part (B, L, RK) and basis (H*DK, RK)
        iv_ptr, siv_b, siv_l, pv_ptr, spv_m,  # V: indices (B, L), pool (m_v, H*DV)
        uv_ptr, suv_b, suv_l, bv_ptr, sbv_d,  # V user part (B, L, RV) and basis (H*DV, RV)
        valid_ptr, sva_b, sva_l, bias_ptr, sbi_b, sbi_h, sbi_t, sbi_l,  # mask (B, L) uint8, bias
        o_ptr, so_s, so_b, so_h, so_t,  # output: partials (S, B, H, T, DV) fp32, or final (B, T, H*DV)
        ml_ptr, sml_s, sml_l,  # running max and sum (S, 2, B*H*T) fp32 (partials only)
        bins_ptr, sbn_h, sbn_b, sbn_t,  # value bins (H, B, T, m_v) fp32 (VALUE_BINS)
        T, L, split_len, H, DK, DV, RK, RV, scale, inv_norm,
        KIND_SILU: tl.constexpr, SCORE_TABLE: tl.constexpr, VALUE_BINS: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_UK: tl.constexpr, HAS_UV: tl.constexpr, FINAL: tl.constexpr, PREC: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
        RK_P: tl.constexpr, RV_P: tl.constexpr,
    ):
        """One program: queries [pid_t BLOCK_T, +BLOCK_T) of user b, head h, over keys [pid_s split_len, +split_len)."""
        pid_bh, pid_t, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # B*H first: no 65535 cap
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_dv = tl.arange(0, DV_P)
        dv_ok = offs_dv < DV
        offs_rv = tl.arange(0, RV_P)
        dtype = pv_ptr.dtype.element_ty

        q = tl.zeros((BLOCK_T, DK_P), dtype=dtype)
        qb = tl.zeros((BLOCK_T, RK_P), dtype=dtype)
        if HAS_UK or not SCORE_TABLE:
            offs_dk = tl.arange(0, DK_P)
            qp = q_ptr + b * sq_b + offs_t[:, None] * sq_t + h * DK + offs_dk[None, :]
            q = tl.load(qp, mask=t_ok[:, None] & (offs_dk < DK)[None, :], other=0.0)
            q = (q.to(tl.float32) * scale).to(dtype)  # (BLOCK_T, DK_P), scaled once
            if HAS_UK:  # q B_k (BLOCK_T, RK_P)
                offs_rk = tl.arange(0, RK_P)
                bk = tl.load(bk_ptr + (h * DK + offs_dk[:, None]) * sbk_d + offs_rk[None, :],
                             mask=(offs_dk < DK)[:, None] & (offs_rk < RK)[None, :], other=0.0)
                qb = tl.dot(q, bk.to(dtype), input_precision=PREC).to(dtype)

        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, L)
        m_i = tl.full((BLOCK_T,), -1.0e30, tl.float32)  # finite: a fully masked row never gives inf - inf
        l_i = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, DV_P), tl.float32)
        acc_u = tl.zeros((BLOCK_T, RV_P), tl.float32)
        bv_t = tl.zeros((RV_P, DV_P), dtype=dtype)
        if HAS_UV:  # B_v^T of head h (RV_P, DV_P)
            bv_t = tl.load(bv_ptr + (h * DV + offs_dv[None, :]) * sbv_d + offs_rv[:, None],
                           mask=dv_ok[None, :] & (offs_rv < RV)[:, None], other=0.0).to(dtype)

        if VALUE_BINS and not KIND_SILU:  # first pass: the softmax max and sum, scores only
            for start in range(lo, hi, BLOCK_L):
                offs_l = start + tl.arange(0, BLOCK_L)
                s, ok = _scores(b, h, offs_t, t_ok, offs_l, offs_l < hi, q, qb,
                                ik_ptr, sik_b, sik_l, pk_ptr, spk_m, tab_ptr, stab_h, stab_b, stab_t,
                                uk_ptr, suk_b, suk_l, valid_ptr, sva_b, sva_l, bias_ptr, sbi_b, sbi_h, sbi_t, sbi_l,
                                scale, DK, SCORE_TABLE, HAS_UK, HAS_BIAS, DK_P, RK_P, RK, PREC)
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
                m_i = m_new
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)

        for start in range(lo, hi, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            l_ok = offs_l < hi
            s, ok = _scores(b, h, offs_t, t_ok, offs_l, l_ok, q, qb,
                            ik_ptr, sik_b, sik_l, pk_ptr, spk_m, tab_ptr, stab_h, stab_b, stab_t,
                            uk_ptr, suk_b, suk_l, valid_ptr, sva_b, sva_l, bias_ptr, sbi_b, sbi_h, sbi_t, sbi_l,
                            scale, DK, SCORE_TABLE, HAS_UK, HAS_BIAS, DK_P, RK_P, RK, PREC)
            if KIND_SILU:
                p = tl.where(ok[None, :], s * tl.sigmoid(s) * inv_norm, 0.0)  # (BLOCK_T, BLOCK_L)
            elif VALUE_BINS:
                p = tl.exp(tl.where(ok[None, :], s, float("-inf")) - m_i[:, None]) * inv_l[:, None]
            else:  # online softmax
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m_i = m_new
            iv = tl.load(iv_ptr + b * siv_b + offs_l * siv_l, mask=l_ok, other=0)  # (BLOCK_L,)
            if VALUE_BINS:  # p into the user's pool bins; bins @ P_v follows outside
                bins = bins_ptr + h * sbn_h + b * sbn_b + offs_t[:, None] * sbn_t + iv[None, :]
                tl.atomic_add(bins, p, mask=t_ok[:, None] & ok[None, :], sem="relaxed")  # order is irrelevant
            if HAS_UV:
                u = tl.load(uv_ptr + b * suv_b + offs_l[:, None] * suv_l + offs_rv[None, :],
                            mask=l_ok[:, None] & (offs_rv < RV)[None, :], other=0.0).to(dtype)  # (BLOCK_L, RV_P)
            if VALUE_BINS:
                if HAS_UV:  # sum_j p_j u_j, projected on B_v after the loop
                    acc_u += tl.dot(p.to(dtype), u, input_precision=PREC)
            else:  # gather the tile's V rows (BLOCK_L, DV_P), + u B_v^T: the tile decoded in registers
                rows = pv_ptr + iv[:, None] * spv_m + h * DV + offs_dv[None, :]
                v = tl.load(rows, mask=l_ok[:, None] & dv_ok[None, :], other=0.0)
                if HAS_UV:
                    v = (v.to(tl.float32) + tl.dot(u, bv_t, input_precision=PREC)).to(dtype)
                acc += tl.dot(p.to(dtype), v, input_precision=PREC)

        if HAS_UV and VALUE_BINS:  # + (w u) B_v^T
            acc += tl.dot(acc_u.to(dtype), bv_t, input_precision=PREC)
        if FINAL:  # one split: normalise and write (B, T, H*DV) in the output dtype
            if not KIND_SILU and not VALUE_BINS:
                acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            out = o_ptr + b * so_b + offs_t[:, None] * so_t + h * DV + offs_dv[None, :]
            tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=t_ok[:, None] & dv_ok[None, :])
        else:  # partials of this split, merged by _merge_kernel
            out = o_ptr + pid_s * so_s + b * so_b + h * so_h + offs_t[:, None] * so_t + offs_dv[None, :]
            tl.store(out, acc, mask=t_ok[:, None] & dv_ok[None, :])
            row = (b * H + h) * T + offs_t  # (BLOCK_T,)
            tl.store(ml_ptr + pid_s * sml_s + row, m_i, mask=t_ok)
            tl.store(ml_ptr + pid_s * sml_s + sml_l + row, l_i, mask=t_ok)

    @triton.jit
    def _merge_kernel(o_ptr, so_s, ml_ptr, sml_s, sml_l, out_ptr, sout_b, sout_t, S, T, H, DV,
                      KIND_SILU: tl.constexpr, BLOCK_T: tl.constexpr, DV_P: tl.constexpr):
        """Merge S splits' partials (S, B, H, T, DV) (+ max, sum) into the output (B, T, H*DV)."""
        pid_bh, pid_t = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_dv = tl.arange(0, DV_P)
        mask = t_ok[:, None] & (offs_dv < DV)[None, :]
        row = pid_bh.to(tl.int64) * T + offs_t  # (BLOCK_T,) = (b H + h) T + t
        part = o_ptr + row[:, None] * DV + offs_dv[None, :]
        m_i = tl.full((BLOCK_T,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, DV_P), tl.float32)
        for s in range(0, S):
            a = tl.load(part + s * so_s, mask=mask, other=0.0)
            if KIND_SILU:
                acc += a
            else:
                m_s = tl.load(ml_ptr + s * sml_s + row, mask=t_ok, other=-1.0e30)
                l_s = tl.load(ml_ptr + s * sml_s + sml_l + row, mask=t_ok, other=0.0)
                m_new = tl.maximum(m_i, m_s)
                alpha, beta = tl.exp(m_i - m_new), tl.exp(m_s - m_new)
                acc = acc * alpha[:, None] + a * beta[:, None]
                l_i = l_i * alpha + l_s * beta
                m_i = m_new
        if not KIND_SILU:
            acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = out_ptr + b * sout_b + offs_t[:, None] * sout_t + h * DV + offs_dv[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
else:  # pragma: no cover
    _attn_kernel = _merge_kernel = None


# ---------------------------------------------------------------------------------------------- launch


def _pow2(n: int, least: int = 16) -> int:
    """Tile width for n: the next power of two, at least 16 (tl.dot's smallest side)."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def why_not(q: torch.Tensor, k: CompressedStream, v: CompressedStream, valid: torch.Tensor,
            bias: torch.Tensor | None = None) -> str | None:
    """Why the Triton kernel cannot run these inputs (then `compressed_attention_triton` uses the torch path),
    or None when it can."""
    if triton is None:
        return "triton is not installed (pip install 'ckv-cli[gpu]')"
    if q.device.type != "cuda" and not interpreting():
        return f"tensors on {q.device.type}: the kernel needs a CUDA device (or TRITON_INTERPRET=1 for tests)"
    dtypes = {q.dtype, k.pool.dtype, v.pool.dtype}
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"queries and pools must share one of fp16/bf16/fp32, got {sorted(map(str, dtypes))}"
    tensors = [q, k.pool, v.pool, bias, k.user, v.user, k.basis, v.basis]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "autograd: the kernel is inference only"
    if bias is not None and bias.dim() not in (3, 4):
        return f"bias must be (B, T, L) or (B, H, T, L), got {tuple(bias.shape)}"
    for name, s in (("k", k), ("v", v)):
        if s.has_user and s.basis is None:
            return f"{name} has user values but no basis"
    return None


def choose_triton_forms(n_keys: int, pool_k: int, pool_v: int, n_queries: int = 1, d_k: int = 64, d_v: int = 64,
                        kind: str = SOFTMAX, n_users: int = 512, n_heads: int = 1, elem: int = 2) -> tuple[str, str]:
    """(scores form, values form) for the kernel: the pair moving the fewest bytes per (user, head), counted as
    - scores `gather`: ceil(T / BLOCK_T) L d_k elem (K rows gathered once per block of queries);
    - scores `scatter`: T m_k 4 (the fp32 table written by the product) + T L 4 (scalars gathered);
    - values `gather`: ceil(T / BLOCK_T) L d_v elem;
    - values `scatter`: T m_v 12 (fp32 bins zeroed, read, cast) + T L 4 (atomics), and with softmax the scores
      once more (the second pass); the bins (B T H m_v fp32) must fit BINS_BYTES and atomics are off while
      torch.are_deterministic_algorithms_enabled().
    A model of memory traffic, not a measurement: bench/gpu_attention.py times every pair (GPU numbers pending)."""
    T, L = max(n_queries, 1), n_keys
    blocks = math.ceil(T / (16 if T <= 16 else 32 if T <= 32 else 64))
    score = {GATHER: blocks * L * d_k * elem, SCATTER: T * pool_k * 4 + T * L * 4}
    if n_users * n_heads * T * pool_k * 4 > TABLE_BYTES:
        score[SCATTER] = math.inf
    best, pair = math.inf, (GATHER, GATHER)
    for sf in FORMS:
        for vf in FORMS:
            cost = score[sf]
            if vf == GATHER:
                cost += blocks * L * d_v * elem
            elif n_users * n_heads * T * pool_v * 4 > BINS_BYTES or torch.are_deterministic_algorithms_enabled():
                continue
            else:
                cost += T * pool_v * 12 + T * L * 4 + (score[sf] if kind == SOFTMAX else 0)
            if cost < best:
                best, pair = cost, (sf, vf)
    return pair


def _forms(form: str, q: torch.Tensor, k: CompressedStream, v: CompressedStream, kind: str, n_heads: int):
    if form == AUTO:
        (B, T, _), L = q.shape, k.idx.shape[1]
        return choose_triton_forms(L, k.pool.shape[0], v.pool.shape[0], T, k.pool.shape[1] // n_heads,
                                   v.pool.shape[1] // n_heads, kind, B, n_heads, q.element_size())
    pair = tuple(form.split("/")) if "/" in form else (form, form)
    if len(pair) != 2 or any(f not in FORMS for f in pair):
        raise ValueError(f"form must be '{GATHER}', '{SCATTER}', '{AUTO}' or 'scores/values' of those, got {form!r}")
    return pair


def default_config(B: int, T: int, L: int, d_k: int, d_v: int, forms: tuple[str, str], n_heads: int = 1,
                   device: torch.device | str = "cuda", user: bool = False) -> dict:
    """Launch meta-parameters by rule (not tuned on a GPU yet; bench/gpu_attention.py --tune tries others):
    BLOCK_T 16/32/64 by T (tl.dot's least 16), or T's power of two up to 16 where the kernel has no dot
    (`scatter/scatter` without user parts: one query per user then runs 1-row tiles); BLOCK_L so that a gathered
    (BLOCK_L, d) row tile stays near 16 KB (64 / 32 / 16 rows at d <= 64 / 256 / more, 128 without row tiles);
    8 warps for 256-wide tiles or 64 queries; FlashDecoding splits of the history until about PROGRAMS_PER_SM
    programs per multiprocessor (one split with value bins or in the interpreter)."""
    block_t = 16 if T <= 16 else 32 if T <= 32 else 64
    if forms == (SCATTER, SCATTER) and not user and T <= 16:
        block_t = _pow2(T, least=1)
    widest = max(_pow2(d_k) if forms[0] == GATHER else 0, _pow2(d_v) if forms[1] == GATHER else 0)
    block_l = 128 if widest == 0 else 64 if widest <= 64 else 32 if widest <= 256 else 16
    warps = 8 if widest >= 256 or block_t >= 64 else 4
    splits = 1
    if forms[1] == GATHER and torch.device(device).type == "cuda" and not interpreting():
        programs = B * n_heads * math.ceil(T / block_t)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(math.ceil(PROGRAMS_PER_SM * sms / programs), math.ceil(L / (4 * block_l))))
    return {"block_t": block_t, "block_l": block_l, "num_warps": warps, "num_stages": 2, "splits": splits}


def _bias4(bias: torch.Tensor | None, B: int, H: int, T: int, L: int) -> torch.Tensor | None:
    """(B, T, L) or (B, 1 or H, T, L) -> a (B, H, T, L) view (stride 0 where broadcast), never copied."""
    if bias is None:
        return None
    return (bias[:, None] if bias.dim() == 3 else bias).expand(B, H, T, L)


def _user(stream: CompressedStream, like: torch.Tensor):
    """(user (B, L, r), basis (d, r), r) or placeholders when the stream has no user part."""
    if not stream.has_user:
        return like, like, 0
    return stream.user, stream.basis.contiguous(), stream.user.shape[-1]


def _table(qh: torch.Tensor, pool_t: torch.Tensor) -> torch.Tensor:
    """q P_k^T per head (H, B*T, DK) @ (H, DK, m) -> (H, B*T, m) in fp32: fp16 inputs, fp32 output on CUDA (torch's
    out_dtype, cuBLAS), an fp32 product elsewhere (the interpreter); an fp16 table rounds the scores ~1e-3."""
    if qh.device.type == "cuda":
        try:
            return torch.bmm(qh, pool_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without out_dtype: the pool dtype
            return torch.bmm(qh, pool_t)
    return torch.bmm(qh.float(), pool_t.float())


@torch.no_grad()
def _launch(q, k, v, valid, sc, kind, bias, inv_norm, forms, H, cfg, launch=None) -> torch.Tensor:
    """Allocate, run the kernel (and the merge of splits, the bins product), return (B, T, H*DV). `launch(kernel,
    grid, args, kwargs)` replaces the kernel calls (bench/kernel_resources.py compiles what would run)."""
    run = launch or (lambda kernel, grid, args, kwargs: kernel[grid](*args, **kwargs))
    B, T, _ = q.shape
    L = k.idx.shape[1]
    pk, pv = k.pool.contiguous(), v.pool.contiguous()
    DK, DV = pk.shape[1] // H, pv.shape[1] // H
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = q.new_empty(B, T, H * DV)  # (B, T, d_v)
    dev = q.device
    tab = pk  # placeholder pointers where a part is absent (never read)
    if forms[0] == SCATTER:  # the table q P_k^T, one product per head: (H, B*T, m_k), unscaled
        tab = _table(q.view(B * T, H, DK).transpose(0, 1), pk.view(-1, H, DK).permute(1, 2, 0))
    bins = None
    if forms[1] == SCATTER:
        bins = torch.zeros(H, B, T, pv.shape[0], dtype=torch.float32, device=dev)  # (H, B, T, m_v)
    uk, bk, RK = _user(k, pk)
    uv, bv, RV = _user(v, pv)
    bias4 = _bias4(bias, B, H, T, L)  # (B, H, T, L) view or None
    valid8 = valid.view(torch.uint8) if valid.dtype == torch.bool else (valid != 0).view(torch.uint8)
    S = 1 if bins is not None else max(1, int(cfg["splits"]))
    split_len = math.ceil(math.ceil(L / S) / cfg["block_l"]) * cfg["block_l"]
    S = math.ceil(L / split_len)
    part = ml = None
    if S > 1:
        part = torch.empty(S, B, H, T, DV, dtype=torch.float32, device=dev)  # (S, B, H, T, DV)
        ml = torch.empty(S, 2, B * H * T, dtype=torch.float32, device=dev)  # running max, sum
    o = out if S == 1 else part
    o_strides = (0, out.stride(0), 0, out.stride(1)) if S == 1 else part.stride()[:4]
    n_t = math.ceil(T / cfg["block_t"])
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        run(_attn_kernel, (B * H, n_t, S), (
            q, q.stride(0), q.stride(1),
            k.idx, k.idx.stride(0), k.idx.stride(1), pk, pk.stride(0),
            tab, *((tab.stride(0), T * tab.stride(1), tab.stride(1)) if forms[0] == SCATTER else (0, 0, 0)),
            uk, uk.stride(0), uk.stride(1) if RK else 0, bk, bk.stride(0),
            v.idx, v.idx.stride(0), v.idx.stride(1), pv, pv.stride(0),
            uv, uv.stride(0), uv.stride(1) if RV else 0, bv, bv.stride(0),
            valid8, valid8.stride(0), valid8.stride(1),
            *((bias4, *bias4.stride()) if bias4 is not None else (pk, 0, 0, 0, 0)),
            o, *o_strides,
            *((ml, ml.stride(0), ml.stride(1)) if ml is not None else (pk, 0, 0)),
            *((bins, *bins.stride()[:3]) if bins is not None else (pk, 0, 0, 0)),
            T, L, split_len, H, DK, DV, RK, RV, sc, inv_norm), dict(
            KIND_SILU=kind == SILU, SCORE_TABLE=forms[0] == SCATTER, VALUE_BINS=bins is not None,
            HAS_BIAS=bias4 is not None, HAS_UK=RK > 0, HAS_UV=RV > 0, FINAL=S == 1,
            PREC="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_T=cfg["block_t"], BLOCK_L=cfg["block_l"], DK_P=_pow2(DK), DV_P=_pow2(DV), RK_P=_pow2(RK),
            RV_P=_pow2(RV), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        if S > 1:
            run(_merge_kernel, (B * H, n_t), (
                part, part.stride(0), ml, ml.stride(0), ml.stride(1), out, out.stride(0), out.stride(1), S, T, H, DV),
                dict(KIND_SILU=kind == SILU, BLOCK_T=cfg["block_t"], DV_P=_pow2(DV), num_warps=4))
    if bins is not None:  # + bins @ P_v per head (the kernel wrote the user part, or zeros)
        w = bins.view(H, B * T, -1).to(q.dtype)  # (H, B*T, m_v)
        if H == 1:
            flat = out.view(B * T, DV)
            torch.addmm(flat, w[0], pv, out=flat) if RV else torch.mm(w[0], pv, out=flat)
        else:
            vals = torch.bmm(w, pv.view(-1, H, DV).transpose(0, 1))  # (H, B*T, DV)
            out.view(B, T, H, DV).add_(vals.view(H, B, T, DV).permute(1, 2, 0, 3))
    return out


def compressed_attention_triton(q: torch.Tensor, k: CompressedStream, v: CompressedStream, valid: torch.Tensor,
                                scale: float | None = None, kind: str = SOFTMAX, bias: torch.Tensor | None = None,
                                norm: float | None = None, form: str = AUTO, n_heads: int = 1,
                                config: dict | None = None) -> torch.Tensor:
    """`compressed_attention` (same arguments, same result to float tolerance) through the fused Triton kernel;
    the torch path where `why_not` gives a reason. `form`: `gather` (rows gathered in the kernel), `scatter`
    (score table q P_k^T and value bins), `auto` (`choose_triton_forms`) or 'scores/values', e.g.
    'scatter/gather'. `config` overrides `default_config`'s launch parameters (keys block_t, block_l,
    num_warps, num_stages, splits)."""
    d = k.pool.shape[1]
    _check(q, d, n_heads, kind)
    forms = _forms(form, q, k, v, kind, n_heads)
    if why_not(q, k, v, valid, bias) is not None:
        torch_form = form if form in (GATHER, SCATTER) else AUTO
        return compressed_attention(q, k, v, valid, scale, kind, bias, norm, torch_form, n_heads)
    B, T, _ = q.shape
    L = k.idx.shape[1]
    if B == 0 or T == 0 or L == 0:  # nobody, or no cached token: nothing to attend to
        return q.new_zeros(B, T, v.pool.shape[1])
    cfg = default_config(B, T, L, d // n_heads, v.pool.shape[1] // n_heads, forms, n_heads, q.device,
                         k.has_user or v.has_user)
    cfg.update(config or {})
    inv_norm = 1.0 / float(norm if norm is not None else L)
    return _launch(q, k, v, valid, _scale(scale, kind, d // n_heads), kind, bias, inv_norm, forms, n_heads, cfg)
