"""The compressed-cache artifact: one safetensors file that explains itself.

Tensors
- `shared/<stream>/<name>`: what every user shares (pools, routers, bases), e.g. `shared/L1.k/pool`;
- `users/offsets` (U + 1,) int64: user u's tokens are [offsets[u], offsets[u+1]);
- `users/id_bytes`, `users/id_offsets`: the user id table (utf-8), so users are found by their raw id;
- `tokens/items` (bit-packed), `tokens/timestamps` (int32, models that read event times), and per stream
  `<stream>/<field>`: per-token fields flattened in user order (bit-packed ones as uint8 streams), per-user
  fields as (U, width).
`__metadata__` (strings; JSON where structured): format, format_version, plan (which codec stores each
stream, with parameters), fields (name -> per/dtype/width/bits/count), accounting (bytes, NOTES §4),
metrics, source checkpoint path and sha256, data fingerprint, command, ckv version, seed, and `checksums`
(sha256 of each tensor's bytes, checked by `verify`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ckv_cli import __version__
from ckv_cli.checkpoint import write_safetensors
from ckv_cli.codecs import CachePlan, Field, plan_from_description
from ckv_cli.codecs.bits import byte_range, pack, unpack
from ckv_cli.errors import CkvError
from ckv_cli.kv.extract import FlatCache

FORMAT = "ckv-artifact"
FORMAT_VERSION = "1"


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def field_meta(f: Field, count: int) -> dict:
    return {"per": f.per, "dtype": f.dtype, "width": f.width, "bits": f.bits, "count": count}


def write_artifact(path: str | Path, plan: CachePlan, fields: dict[str, np.ndarray], offsets: np.ndarray,
                   user_ids: list[str], metadata: dict, force: bool = False) -> dict[str, int]:
    """Write atomically; returns bytes per tensor as stored. `fields` hold unpacked per-token/per-user arrays."""
    declared = plan.fields()
    tensors: dict[str, np.ndarray] = {}
    fmeta = {}
    n_tokens = int(offsets[-1])
    for name, f in declared.items():
        if name == "users/offsets":
            continue
        arr = np.asarray(fields[name])
        count = n_tokens if f.per == "token" else len(offsets) - 1
        if len(arr) != count:
            raise CkvError(f"internal: field {name} has {len(arr)} rows, expected {count}")
        tensors[name] = pack(arr, f.bits) if f.bits else np.ascontiguousarray(arr.reshape(count, -1) if f.width > 1 or f.per == "user" else arr)
        fmeta[name] = field_meta(f, count)
    tensors["users/offsets"] = offsets.astype(np.int64)
    fmeta["users/offsets"] = field_meta(declared["users/offsets"], len(offsets))
    ids = [str(u).encode() for u in user_ids]
    tensors["users/id_bytes"] = np.frombuffer(b"".join(ids), dtype=np.uint8) if ids else np.zeros(0, np.uint8)
    tensors["users/id_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in ids])]).astype(np.int64)
    for stream, codec in plan.streams.items():
        if not isinstance(codec, str):
            for name, t in codec.shared().items():
                tensors[f"shared/{stream}/{name}"] = t.detach().cpu().contiguous().numpy()
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "plan": json.dumps(plan.describe(), sort_keys=True),
                 "fields": json.dumps(fmeta, sort_keys=True), "ckv_version": __version__,
                 "checksums": json.dumps({k: _sha(v) for k, v in tensors.items()}, sort_keys=True)})
    write_safetensors(Path(path), save_file, tensors, meta, force=force)
    return {k: int(v.nbytes) for k, v in tensors.items()}


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
    def open(path: str | Path) -> "Artifact":
        path = Path(path)
        if not path.exists():
            raise CkvError(f"artifact not found: {path}")
        if path.is_dir():
            raise CkvError(f"expected an artifact file, got a directory: {path}")
        try:
            f = safe_open(str(path), "np")
            raw = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CkvError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        if raw.get("format") != FORMAT:
            raise CkvError(f"{path}: not a ckv artifact (metadata 'format' is {raw.get('format')!r})")
        meta = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v) if v.startswith(("{", "[")) else v  # "" is a plain string too
            except json.JSONDecodeError:
                raise CkvError(f"{path}: corrupted metadata entry '{k}'") from None
        try:
            plan = plan_from_description(meta["plan"])
            names = set(f.keys())
            for stream, codec in plan.streams.items():
                if not isinstance(codec, str):
                    prefix = f"shared/{stream}/"
                    codec.load_shared({n[len(prefix):]: torch.from_numpy(f.get_tensor(n).copy()) for n in names if n.startswith(prefix)})
            offsets = f.get_tensor("users/offsets")
            id_bytes = f.get_tensor("users/id_bytes").tobytes()
            id_off = f.get_tensor("users/id_offsets")
        except (KeyError, SafetensorError, ValueError, TypeError) as e:
            raise CkvError(f"{path}: incomplete or inconsistent artifact ({type(e).__name__}: {str(e)[:100]})") from None
        if len(offsets) < 1 or (np.diff(offsets) < 0).any() or offsets[0] != 0:
            raise CkvError(f"{path}: user offsets are not increasing")
        user_ids = [id_bytes[a:b].decode("utf-8", "replace") for a, b in zip(id_off[:-1], id_off[1:])]
        return Artifact(path, meta, plan, meta["fields"], offsets, user_ids)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    def user_index(self, user_id: str) -> int:
        if not hasattr(self, "_lookup"):
            self._lookup = {u: i for i, u in enumerate(self.user_ids)}
        if user_id not in self._lookup:
            raise CkvError(f"user '{user_id}' is not in {self.path}")
        return self._lookup[user_id]

    def read_fields(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Fields of the given users (indices, any order) and their offsets, reading only their byte ranges."""
        users = np.asarray(users, dtype=np.int64)
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise CkvError(f"user index out of range (artifact has {self.n_users} users)")
        starts, ends = self.offsets[users], self.offsets[users + 1]
        out_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        out: dict[str, np.ndarray] = {}
        with safe_open(str(self.path), "np") as f:
            for name, fm in self.fields.items():
                if name == "users/offsets":
                    continue
                sl = f.get_slice(name)
                if fm["per"] == "user":
                    out[name] = np.stack([sl[int(u) : int(u) + 1][0] for u in users]) if len(users) else np.zeros((0, fm["width"]))
                elif fm["bits"]:
                    parts = []
                    for a, b in zip(starts, ends):
                        lo, hi, bit = byte_range(int(a), int(b - a), fm["bits"])
                        parts.append(unpack(sl[lo:hi], fm["bits"], int(b - a), bit))
                    out[name] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                else:
                    parts = [sl[int(a) : int(b)] for a, b in zip(starts, ends)]
                    out[name] = np.concatenate(parts) if parts else np.zeros(0)
        self._check_ranges(out)
        return out, out_offsets

    def decode(self, users, item_kv) -> "FlatCache":
        """Decoded caches of the given users (indices) as a flat cache; `item_kv(items, positions)` recomputes
        the streams stored as item ids (pass `lambda i, p: item_layer_kv(model, i, p)`)."""
        fields, offsets = self.read_fields(np.asarray(users))
        return self.plan.decode(fields, offsets, item_kv)

    def _check_ranges(self, fields: dict[str, np.ndarray]) -> None:
        for stream, codec in self.plan.streams.items():
            if not isinstance(codec, str) and f"{stream}/idx" in fields:
                idx = fields[f"{stream}/idx"]
                if len(idx) and idx.max() >= codec.pool_size:
                    raise CkvError(f"{self.path}: {stream} pool index {int(idx.max())} out of range (pool {codec.pool_size})")
        items = fields.get("tokens/items")
        if items is not None and len(items) and items.max() > self.plan.n_items:
            raise CkvError(f"{self.path}: item id {int(items.max())} out of range ({self.plan.n_items} items)")

    def verify(self) -> list[str]:
        """Names of tensors whose bytes no longer match the checksum written with them."""
        sums = self.meta.get("checksums", {})
        bad = []
        with safe_open(str(self.path), "np") as f:
            for name in f.keys():
                if sums.get(name) != _sha(f.get_tensor(name)):
                    bad.append(name)
        return bad + [n for n in sums if n not in set(safe_open(str(self.path), "np").keys())]
