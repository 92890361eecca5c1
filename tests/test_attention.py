"""Compressed-domain attention (CollectiveKV, arXiv 2601.19178) equals decode-then-attend to float tolerance."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.codecs import CollectiveCodec
from ckv_cli.serve import attention
from ckv_cli.serve.attention import (GATHER, SCATTER, SCORES, SILU, SOFTMAX, CompressedStream, choose_form,
                                  compressed_attention, decode_then_attend, full_attention, stream_from_codec)

REL = 1e-5  # float32: max |compressed - reference| <= REL * max |reference|
LENGTHS = [20, 7, 0, 13]  # ragged, one user with no cached token
D = 16


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def valid_mask(lengths) -> torch.Tensor:
    L = max(lengths)
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def random_stream(gen, m: int, r: int, lengths, d: int = D) -> CompressedStream:
    """Padding positions hold random (valid) indices and random user values: the mask alone must hide them."""
    B, L = len(lengths), max(lengths)
    pool = torch.randn(m, d, generator=gen)
    idx = torch.randint(0, m, (B, L), generator=gen)
    if not r:
        return CompressedStream(pool, idx)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q  # (d, r)
    return CompressedStream(pool, idx, torch.randn(B, L, r, generator=gen), basis)


@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
@pytest.mark.parametrize("form", [GATHER, SCATTER, "auto"])
@pytest.mark.parametrize("r", [0, 3])
@pytest.mark.parametrize("m", [8, 64])  # pool smaller and larger than the history (L = 20)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("n_heads", [1, 2])
def test_compressed_equals_decode_then_attend(kind, form, r, m, T, n_heads):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, form, r, m, T, n_heads)).encode()))
    k, v = random_stream(gen, m, r, LENGTHS), random_stream(gen, m, r, LENGTHS)
    valid = valid_mask(LENGTHS)
    q = torch.randn(len(LENGTHS), T, D, generator=gen)
    bias = torch.randn(len(LENGTHS), T, max(LENGTHS), generator=gen)
    for b in (None, bias):
        kw = dict(kind=kind, bias=b, n_heads=n_heads, norm=32.0 if kind == SILU else None)
        out = compressed_attention(q, k, v, valid, form=form, **kw)
        ref = decode_then_attend(q, k, v, valid, **kw)
        assert out.shape == (len(LENGTHS), T, D)
        assert rel_err(out, ref) <= REL
        assert out[2].abs().max() == 0  # the user with no cached token attends to nothing


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("sampled", [True, False])
def test_gather_form_variants(monkeypatch, T, sampled):
    """Scores by sampled dot products or by gathered rows in chunks of one user; values by bags or rows; users
    split over several calls."""
    monkeypatch.setattr(attention, "ROW_CHUNK_BYTES", 1)  # every user its own chunk of rows
    monkeypatch.setattr(attention, "ATTN_CHUNK_BYTES", 2 * 2 * T * 40 * 4)  # 2 users per call: 2 heads, pool 40
    monkeypatch.setattr(attention, "_sampled", lambda device, T, L, m, dtype=None: sampled)
    gen = torch.Generator().manual_seed(11)
    k, v = random_stream(gen, 40, 2, LENGTHS), random_stream(gen, 40, 2, LENGTHS)
    valid = valid_mask(LENGTHS)
    q = torch.randn(len(LENGTHS), T, D, generator=gen)
    bias = torch.randn(len(LENGTHS), T, max(LENGTHS), generator=gen)
    for kind in (SOFTMAX, SILU):
        ref = decode_then_attend(q, k, v, valid, kind=kind, n_heads=2, bias=bias)
        for form in (GATHER, SCATTER):
            out = compressed_attention(q, k, v, valid, kind=kind, form=form, n_heads=2, bias=bias)
            assert rel_err(out, ref) <= REL


@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
def test_int32_indices_and_per_head_bias(kind):
    gen = torch.Generator().manual_seed(7)
    k, v = random_stream(gen, 12, 2, LENGTHS), random_stream(gen, 12, 2, LENGTHS)
    valid = valid_mask(LENGTHS)
    q = torch.randn(len(LENGTHS), 1, D, generator=gen)
    bias = torch.randn(len(LENGTHS), 2, 1, max(LENGTHS), generator=gen)  # (B, H, T, L)
    ref = decode_then_attend(q, k, v, valid, kind=kind, bias=bias, n_heads=2)
    k32 = CompressedStream(k.pool, k.idx.int(), k.user, k.basis)
    v32 = CompressedStream(v.pool, v.idx.int(), v.user, v.basis)
    for form in (GATHER, SCATTER):
        assert rel_err(compressed_attention(q, k32, v32, valid, kind=kind, bias=bias, n_heads=2, form=form), ref) <= REL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", [GATHER, SCATTER])
def test_half_types_on_a_cpu(dtype, form):
    """CPU sampled dot products take no half types: the gather form falls back to gathered rows there."""
    gen = torch.Generator().manual_seed(3)
    k, v = random_stream(gen, 64, 0, LENGTHS), random_stream(gen, 64, 0, LENGTHS)
    q, valid = torch.randn(len(LENGTHS), 1, D, generator=gen), valid_mask(LENGTHS)
    ref = compressed_attention(q, k, v, valid, form=form)
    half = [CompressedStream(s.pool.to(dtype), s.idx) for s in (k, v)]
    out = compressed_attention(q.to(dtype), *half, valid, form=form)
    assert out.dtype == dtype and rel_err(out.float(), ref) <= 2e-2


def test_weights_keep_the_graph():
    """Softmax weights are differentiable: a fully masked row's NaNs are replaced out of place."""
    s = torch.randn(1, 2, 1, 5, requires_grad=True)
    valid = torch.tensor([[True, True, False, False, False], [False] * 5])
    w = attention.attention_weights(s, valid, SOFTMAX, None)
    (w * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(s.grad).all() and w[0, 1].abs().max() == 0


def test_choose_form_rule():
    assert choose_form(1000, 1024) == SCATTER  # long history, small pool
    assert choose_form(50, 10000) == GATHER  # short history, big pool
    assert choose_form(1000, 1700) == SCATTER and choose_form(1000, 1800) == GATHER  # values: m ~ BAG_COST L
    assert choose_form(1000, 3400, side=SCORES) == SCATTER  # scores, one query: up to m ~ SDDMM_COST L
    assert choose_form(1000, 3600, side=SCORES) == GATHER
    assert choose_form(1000, 3600, side=SCORES, device="cuda") == SCATTER  # no sampled dot products off CPU
    assert choose_form(1000, 800, n_queries=100) == SCATTER
    assert choose_form(1000, 1024, n_queries=100, side=SCORES) == GATHER  # 100 queries share the gathered rows
    assert choose_form(4000, 10000, side=SCORES) == SCATTER
    assert choose_form(4000, 10000, side=SCORES, n_users=1) == GATHER  # one user does not amortise reading the pool
    assert choose_form(4000, 1024, side=SCORES, n_users=1) == SCATTER


@pytest.mark.parametrize("lengths", [[0, 0], []])
def test_nothing_to_attend(lengths):
    gen = torch.Generator().manual_seed(5)
    B = len(lengths)
    k = CompressedStream(torch.randn(8, D, generator=gen), torch.zeros(B, 0, dtype=torch.long))
    q = torch.randn(B, 2, D, generator=gen)
    for form in (GATHER, SCATTER, "auto"):
        out = compressed_attention(q, k, k, torch.zeros(B, 0, dtype=torch.bool), form=form)
        assert out.shape == (B, 2, D) and not out.any()


def test_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    k = random_stream(gen, 8, 0, [4])
    valid = valid_mask([4])
    with pytest.raises(ValueError, match="queries"):
        compressed_attention(torch.randn(1, 1, D + 1), k, k, valid)
    with pytest.raises(ValueError, match="heads"):
        compressed_attention(torch.randn(1, 1, D), k, k, valid, n_heads=3)
    with pytest.raises(ValueError, match="kind"):
        compressed_attention(torch.randn(1, 1, D), k, k, valid, kind="relu")
    with pytest.raises(ValueError, match="form"):
        compressed_attention(torch.randn(1, 1, D), k, k, valid, form="both")


# ---------------------------------------------------------------- a real fitted codec


def padded(flat: torch.Tensor, lengths) -> torch.Tensor:
    out = torch.zeros(len(lengths), max(lengths), flat.shape[1])
    out[valid_mask(lengths)] = flat
    return out  # (B, L, d)


@pytest.mark.parametrize("layout,user_dim,user_dtype", [("residual", 0, "int8"), ("residual", 2, "int8"),
                                                         ("residual", 2, "fp16"), ("concat", 0, "int8"),
                                                         ("concat", 3, "int8")])
@pytest.mark.parametrize("kind", [SOFTMAX, SILU])
def test_fitted_collective_codec(layout, user_dim, user_dtype, kind):
    torch.manual_seed(0)
    calib = torch.randn(600, D)
    codecs = {}
    for name in ("k", "v"):
        codec = CollectiveCodec(d=D, pool_size=32, user_dim=user_dim, layout=layout, user_dtype=user_dtype, iters=5)
        codec.fit(calib + (0.5 if name == "v" else 0.0), seed=1)
        codecs[name] = codec
    lengths = [30, 11, 1, 25]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = {name: torch.randn(int(offsets[-1]), D) for name in codecs}  # tokens of 4 users, flat
    fields = {name: codecs[name].encode(x[name], offsets) for name in codecs}
    (k, valid), (v, _) = (stream_from_codec(codecs[n], fields[n], offsets) for n in ("k", "v"))
    K = padded(codecs["k"].decode(fields["k"], offsets), lengths)  # codec.decode, then the standard path
    V = padded(codecs["v"].decode(fields["v"], offsets), lengths)
    q = torch.randn(len(lengths), 2, D)
    ref = full_attention(q, K, V, valid, kind=kind, n_heads=2)
    for form in (GATHER, SCATTER):
        assert rel_err(compressed_attention(q, k, v, valid, kind=kind, form=form, n_heads=2), ref) <= REL


# ---------------------------------------------------------------- the models' own attention


def test_matches_hstu_and_sasrec_layers():
    """HSTU's `attend` (silu, scale 1, / max_len, relative bias) and SASRec's (SDPA) on decoded caches."""
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 4, 12]
    valid = valid_mask(lengths)
    B, L = len(lengths), max(lengths)
    q_pos = torch.tensor(lengths)[:, None]  # one new event per user, after its cache
    k_pos = torch.arange(L)[None].expand(B, L)
    k_ts = torch.cumsum(torch.randint(0, 10_000, (B, L), generator=gen), 1)
    q_ts = k_ts.max(1, keepdim=True).values + 50
    for arch in ("hstu", "sasrec"):
        layer = make_model(arch).layers[1]
        k, v = random_stream(gen, 16, 2, lengths, layer.d_k), random_stream(gen, 16, 2, lengths, layer.d_v)
        q = torch.randn(B, 1, layer.d_k, generator=gen)
        with torch.no_grad():
            ref = layer.attend(q, k.decode(), v.decode(), valid[:, None, :], q_pos, k_pos, q_ts, k_ts)
            if arch == "hstu":
                bias = layer.bias(q_pos, k_pos, q_ts, k_ts)  # (B, 1, L)
                out = compressed_attention(q, k, v, valid, scale=1.0, kind=SILU, bias=bias, norm=layer.max_len,
                                           n_heads=layer.h)
            else:
                out = compressed_attention(q, k, v, valid, n_heads=layer.h)
        assert rel_err(out, ref) <= REL
