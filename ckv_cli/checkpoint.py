"""Self-describing model checkpoints: one safetensors file; `__metadata__` holds everything needed to load it.

Metadata keys (all strings, JSON where structured): format ("ckv-checkpoint"), format_version, arch, config,
dataset, data_fingerprint, item_vocab, metrics, train (recipe), ckv_version.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ckv_cli import __version__
from ckv_cli.errors import CkvError

FORMAT = "ckv-checkpoint"
FORMAT_VERSION = "1"


def check_output(path: Path | None, force: bool = True) -> None:
    """Fail early (before any work) on an output that could not be written."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.exists() and not force:
        raise CkvError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise CkvError(f"output directory does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise CkvError(f"output directory is not writable: {path.parent}")


def atomic_write(path: Path, write, force: bool = True) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise CkvError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sort_header(path) -> None:
    """safetensors writes `__metadata__` from a hash map, in an order that changes from call to call; rewrite
    the JSON header with sorted keys so that the same inputs give byte-identical files."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        text = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # the same JSON reordered: same length (spaces pad, as safetensors itself does)
            f.seek(8)
            f.write(text.ljust(n, b" "))
            return
        data = f.read()
        text = text.ljust(-(-len(text) // 8) * 8, b" ")
        f.seek(0)
        f.write(struct.pack("<Q", len(text)) + text + data)


def write_safetensors(path: Path, save, tensors: dict, metadata: dict, force: bool = True) -> None:
    """`save` (safetensors' torch or numpy `save_file`) into a temporary file, header sorted, renamed into place."""
    def write(tmp):
        save(tensors, tmp, metadata=metadata)
        sort_header(tmp)

    atomic_write(Path(path), write, force=force)


def save_checkpoint(model, path: str | Path, *, dataset: str, fingerprint: str, item_vocab, metrics: dict,
                    train: dict, force: bool = True) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "config": json.dumps(asdict(model.config)),
        "dataset": dataset,
        "data_fingerprint": fingerprint,
        "item_vocab": json.dumps([str(x) for x in item_vocab]),
        "metrics": json.dumps(metrics),
        "train": json.dumps(train),
        "ckv_version": __version__,
    }
    write_safetensors(Path(path), save_file, tensors, meta, force=force)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, validated, without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CkvError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CkvError(f"expected a checkpoint file, got a directory: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise CkvError(f"{path}: not a ckv checkpoint (metadata 'format' is {meta.get('format')!r})")
    for key in ("arch", "config", "item_vocab"):
        if key not in meta:
            raise CkvError(f"{path}: ckv checkpoint metadata lacks '{key}'")
    return meta


def load_checkpoint(path: str | Path):
    """(model in eval mode, metadata dict with JSON fields decoded)."""
    from ckv_cli.models import REGISTRY

    meta = read_metadata(path)
    if meta["arch"] not in REGISTRY:
        raise CkvError(f"{path}: unknown architecture '{meta['arch']}' (known: {', '.join(REGISTRY)})")
    try:
        for key in ("config", "item_vocab", "metrics", "train"):
            meta[key] = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError:
        raise CkvError(f"{path}: corrupted checkpoint metadata") from None
    model_cls, cfg_cls = REGISTRY[meta["arch"]]
    try:
        model = model_cls(cfg_cls(**meta["config"]))
        state = load_file(str(path))
    except (TypeError, SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: cannot load checkpoint ({str(e).splitlines()[0][:120]})") from None
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CkvError(f"{path}: tensor '{name}' contains NaN or Inf")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CkvError(f"{path}: weights do not match the config ({str(e).splitlines()[0][:120]})") from None
    return model.eval(), meta
