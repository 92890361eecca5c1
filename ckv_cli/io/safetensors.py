"""safetensors files read by ckv itself: the header parsed and checked (`parse_header`: one-line errors that say
what is wrong), a file mapped read-only (`SafetensorsMap`), bit-packed values read at given positions (`unpack_at`).
Nothing is unpickled: `.pt`/`.pth` files are refused unread."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ckv_cli.errors import CkvError

NP_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
             "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64, "I64": np.int64,
             "F64": np.float64}  # the safetensors dtypes numpy reads
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


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



class SafetensorsMap:
    """A safetensors file mapped read-only: `tensors[name]` is a numpy view into the map (index it to copy out
    what you need; never keep slices of it). The file stays open, so a file renamed over the path later does
    not change what this map reads (ckv always writes by rename); a file truncated in place while mapped would
    crash the reading process (SIGBUS), as with any memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CkvError(f"file not found: {self.path}")
        if self.path.is_dir():
            raise CkvError(f"expected a file, got a directory: {self.path}")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CkvError(f"cannot read {self.path}: {e.strerror or e}") from None
        self._mm = None
        self.tensors: dict[str, np.ndarray] = {}
        try:
            self.stat = os.fstat(self._file.fileno())
            self.header, self.metadata, self.data_start = parse_header(self._file, self.stat.st_size, self.path)
            for name, info in self.header.items():
                if info["dtype"] not in NP_DTYPES:
                    raise CkvError(f"{self.path}: tensor '{name}' has dtype {info['dtype']}, which this reader does not map")
            self._map()
        except OSError as e:
            self._file.close()
            raise CkvError(f"cannot read {self.path}: {e.strerror or e}") from None
        except CkvError:
            self._file.close()
            raise

    def _map(self) -> None:
        try:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CkvError(f"cannot map {self.path}: {e}") from None
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        out = {}
        for name, info in self.header.items():
            a, b = info["data_offsets"]
            out[name] = buf[self.data_start + a : self.data_start + b].view(NP_DTYPES[info["dtype"]]).reshape(info["shape"])
        self.tensors = out

    def same_file(self) -> bool:
        """Whether the path still names the file this map reads."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.stat.st_dev, self.stat.st_ino, self.stat.st_size, self.stat.st_mtime_ns)

    def evict(self) -> bool:
        """Unmap, ask the kernel to drop the file's pages from the page cache (posix_fadvise DONTNEED), map
        again: the next reads come from the disk (cold). False where the map could not be released (a view of
        it is still alive) or the platform lacks posix_fadvise; the kernel may keep pages other processes map."""
        self.tensors = {}
        released = True
        try:
            self._mm.close()
        except BufferError:
            released = False
        if released and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._map()
        return released and hasattr(os, "posix_fadvise")

    def close(self) -> None:
        self.tensors = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
        self._file.close()


def unpack_at(packed: np.ndarray, positions: np.ndarray, bits: int) -> np.ndarray:
    """Values at `positions` of a bit-packed stream (`ckv_cli.codecs.bits.pack`: value i at bits [i*bits,
    (i+1)*bits), most significant bit first) -> int64, all at once: each value's bytes are gathered into one
    integer (at most 5 bytes for 32 bits), shifted and masked."""
    positions = np.asarray(positions, np.int64)
    if positions.size == 0:
        return np.zeros(0, np.int64)
    bit = positions * bits
    lo, off = bit >> 3, (bit & 7).astype(np.uint64)
    g = math.gcd(bits, 8)
    n_bytes = (bits + (8 - g if bits % 8 else 0) + 7) // 8  # bit offsets are multiples of gcd(bits, 8)
    acc = np.zeros(len(positions), np.uint64)
    for j in range(n_bytes):  # bytes past the stream's end are never among a value's bits: clip is harmless
        acc = (acc << np.uint64(8)) | np.take(packed, lo + j, mode="clip").astype(np.uint64)
    shift = np.uint64(8 * n_bytes - bits) - off
    return ((acc >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)
