"""HSTU's first-layer K/V from tables (`HSTU.first_layer_tables`, `ckv_cli.serve.next_item.tabled_kv`) and the
threads helper (`ckv_cli.threads`)."""
from __future__ import annotations

import os

import pytest
import torch

from ckv_cli.errors import CkvError
from ckv_cli.models.base import item_layer_kv
from ckv_cli.serve import next_item
from ckv_cli.serve.next_item import CompressedCache, first_layer_streams, replay_hidden, tabled_kv, token_rows
from conftest import N_ITEMS, make_model

GR_HSTU = {"ln_affine": False, "ln_eps": 1e-6, "uvqk_bias": False, "attn_norm": 43, "rel_pos": "toeplitz",
           "time_bucket": "log_clamp1", "n_positions": 43, "emb_scale": False}


@pytest.mark.parametrize("over", [{}, GR_HSTU], ids=["ckv", "gr-layout"])
def test_hstu_first_layer_from_tables_matches_the_layer(over, monkeypatch):
    model = make_model("hstu", **over)
    with torch.no_grad():  # LayerNorm and bias away from their init values, so that every term matters
        if model.layers[0].ln_in.weight is not None:
            model.layers[0].ln_in.weight.normal_(1.0, 0.3)
            model.layers[0].ln_in.bias.normal_(0.0, 0.3)
        if model.layers[0].f1.bias is not None:
            model.layers[0].f1.bias.normal_(0.0, 0.3)
    tables = model.first_layer_tables()
    assert tables["form"] == "kv"
    g = torch.Generator().manual_seed(0)
    B, L = 6, model.config.max_len + 4  # positions past the window clamp, as `embed` does
    items = torch.randint(0, N_ITEMS + 1, (B, L), generator=g)
    pos = torch.arange(L)[None].expand(B, L)
    with torch.no_grad():
        k_ref, v_ref = item_layer_kv(model, items, pos)
    k, v = tabled_kv(tables, items, pos)  # flat: (B L, d_k), (B L, d_v)
    assert k.shape == (B * L, k_ref.shape[-1]) and v.shape == (B * L, v_ref.shape[-1])
    k, v = k.view(k_ref.shape), v.view(v_ref.shape)
    assert torch.allclose(k, k_ref, atol=1e-5, rtol=1e-4) and torch.allclose(v, v_ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(k, v[..., : k.shape[-1]])  # K and V rows are not mixed up
    # into kept buffers (a server's, from batch to batch), a few tokens per embedding_bag call: the same values
    # in the first N rows, the rows past them left as they were
    valid = torch.rand(B, L, generator=g) < 0.6
    monkeypatch.setattr(next_item, "_BAG_CHUNK", 7)
    d_k, d_v = model.kv_dims
    n = int(valid.sum())
    kb, vb = torch.full((n + 5, d_k), 3.0), torch.full((n + 5, d_v), -2.0)
    kk, vv = tabled_kv(tables, items[valid], pos[valid], out=(kb, vb))
    assert kk.shape == (n, d_k) and kk.data_ptr() == kb.data_ptr() and vv.data_ptr() == vb.data_ptr()
    assert torch.equal(kk, k[valid]) and torch.equal(vv, v[valid])
    assert (kb[n:] == 3.0).all() and (vb[n:] == -2.0).all()
    # as streams over the real tokens' rows: each slot reads its own token's row; padding slots read a real row
    ks, vs = first_layer_streams(tables, items, valid)
    assert ks.pool.shape == (n, d_k) and torch.equal(ks.idx, vs.idx) and int(ks.idx.max()) == n - 1
    assert torch.equal(ks.decode()[valid], k[valid]) and torch.equal(vs.decode()[valid], v[valid])


def test_token_rows():
    valid = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, False]])
    assert token_rows(valid).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [2, 3, 4, 4]]
    assert token_rows(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [[0] * 3] * 2


def test_sasrec_tables_are_a_fold_not_kv():
    assert make_model("sasrec").first_layer_tables().get("form", "fold") == "fold"


def test_compressed_replay_through_hstu_tables_equals_the_layer():
    """`extend_compressed` with the first layer from the tables gives the hidden state it gives with the layer
    recomputing K/V from item ids (deeper layers dense)."""
    model = make_model("hstu")
    g = torch.Generator().manual_seed(3)
    B, L = 5, 20
    items = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (B, L), generator=g), dim=1)
    lengths = torch.tensor([20, 7, 1, 13, 2])
    with torch.no_grad():
        cache, _ = model.prefill(items, ts, lengths)
    cc = CompressedCache([None] + list(cache.keys[1:]), [None] + list(cache.values[1:]), cache.lengths,
                         cache.items, cache.timestamps)
    with_tables = replay_hidden(model, cc, model.first_layer_tables())
    without = replay_hidden(model, cc, None)
    assert torch.allclose(with_tables, without, atol=1e-5, rtol=1e-4)


def test_set_threads(monkeypatch):
    from ckv_cli.threads import available_cores, default_threads, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert default_threads() == available_cores() == len(os.sched_getaffinity(0))
        assert set_threads(None) == available_cores() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1 == torch.get_num_threads()
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(CkvError, match="threads must be an integer of at least 1"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_every_computing_command_has_threads():
    """--threads on compress, evaluate (and its --sweep), inspect and train; `import` converts tensors only."""
    from typer.main import get_command

    from ckv_cli.cli.app import app

    cli = get_command(app)
    for name in ("compress", "evaluate", "inspect", "train"):
        opt = next(p for p in cli.commands[name].params if p.name == "threads")
        assert opt.default is None and "every core" in opt.help
