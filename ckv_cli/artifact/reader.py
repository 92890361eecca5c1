"""Reading an artifact (one file, or one shard with its shared tensors) for every model, next-item or CTR.

`Artifact.open` never trusts the file: it checks the safetensors header (lengths, dtypes, shapes against byte
spans), the metadata, the plan (`ckv_cli.codecs.plan.plan_from_description`), every field's declaration against
its codec and its tensor's dtype and shape, the user offsets and id table, that each ragged field's per-user
counts sum to its rows, and that the shared tensors fit their codecs; `read_fields` checks the indices and ids
it reads (and that each user's escape rows match its escape codes). A file that fails any check is refused with a one-line
CkvError. Values are not checked on read (that is what the checksums are for: `verify`). The file is mapped
read-only (`SafetensorsMap`); a batch read is one gather per field over the users' token ranges (bit-packed
fields unpacked at those positions only): nothing is read for the other users.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ckv_cli.artifact.format import (ACCOUNTING_NUMBERS, FORMAT, FORMAT_VERSION, SAFETENSORS_DTYPE, SHARD_FORMAT, _is_int,
                                     _sha, check_field_tensors, check_listed_fields, checked_user_table,
                                     decode_metadata, load_shared_into, ragged_count)
from ckv_cli.codecs.plan import DECODE_ERRORS, CachePlan, plan_from_description
from ckv_cli.errors import CkvError
from ckv_cli.io import formats
from ckv_cli.io.safetensors import SafetensorsMap, read_header, unpack_at
from ckv_cli.spec import FlatCache, token_index

ID_TABLE = {"users/id_bytes": "U8", "users/id_offsets": "I64"}
ID_RANGES = {"tokens/ratings": "rating", "tokens/gaps": "gap"}  # event ids a CTR plan may store (their widths)


def user_indices(lookup: dict[str, int], user_ids, where) -> np.ndarray:
    """Raw user ids (one, or a sequence of them) -> indices through `lookup`; CkvError naming an unknown user and
    `where` (the artifact) it is missing from."""
    from collections.abc import Sequence

    if isinstance(user_ids, (str, bytes, int, np.integer)) or not isinstance(user_ids, (Sequence, np.ndarray)):
        user_ids = [user_ids]
    out = np.empty(len(user_ids), np.int64)
    for j, u in enumerate(user_ids):
        key = u.decode() if isinstance(u, bytes) else str(u)
        if key not in lookup:
            raise CkvError(f"user '{key}' is not in {where}")
        out[j] = lookup[key]
    return out


class Artifact:
    """An opened artifact: metadata, plan (codecs loaded), user table up front; fields read on demand."""

    def __init__(self, path: Path, meta: dict, plan: CachePlan, fields: dict[str, dict], offsets: np.ndarray,
                 user_ids: list[str], mapped: SafetensorsMap | None = None):
        self.path, self.meta, self.plan, self.fields = path, meta, plan, fields
        self.offsets, self.user_ids, self.mapped = offsets, user_ids, mapped
        self.rows: dict[str, np.ndarray] = {}  # ragged field -> (U + 1,) row offsets (from its per-user counts)
        self._lookup = None

    @classmethod
    def open(cls, path: str | Path, shared: dict[str, np.ndarray] | None = None) -> "Artifact":
        """Open and check an artifact file; with `shared` (name -> array, from a shared-tensor file) a shard,
        which holds the per-user tensors only (`ckv_cli.artifact.sharded`)."""
        path = Path(path)
        if not path.exists():
            raise CkvError(f"artifact not found: {path}")
        if path.is_dir():
            raise CkvError(f"expected an artifact file, got a directory: {path}")
        header, raw = read_header(path)
        meta, plan, fields, n_users, n_tokens = _checked(path, header, raw, shared is not None)
        mapped = SafetensorsMap(path)
        try:
            if (mapped.header, mapped.metadata) != (header, raw):
                raise CkvError(f"{path}: the file changed while it was being opened")
            t = mapped.tensors
            offsets = np.array(t["users/offsets"], dtype=np.int64)
            user_ids = checked_user_table(offsets, np.array(t["users/id_offsets"], dtype=np.int64),
                                          t["users/id_bytes"].tobytes(), n_tokens, _bad(path))
            rows = ragged_rows(t, fields, _bad(path))
            if shared is None:
                shared = {n: np.array(t[n]) for n in header if n.startswith("shared/")}
            load_shared_into(plan, shared, _bad(path))
        except BaseException:
            mapped.close()
            raise
        out = cls(path, meta, plan, fields, offsets, user_ids, mapped)
        out.rows = rows
        return out

    # -- what it is
    @property
    def task(self) -> str:
        return str(self.meta.get("task", "next-item"))

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lookup(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = {u: i for i, u in enumerate(self.user_ids)}
        return self._lookup

    def user_index(self, user_id: str) -> int:
        return int(self.index([user_id])[0])

    def index(self, user_ids) -> np.ndarray:
        """Raw user ids (one or a sequence) -> user indices; a CkvError naming an unknown user."""
        return user_indices(self.lookup, user_ids, self.path)

    def check_model(self, model) -> None:
        """Refuse a model whose caches this artifact's plan cannot hold (items, streams, widths, ids)."""
        why = self.plan.check_model(model)
        if why:
            raise CkvError(f"{self.path}: {why}")

    def check_source(self, checkpoint_sha256: str) -> None:
        """Refuse an artifact made from another checkpoint (`check_source`)."""
        check_source(self.meta, self.path, checkpoint_sha256)

    def checked_users(self, users) -> np.ndarray:
        """User indices as int64 (1-D), or a CkvError for non-integers or indices out of range."""
        users = np.asarray(users)
        if users.dtype.kind not in "iu" and len(users):
            raise CkvError(f"user indices must be integers, got {users.dtype}")
        users = users.astype(np.int64).reshape(-1)
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise CkvError(f"user index out of range (artifact has {self.n_users} users)")
        return users

    # -- reading
    def read_fields(self, users) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stored fields of the given users (indices, any order: token fields concatenated in that order, bit-packed
        ones unpacked to int64; per-user fields one row per user) and their offsets (B + 1,)."""
        users = self.checked_users(users)
        out, offsets = gather_fields(self.mapped.tensors, self.fields, self.offsets, users, self.rows)
        self.check_ranges(out, offsets)
        return out, offsets

    def check_ranges(self, fields: dict[str, np.ndarray], offsets: np.ndarray | None = None) -> None:
        """Refuse indices a corrupted file could hold (pool entries, item-coded indices whose escape rows do not
        match their escape codes, item, rating and gap ids) before decoding."""
        for stream, codec in self.plan.coded().items():
            if hasattr(codec, "index_check") and offsets is not None:
                sub = {f.name: fields[f"{stream}/{f.name}"] for f in codec.index_fields()}
                why = codec.index_check(sub, offsets)
                if why:
                    raise CkvError(f"{self.path}: {stream} {why}")
                continue
            idx = fields.get(f"{stream}/idx")
            if idx is not None and len(idx) and hasattr(codec, "pool_size") and int(idx.max()) >= codec.pool_size:
                raise CkvError(f"{self.path}: {stream} pool index {int(idx.max())} out of range (pool {codec.pool_size})")
        items = fields.get("tokens/items")
        if items is not None and len(items) and int(items.max()) > self.plan.n_items:
            raise CkvError(f"{self.path}: item id {int(items.max())} out of range ({self.plan.n_items} items)")
        for t in self.plan.ids:
            v = fields.get(f"tokens/{t.name}")
            if t.name in ("ratings", "gaps") and v is not None and len(v) and int(v.max()) >= 1 << t.bits:
                raise CkvError(f"{self.path}: {ID_RANGES[f'tokens/{t.name}']} id {int(v.max())} out of range")

    def decode_fields(self, fields: dict[str, np.ndarray], offsets: np.ndarray, model) -> FlatCache:
        try:
            with np.errstate(all="ignore"):  # corrupted values decode to NaN quietly: `verify` names the tensor
                return self.plan.decode(fields, offsets, model)
        except DECODE_ERRORS as e:  # checked at open; a last line of defence against a file that fools the checks
            raise CkvError(f"{self.path}: cannot decode ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None

    def decode(self, users, model) -> FlatCache:
        """Decoded caches of the given users (indices) as a flat cache; `model` (the one reading the cache)
        recomputes the recomputed streams."""
        fields, offsets = self.read_fields(np.asarray(users))
        return self.decode_fields(fields, offsets, model)

    def verify(self) -> list[str]:
        """Names of tensors whose bytes no longer match the checksum written with them."""
        sums = self.meta.get("checksums", {})
        if not isinstance(sums, dict):
            return ["checksums"]
        t = self.mapped.tensors
        return [n for n in sorted(t) if sums.get(n) != _sha(t[n])] + [n for n in sums if n not in t]

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_source(meta: dict, path, checkpoint_sha256: str) -> None:
    """Refuse an artifact (`meta`: its metadata, or an index's; `path`: what the message names) made from another
    checkpoint (its metadata keeps the checkpoint's sha256). An artifact
    of `ckv compress --finetune` is read by its fine-tuned student (`student_sha256`): the student is
    accepted, the teacher it was compressed from is refused (reading it with the teacher's weights is not what
    was measured)."""
    made_from = meta.get("checkpoint_sha256")
    student = meta.get("student_sha256")
    if student is not None:
        if checkpoint_sha256 == student:
            return
        name = meta.get("student_checkpoint", "its student checkpoint")
        if checkpoint_sha256 == made_from:
            raise CkvError(f"{path} is read by the fine-tuned student {name}, not by the teacher checkpoint "
                           f"it was compressed from: use {name}")
        raise CkvError(f"{path} is read by the fine-tuned student {name} (sha256 {str(student)[:12]}...), "
                       f"not by this checkpoint ({checkpoint_sha256[:12]}...)")
    if made_from != checkpoint_sha256:
        raise CkvError(f"{path} was made from another checkpoint (sha256 {str(made_from)[:12]}..., "
                       f"this checkpoint {checkpoint_sha256[:12]}...)")


def gather_fields(t: dict[str, np.ndarray], fields: dict[str, dict], offsets: np.ndarray, users: np.ndarray,
                  rows: dict[str, np.ndarray] | None = None):
    """Fields and offsets of `users` from one mapped file `t` whose users' tokens are at `offsets` (and whose
    ragged fields' rows are at `rows[name]`, (U + 1,) row offsets)."""
    starts = offsets[users]
    lengths = offsets[users + 1] - starts
    tok = token_index(starts, lengths)
    out = {}
    for name, fm in fields.items():
        if name == "users/offsets":
            continue
        at = tok
        if fm["per"] == "ragged":
            r = rows[name]
            at = token_index(r[users], r[users + 1] - r[users])
        if fm["per"] == "user":
            out[name] = np.array(t[name][users])
        elif fm["bits"]:
            out[name] = unpack_at(t[name], at, fm["bits"])
        else:
            out[name] = np.array(t[name][at])
    return out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def ragged_rows(t: dict[str, np.ndarray], fields: dict[str, dict], bad) -> dict[str, np.ndarray]:
    """Each ragged field's row offsets (U + 1,) from its per-user counts, checked to sum to its rows; `bad(why)`
    makes the error."""
    out = {}
    for name, fm in fields.items():
        if fm.get("per") != "ragged":
            continue
        counts = np.asarray(t[fm["counts"]], np.int64).reshape(-1)
        if len(counts) and int(counts.min()) < 0:
            raise bad(f"'{fm['counts']}' holds a negative row count")
        out[name] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if int(out[name][-1]) != ragged_count(fm):
            raise bad(f"the counts in '{fm['counts']}' sum to {int(out[name][-1]):,}, '{name}' has {ragged_count(fm):,} rows")
    return out


def _bad(path: Path):
    def bad(why: str) -> CkvError:
        return CkvError(f"{path}: inconsistent artifact ({why})")
    return bad


def _checked(path: Path, header: dict, raw: dict, is_shard: bool):
    """(metadata, plan, fields, users, tokens) of an artifact's header, every check of the module docstring."""
    fmt = raw.get("format")
    if fmt == formats.CHECKPOINT:
        from ckv_cli.models import TASKS

        if TASKS.get(raw.get("arch")) == "ctr":
            raise CkvError(f"{path}: not a CTR artifact but a ckv checkpoint (ckv compress of a CTR model writes one)")
        raise CkvError(f"{path}: not a ckv artifact but a ckv checkpoint (written by ckv train)")
    if fmt == SHARD_FORMAT and not is_shard:
        raise CkvError(f"{path}: a shard of a sharded artifact: open its index (.json) instead")
    if fmt != (SHARD_FORMAT if is_shard else FORMAT):
        raise CkvError(f"{path}: not a ckv artifact{' shard' if is_shard else ''} (metadata 'format' is {fmt!r})")
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
    bad = _bad(path)
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPE.values():
            raise bad(f"tensor '{name}' has dtype {info['dtype']}, which ckv never writes")
    try:
        plan = plan_from_description(meta.get("plan"), meta.get("fields") if isinstance(meta.get("fields"), dict)
                                     else None, bad)
    except CkvError as e:
        if str(e).startswith(str(path)):
            raise
        raise bad(f"its plan: {e}") from None
    except DECODE_ERRORS as e:
        raise bad(f"its plan: {type(e).__name__}: {str(e)[:100]}") from None
    fields = meta.get("fields")
    declared = plan.fields()
    check_listed_fields(fields, declared, bad)
    token_fields = [n for n, f in declared.items() if f.per == "token"]
    n_offsets = fields["users/offsets"].get("count") if isinstance(fields["users/offsets"], dict) else None
    n_tokens = (fields[token_fields[0]].get("count") if token_fields and isinstance(fields[token_fields[0]], dict)
                else None)
    if not _is_int(n_offsets, 1, 2**62) or not _is_int(n_tokens, 0, 2**62):
        raise bad("metadata 'fields' gives no user or token count")
    n_users = n_offsets - 1
    check_field_tensors(fields, declared, header, n_tokens, n_users, bad)
    for name, dtype in ID_TABLE.items():
        info = header.get(name)
        if info is None or info["dtype"] != dtype or len(info["shape"]) != 1:
            raise bad(f"tensor '{name}' is missing or not a {dtype} vector")
    if header["users/id_offsets"]["shape"] != [n_users + 1]:
        raise bad(f"tensor 'users/id_offsets' has shape {header['users/id_offsets']['shape']}, expected [{n_users + 1}]")
    coded = set(plan.shared_owners())
    for name in header:
        if name not in declared and name not in ID_TABLE and (
                is_shard or not name.startswith("shared/") or name.count("/") != 2 or name.split("/")[1] not in coded):
            raise bad(f"unexpected tensor '{name}'")
    return meta, plan, fields, n_users, n_tokens
