"""Read a `torch.save` zip file without executing anything from it.

A torch checkpoint is a zip archive: `<dir>/data.pkl` (a pickle of the saved object) and `<dir>/data/<key>` (the raw
bytes of each tensor storage). A pickle is a program: its GLOBAL opcodes name any importable callable and its
REDUCE/NEWOBJ/BUILD opcodes call it, which is how a crafted file runs a command on `torch.load(weights_only=False)`.
`torch.load(weights_only=True)` resolves an allow-list instead, but refuses RecBole's files outright (their pickle
references RecBole's `Config`, its enums, yaml's loader and numpy scalars).

`load_torch_zip` walks `data.pkl` with an unpickler whose `find_class` never imports anything. It resolves exactly:
- `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor_v3` / `_rebuild_parameter`: ckv's own functions that build
  a tensor from storage bytes read here (shape, stride and offset checked against the storage size);
- `torch.<Type>Storage` (and `torch.storage.UntypedStorage` / `TypedStorage`): a dtype marker;
- `collections.OrderedDict`: the dict subclass itself.
Every other global becomes an `Inert` class created here: "calling" it (REDUCE, NEWOBJ) makes an `Inert` instance
that records the global's name, the arguments and any BUILD state, and does nothing else. The named global is never
imported, looked up or called, so nothing in the file can run. Sizes are bounded: the pickle, each storage and the
total read (`max_bytes`); storages must be stored uncompressed, in little-endian byte order.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

from ckv_cli.errors import CkvError

MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 16 * 1024**3

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class Inert:
    """Stand-in for a global the pickle named: holds the name, the call arguments and the BUILD state; inert."""

    module = ""
    name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "kwargs", kwargs)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "items", [])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):  # SETITEM(S) on an inert object
        self.items.append((key, value))

    def append(self, value):  # APPEND on an inert object
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __call__(self, *args, **kwargs):  # REDUCE with an inert *instance* as the callable
        return _inert_class(self.module, self.name + "()")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.name}>"


_CLASSES: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
    key = (str(module), str(name))
    if key not in _CLASSES:
        _CLASSES[key] = type("Inert", (Inert,), {"module": key[0], "name": key[1]})
    return _CLASSES[key]


def global_name(obj) -> str | None:
    """'module.name' of an inert object or class, else None."""
    if isinstance(obj, Inert) or (isinstance(obj, type) and issubclass(obj, Inert)):
        return f"{obj.module}.{obj.name}"
    return None


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    def __init__(self, dtype, raw: bytes):
        self.dtype, self.raw = dtype, raw

    @property
    def numel(self) -> int:
        return len(self.raw) // _itemsize(self.dtype)


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_int_tuple(x) -> bool:
    return isinstance(x, tuple) and all(type(v) is int and v >= 0 for v in x)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2's arguments -> a tensor that owns a copy of its bytes."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    if type(offset) is not int or offset < 0 or not _is_int_tuple(size) or not _is_int_tuple(stride) \
            or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor with an invalid offset, shape or stride")
    numel = storage.numel
    if all(s > 0 for s in size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= numel:
            raise pickle.UnpicklingError(f"a tensor reaching element {last:,} of a storage of {numel:,}")
    flat = torch.frombuffer(bytearray(storage.raw), dtype=storage.dtype) if storage.raw else torch.empty(0, dtype=storage.dtype)
    return torch.as_strided(flat, size, stride, offset).clone()


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *rest):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, max_bytes: int):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.max_bytes = archive, prefix, max_bytes
        self.read_bytes = 0
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):  # never imports: the allowed names map to ckv's own objects
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                                           "int8", "uint8", "bool"):
            return getattr(torch, name)  # a dtype object (the v3 rebuild's argument): data, not code
        return _inert_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("an unknown persistent id (only tensor storages are read)")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"a storage of unsupported type {global_name(stype) or type(stype).__name__}")
        if not isinstance(key, str) or not key.isdigit() or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("a storage with an invalid key or size")
        if key in self.storages:
            return self.storages[key]
        member = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
        need = numel * _itemsize(stype.dtype)
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != need:
            raise pickle.UnpicklingError(f"storage {key}: {info.file_size:,} bytes (compressed: "
                                         f"{info.compress_type != zipfile.ZIP_STORED}), expected {need:,} stored")
        self.read_bytes += need
        if self.read_bytes > self.max_bytes:
            raise pickle.UnpicklingError(f"more than {self.max_bytes:,} bytes of tensors")
        storage = _Storage(stype.dtype, self.archive.read(member))
        self.storages[key] = storage
        return storage


def load_torch_zip(path: str | Path, max_bytes: int = MAX_TOTAL_BYTES, max_pickle_bytes: int = MAX_PICKLE_BYTES):
    """The object a `torch.save` zip file holds, tensors materialised and every other global inert (module
    docstring). Raises CkvError (one line) on anything it will not read."""
    path = Path(path)
    if not path.exists():
        raise CkvError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CkvError(f"expected a checkpoint file, got a directory: {path}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise CkvError(f"{path}: a legacy (pre-1.6, non-zip) torch.save file; ckv reads only the zip format: "
                           "re-save it with a current torch") from None
        raise CkvError(f"{path}: not a torch.save zip file") from None
    except OSError as e:
        raise CkvError(f"cannot read {path}: {e.strerror or e}") from None
    with archive:
        pkls = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pkls) != 1:
            raise CkvError(f"{path}: not a torch.save zip file (no single <dir>/data.pkl)")
        info = pkls[0]
        prefix = info.filename[: -len("data.pkl")]
        if info.file_size > max_pickle_bytes or info.compress_type != zipfile.ZIP_STORED:
            raise CkvError(f"{path}: its pickle is {info.file_size:,} bytes (at most {max_pickle_bytes:,}, stored)")
        try:
            order = archive.read(prefix + "byteorder").decode().strip()
        except KeyError:
            order = "little"
        if order != "little":
            raise CkvError(f"{path}: tensors saved in {order}-endian byte order; ckv reads little-endian")
        try:
            return _Unpickler(archive.read(info), archive, prefix, max_bytes).load()
        except CkvError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                RuntimeError, RecursionError, MemoryError, zipfile.BadZipFile, OSError) as e:
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise CkvError(f"{path}: unreadable checkpoint pickle ({msg})") from None
