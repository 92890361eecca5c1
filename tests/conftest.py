"""Shared fixtures: small models, a tiny checkpoint, and a one-thread environment for subprocesses."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the suite is small, threads only add overhead

import pytest
import torch

from ckv_cli.models import HSTU, SASRec, HSTUConfig, SASRecConfig

torch.set_num_threads(1)

N_ITEMS = 50
TINY_VOCAB = ["<pad>"] + [f"i{k}" for k in range(1, 21)]  # raw ids of the tiny checkpoint's 20 items


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
    from ckv_cli.checkpoint import save_checkpoint

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
    from ckv_cli.checkpoint import save_checkpoint

    save_checkpoint(make_model(arch, n_items=ds.n_items, max_len=max_len), path, dataset=ds.name,
                    fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={"epochs": 0})
    return path


def cli_runner(cwd):
    """`run(*args)`: `python -m ckv_cli.cli ARGS` in `cwd`, one thread, a wide terminal, output captured."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=600)
    return run
