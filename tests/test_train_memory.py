"""The training memory fix (issue 19 part 3): the chunked sampled dot product gives the one-shot expression's
values and gradients bit for bit; the malloc setting is idempotent."""
from __future__ import annotations

import pytest
import torch

from ckv_cli.memory import release_large_blocks
from ckv_cli.train.next_item import SampledDot


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
