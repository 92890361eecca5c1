"""Importers (issue 16): safe reading, exact equality with RecBole's and generative-recommenders' own forward on
committed fixtures (scripts/fixtures/*.py made them with the frameworks themselves), the model variants the
importers configure, next-event query time served exactly through prefill + extend, and bad input."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.data.batching import pad_right
from ckv_cli.errors import CkvError
from ckv_cli.importers import import_checkpoint
from ckv_cli.importers.gr import parse_gin
from ckv_cli.importers.safe_pickle import Inert, load_torch_zip
from ckv_cli.models.base import item_layer_kv, last_hidden
from ckv_cli.models.checkpoint import load_checkpoint

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = 1e-5


# ------------------------------------------------------------------------------ equality with the frameworks


def _batch(seqs, max_len):
    items, lengths = pad_right([np.asarray(s) for s in seqs], max_len)
    return items, lengths


def _three_ways(model, items, ts, lengths, query=None, prefix_query=None):
    """Scores after prefill of the whole history, after prefill of all but the last event, and after that
    prefill extended by the last event (the serving path)."""
    B = len(lengths)
    rows = torch.arange(B)
    with torch.no_grad():
        _, h = model.prefill(items, ts, lengths, query_ts=query)
        full = model.score_all(last_hidden(h, lengths))
        p_items, p_ts = items.clone(), ts.clone()
        p_items[rows, lengths - 1] = 0
        p_ts[rows, lengths - 1] = 0
        cache, h = model.prefill(p_items, p_ts, lengths - 1, query_ts=prefix_query)
        prefix = model.score_all(last_hidden(h, lengths - 1))
        last_i, last_t = items[rows, lengths - 1][:, None], ts[rows, lengths - 1][:, None]
        _, h = model.extend(cache, last_i, last_t, query_ts=query)
        extended = model.score_all(h[:, 0])
    return full[:, 1:], prefix[:, 1:], extended[:, 1:]


def _gap(a, b) -> float:
    return float((a - torch.as_tensor(b)[:, 1:]).abs().max())


@pytest.fixture(scope="module")
def recbole_fixture():
    hist = json.loads((FIX / "recbole" / "histories.json").read_text())
    return hist, np.load(FIX / "recbole" / "scores.npz")


def test_recbole_sasrec_equals_recbole(recbole_fixture):
    hist, scores = recbole_fixture
    imp = import_checkpoint("recbole", FIX / "recbole" / "sasrec.pth", item_vocab=str(FIX / "recbole" / "item_vocab.json"))
    model, lookup = imp.model, {v: i for i, v in enumerate(imp.item_vocab)}
    items, lengths = _batch([[lookup[x] for x in h] for h in hist["histories"]], model.config.max_len)
    full, prefix, extended = _three_ways(model, items, torch.zeros_like(items), lengths)
    assert _gap(full, scores["full"]) < TOL
    assert _gap(prefix, scores["prefix"]) < TOL
    assert _gap(extended, scores["full"]) < TOL
    cfg = model.config
    assert (cfg.block, cfg.emb_ln, cfg.emb_scale, cfg.score, cfg.ln_eps) == ("post_ln", True, False, "dot", 1e-12)


def test_recbole_vocab_rebuilt_from_the_log_equals_recboles():
    """RecBole's numbering (factorised .inter, file order) rebuilt from ml-100k and the checkpoint's config."""
    imp = import_checkpoint("recbole", FIX / "recbole" / "sasrec.pth", data="ml-100k")
    want = json.loads((FIX / "recbole" / "item_vocab.json").read_text())
    assert imp.item_vocab[1:] == want[1:] and imp.dataset == "ml-100k" and imp.fingerprint


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_gr_equals_generative_recommenders(kind):
    cases = json.loads((FIX / "gr" / "histories.json").read_text())["cases"]
    scores = np.load(FIX / "gr" / f"{kind}_scores.npz")
    imp = import_checkpoint("gr", FIX / "gr" / f"{kind}.pt", gin=str(FIX / "gr" / f"{kind}.gin"))
    model = imp.model
    items, lengths = _batch([c["items"] for c in cases], model.config.max_len)
    ts, _ = _batch([c["timestamps"] for c in cases], model.config.max_len)
    target = torch.tensor([c["target_ts"] for c in cases])
    last_ts = ts[torch.arange(len(lengths)), lengths - 1]
    full, prefix, extended = _three_ways(model, items, ts, lengths, query=target, prefix_query=last_ts)
    assert _gap(full, scores["full"]) < TOL
    assert _gap(prefix, scores["prefix"]) < TOL
    assert _gap(extended, scores["full"]) < TOL
    if kind == "hstu":  # the next event's time matters: each event's own time on the same weights is far off
        assert model.provisional_tokens == 1
        model.config.query_time = "own"
        own, _, _ = _three_ways(model, items, ts, lengths)
        model.config.query_time = "next"
        assert _gap(own, scores["full"]) > 1e-3


def test_imported_checkpoint_round_trips(tmp_path):
    out = tmp_path / "gr.safetensors"
    import_checkpoint("gr", FIX / "gr" / "hstu.pt", out, gin=str(FIX / "gr" / "hstu.gin"))
    model, meta = load_checkpoint(out)
    src = meta["source"]
    assert src["framework"] == "generative-recommenders" and len(src["sha256"]) == 64 and src["model"] == "HSTU"
    assert model.config.query_time == "next" and model.config.rel_pos == "toeplitz"
    assert meta["item_vocab"][:3] == ["<pad>", "1", "2"]


# ------------------------------------------------------------------------------ safe reading


def _torch_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


class _Run:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _evil_payloads(marker: Path) -> list[bytes]:
    import builtins
    import os
    import subprocess

    cmd = f"touch {marker}"
    return [
        pickle.dumps(_Run(os.system, cmd), protocol=4),
        pickle.dumps({"config": _Run(os.system, cmd), "state_dict": {}}, protocol=2),
        pickle.dumps(_Run(builtins.exec, f"open({str(marker)!r}, 'w').close()"), protocol=4),
        pickle.dumps(_Run(subprocess.call, ["touch", str(marker)]), protocol=4),
        pickle.dumps({"config": _Run(builtins.eval, f"open({str(marker)!r}, 'w')"),
                      "state_dict": _Run(os.system, cmd)}, protocol=4),
    ]


def test_crafted_pickle_runs_nothing_and_fails_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    for n, payload in enumerate(_evil_payloads(marker)):
        evil = tmp_path / f"evil{n}.pth"
        _torch_zip(evil, payload)
        obj = load_torch_zip(evil)  # the reader walks it: every global is an inert stand-in
        assert not marker.exists()
        with pytest.raises(CkvError) as e:
            import_checkpoint("recbole", evil, tmp_path / "out.safetensors", item_vocab=str(FIX / "recbole" / "item_vocab.json"))
        assert "\n" not in str(e.value) and "not a RecBole checkpoint" in str(e.value)
        assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
        assert isinstance(obj, (Inert, dict))


def test_crafted_pickle_through_the_cli(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    _torch_zip(evil, _evil_payloads(marker)[0])
    for args in (["recbole", str(evil), "--data", "ml-100k"], ["gr", str(evil), "--gin", str(FIX / "gr" / "hstu.gin")]):
        proc = subprocess.run([sys.executable, "-m", "ckv_cli.cli", "import", *args, "-o", str(tmp_path / "o.safetensors")],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("ckv: error: "), proc.stderr
        assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_safe_reader_bounds_and_checks(tmp_path):
    good = FIX / "recbole" / "sasrec.pth"
    with pytest.raises(CkvError, match="bytes of tensors"):
        load_torch_zip(good, max_bytes=1000)
    with pytest.raises(CkvError, match="its pickle is"):
        load_torch_zip(good, max_pickle_bytes=100)
    # a storage shorter than its tensor claims
    buf = io.BytesIO()
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as w:
        for info in z.infolist():
            data = z.read(info)
            w.writestr(info.filename, data[:-4] if info.filename.endswith("/data/0") else data)
    (tmp_path / "cut.pth").write_bytes(buf.getvalue())
    with pytest.raises(CkvError, match="storage 0"):
        load_torch_zip(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CkvError, match="not a torch.save zip"):
        load_torch_zip(tmp_path / "text.pth")


# ------------------------------------------------------------------------------ variants and next-event time


VARIANTS = [
    ("sasrec", {}),
    ("sasrec", {"block": "post_ln", "emb_ln": True, "emb_scale": False, "final_ln": False, "score": "dot",
                "ffn_dim": 24, "ffn_act": "relu", "ln_eps": 1e-12}),
    ("sasrec", {"block": "query_ln", "ln_affine": False, "ln_eps": 1e-8, "final_ln": False, "n_positions": 40}),
    ("hstu", {}),
    ("hstu", {"ln_affine": False, "ln_eps": 1e-6, "uvqk_bias": False, "attn_norm": 43, "rel_pos": "toeplitz",
              "time_bucket": "log_clamp1", "query_time": "next", "n_positions": 43}),
]


def _variant(arch, over, seed=0):
    model = make_model(arch, seed, **over)
    if arch == "hstu" and over.get("rel_pos") == "toeplitz":
        with torch.no_grad():
            for layer in model.layers:
                layer.bias.pos.normal_(0.0, 0.5)
    return model


def _history(B=5, L=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 51, (B, L), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (B, L), generator=g), dim=1)
    lengths = torch.tensor([L, L - 3, 7, 1, L - 10])[:B]
    return items, ts, lengths


@pytest.mark.parametrize("arch,over", VARIANTS, ids=lambda v: str(v) if isinstance(v, str) else "-".join(v) or "default")
def test_prefill_then_extends_equal_one_prefill(arch, over):
    """Chunks of new events through extend (the provisional newest token re-opened each time for next-event
    time) give the hidden states and caches of one prefill of everything."""
    model = _variant(arch, over)
    items, ts, lengths = _history()
    query = ts.max(1).values + 100
    with torch.no_grad():
        ref_cache, ref_h = model.prefill(items, ts, lengths, query_ts=query)
        cache = model.empty_cache(len(lengths))
        hs, done = [], torch.zeros_like(lengths)
        for chunk in (4, 1, 9, 16):
            take = (lengths - done).clamp(min=0, max=chunk)
            idx = (done[:, None] + torch.arange(chunk)[None]).clamp(max=items.shape[1] - 1)
            cache, h = model.extend(cache, items.gather(1, idx), ts.gather(1, idx), take, query_ts=query)
            hs.append((h, take))
            done = done + take
        assert torch.equal(done, lengths)
        final = torch.zeros(len(lengths), model.config.d)
        for h, take in hs:
            for b in range(len(lengths)):
                if take[b] > 0:
                    final[b] = h[b, take[b] - 1]
        assert torch.allclose(final, last_hidden(ref_h, lengths), atol=1e-5)
        for i in range(len(model.layers)):
            m = ref_cache.length_mask()
            assert torch.allclose(cache.keys[i][m], ref_cache.keys[i][m], atol=1e-5)
        k0, v0 = item_layer_kv(model, cache.items, torch.arange(cache.items.shape[1])[None].expand_as(cache.items))
        assert model.first_layer_item_function()
        assert torch.allclose(k0[m], cache.keys[0][m], atol=1e-5) and torch.allclose(v0[m], cache.values[0][m], atol=1e-5)


def test_next_event_time_window_slide_is_exact():
    """Extending past the window re-prefills it; with next-event time the result still equals a prefill of the
    window (request time carried)."""
    arch, over = VARIANTS[-1]
    model = _variant(arch, over)
    items, ts, lengths = _history(B=3, L=30)
    lengths = torch.tensor([30, 30, 30])
    W = model.config.max_len  # 32
    more_i, more_t = torch.randint(1, 51, (3, 5)), ts[:, -1:] + torch.arange(1, 6)[None] * 77
    query = more_t[:, -1] + 10
    with torch.no_grad():
        cache, _ = model.prefill(items, ts, lengths)
        _, h = model.extend(cache, more_i, more_t, query_ts=query)
        all_i, all_t = torch.cat([items, more_i], 1)[:, -W:], torch.cat([ts, more_t], 1)[:, -W:]
        _, ref = model.prefill(all_i, all_t, torch.full((3,), W), query_ts=query)
    assert torch.allclose(h[:, -1], ref[:, -1], atol=1e-5)


def test_compress_protocol_exact_for_next_event_time(tmp_path):
    """iter_test_caches + scores_after_last_event (what compress scores through) equal evaluate's prefill with
    the target's time as the request time."""
    from ckv_cli.data.readers import read_log
    from ckv_cli.data.sequences import build
    from ckv_cli.tasks.next_item import iter_test_caches, rank_targets, scores_after_last_event, target_ranks

    arch, over = VARIANTS[-1]
    model = _variant(arch, over)
    rng = np.random.default_rng(0)
    rows = ["user,item,timestamp"] + [f"u{u},i{rng.integers(1, 51)},{1000 + 37 * t + int(rng.integers(0, 30))}"
                                      for u in range(12) for t in range(int(rng.integers(4, 40)))]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    ds = build(read_log(tmp_path / "log.csv"), "log", item_vocab=["<pad>"] + [f"i{k}" for k in range(1, 51)])
    ranks = rank_targets(model, ds, "test")
    got = []
    for b in iter_test_caches(model, ds, range(ds.n_users), 5):
        got.append(target_ranks(scores_after_last_event(model, b.cache, b), b.targets))
    assert np.array_equal(np.concatenate(got), ranks)


