"""Checkpoints: exact round trip, and every kind of bad file refused with a one-line CkvError."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckv_cli.io.files import atomic_write
from ckv_cli.models.checkpoint import FORMAT, load_checkpoint, read_metadata, save_checkpoint
from ckv_cli.data.batching import history_batch
from ckv_cli.errors import CkvError
from ckv_cli.models import last_hidden

VOCAB = ["<pad>"] + [str(k) for k in range(1, 51)]


def save(model, path, **kw):
    args = dict(dataset="toy", fingerprint="abcdef0123456789", item_vocab=VOCAB,
                metrics={"test": {"HR@10": 0.25}}, train={"epochs": 3, "lr": 0.001})
    save_checkpoint(model, path, **{**args, **kw})
    return path


def scores(model):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 51, (n,), generator=g).numpy() for n in (7, 1, 30)]
    items, times, lengths = history_batch(seqs, [s.cumsum() * 100 for s in seqs], model.config.max_len)
    with torch.no_grad():
        _, h = model.prefill(items, times, lengths)
        return model.score_all(last_hidden(h, lengths))


def expect_one_line_error(path, match=None):
    with pytest.raises(CkvError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert str(path) in msg or os.path.basename(str(path)) in msg
    if match:
        assert match in msg, msg
    return msg


@pytest.fixture
def ckpt(model, tmp_path):
    return save(model, tmp_path / "model.safetensors")


def test_round_trip_gives_identical_scores(model, ckpt):
    loaded, meta = load_checkpoint(ckpt)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert torch.equal(scores(loaded), scores(model))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert meta["format"] == FORMAT and meta["arch"] == model.arch
    assert meta["item_vocab"] == VOCAB
    assert meta["metrics"] == {"test": {"HR@10": 0.25}} and meta["train"] == {"epochs": 3, "lr": 0.001}
    assert meta["dataset"] == "toy" and meta["data_fingerprint"] == "abcdef0123456789"
    assert read_metadata(ckpt)["arch"] == model.arch  # metadata alone, undecoded strings
    assert json.loads(read_metadata(ckpt)["config"])["d"] == model.config.d


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_checkpoint(ckpt, keep):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: max(1, int(len(data) * keep))])
    expect_one_line_error(ckpt)


def test_truncated_by_one_byte(ckpt):
    ckpt.write_bytes(ckpt.read_bytes()[:-1])
    expect_one_line_error(ckpt, "not a readable safetensors file")


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes(tmp_path, seed):
    p = tmp_path / "noise.safetensors"
    g = torch.Generator().manual_seed(seed)
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    expect_one_line_error(p)


def test_header_length_then_garbage(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes((16).to_bytes(8, "little") + b"\xff" * 16)  # a plausible header length, not JSON
    expect_one_line_error(p)


def test_text_file(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item,timestamp\n1,2,3\n")
    expect_one_line_error(p)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_safetensors_without_ckv_metadata(model, tmp_path, metadata):
    p = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p), metadata=metadata)
    expect_one_line_error(p, "not a ckv checkpoint")


def test_nan_in_a_tensor(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    state = load_file(str(ckpt))
    state["item_emb.weight"][3, 2] = float("nan")
    save_file(state, str(ckpt), metadata=meta)
    expect_one_line_error(ckpt, "item_emb.weight")


def test_inf_in_a_tensor(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    state = load_file(str(ckpt))
    name = next(k for k in state if k.startswith("layers.1.") and state[k].is_floating_point())
    state[name].view(-1)[0] = float("-inf")
    save_file(state, str(ckpt), metadata=meta)
    expect_one_line_error(ckpt, name)


def test_unknown_arch(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "arch": "gpt2"})
    expect_one_line_error(ckpt, "gpt2")


def test_weights_that_do_not_match_the_config(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["d"] = 2 * config["d"]
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "config": json.dumps(config)})
    expect_one_line_error(ckpt)


def test_corrupt_metadata_json(ckpt):
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "item_vocab": "[\"<pad>\", "})
    expect_one_line_error(ckpt, "metadata")


def test_missing_path_and_directory(tmp_path):
    expect_one_line_error(tmp_path / "nope.safetensors", "not found")
    (tmp_path / "d.safetensors").mkdir()
    expect_one_line_error(tmp_path / "d.safetensors", "directory")


def test_atomic_write_without_force_keeps_the_file(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("precious")
    calls = []
    with pytest.raises(CkvError, match="--force"):
        atomic_write(p, lambda tmp: calls.append(tmp) or open(tmp, "w").write("new"), force=False)
    assert p.read_text() == "precious" and calls == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]  # no temporary left behind
    atomic_write(p, lambda tmp: open(tmp, "w").write("new"), force=True)
    assert p.read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]


def test_save_checkpoint_without_force_keeps_the_file(model, ckpt):
    before = ckpt.read_bytes()
    with torch.no_grad():
        model.item_emb.weight.add_(1.0)
    with pytest.raises(CkvError, match="exists"):
        save(model, ckpt, force=False)
    assert ckpt.read_bytes() == before


def test_atomic_write_failure_leaves_target_and_no_temporary(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CkvError, match="No space left"):
        atomic_write(p, failing)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_into_missing_directory(tmp_path):
    with pytest.raises(CkvError, match="does not exist"):
        atomic_write(tmp_path / "nodir" / "x.json", lambda tmp: None)
    assert not (tmp_path / "nodir").exists()
