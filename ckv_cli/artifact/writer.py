"""Writing an artifact (`ckv_cli.artifact.format` says what it holds) batch by batch of users, memory flat in
the number of users, byte-identical to writing every tensor at once with safetensors."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_bytes

from ckv_cli import __version__
from ckv_cli.artifact.format import (FORMAT, FORMAT_VERSION, SAFETENSORS_DTYPE, SHARD_FORMAT, encode_meta, field_meta,
                                     shared_tensors, stored_shape)

SAFETENSORS_NUMPY = {v: k for k, v in SAFETENSORS_DTYPE.items()}
from ckv_cli.codecs import CachePlan
from ckv_cli.codecs.bits import BitPacker
from ckv_cli.codecs.evict import NO_ARTIFACT
from ckv_cli.errors import CkvError
from ckv_cli.io.files import atomic_write, check_output

COPY_CHUNK = 1 << 20  # bytes per read when the data is copied behind the header


def _layout_order(dtypes: dict[str, np.dtype]) -> list[str]:
    """Tensor names in the order safetensors lays their bytes out (it sorts by dtype, then by name), asked of
    safetensors itself with one-element stand-ins: a streamed artifact is byte for byte the file `save_file`
    followed by `sort_header` writes for the same tensors and metadata."""
    raw = save_bytes({name: np.zeros(1, dtype) for name, dtype in dtypes.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def _assemble(tmp: str, header: bytes, pieces: list[tuple]) -> None:
    """The final file at `tmp`: the 8-byte header length, the header, then the tensor data, copied piece by piece
    (`pieces`: (temporary file, start, size) in the file's order) in 1 MiB chunks: memory stays flat."""
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for data, start, size in pieces:
            data.seek(start)
            left = size
            while left:
                chunk = data.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise OSError(errno.EIO, f"the temporary data file ended {left:,} bytes early")
                out.write(chunk)
                left -= len(chunk)


class ArtifactWriter:
    """Writes an artifact batch by batch of users, with memory flat in the number of users.

    Every tensor's size but the ragged fields' follows from the users' token counts (`lengths`, known before
    anything is encoded), the plan's fields and its shared tensors, so their layout is fixed by `start(plan)`;
    `add(fields, offsets)` then packs each batch's fields (bit-packed ones carry their last partial byte into the
    next batch) and writes them at their offsets in an anonymous temporary file beside the output, updating one
    sha256 per tensor. A ragged field (rows per user known only once encoded: escaped indices) goes to a
    temporary file of its own, its rows checked against its per-user counts; the file's order and offsets are
    laid out again over every tensor by `finish`. Nothing per user is held: the user offsets are written by
    `start` and read back from the data file to check each batch. `finish(metadata)` writes the header (the
    metadata and checksums are known only then) followed by the data into a second temporary file and renames
    it into place (`atomic_write`); the disk briefly holds the data twice. An interrupt or error at any point
    leaves no file behind and any old output intact; the output is byte-identical to writing every tensor at
    once with safetensors (`write_artifact` is this writer with one batch).

        writer = ArtifactWriter(path, lengths, user_ids)   # refuses an existing output (unless force) up front
        try:
            writer.start(plan)
            for fields, offsets in batches:                 # consecutive users, in order
                writer.add(fields, offsets)
            stored = writer.finish(metadata)
        finally:
            writer.discard()
    """

    ID_CHUNK = 1 << 16  # user ids encoded per write

    def __init__(self, path: str | Path, lengths, user_ids, force: bool = False, shared: bool = True):
        """`lengths`: each user's token count (an array), or a function `lengths(a, b)` returning those of users
        [a, b), asked a chunk at a time by `start` (nothing per user is then held at any point); `user_ids`: a
        sequence (list, array) of ids, str() of each stored. `shared=False` writes a shard (`ckv_cli.shard`):
        the per-user tensors only, metadata format `SHARD_FORMAT`."""
        self.path, self.force, self.with_shared = Path(path), force, shared
        check_output(self.path, force)
        self._lengths = lengths
        self.user_ids = user_ids
        self.n_users = len(user_ids)
        self.n_tokens = 0
        self._data = None
        self._users_done = 0
        self._spans: dict[str, tuple[int, int]] = {}  # tensor -> [start, end) in the data, fixed by `start`

    def start(self, plan: CachePlan) -> None:
        """Fix the layout, open the data file, write what is known before encoding: the user offsets and id
        table and the plan's shared tensors (pools, bases, routers: the plan must be fitted)."""
        if self._data is not None or self._lengths is None:
            raise CkvError("internal: the artifact writer was started twice")
        if any(f.per == "kept" for f in plan.fields().values()):
            raise CkvError(NO_ARTIFACT)
        lengths = self._lengths if callable(self._lengths) else self._array_chunks(self._lengths, self.n_users)
        self._lengths = None
        for a in range(0, self.n_users, self.ID_CHUNK):
            chunk = lengths(a, min(a + self.ID_CHUNK, self.n_users))
            if len(chunk) and int(chunk.min()) < 0:
                raise CkvError("internal: a user has a negative number of tokens")
            self.n_tokens += int(chunk.sum())
        self.plan, self._declared = plan, plan.fields()
        specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._fmeta = {}
        self._ragged = {name: f for name, f in self._declared.items() if f.per == "ragged"}
        self._rows = {name: 0 for name in self._ragged}
        for name, f in self._declared.items():
            if f.per == "ragged":  # laid out by `finish`, once its rows are known
                continue
            count = self.n_tokens if f.per == "token" else self.n_users + (name == "users/offsets")
            specs[name] = (np.dtype(np.uint8) if f.bits else np.dtype(f.dtype), stored_shape(name, f, count))
            self._fmeta[name] = field_meta(f, count)
        id_bytes = sum(len(str(u).encode()) for u in self.user_ids)
        specs["users/id_bytes"] = (np.dtype(np.uint8), (id_bytes,))
        specs["users/id_offsets"] = (np.dtype(np.int64), (self.n_users + 1,))
        shared = shared_tensors(plan) if self.with_shared else {}
        specs.update({name: (a.dtype, a.shape) for name, a in shared.items()})
        unknown = next((n for n, (dtype, _) in specs.items() if dtype.name not in SAFETENSORS_DTYPE), None)
        if unknown:
            raise CkvError(f"internal: tensor {unknown} is {specs[unknown][0]}, which safetensors cannot store")
        self._header: dict[str, dict] = {}
        pos = 0
        for name in _layout_order({n: dtype for n, (dtype, _) in specs.items()}):
            dtype, shape = specs[name]
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self._spans[name] = (pos, pos + size)
            self._header[name] = {"dtype": SAFETENSORS_DTYPE[dtype.name], "shape": [int(s) for s in shape],
                                  "data_offsets": [pos, pos + size]}
            pos += size
        self._size = pos
        self._cursor = {name: a for name, (a, _) in self._spans.items()}
        self._sha = {name: hashlib.sha256() for name in [*self._spans, *self._ragged]}
        self._packers = {name: BitPacker(f.bits) for name, f in self._declared.items() if f.bits}
        self._rfiles = {}
        try:
            self._data = tempfile.TemporaryFile(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
            for name in self._ragged:
                self._rfiles[name] = tempfile.TemporaryFile(prefix=f".{self.path.name}.", suffix=".rows",
                                                            dir=self.path.parent)
        except OSError as e:
            raise self._write_error(e) from None
        self._put_offsets(lengths)
        self._put_ids()
        for name, a in shared.items():
            self._put(name, a)

    def add(self, fields: dict[str, np.ndarray], offsets: np.ndarray) -> None:
        """The next batch of users (consecutive, in order): their fields as `CachePlan.encode` returns them (token
        fields concatenated in user order, per-user fields one row per user) and their offsets."""
        if self._data is None:
            raise CkvError("internal: the artifact writer was not started")
        offsets = np.asarray(offsets, dtype=np.int64)
        a, n = self._users_done, len(offsets) - 1
        if a + n <= self.n_users:  # the offsets written by `start`, read back
            want = np.frombuffer(self._read(self._spans["users/offsets"][0] + 8 * a, 8 * (n + 1)), dtype=np.int64)
        if a + n > self.n_users or not np.array_equal(offsets - offsets[0], want - want[0]):
            raise CkvError(f"internal: users {a:,}..{a + n - 1:,} do not have the token counts the artifact was laid "
                           "out for")
        n_tok = int(want[-1] - want[0])
        for name, f in self._declared.items():
            if name == "users/offsets":
                continue
            if name not in fields:
                raise CkvError(f"internal: field {name} is missing")
            arr = np.asarray(fields[name])
            count = n_tok if f.per == "token" else n
            if f.per == "ragged":
                if f.counts not in fields:
                    raise CkvError(f"internal: field {f.counts} is missing")
                count = int(np.asarray(fields[f.counts], np.int64).sum())
            if len(arr) != count:
                raise CkvError(f"internal: field {name} has {len(arr)} rows, expected {count}")
            if f.per == "ragged":
                self._put_rows(name, f, arr)
            elif f.bits:
                self._put(name, self._packers[name].feed(arr))
            else:
                if arr.dtype != np.dtype(f.dtype) or arr.size != count * (1 if name.startswith("tokens/") else f.width):
                    raise CkvError(f"internal: field {name} is {arr.dtype} {arr.shape}, declared {f.dtype} x {f.width}")
                self._put(name, arr)
        self._users_done += n

    def finish(self, metadata: dict) -> dict[str, int]:
        """Header and data into the output, atomically; returns bytes per tensor as stored."""
        if self._data is None:
            raise CkvError("internal: the artifact writer was not started")
        if self._users_done != self.n_users:
            raise CkvError(f"internal: {self._users_done:,} of {self.n_users:,} users were written")
        for name, packer in self._packers.items():
            if name in self._ragged:
                self._put_bytes(name, packer.close())
            else:
                self._put(name, packer.close())
        for name, (a, b) in self._spans.items():
            if self._cursor[name] != b:
                raise CkvError(f"internal: tensor {name} got {self._cursor[name] - a:,} of its {b - a:,} bytes")
        header, pieces = self._final_layout()
        meta = {k: encode_meta(v) for k, v in metadata.items()}
        meta.update({"format": FORMAT if self.with_shared else SHARD_FORMAT, "format_version": FORMAT_VERSION,
                     "plan": json.dumps(self.plan.describe(), sort_keys=True),
                     "fields": json.dumps(self._fmeta, sort_keys=True), "ckv_version": __version__,
                     "checksums": json.dumps({k: h.hexdigest() for k, h in self._sha.items()}, sort_keys=True)})
        header = {**header, "__metadata__": meta}
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text = text.ljust(-(-len(text) // 8) * 8, b" ")  # as safetensors pads it
        atomic_write(self.path, lambda tmp: _assemble(tmp, text, pieces), force=self.force)
        out = self.tensor_bytes
        self.discard()
        return out

    def _final_layout(self) -> tuple[dict, list[tuple]]:
        """(safetensors header of every tensor, the pieces to copy in the file's order): the layout of `start`
        when there is no ragged field; otherwise every tensor laid out again now that the ragged rows are known."""
        if not self._ragged:
            return self._header, [(self._data, 0, self._size)]
        for name, f in self._ragged.items():
            self._fmeta[name] = field_meta(f, self._rows[name])
        dtypes = {name: np.dtype(np.uint8) if f.bits else np.dtype(f.dtype) for name, f in self._ragged.items()}
        dtypes.update({name: np.dtype(SAFETENSORS_NUMPY[info["dtype"]]) for name, info in self._header.items()})
        header, pieces, pos = {}, [], 0
        for name in _layout_order(dtypes):
            if name in self._ragged:
                f = self._ragged[name]
                size = f.nbytes(self._rows[name]) if f.bits else self._rows[name] * f.width * dtypes[name].itemsize
                shape = stored_shape(name, f, self._rows[name])
                header[name] = {"dtype": SAFETENSORS_DTYPE[dtypes[name].name], "shape": [int(s) for s in shape],
                                "data_offsets": [pos, pos + size]}
                pieces.append((self._rfiles[name], 0, size))
            else:
                a, b = self._spans[name]
                size = b - a
                header[name] = {**self._header[name], "data_offsets": [pos, pos + size]}
                pieces.append((self._data, a, size))
            pos += size
        return header, pieces

    @property
    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of each tensor as laid out (known once started; a ragged field's once its users are all added)."""
        out = {name: b - a for name, (a, b) in self._spans.items()}
        for name, f in self._ragged.items():
            out[name] = f.nbytes(self._rows[name])
        return out

    def discard(self) -> None:
        """Close (and so delete) the temporary data files; the writer is unusable afterwards. Safe to repeat."""
        if self._data is not None:
            self._data.close()
            self._data = None
        for f in getattr(self, "_rfiles", {}).values():
            f.close()
        self._rfiles = {}

    # -- internals
    def _write_error(self, e: OSError) -> CkvError:
        return CkvError(f"could not write {self.path}: {e.strerror or e}")

    def _put(self, name: str, arr: np.ndarray) -> None:
        """Append `arr`'s bytes to tensor `name` in the data file."""
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        pos = self._cursor[name]
        if pos + len(buf) > self._spans[name][1]:
            raise CkvError(f"internal: tensor {name} is given more than its "
                           f"{self._spans[name][1] - self._spans[name][0]:,} bytes")
        self._sha[name].update(buf)
        fd = self._data.fileno()
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], pos + done)
        except OSError as e:
            raise self._write_error(e) from None
        self._cursor[name] = pos + len(buf)

    @property
    def ragged_rows(self) -> dict[str, int]:
        """Rows added so far to each ragged field (item-coded escapes), as the byte accounting counts them."""
        return dict(self._rows)

    def _put_rows(self, name: str, f, arr: np.ndarray) -> None:
        """A batch's rows of a ragged field, appended to its own temporary file."""
        if f.bits:
            self._put_bytes(name, self._packers[name].feed(arr))
        else:
            if arr.dtype != np.dtype(f.dtype) or arr.size != len(arr) * f.width:
                raise CkvError(f"internal: field {name} is {arr.dtype} {arr.shape}, declared {f.dtype} x {f.width}")
            self._put_bytes(name, arr)
        self._rows[name] += len(arr)

    def _put_bytes(self, name: str, arr: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        self._sha[name].update(buf)
        try:
            self._rfiles[name].write(buf)
        except OSError as e:
            raise self._write_error(e) from None

    def _read(self, pos: int, size: int) -> bytes:
        try:
            out = os.pread(self._data.fileno(), size, pos)
        except OSError as e:
            raise CkvError(f"could not read back the temporary data of {self.path}: {e.strerror or e}") from None
        if len(out) != size:
            raise CkvError(f"internal: the temporary data of {self.path} is {size - len(out):,} bytes short")
        return out

    @staticmethod
    def _array_chunks(lengths, n_users: int):
        lengths = np.asarray(lengths).reshape(-1)
        if len(lengths) != n_users or (len(lengths) and lengths.dtype.kind not in "iu"):
            raise CkvError(f"internal: {n_users} user ids for {len(lengths)} token counts")
        return lambda a, b: lengths[a:b]

    def _put_offsets(self, lengths) -> None:
        """users/offsets from the token counts (`lengths(a, b)`), a chunk of users at a time."""
        self._put("users/offsets", np.zeros(1, np.int64))
        end = 0
        for a in range(0, self.n_users, self.ID_CHUNK):
            b = min(a + self.ID_CHUNK, self.n_users)
            chunk = np.asarray(lengths(a, b), dtype=np.int64)
            if len(chunk) != b - a:
                raise CkvError(f"internal: {len(chunk)} token counts for the {b - a} users {a:,}..{b - 1:,}")
            ends = end + np.cumsum(chunk)
            self._put("users/offsets", ends)
            end = int(ends[-1])

    def _put_ids(self) -> None:
        """The user id table (utf-8 bytes and their offsets), a chunk of ids at a time."""
        self._put("users/id_offsets", np.zeros(1, np.int64))
        end = 0
        for a in range(0, self.n_users, self.ID_CHUNK):
            encoded = [str(u).encode() for u in self.user_ids[a : a + self.ID_CHUNK]]
            self._put("users/id_bytes", np.frombuffer(b"".join(encoded), dtype=np.uint8))
            ends = end + np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)))
            self._put("users/id_offsets", ends)
            end = int(ends[-1])


def write_artifact(path: str | Path, plan: CachePlan, fields: dict[str, np.ndarray], offsets: np.ndarray,
                   user_ids: list[str], metadata: dict, force: bool = False) -> dict[str, int]:
    """Write atomically; returns bytes per tensor as stored. `fields` hold every user's unpacked per-token and
    per-user arrays (`ArtifactWriter` with one batch; `compress_to_artifact` streams instead)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    writer = ArtifactWriter(path, np.diff(offsets), user_ids, force=force)
    try:
        writer.start(plan)
        writer.add(fields, offsets)
        return writer.finish(metadata)
    finally:
        writer.discard()
