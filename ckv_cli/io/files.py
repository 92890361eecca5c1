"""Writing files: every output goes through `atomic_write` (a temporary file beside the target, renamed into place;
an existing target only replaced with force), checked before any work by `check_output`."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from ckv_cli.errors import CkvError

HASH_CHUNK = 1 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