def test_store_item_tables_for_the_recbole_layout(tmp_path):
    """CacheStore's compressed-domain first layer (`ItemLayer`) on a post-LN model with an embedding LayerNorm
    and raw dot scores ranks as the decoded path does."""
    from ckv_cli.data import load
    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
    from ckv_cli.serve.next_item import CacheStore

    model = _variant(*VARIANTS[1])
    vocab = ["<pad>"] + [f"i{k}" for k in range(1, 51)]
    save_checkpoint(model, tmp_path / "m.safetensors", dataset="log", fingerprint="0" * 16, item_vocab=vocab,
                    metrics={}, train={})
    rng = np.random.default_rng(1)
    rows = ["user,item,timestamp"] + [f"u{u},i{rng.integers(1, 51)},{100 + t}" for u in range(30) for t in range(int(rng.integers(4, 20)))]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    model, meta = load_checkpoint(tmp_path / "m.safetensors")
    ds = load(str(tmp_path / "log.csv"), item_vocab=meta["item_vocab"])
    opts = CompressOptions(params={"pool_size": 16, "user_dim": 2, "layout": "residual"}, calib_users=30)
    compress_to_artifact(model, meta, tmp_path / "m.safetensors", ds, opts, tmp_path / "a.safetensors")
    with CacheStore.open(tmp_path / "a.safetensors", tmp_path / "m.safetensors") as store:
        assert store._tables() is not None  # the item-table path is taken for this layout
        users = [str(u) for u in ds.user_ids[:10]]
        a = store.rank_next(users, k=5, attention="compressed")
        b = store.rank_next(users, k=5, attention="decoded")
    assert np.allclose(a.scores, b.scores, atol=1e-4)


