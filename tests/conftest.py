"""Shared fixtures: small models, a tiny checkpoint, and a one-thread environment for subprocesses."""
from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the suite is small, threads only add overhead

import pytest
import torch

from ckv_cli.models import HSTU, SASRec, HSTUConfig, SASRecConfig

torch.set_num_threads(1)


def pytest_configure(config):
    """The signal tests send SIGINT and SIGHUP to ckv, in this process and in child processes. A test run started
    under `nohup`, or as a background job of a non-interactive shell, inherits those signals ignored, and ckv
    rightly keeps a signal its parent ignores (`ckv_cli.io.signals`), so those tests would wait for nothing: give
    the two signals their defaults back (children inherit them)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


N_ITEMS = 50
TINY_VOCAB = ["<pad>"] + [f"i{k}" for k in range(1, 21)]  # raw ids of the tiny checkpoint's 20 items


REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None):
    """A repository script that is not a package module (bench/*.py, scripts/*.py), loaded from its path and run
    as a module (its `__main__` guard stays shut)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(arch: str, seed: int = 0, **overrides):
    """A small model in eval mode; HSTU's relative-bias tables (zero at init) are randomised so that a wrong
    position or timestamp in `extend` changes the output."""
    torch.manual_seed(seed)
    if arch == "sasrec":
        cfg = SASRecConfig(**{"n_items": N_ITEMS, "d": 16, "n_layers": 2, "n_heads": 2, "max_len": 32, **overrides})
        model = SASRec(cfg)
    elif arch == "hstu":
        cfg = HSTUConfig(**{"n_items": N_ITEMS, "d": 16, "n_layers": 2, "n_heads": 2, "d_qk": 8, "d_v": 8,
                            "max_len": 32, **overrides})
        model = HSTU(cfg)
        with torch.no_grad():
            for layer in model.layers:
                layer.bias.pos.normal_(0.0, 0.5)
                layer.bias.time.normal_(0.0, 0.5)
    else:
        raise ValueError(arch)
    return model.float().eval()


@pytest.fixture(params=["sasrec", "hstu"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch):
    return make_model(arch)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A SASRec checkpoint over TINY_VOCAB written by save_checkpoint (no training)."""
    from ckv_cli.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = SASRec(SASRecConfig(n_items=len(TINY_VOCAB) - 1, d=8, n_layers=1, max_len=8)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(m, path, dataset="tiny", fingerprint="0" * 16, item_vocab=TINY_VOCAB,
                    metrics={"valid_NDCG@10": 0.5}, train={"epochs": 0})
    return path


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CKV_NO_PROGRESS="1")
    return env


def untrained_checkpoint(arch: str, ds, path, max_len: int):
    """A small untrained model of `arch` over `ds`'s items saved as a ckv checkpoint at `path` (returned)."""
    from ckv_cli.models.checkpoint import save_checkpoint

    save_checkpoint(make_model(arch, n_items=ds.n_items, max_len=max_len), path, dataset=ds.name,
                    fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={"epochs": 0})
    return path


def cli_runner(cwd):
    """`run(*args)`: `python -m ckv_cli.cli ARGS` in `cwd`, one thread, a wide terminal, output captured, no
    progress lines on stderr (a non-terminal stderr gets them otherwise: `ckv_cli.cli.render.LogLines`)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CKV_NO_PROGRESS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=600)
    return run


def next_item_plan(name: str, params: dict, *, n_layers: int, d_k: int, d_v: int, n_items: int, timestamps: bool,
                   recompute_item_layers: bool = True, **kw):
    """`build_plan` for a next-item model's cache (`next_item_spec`): what the plans of these tests were built as."""
    from ckv_cli.codecs import build_plan
    from ckv_cli.models.base import next_item_spec

    spec = next_item_spec(n_items, n_layers, d_k, d_v, timestamps)
    return build_plan(spec, name, params, n_items=n_items, recompute_free=recompute_item_layers, **kw)


def flat_of(offsets, keys: list, values: list, items, timestamps, keep=None):
    """A next-item flat cache from per-layer keys and values (streams L0.k, L0.v, ...)."""
    import numpy as np

    from ckv_cli.spec import FlatCache

    streams = {}
    for i, (k, v) in enumerate(zip(keys, values)):
        streams[f"L{i}.k"], streams[f"L{i}.v"] = k, v
    return FlatCache(np.asarray(offsets, dtype=np.int64), streams,
                     {"items": np.asarray(items, dtype=np.int64), "timestamps": np.asarray(timestamps, dtype=np.int64)},
                     keep=keep)


class ItemKVModel:
    """What a plan asks of the model reading a cache, with the first layer's K/V given by `item_kv(items (B, L),
    positions (B, L)) -> (k, v)`: a deterministic stand-in for a model's first layer, or a real model's
    (`lambda i, p: item_layer_kv(model, i, p)`)."""

    def __init__(self, item_kv):
        self.item_kv = item_kv

    def recompute(self, names, ids, offsets):
        from ckv_cli.models.base import recompute_item_layer

        return recompute_item_layer(self.item_kv, names, ids, offsets), {}


def rewrite(path, out, tensors=None, fields=None):
    """A copy of an artifact with some tensors or field declarations replaced."""
    from ckv_cli.io.safetensors import read_header

    import json

    from safetensors.numpy import load_file, save_file

    _, meta = read_header(path)
    t = load_file(str(path))
    t.update(tensors or {})
    if fields is not None:
        meta = {**meta, "fields": json.dumps(fields, sort_keys=True)}
    save_file(t, str(out), metadata=meta)
    return out


def clustered(n: int, d: int, centres: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    """(n, d) points around `centres` seeded Gaussian centres (scale 3), each with Gaussian noise of `spread`."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 3
    return c[torch.randint(centres, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
