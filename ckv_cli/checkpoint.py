"""Self-describing model checkpoints: one safetensors file; `__metadata__` holds everything needed to load it.

Metadata keys (all strings, JSON where structured): format ("ckv-checkpoint"), format_version, arch, config,
dataset, data_fingerprint, item_vocab, metrics, train (recipe), ckv_version.
"""
from __future__ import annotations

import json
import math
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
    if path.is_dir():
        raise CkvError(f"output is a directory: {path}")
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
                    train: dict, force: bool = True, user_vocab=None) -> None:
    """`user_vocab`: raw user ids in the order of the model's user rows (CTR models, which embed users)."""
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
    write_safetensors(Path(path), save_file, tensors, meta, force=force)


# -- reading safetensors files that ckv did not necessarily write ------------------------------------------------
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SIZES = ("n_items", "d", "n_layers", "n_heads", "d_qk", "d_v", "max_len", "time_buckets", "n_users", "d_attn", "top_k")  # config sizes, all >= 1


def _pickle_error(path: Path) -> CkvError:
    return CkvError(f"{path}: a PyTorch pickle (torch.save) file; ckv never unpickles, it reads only safetensors "
                    "files written by ckv")


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensors: name -> {dtype, shape, data_offsets}, metadata) of a safetensors file, checked by
    `parse_header`. Nothing is unpickled: `.pt`/`.pth` files are refused unread."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    try:
        with open(path, "rb") as f:
            header, meta, _ = parse_header(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise CkvError(f"cannot read {path}: {e.strerror or e}") from None
    return header, meta


def parse_header(f, size: int, path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensors, metadata, first data byte) of an open safetensors file of `size` bytes, checked as safetensors
    checks it (header length, JSON, dtypes, shapes against byte spans, spans tiling the data exactly) but with a
    one-line CkvError that says what is wrong."""

    def bad(why: str) -> CkvError:
        return CkvError(f"{path}: not a readable safetensors file ({why})")

    f.seek(0)
    head = f.read(8)
    if size == 0:
        raise bad("the file is empty")
    if len(head) < 8:
        raise bad(f"{size} bytes, too short for the 8-byte header length")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8 or n > MAX_HEADER_BYTES:
        if head.startswith((b"PK\x03\x04", b"\x80\x02")):  # a torch.save zip, or a legacy pickle
            raise _pickle_error(path)
        if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
            raise bad(f"it starts with text, {head.decode()!r}, where the 8-byte header length should be")
        if n > MAX_HEADER_BYTES:
            raise bad(f"its first 8 bytes give a header of {n:,} bytes, more than a safetensors header may have")
        raise bad(f"its first 8 bytes give a header of {n:,} bytes, the file has {size - 8:,} after them: truncated")
    raw = f.read(n)
    if len(raw) != n:
        raise bad("the header could not be read whole")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not a map of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"tensor '{name}' lacks a dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise bad(f"tensor '{name}' has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise bad(f"tensor '{name}' has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"tensor '{name}' has invalid data offsets {offsets!r}")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            raise bad(f"tensor '{name}' of shape {shape} and dtype {dtype} needs {need:,} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            raise bad(f"tensor '{name}' starts at byte {a:,} of the data, expected {end:,} (overlap or gap)")
        end = b
    if end != size - 8 - n:
        raise bad(f"the header declares {end:,} bytes of tensor data, the file holds {size - 8 - n:,}"
                  + (": truncated" if end > size - 8 - n else ""))
    return header, meta, 8 + n


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, validated, without loading tensors."""
    from ckv_cli.artifact import FORMAT as ARTIFACT_FORMAT

    path = Path(path)
    if not path.exists():
        raise CkvError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CkvError(f"expected a checkpoint file, got a directory: {path}")
    _, meta = read_header(path)
    if meta.get("format") == ARTIFACT_FORMAT:
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
    for key in ("config", "item_vocab", "metrics", "train", "user_vocab"):
        if key == "user_vocab" and key not in meta:
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