# ------------------------------------------------------------------------------ parsing and bad input


def test_gin_parser_reads_literals_and_never_evaluates():
    b = parse_gin('a.x = 3\nb.y = 1e-3  # c\nc.z = "HSTU"\nd.w = True\ne.v = __import__("os").system("x")\n'
                  "f.u = %MACRO\n# g.t = 5\n")
    assert b["a.x"] == 3 and b["b.y"] == 0.001 and b["c.z"] == "HSTU" and b["d.w"] is True and "g.t" not in b
    assert type(b["e.v"]).__name__ == "_Unparsed" and type(b["f.u"]).__name__ == "_Unparsed"


@pytest.mark.parametrize("framework,kw,match", [
    ("tensorflow", {}, "unknown framework 'tensorflow'"),
    ("recbole", {}, "needs --data LOG"),
    ("gr", {}, "needs the run's --gin FILE"),
    ("gr", {"binds": ["train_fn.main_module=\"HSTU\"", "hstu_encoder.num_blocks=3"]}, "num_blocks says 3, the weights have 2 layers"),
    ("gr", {"binds": ["train_fn.main_module=\"HSTU\"", "train_fn.item_l2_norm=True", "train_fn.user_embedding_norm=\"l2_norm\"",
                      "train_fn.interaction_module_type=\"MoL\""]}, "interaction_module_type = 'MoL' cannot be represented"),
    ("gr", {"binds": ["train_fn.main_module=\"HSTU\"", "train_fn.temperature=0"]}, "temperature = 0 is not a positive number"),
    ("gr", {"binds": ["train_fn.main_module=\"HSTU\"", "train_fn.temperature=\"x\""]}, "temperature = 'x' is not a positive"),
    ("gr", {"binds": ["train_fn.main_module=\"HSTU\"", "hstu_encoder.num_blocks=\"2\""]}, "num_blocks = '2' is not a valid size"),
])
def test_bad_input_is_one_line(tmp_path, framework, kw, match):
    src = FIX / ("gr/hstu.pt" if framework == "gr" else "recbole/sasrec.pth")
    if framework == "gr" and "binds" in kw and "MoL" not in str(kw):
        kw = {**kw, "binds": kw["binds"] + ["train_fn.item_l2_norm=True", "train_fn.interaction_module_type=\"DotProduct\"",
                                            "train_fn.item_embedding_dim=8", "train_fn.max_sequence_length=20",
                                            "hstu_encoder.num_heads=2", "hstu_encoder.dqk=4", "hstu_encoder.dv=4"]}
    with pytest.raises(CkvError, match=match) as e:
        import_checkpoint(framework, src, tmp_path / "o.safetensors", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "o.safetensors").exists()


