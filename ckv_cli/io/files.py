"""Writing files: every output goes through `atomic_write` (a temporary file beside the target, fsynced, renamed
into place; an existing target only replaced with force), checked before any work by `check_output`. Both are
`ckv_cli.io.guarded` (the one writer) under the names the library has always called."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ckv_cli.io.guarded import check_target, current
from ckv_cli.io.guarded import write as guarded_write

HASH_CHUNK = 1 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_output(path: Path | None, force: bool = True, option: str = "output") -> None:
    """Fail early (before any work) on an output that could not be written (`ckv_cli.io.guarded`): under the
    command's `OutputGuard` a claim (an input of the command, or one path given to two options, is refused too);
    without one, the same checks of the path alone. `option` names it in messages ('-o', '--json')."""
    if path is None or str(path) == "-":
        return
    guard = current()
    if guard is not None:
        guard.claim(path, force, option)
    else:
        check_target(path, force, option)


def atomic_write(path: Path, write, force: bool = True) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, fsynced, then renamed into place:
    `ckv_cli.io.guarded.write` (the one writer; its temporary file is removed on every way out, signals
    included; an OSError is one line naming the path)."""
    guarded_write(path, write, force=force)


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
