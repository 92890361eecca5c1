"""Self-describing model checkpoints: one safetensors file; `__metadata__` holds everything needed to load it.

Metadata keys (all strings, JSON where structured): format ("ckv-checkpoint"), format_version, arch, config,
dataset, data_fingerprint, item_vocab, metrics, train (recipe), ckv_version; `user_vocab` for models that embed
users; `source` for a checkpoint imported from another framework (framework, version, file and its sha256).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ckv_cli import __version__
from ckv_cli.errors import CkvError
from ckv_cli.io import formats
from ckv_cli.io.files import write_safetensors
from ckv_cli.io.safetensors import read_header

FORMAT = formats.CHECKPOINT
FORMAT_VERSION = formats.FORMAT_VERSION
SIZES = ("n_items", "d", "n_layers", "n_heads", "d_qk", "d_v", "max_len", "time_buckets", "n_users", "d_attn", "top_k")  # config sizes, all >= 1


def save_checkpoint(model, path: str | Path, *, dataset: str, fingerprint: str, item_vocab, metrics: dict,
                    train: dict, force: bool = True, user_vocab=None, source: dict | None = None) -> None:
    """`user_vocab`: raw user ids in the order of the model's user rows (CTR models, which embed users).
    `source`: where an imported checkpoint came from (`ckv_cli.importers`)."""
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
    if user_vocab is not None:
        meta["user_vocab"] = json.dumps([str(x) for x in user_vocab])
    if source is not None:
        meta["source"] = json.dumps(source, sort_keys=True)
    write_safetensors(Path(path), save_file, tensors, meta, force=force)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, validated, without loading tensors."""
    path = Path(path)
    if not path.exists():
        raise CkvError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CkvError(f"expected a checkpoint file, got a directory: {path}")
    _, meta = read_header(path)
    if meta.get("format") == formats.ARTIFACT:
        raise CkvError(f"{path}: not a ckv checkpoint but a ckv artifact (written by ckv compress)")
    if meta.get("format") != FORMAT:
        raise CkvError(f"{path}: not a ckv checkpoint (metadata 'format' is {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CkvError(f"{path}: checkpoint format version {meta.get('format_version')!r}, this ckv reads "
                       f"{FORMAT_VERSION!r}")
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
    for key in ("config", "item_vocab", "metrics", "train", "user_vocab", "source"):
        if key in ("user_vocab", "source") and key not in meta:
            continue
        try:
            meta[key] = json.loads(meta.get(key, "{}"))
        except (ValueError, RecursionError):
            raise CkvError(f"{path}: corrupted checkpoint metadata: '{key}' is not valid JSON") from None
    config, vocab = meta["config"], meta["item_vocab"]
    if not isinstance(config, dict):
        raise CkvError(f"{path}: corrupted checkpoint metadata: 'config' is not a JSON object")
    if not isinstance(vocab, list) or not all(isinstance(x, str) for x in vocab):
        raise CkvError(f"{path}: corrupted checkpoint metadata: 'item_vocab' is not a list of item ids")
    model_cls, cfg_cls = REGISTRY[meta["arch"]]
    try:
        cfg = cfg_cls(**config)
        for key in SIZES:
            value = getattr(cfg, key, 1)
            if type(value) is not int or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not (type(cfg.dropout) in (int, float) and 0 <= cfg.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}")
        model = model_cls(cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        raise CkvError(f"{path}: invalid model config ({str(e).splitlines()[0][:120]})") from None
    users = meta.get("user_vocab")
    if users is not None and (not isinstance(users, list) or len(users) != getattr(cfg, "n_users", -1)):
        raise CkvError(f"{path}: corrupted checkpoint metadata: 'user_vocab' is not a list of the config's "
                       f"{getattr(cfg, 'n_users', 0):,} user ids")
    if len(vocab) != cfg.n_items + 1:
        raise CkvError(f"{path}: the item vocabulary has {len(vocab):,} entries, the config says {cfg.n_items:,} items "
                       "(+ 1 for padding)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: cannot load checkpoint ({str(e).splitlines()[0][:120]})") from None
    expected = model.state_dict()
    for name in expected:
        if name not in state:
            raise CkvError(f"{path}: tensor '{name}' is missing (weights do not match the config)")
    for name, t in state.items():
        if name not in expected:
            raise CkvError(f"{path}: unexpected tensor '{name}' (weights do not match the config)")
        if t.shape != expected[name].shape:
            raise CkvError(f"{path}: tensor '{name}' has shape {tuple(t.shape)}, the config implies "
                           f"{tuple(expected[name].shape)} (weights do not match the config)")
        if t.dtype != expected[name].dtype:
            raise CkvError(f"{path}: tensor '{name}' is {t.dtype}, expected {expected[name].dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CkvError(f"{path}: tensor '{name}' contains NaN or Inf")
    model.load_state_dict(state)
    return model.eval(), meta