def test_import_command_writes_like_every_command(tmp_path):
    """`ckv import` through main's writer: an existing output replaced with --force (refused without it: the
    error cases), --json, and `ckv inspect` showing the source."""
    from typer.testing import CliRunner

    from ckv_cli.cli import app

    out = tmp_path / "hstu.safetensors"
    out.write_text("old")
    args = ["import", "gr", str(FIX / "gr" / "hstu.pt"), "--gin", str(FIX / "gr" / "hstu.gin"), "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--force", "--json", str(tmp_path / "import.json")])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {out}: hstu from generative-recommenders HSTU")
    report = json.loads((tmp_path / "import.json").read_text())
    _, meta = load_checkpoint(out)
    assert report["source"] == meta["source"] and report["arch"] == "hstu"
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "source" in res.output and meta["source"]["sha256"] in res.output


def test_import_help_documents_both_frameworks():
    from typer.testing import CliRunner

    from ckv_cli.cli import app

    out = CliRunner().invoke(app, ["import", "--help"]).output
    for words in ("recbole", "gr", "--gin", "--bind", "--item-vocab", "--data", "RecBole", "generative-recommenders"):
        assert words in out, words


def test_recbole_protocol_orders_events_as_recbole():
    """RecBole orders by its float32 time (min-max scaled for ml-100k, whose yaml sets normalize_all): the
    histories RecBole itself scored come out in its order."""
    from ckv_cli.data import load
    from ckv_cli.importers.recbole import recbole_protocol_data

    vocab = json.loads((FIX / "recbole" / "item_vocab.json").read_text())
    vocab = ["<pad>", *vocab[1:]]
    imp = import_checkpoint("recbole", FIX / "recbole" / "sasrec.pth", item_vocab=str(FIX / "recbole" / "item_vocab.json"))
    assert imp.notes["recbole_time_key"] == "normalized"
    rb, exact = recbole_protocol_data("ml-100k", vocab, "normalized"), load("ml-100k", item_vocab=vocab)
    assert rb.n_users == exact.n_users and np.array_equal(np.sort(rb.items), np.sort(exact.items))
    hist = json.loads((FIX / "recbole" / "histories.json").read_text())
    for user, h in zip(hist["users"], hist["histories"]):  # RecBole's own test histories, in its order
        u = int(np.flatnonzero(rb.user_ids == user)[0])
        items = [rb.item_ids[i] for i in rb.sequence(u)[0][:-1]]
        assert items[-len(h):] == h


