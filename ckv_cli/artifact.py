"""The compressed-cache artifact: one safetensors file that explains itself.

Tensors
- `shared/<stream>/<name>`: what every user shares (pools, routers, bases), e.g. `shared/L1.k/pool`;
- `users/offsets` (U + 1,) int64: user u's tokens are [offsets[u], offsets[u+1]);
- `users/id_bytes`, `users/id_offsets`: the user id table (utf-8), so users are found by their raw id;
- `tokens/items` (bit-packed), `tokens/timestamps` (int32, models that read event times), and per stream
  `<stream>/<field>`: per-token fields flattened in user order, as (N, width) (bit-packed ones as uint8
  streams), per-user fields as (U, width). `stored_shape` is the rule; codecs get their fields back at it.
`__metadata__` (strings; JSON where structured): format, format_version, plan (which codec stores each
stream, with parameters), fields (name -> per/dtype/width/bits/count), accounting (bytes, NOTES §4),
metrics, source checkpoint path and sha256, data fingerprint, command, ckv version, seed, and `checksums`
(sha256 of each tensor's bytes, checked by `verify`).

Reading never trusts the file: `Artifact.open` checks the safetensors header (lengths, dtypes, shapes against
byte spans), the plan, every field's declaration against its codec and its tensor's dtype and shape, the user
offsets and id table, and that the shared tensors fit their codecs; `read_fields` checks the indices and item
ids it reads. A file that fails any check is refused with a one-line CkvError. Values are not checked on
read (that is what the checksums are for: `verify`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_bytes

from ckv_cli import __version__
from ckv_cli.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ckv_cli.checkpoint import atomic_write, check_output, read_header
from ckv_cli.codecs import ITEMS, CachePlan, Field, plan_from_description
from ckv_cli.codecs.bits import BitPacker, byte_range, packed_nbytes, unpack
from ckv_cli.codecs.evict import NO_ARTIFACT
from ckv_cli.errors import CkvError
from ckv_cli.kv.extract import FlatCache

FORMAT = "ckv-artifact"
SHARD_FORMAT = "ckv-artifact-shard"  # the per-user tensors of some users; shared tensors in their own file (`ckv_cli.shard`)
FORMAT_VERSION = "1"
SAFETENSORS_DTYPE = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
                     "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64",
                     "float64": "F64"}  # numpy name -> safetensors name (every dtype numpy can read)
MAX_WIDTH = 1 << 16  # no stream or field is wider
MAX_BITS = 32  # no packed field is wider (pool indices, item ids, PQ codes)
ACCOUNTING_NUMBERS = ("users", "tokens", "full_fp16_bytes", "full_fp32_bytes", "per_user_bytes", "shared_bytes",
                      "bytes_per_token", "full_fp16_bytes_per_token", "per_user_ratio_fp16", "per_user_ratio_fp32",
                      "total_ratio_fp16", "total_ratio_fp32")  # `ckv_cli.compress.accounting` writes them all
COPY_CHUNK = 1 << 20  # bytes per read when the data is copied behind the header
DECODE_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, KeyError, AttributeError, OverflowError)


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def field_meta(f: Field, count: int) -> dict:
    return {"per": f.per, "dtype": f.dtype, "width": f.width, "bits": f.bits, "count": count}


def stored_shape(name: str, f: Field, count: int) -> tuple[int, ...]:
    """The shape a field is stored at: packed bytes (bits > 0); (count,) for the user offsets and the plan's own
    per-token fields (`tokens/...`); (count, width) for every codec field and per-user field."""
    if f.bits:
        return (packed_nbytes(count, f.bits),)
    if name == "users/offsets" or name.startswith("tokens/"):
        return (count,)
    return (count, f.width)


def encode_meta(value) -> str:
    """A metadata value as a string: strings as they are, unless they start like JSON ('{', '[' or '"': then
    JSON-quoted, so that a path like '[v2].safetensors' reads back as itself); everything else as JSON."""
    if isinstance(value, str) and not value.startswith(("{", "[", '"')):
        return value
    return json.dumps(value, sort_keys=True)


def decode_meta(value: str):
    """Inverse of `encode_meta`; raises ValueError on a value that starts like JSON but is not."""
    if value.startswith(("{", "[")):
        return json.loads(value)
    if value.startswith('"'):
        try:
            out = json.loads(value)
        except ValueError:
            return value  # written by a ckv that stored such strings raw
        return out if isinstance(out, str) else value
    return value


def decode_metadata(raw: dict[str, str], path) -> dict:
    """Every `__metadata__` entry decoded (`decode_meta`), a one-line CkvError naming the one that is not."""
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = decode_meta(v)
        except (ValueError, RecursionError):
            raise CkvError(f"{path}: corrupted metadata entry '{k}'") from None
    return meta


def _layout_order(dtypes: dict[str, np.dtype]) -> list[str]:
    """Tensor names in the order safetensors lays their bytes out (it sorts by dtype, then by name), asked of
    safetensors itself with one-element stand-ins: a streamed artifact is byte for byte the file `save_file`
    followed by `sort_header` writes for the same tensors and metadata."""
    raw = save_bytes({name: np.zeros(1, dtype) for name, dtype in dtypes.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def _assemble(tmp: str, header: bytes, data, size: int) -> None:
    """The final file at `tmp`: the 8-byte header length, the header, then the `size` bytes of tensor data
    streamed from the temporary data file `data` (in 1 MiB pieces: memory stays flat)."""
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        data.seek(0)
        left = size
        while left:
            chunk = data.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(errno.EIO, f"the temporary data file ended {left:,} bytes early")
            out.write(chunk)
            left -= len(chunk)


class ArtifactWriter:
    """Writes an artifact batch by batch of users, with memory flat in the number of users.

    Every tensor's size follows from the users' token counts (`lengths`, known before anything is encoded),
    the plan's fields and its shared tensors, so the layout (safetensors' order and offsets) is fixed by
    `start(plan)`; `add(fields, offsets)` then packs each batch's fields (bit-packed ones carry their last
    partial byte into the next batch) and writes them at their offsets in an anonymous temporary file beside
    the output, updating one sha256 per tensor. Nothing per user is held: the user offsets are written by
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
        for name, f in self._declared.items():
            count = self.n_tokens if f.per == "token" else self.n_users + (name == "users/offsets")
            specs[name] = (np.dtype(np.uint8) if f.bits else np.dtype(f.dtype), stored_shape(name, f, count))
            self._fmeta[name] = field_meta(f, count)
        id_bytes = sum(len(str(u).encode()) for u in self.user_ids)
        specs["users/id_bytes"] = (np.dtype(np.uint8), (id_bytes,))
        specs["users/id_offsets"] = (np.dtype(np.int64), (self.n_users + 1,))
        shared = {f"shared/{stream}/{name}": t.detach().cpu().contiguous().numpy()
                  for stream, codec in plan.streams.items() if not isinstance(codec, str)
                  for name, t in codec.shared().items()} if self.with_shared else {}
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
        self._sha = {name: hashlib.sha256() for name in self._spans}
        self._packers = {name: BitPacker(f.bits) for name, f in self._declared.items() if f.bits}
        try:
            self._data = tempfile.TemporaryFile(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
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
            if len(arr) != count:
                raise CkvError(f"internal: field {name} has {len(arr)} rows, expected {count}")
            if f.bits:
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
            self._put(name, packer.close())
        for name, (a, b) in self._spans.items():
            if self._cursor[name] != b:
                raise CkvError(f"internal: tensor {name} got {self._cursor[name] - a:,} of its {b - a:,} bytes")
        meta = {k: encode_meta(v) for k, v in metadata.items()}
        meta.update({"format": FORMAT if self.with_shared else SHARD_FORMAT, "format_version": FORMAT_VERSION,
                     "plan": json.dumps(self.plan.describe(), sort_keys=True),
                     "fields": json.dumps(self._fmeta, sort_keys=True), "ckv_version": __version__,
                     "checksums": json.dumps({k: h.hexdigest() for k, h in self._sha.items()}, sort_keys=True)})
        header = {**self._header, "__metadata__": meta}
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text = text.ljust(-(-len(text) // 8) * 8, b" ")  # as safetensors pads it
        atomic_write(self.path, lambda tmp: _assemble(tmp, text, self._data, self._size), force=self.force)
        self.discard()
        return self.tensor_bytes

    @property
    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of each tensor as laid out (known once started)."""
        return {name: b - a for name, (a, b) in self._spans.items()}

    def discard(self) -> None:
        """Close (and so delete) the temporary data file; the writer is unusable afterwards. Safe to repeat."""
        if self._data is not None:
            self._data.close()
            self._data = None

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


def _is_int(x, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def checked_user_table(offsets: np.ndarray, id_off: np.ndarray, id_bytes: bytes, n_tokens: int, bad) -> list[str]:
    """The user id table of an artifact, after checking the token offsets (0 .. n_tokens, non-decreasing), the id
    offsets (0 .. len(id_bytes)) and that no user is listed twice; `bad(why)` makes the error."""
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != n_tokens:
        raise bad(f"user offsets are not increasing from 0 to the {n_tokens:,} tokens")
    if id_off[0] != 0 or (np.diff(id_off) < 0).any() or id_off[-1] != len(id_bytes):
        raise bad(f"user id offsets are not increasing from 0 to the {len(id_bytes):,} id bytes")
    user_ids = [id_bytes[a:b].decode("utf-8", "replace") for a, b in zip(id_off[:-1], id_off[1:])]
    if len(set(user_ids)) != len(user_ids):
        raise bad("the user id table holds a user twice")
    return user_ids


def check_listed_fields(fields, declared: dict, bad) -> None:
    """The metadata's 'fields' must list exactly the fields the plan declares; `bad(why)` makes the error."""
    if not isinstance(fields, dict):
        raise bad("metadata 'fields' is missing or not a JSON object")
    if set(fields) != set(declared):
        name = sorted(set(fields) ^ set(declared))[0]
        raise bad(f"field '{name}' is " + ("declared by the plan but not listed in metadata 'fields'"
                                           if name in declared else "listed in metadata 'fields' but not in the plan"))


def check_field_tensors(fields: dict, declared: dict, header: dict, n_tokens: int, n_users: int, bad) -> None:
    """Each declared field's metadata entry, width and tensor (dtype, shape in the safetensors `header`) must be
    what the plan stores for `n_tokens` tokens of `n_users` users; `bad(why)` makes the error."""
    for name, f in declared.items():
        fm = fields[name]
        want = field_meta(f, n_tokens if f.per == "token" else n_users + (name == "users/offsets"))
        if fm != want:
            if not isinstance(fm, dict) or set(fm) != set(want):
                raise bad(f"field '{name}' in metadata 'fields' is not {{{', '.join(want)}}}")
            key = next(k for k in want if fm[k] != want[k] or type(fm[k]) is not type(want[k]))
            raise bad(f"field '{name}' has {key} {fm[key]!r} in metadata 'fields', expected {want[key]!r}")
        if f.bits > MAX_BITS or f.width > MAX_WIDTH:
            raise bad(f"field '{name}' is {f.bits} bits x {f.width} wide")
        info = header.get(name)
        shape = list(stored_shape(name, f, want["count"]))
        dtype = "U8" if f.bits else SAFETENSORS_DTYPE.get(f.dtype)
        if info is None:
            raise bad(f"tensor '{name}' is missing")
        if info["dtype"] != dtype or list(info["shape"]) != shape:
            raise bad(f"tensor '{name}' is {info['dtype']} {info['shape']}, its field needs {dtype} {shape}")


def _check_plan(desc) -> str | None:
    """What is wrong with a plan description (the metadata's 'plan'), or None."""
    if not isinstance(desc, dict):
        return "metadata 'plan' is missing or not a JSON object"
    missing = [k for k in ("n_layers", "n_items", "timestamps", "streams") if k not in desc]
    if missing:
        return f"the plan lacks '{missing[0]}'"
    if not _is_int(desc["n_layers"], 1, 1024):
        return f"the plan's n_layers is {desc['n_layers']!r}"
    if not _is_int(desc["n_items"], 1, 2**MAX_BITS - 2):
        return f"the plan's n_items is {desc['n_items']!r}"
    if type(desc["timestamps"]) is not bool:
        return f"the plan's timestamps is {desc['timestamps']!r}, not true or false"
    streams = desc["streams"]
    keys = {CachePlan.key(layer, kind) for layer in range(desc["n_layers"]) for kind in "kv"}
    if not isinstance(streams, dict) or set(streams) != keys:
        return f"the plan's streams are not L0.k ... L{desc['n_layers'] - 1}.v"
    for key, entry in streams.items():
        if entry == ITEMS:
            continue
        if (not isinstance(entry, dict) or not isinstance(entry.get("codec"), str)
                or not isinstance(entry.get("params"), dict)):
            return f"stream {key}: not a codec and parameters"
        if not _is_int(entry["params"].get("d"), 1, MAX_WIDTH):
            return f"stream {key}: width d is {entry['params'].get('d')!r}"
    return None


def _probe(codec) -> str | None:
    """Decode one all-zero token through a codec loaded from shared tensors: what breaks, or None. Shared
    tensors of the wrong shape fail here, at open, instead of in the middle of a read."""
    fields = {f.name: np.zeros(1, np.int64) if f.bits else np.zeros((1, f.width), f.dtype) for f in codec.fields()}
    kw = {"items": np.zeros(1, np.int64)} if codec.needs_items else {}
    try:
        with warnings.catch_warnings():  # a misshapen tensor may warn before it fails
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                out = codec.decode(fields, np.array([0, 1]), **kw)
    except CkvError:
        return None  # a refusal the codec explains itself when the token is really read
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if tuple(out.shape) != (1, codec.d):
        return f"decodes to shape {tuple(out.shape)}, not (1, {codec.d})"
    return None


def load_shared_into(plan: CachePlan, shared: dict[str, np.ndarray], bad) -> None:
    """Load each pooled stream's shared tensors (`shared/<stream>/<name>` -> array) into its codec, checking that
    they fit it; `bad(why)` makes the error raised."""
    for stream, codec in plan.streams.items():
        if isinstance(codec, str):
            continue
        prefix = f"shared/{stream}/"
        try:
            codec.load_shared({n[len(prefix):]: torch.from_numpy(t.copy()) for n, t in shared.items() if n.startswith(prefix)})
        except KeyError as e:
            raise bad(f"stream {stream} lacks shared tensor {e}") from None
        except CkvError as e:
            raise bad(f"stream {stream}: {e}") from None
        except DECODE_ERRORS as e:
            raise bad(f"stream {stream}: its shared tensors do not fit its codec ({type(e).__name__})") from None
        why = _probe(codec)
        if why:
            raise bad(f"stream {stream}: its shared tensors do not fit its codec ({why})")


@dataclass
class Artifact:
    """A lazily opened artifact: metadata up front, tensors read on demand (one user without the others)."""

    path: Path
    meta: dict
    plan: CachePlan
    fields: dict[str, dict]
    offsets: np.ndarray
    user_ids: list[str]

    @staticmethod
    def open(path: str | Path, shared: dict[str, np.ndarray] | None = None) -> "Artifact":
        """Open and check an artifact file; with `shared` (name -> array, from a shared-tensor file) a shard,
        which holds the per-user tensors only (`ckv_cli.shard`)."""
        path = Path(path)
        if not path.exists():
            raise CkvError(f"artifact not found: {path}")
        if path.is_dir():
            raise CkvError(f"expected an artifact file, got a directory: {path}")
        header, raw = read_header(path)
        if raw.get("format") == CHECKPOINT_FORMAT:
            raise CkvError(f"{path}: not a ckv artifact but a ckv checkpoint (written by ckv train)")
        if raw.get("format") == SHARD_FORMAT and shared is None:
            raise CkvError(f"{path}: a shard of a sharded artifact: open its index (.json) instead")
        if raw.get("format") != (FORMAT if shared is None else SHARD_FORMAT):
            raise CkvError(f"{path}: not a ckv artifact{' shard' if shared is not None else ''} "
                           f"(metadata 'format' is {raw.get('format')!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise CkvError(f"{path}: artifact format version {raw.get('format_version')!r}, this ckv reads "
                           f"{FORMAT_VERSION!r}")
        meta = decode_metadata(raw, path)
        for k in ("plan", "fields", "checksums", "accounting", "metrics"):
            if k in meta and not isinstance(meta[k], dict):
                raise CkvError(f"{path}: corrupted metadata entry '{k}' (not a JSON object)")
        if "accounting" in meta:  # reports and gates read these numbers
            acct = meta["accounting"]
            key = next((k for k in ACCOUNTING_NUMBERS if type(acct.get(k)) not in (int, float)), None)
            if key is not None:
                raise CkvError(f"{path}: corrupted metadata entry 'accounting' ('{key}' is not a number)")

        def bad(why: str) -> CkvError:
            return CkvError(f"{path}: inconsistent artifact ({why})")

        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPE.values():
                raise bad(f"tensor '{name}' has dtype {info['dtype']}, which ckv never writes")
        why = _check_plan(meta.get("plan"))
        if why:
            raise bad(why)
        try:
            plan = plan_from_description(meta["plan"])
        except CkvError as e:
            raise bad(f"its plan: {e}") from None
        except DECODE_ERRORS as e:
            raise bad(f"its plan: {type(e).__name__}: {str(e)[:100]}") from None
        fields = meta.get("fields")
        declared = plan.fields()
        check_listed_fields(fields, declared, bad)
        offsets_count = fields["users/offsets"].get("count") if isinstance(fields["users/offsets"], dict) else None
        n_tokens = fields["tokens/items"].get("count") if isinstance(fields["tokens/items"], dict) else None
        if not _is_int(offsets_count, 1, 2**62) or not _is_int(n_tokens, 0, 2**62):
            raise bad("metadata 'fields' gives no user or token count")
        n_users = offsets_count - 1
        check_field_tensors(fields, declared, header, n_tokens, n_users, bad)
        table = {"users/id_bytes": "U8", "users/id_offsets": "I64"}
        for name, dtype in table.items():
            info = header.get(name)
            if info is None or info["dtype"] != dtype or len(info["shape"]) != 1:
                raise bad(f"tensor '{name}' is missing or not a {dtype} vector")
        if header["users/id_offsets"]["shape"] != [n_users + 1]:
            raise bad(f"tensor 'users/id_offsets' has shape {header['users/id_offsets']['shape']}, expected [{n_users + 1}]")
        pooled = {s for s, c in plan.streams.items() if not isinstance(c, str)}
        for name in header:
            if name not in declared and name not in table and (shared is not None or
                    not name.startswith("shared/") or name.split("/")[1] not in pooled or name.count("/") != 2):
                raise bad(f"unexpected tensor '{name}'")
        try:
            f = safe_open(str(path), "np")
            offsets = f.get_tensor("users/offsets")
            id_bytes = f.get_tensor("users/id_bytes").tobytes()
            id_off = f.get_tensor("users/id_offsets")
            if shared is None:
                shared = {n: f.get_tensor(n) for n in header if n.startswith("shared/")}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CkvError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        user_ids = checked_user_table(offsets, id_off, id_bytes, n_tokens, bad)
        load_shared_into(plan, shared, bad)
        return Artifact(path, meta, plan, fields, offsets, user_ids)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    def user_index(self, user_id: str) -> int:
        if not hasattr(self, "_lookup"):
            self._lookup = {u: i for i, u in enumerate(self.user_ids)}
        if user_id not in self._lookup:
            raise CkvError(f"user '{user_id}' is not in {self.path}")
        return self._lookup[user_id]

    def check_model(self, model) -> None:
        """Refuse a model whose caches this artifact's plan cannot hold (items, layers, widths, timestamps)."""
        plan, d_k, d_v = self.plan, *model.kv_dims
        if plan.n_items != model.config.n_items:
            raise CkvError(f"{self.path}: holds ids of {plan.n_items:,} items, the checkpoint has {model.config.n_items:,}")
        if plan.n_layers != len(model.layers):
            raise CkvError(f"{self.path}: holds {plan.n_layers} layers, the checkpoint has {len(model.layers)}")
        for name, codec in plan.streams.items():
            want = d_k if name.endswith(".k") else d_v
            if not isinstance(codec, str) and codec.d != want:
                raise CkvError(f"{self.path}: stream {name} is {codec.d} wide, the checkpoint's is {want}")
        if plan.timestamps != (getattr(model, "arch", "") == "hstu"):
            raise CkvError(f"{self.path}: " + ("holds no timestamps, which the checkpoint's attention reads"
                                               if not plan.timestamps else "holds timestamps, which the checkpoint does not read"))

    def checked_users(self, users) -> np.ndarray:
        """User indices as int64 (1-D), or a CkvError for non-integers or indices out of range."""
        users = np.asarray(users)
        if users.dtype.kind not in "iu" and len(users):
            raise CkvError(f"user indices must be integers, got {users.dtype}")
        users = users.astype(np.int64).reshape(-1)
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise CkvError(f"user index out of range (artifact has {self.n_users} users)")
        return users

    def read_fields(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Fields of the given users (indices, any order) and their offsets, reading only their byte ranges."""
        users = self.checked_users(users)
        starts, ends = self.offsets[users], self.offsets[users + 1]
        out_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        out: dict[str, np.ndarray] = {}
        try:
            with safe_open(str(self.path), "np") as f:
                for name, fm in self.fields.items():
                    if name == "users/offsets":
                        continue
                    sl = f.get_slice(name)
                    if fm["per"] == "user":
                        width = fm["width"]
                        out[name] = (np.stack([sl[int(u) : int(u) + 1][0] for u in users]) if len(users)
                                     else np.zeros((0, width), fm["dtype"]))
                    elif fm["bits"]:
                        parts = [np.zeros(0, np.int64)]
                        for a, b in zip(starts, ends):
                            if b > a:  # safetensors refuses an empty slice of an empty tensor
                                lo, hi, bit = byte_range(int(a), int(b - a), fm["bits"])
                                parts.append(unpack(sl[lo:hi], fm["bits"], int(b - a), bit))
                        out[name] = np.concatenate(parts)
                    else:
                        shape = (0,) if name.startswith("tokens/") else (0, fm["width"])
                        parts = [np.zeros(shape, fm["dtype"])] + [sl[int(a) : int(b)] for a, b in zip(starts, ends) if b > a]
                        out[name] = np.concatenate(parts)
        except (SafetensorError, OSError, ValueError) as e:  # the file changed since it was opened
            raise CkvError(f"{self.path}: cannot read ({str(e).splitlines()[0][:120]})") from None
        self._check_ranges(out)
        return out, out_offsets

    def decode(self, users, item_kv) -> "FlatCache":
        """Decoded caches of the given users (indices) as a flat cache; `item_kv(items, positions)` recomputes
        the streams stored as item ids (pass `lambda i, p: item_layer_kv(model, i, p)`)."""
        fields, offsets = self.read_fields(np.asarray(users))
        try:
            with np.errstate(all="ignore"):  # corrupted values decode to NaN quietly: `verify` names the tensor
                return self.plan.decode(fields, offsets, item_kv)
        except DECODE_ERRORS as e:  # checked at open; a last line of defence against a file that fools the checks
            raise CkvError(f"{self.path}: cannot decode ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None

    def _check_ranges(self, fields: dict[str, np.ndarray]) -> None:
        for stream, codec in self.plan.streams.items():
            if not isinstance(codec, str) and f"{stream}/idx" in fields and hasattr(codec, "pool_size"):
                idx = fields[f"{stream}/idx"]
                if len(idx) and idx.max() >= codec.pool_size:
                    raise CkvError(f"{self.path}: {stream} pool index {int(idx.max())} out of range (pool {codec.pool_size})")
        items = fields.get("tokens/items")
        if items is not None and len(items) and items.max() > self.plan.n_items:
            raise CkvError(f"{self.path}: item id {int(items.max())} out of range ({self.plan.n_items} items)")

    def verify(self) -> list[str]:
        """Names of tensors whose bytes no longer match the checksum written with them."""
        sums = self.meta.get("checksums", {})
        if not isinstance(sums, dict):
            return ["checksums"]
        bad = []
        try:
            with safe_open(str(self.path), "np") as f:
                names = set(f.keys())
                for name in sorted(names):
                    if sums.get(name) != _sha(f.get_tensor(name)):
                        bad.append(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CkvError(f"{self.path}: cannot read ({str(e).splitlines()[0][:120]})") from None
        return bad + [n for n in sums if n not in names]
