"""The training memory fix (issue 19 part 3): the chunked sampled dot product, the column pick of the small-catalogue
loss and HSTU's narrow saved indices give the one-shot expressions' values and gradients bit for bit, and keep less
for the backward; the malloc setting is idempotent and trimming the heap returns freed memory."""
from __future__ import annotations

import pytest
import torch

from ckv_cli.memory import release_large_blocks, trim_heap
from ckv_cli.models.hstu import small_table_lookup
from ckv_cli.train.next_item import PickColumns, SampledDot, sampled_softmax_loss
from conftest import make_model


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 64 << 20])  # one user a chunk, a few users, everything at once
def test_sampled_dot_equals_the_one_shot_expression_bit_for_bit(monkeypatch, chunk_bytes):
    monkeypatch.setattr(SampledDot, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    B, L, n, d, N = 7, 11, 13, 16, 40  # few items: many repeated rows, so the table's gradient accumulates
    h0, t0 = torch.randn(B, L, d, generator=g), torch.randn(N, d, generator=g)
    negs = torch.randint(1, N, (B, L, n), generator=g)
    up = torch.randn(B, L, n, generator=g)
    out = {}
    for name, fn in (("ref", lambda h, t: (h[..., None, :] * t[negs]).sum(-1)),
                     ("chunked", lambda h, t: SampledDot.apply(h, t, negs))):
        h, t = h0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        y = fn(h, t)
        (y * up).sum().backward()
        out[name] = (y.detach(), h.grad, t.grad)
    for a, b in zip(out["ref"], out["chunked"]):
        assert torch.equal(a, b)


def test_release_large_blocks_is_idempotent():
    first = release_large_blocks()
    assert release_large_blocks() == first
    x = torch.ones(4 << 20)  # 16 MB: allocated and freed as usual
    assert float(x.sum()) == 4 << 20


def _saved(fn):
    """What autograd keeps for the backward while fn() runs: [(shape, dtype)]."""
    kept = []

    def pack(t):
        kept.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


def test_pick_columns_is_gather_bit_for_bit_and_keeps_only_the_index():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 9, 40, generator=g)
    idx = torch.randint(0, 40, (5, 9, 13), generator=g)  # repeated columns: the gradient accumulates
    up = torch.randn(5, 9, 13, generator=g)
    out = {}
    for name, fn in (("gather", lambda x: x.gather(-1, idx)), ("pick", lambda x: PickColumns.apply(x, idx))):
        x = x0.clone().requires_grad_(True)
        y, kept = _saved(lambda: fn(x))
        (y * up).sum().backward()
        out[name] = (y.detach(), x.grad, kept)
    assert torch.equal(out["gather"][0], out["pick"][0]) and torch.equal(out["gather"][1], out["pick"][1])
    assert (5, 9, 40) in [shape for shape, _ in out["gather"][2]]  # torch's gather keeps its input...
    assert out["pick"][2] == [((5, 9, 13), torch.int64)]  # ...the pick only the index


def test_small_catalogue_loss_keeps_no_full_score_matrix():
    """The loss over a catalogue of N items with n sampled negatives (N + 1 <= 32 n: every item scored once) keeps
    nothing of shape (B, L, N + 1) for the backward."""
    model = make_model("sasrec").train()
    B, L, N = 3, 7, model.config.n_items
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, L, model.config.d, requires_grad=True)
    targets = torch.randint(1, N + 1, (B, L), generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    loss, kept = _saved(lambda: sampled_softmax_loss(model, h, targets, valid, 4, 0.05, g))
    assert N + 1 <= 32 * 4 and torch.isfinite(loss)
    assert not [k for k in kept if k[0][:2] == (B, L) and k[0][-1] == N + 1]
    loss.backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("n", [7, 200, 40000])  # int16 indices, int16 at a larger table, int32 beyond int16
def test_small_table_lookup_keeps_a_narrow_index_with_the_same_gradient(n):
    g = torch.Generator().manual_seed(n)
    w0 = torch.randn(n)
    idx = torch.randint(0, n, (4, 6, 5), generator=g)
    up = torch.randn(4, 6, 5, generator=g)
    w = w0.clone().requires_grad_(True)
    out, kept = _saved(lambda: small_table_lookup(w, idx))
    (out * up).sum().backward()
    expected = torch.bincount(idx.reshape(-1), weights=up.reshape(-1), minlength=n)  # the int64 index's histogram
    assert torch.equal(out, w0[idx]) and torch.equal(w.grad, expected)
    assert [dtype for _, dtype in kept] == [torch.int16 if n <= 1 << 15 else torch.int32]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_trim_heap_returns_freed_heap_memory():
    """Blocks under the mmap threshold come from the heap and stay resident when freed; a trim returns them."""
    if not release_large_blocks():
        pytest.skip("glibc's malloc settings only apply on Linux with glibc")
    kept = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MB, each under the 8 MB threshold: heap memory
    pin = torch.ones(1 << 18)  # allocated last, kept: the freed blocks sit below it, not at the heap's top
    del kept
    before = _rss_mb()
    assert trim_heap()
    assert before - _rss_mb() > 100  # most of the 200 MB freed goes back
    assert float(pin.sum()) == 1 << 18