# ------------------------------------------------------------------------------ main's contract (the port)


def _toy_log(tmp_path, n_users=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = ["user,item,timestamp"] + [f"u{u},i{rng.integers(1, 51)},{1000 + 37 * t + int(rng.integers(0, 30))}"
                                      for u in range(n_users) for t in range(int(rng.integers(4, 40)))]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "log.csv"


def test_cache_spec_asks_the_model_whether_its_first_layer_is_recomputable():
    """`first_layer_item_function()` feeds `cache_spec()`: the plan recomputes the first layer only when it says so."""
    from ckv_cli.pipeline.compress import CompressOptions, make_plan

    model = _variant(*VARIANTS[-1])
    assert [s.name for s in model.cache_spec().streams if s.recomputable] == ["L0.k", "L0.v"]
    assert set(make_plan(model, CompressOptions()).recomputed_streams) == {"L0.k", "L0.v"}
    model.first_layer_item_function = lambda: False
    assert not any(s.recomputable for s in model.cache_spec().streams)
    assert not make_plan(model, CompressOptions()).recomputed_streams


def test_first_layer_tables_only_for_a_layernorm_fold():
    """ckv's pre-LN and RecBole's post-LN (embedding LayerNorm) fold into item tables; generative-recommenders'
    query-LN SASRec (K/V read x without a LayerNorm) has none, and the store recomputes that layer per token."""
    assert _variant(*VARIANTS[0]).first_layer_tables() is not None
    assert _variant(*VARIANTS[1]).first_layer_tables() is not None
    assert _variant(*VARIANTS[2]).first_layer_tables() is None


def test_kl_uses_the_models_temperature():
    from ckv_cli.tasks.next_item import TEMPERATURE, temperature_of

    assert temperature_of(_variant(*VARIANTS[0])) == TEMPERATURE
    imp = import_checkpoint("recbole", FIX / "recbole" / "sasrec.pth", item_vocab=str(FIX / "recbole" / "item_vocab.json"))
    assert temperature_of(imp.model) == 1.0


def test_distillation_uses_the_models_temperature(tmp_path, monkeypatch):
    """--distill-steps' KL is at the model's temperature (RecBole's raw dot products: 1), not ckv's 0.05."""
    import ckv_cli.pipeline.distill as distill_mod
    from ckv_cli.data import load
    from ckv_cli.pipeline.compress import CompressOptions, fit_and_distill

    model = _variant("sasrec", {**VARIANTS[1][1], "temperature": 1.0})
    vocab = ["<pad>"] + [f"i{k}" for k in range(1, 51)]
    rng = np.random.default_rng(1)
    rows = ["user,item,timestamp"] + [f"u{u},i{rng.integers(1, 51)},{100 + t}" for u in range(30) for t in range(8)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    ds = load(str(tmp_path / "log.csv"), item_vocab=vocab)
    seen = []
    real = distill_mod.distill
    monkeypatch.setattr(distill_mod, "distill", lambda *a, **k: seen.append(a[3].temperature) or real(*a, **k))
    fit_and_distill(model, ds, CompressOptions(params={"pool_size": 16}, calib_users=30, distill_steps=1))
    assert seen == [1.0]


def test_store_serves_next_event_time_exactly(tmp_path):
    """A next-event-time HSTU compressed losslessly (plain float32): `CacheStore.rank_next` with the request time
    equals the compress protocol on the exact cache (compressed and decoded paths alike, both decoded), the
    request time changes the scores, and `append` leaves the cache a prefill of the whole history gives."""
    from ckv_cli.data import load
    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
    from ckv_cli.serve.next_item import CacheStore
    from ckv_cli.tasks.next_item import iter_test_caches, scores_after_last_event

    model = _variant(*VARIANTS[-1])
    vocab = ["<pad>"] + [f"i{k}" for k in range(1, 51)]
    ckpt, art = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    save_checkpoint(model, ckpt, dataset="log", fingerprint="0" * 16, item_vocab=vocab, metrics={}, train={})
    model, meta = load_checkpoint(ckpt)
    ds = load(str(_toy_log(tmp_path)), item_vocab=meta["item_vocab"])
    opts = CompressOptions(codec="plain", params={"dtype": "float32"}, calib_users=12)
    compress_to_artifact(model, meta, ckpt, ds, opts, art)
    batch = next(iter_test_caches(model, ds, range(ds.n_users), ds.n_users))
    want = scores_after_last_event(model, batch.cache, batch).topk(5)
    users = [str(u) for u in ds.user_ids]
    with CacheStore.open(art, ckpt) as store:
        for attention in ("compressed", "decoded"):
            got = store.rank_next(users, new_items=batch.last_items, new_timestamps=batch.last_ts, k=5,
                                  attention=attention, query_timestamps=batch.target_ts)
            assert np.allclose(got.scores, want.values.numpy(), atol=1e-5)
        own = store.rank_next(users, new_items=batch.last_items, new_timestamps=batch.last_ts, k=5)
        assert not np.allclose(own.scores, want.values.numpy(), atol=1e-3)
        with pytest.raises(CkvError, match="query_timestamps has 2 entries"):
            store.rank_next(users, k=5, query_timestamps=[1, 2])
        before = store.fetch(users[:1])  # the cached prefix (the test history but its last event)
        n = int(before.lengths[0])
        new_t = int(before.timestamps[0, n - 1]) + 500
        store.append(users[0], ["i7"], [new_t])
        items = torch.cat([before.items[0, :n], torch.tensor([vocab.index("i7")])])[None]
        ts = torch.cat([before.timestamps[0, :n], torch.tensor([new_t])])[None]
        with torch.no_grad():
            ref, _ = model.prefill(items, ts)
        got = store.fetch(users[:1])
        assert torch.equal(got.items, ref.items) and torch.equal(got.timestamps, ref.timestamps)
        for i in range(len(model.layers)):
            assert torch.allclose(got.keys[i], ref.keys[i], atol=1e-5)
            assert torch.allclose(got.values[i], ref.values[i], atol=1e-5)
