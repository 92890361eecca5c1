"""What every store shares: an artifact (one file or a sharded one) opened for a model, users found by raw id,
items by raw id or index, a batch of users' stored fields read with one gather per field, decoded through the
plan, appends kept in an in-memory overlay (the file on disk is never changed), and `save` into a new artifact.

Subclasses add the task's scoring: `ckv_cli.serve.next_item.CacheStore` (`rank_next`, `score_items`) and
`ckv_cli.serve.ctr.CTRStore` (`score`). Both `append` new events through the model and the plan: `_merge` keeps
the old tokens' fields bit for bit for token-local codecs (plain, bf16, lowrank, pq, collective without user
dims: the router picks each new token's pool entry; with `index=item` the new token gets its item's list position
or an escape, appended after the user's old escapes), which is exactly what `ckv compress` of the extended log
stores for them; predictive streams whose prediction reads the window (`ema`, `item+pos`: `codes_tail`) keep the
old tokens' fields too and code only the new tokens, predicted from the whole window; collective's int8 user part
keeps the user's scale when the new values fit under it (else the user's part is requantised); other per-user or
per-group codecs (KIVI keys per channel) re-encode the user's whole stream from the decoded old vectors and the
new ones.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ckv_cli.artifact.format import reorder_users
from ckv_cli.artifact.reader import Artifact, user_indices
from ckv_cli.codecs import CollectiveCodec
from ckv_cli.codecs.base import quantize_per_user
from ckv_cli.codecs.plan import _context, _items, pack_side
from ckv_cli.errors import CkvError
from ckv_cli.spec import FlatCache

WRITTEN_BY_WRITER = ("format", "format_version", "plan", "fields", "ckv_version", "checksums")


class Store:
    """Users' caches served from an artifact on disk (module docstring). Open with `open`."""

    task = ""  # the task of the models this store serves

    def __init__(self, artifact: Artifact, model, item_vocab: list[str] | None, user_vocab: list[str] | None = None):
        self.artifact, self.model, self.plan = artifact, model.eval(), artifact.plan
        self.item_vocab, self._item_lookup = item_vocab, None
        self._user_rows = {str(u): i + 1 for i, u in enumerate(user_vocab or [])}
        self._user_ids = list(artifact.user_ids)
        self._lookup = {u: i for i, u in enumerate(self._user_ids)}
        self._overlay: dict[int, dict[str, np.ndarray]] = {}  # user index -> every field of that user

    # -- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, model, checkpoint: str | Path | None = None,
             item_vocab: Sequence[str] | None = None):
        """Open an artifact for the given model: a model object (then `checkpoint`, the file it was loaded from,
        is hashed and checked against the artifact's `checkpoint_sha256` when given, and its vocabularies used),
        or a checkpoint path (loaded and checked the same way). `path` is one artifact file or the index of a
        sharded one (a `.json` path). Refuses, with a CkvError, an artifact whose plan does not fit the model."""
        from ckv_cli.artifact.sharded import open_artifact
        from ckv_cli.io.files import sha256_file
        from ckv_cli.models.checkpoint import load_checkpoint, read_metadata

        meta = None
        if isinstance(model, (str, Path)):
            checkpoint = Path(model)
            model, meta = load_checkpoint(checkpoint)
        elif checkpoint is not None:
            meta = read_metadata(checkpoint)
            for key in ("item_vocab", "user_vocab"):
                if key in meta:
                    try:
                        meta[key] = json.loads(meta[key])
                    except (ValueError, RecursionError):
                        raise CkvError(f"{checkpoint}: corrupted checkpoint metadata: '{key}' is not valid JSON") from None
            check_weights(model, checkpoint)
        cls._check_task(model)
        model.eval()
        if next(model.parameters()).device.type != "cpu":
            raise CkvError("the store runs on the CPU: pass the model moved there (model.cpu())")
        artifact = open_artifact(path)
        try:
            cls._check_model(artifact, model)
            check_student(artifact, model)
            if checkpoint is not None:
                try:
                    digest = sha256_file(Path(checkpoint))
                except OSError as e:
                    raise CkvError(f"cannot read {checkpoint}: {e.strerror or e}") from None
                artifact.check_source(digest)
            vocab = list(item_vocab) if item_vocab is not None else (meta or {}).get("item_vocab")
            if vocab is not None and len(vocab) != model.config.n_items + 1:
                raise CkvError(f"the item vocabulary has {len(vocab):,} entries, the model has "
                               f"{model.config.n_items:,} items (+ 1 for padding)")
        except BaseException:
            artifact.close()
            raise
        return cls(artifact, model, [str(v) for v in vocab] if vocab is not None else None,
                   (meta or {}).get("user_vocab"))

    @classmethod
    def _check_task(cls, model) -> None:
        if getattr(model, "task", None) != cls.task:
            raise CkvError(f"{cls.__name__} serves {cls.task} models; this is a {getattr(model, 'task', '?')} model")

    @staticmethod
    def _check_model(artifact: Artifact, model) -> None:
        arch = artifact.meta.get("arch")
        if arch is not None and arch != getattr(model, "arch", None):
            raise CkvError(f"{artifact.path}: made from a {arch} checkpoint, the model is {getattr(model, 'arch', '?')}")
        artifact.check_model(model)

    def close(self) -> None:
        self.artifact.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- users and items ----------------------------------------------------------------------------------
    @property
    def user_ids(self) -> list[str]:
        """Raw ids of every user (the file's, then those created by `append`)."""
        return list(self._user_ids)

    def users(self) -> list[str]:
        """`user_ids` (kept for callers of the CTR store's first API)."""
        return self.user_ids

    def __len__(self) -> int:
        return len(self._user_ids)

    def __contains__(self, user_id) -> bool:
        return str(user_id) in self._lookup

    @property
    def appended_users(self) -> list[str]:
        """Users whose cache differs from the file (appended to since opening)."""
        return [self._user_ids[u] for u in sorted(self._overlay)]

    def index(self, user_ids) -> np.ndarray:
        """Raw user ids (a string or a sequence of them) -> user indices; CkvError naming an unknown user."""
        return user_indices(self._lookup, user_ids, self.artifact.path)

    def item_index(self, items) -> np.ndarray:
        """Items -> indices 1..n_items (same shape; one id gives shape (1,)): strings are raw ids looked up in the
        checkpoint's vocabulary, integers are taken as indices. CkvError naming an unknown or out-of-range item."""
        if isinstance(items, torch.Tensor):
            items = items.cpu().numpy()
        if isinstance(items, (str, int, np.integer)):
            items = [items]
        n = self.plan.n_items
        numeric = isinstance(items, np.ndarray) and items.dtype.kind in "iu"  # no per-element scan for strings
        objs = None if numeric else np.asarray(items, dtype=object)
        if objs is None or not any(isinstance(x, str) for x in objs.ravel()):
            arr = np.asarray(items)
            if arr.size and arr.dtype.kind not in "iu":
                raise CkvError(f"items must be raw item ids (strings) or item indices (integers), got {arr.dtype}")
            arr = arr.astype(np.int64)
            if arr.size and (int(arr.min()) < 1 or int(arr.max()) > n):
                raise CkvError(f"item index {int(arr[(arr < 1) | (arr > n)].ravel()[0])} is not in 1..{n}")
            return arr
        if self.item_vocab is None:
            raise CkvError("raw item ids need the checkpoint's item vocabulary: open the store with a checkpoint "
                           "path or item_vocab, or pass item indices")
        if self._item_lookup is None:
            self._item_lookup = {str(v): i for i, v in enumerate(self.item_vocab) if i > 0}
        out = np.empty(objs.shape, np.int64)
        for pos, x in np.ndenumerate(objs):
            if not isinstance(x, str) or x not in self._item_lookup:
                raise CkvError(f"item {x!r} is not in the checkpoint's item vocabulary")
            out[pos] = self._item_lookup[x]
        return out

    def item_ids_of(self, indices: np.ndarray) -> list[list[str]] | None:
        if self.item_vocab is None:
            return None
        return [[self.item_vocab[int(i)] for i in row] for row in np.atleast_2d(indices)]

    def user_rows(self, users: np.ndarray) -> torch.Tensor:
        """The model's user-embedding row of each user (0 = a user the checkpoint never saw; models that embed
        users)."""
        return torch.tensor([self._user_rows.get(self._user_ids[u], 0) for u in users], dtype=torch.long)

    # -- reading ----------------------------------------------------------------------------------------
    def read(self, user_ids) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored fields of a batch of users (token fields concatenated in the order given, per-user fields
        one row per user; bit-packed fields unpacked to int64) and their offsets (B + 1,): appends included."""
        return self._read(self.index(user_ids))

    def _read(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        users = np.asarray(users, np.int64)
        mine = np.fromiter((int(u) in self._overlay for u in users), bool, len(users)) if self._overlay else None
        if mine is None or not mine.any():
            return self.artifact.read_fields(users)
        disk, disk_off = self.artifact.read_fields(users[~mine])
        recs = [self._overlay[int(u)] for u in users[mine]]
        lengths = np.concatenate([np.diff(disk_off), [self._n_tokens(r) for r in recs]]).astype(np.int64)
        joined = {k: np.concatenate([disk[k]] + [r[k] for r in recs]) for k in disk}
        order = np.empty(len(users), np.int64)  # requested position -> position in [disk users, overlay users]
        order[np.flatnonzero(~mine)] = np.arange(int((~mine).sum()))
        order[np.flatnonzero(mine)] = int((~mine).sum()) + np.arange(len(recs))
        fields = reorder_users(joined, self.artifact.fields, lengths, order)
        return fields, np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)

    def _n_tokens(self, record: dict[str, np.ndarray]) -> int:
        name = next(n for n, fm in self.artifact.fields.items() if fm["per"] == "token")
        return len(record[name])

    @torch.no_grad()
    def fetch_flat(self, user_ids) -> FlatCache:
        """Decoded caches of a batch of users (raw ids), flat (`ckv_cli.spec.FlatCache`)."""
        return self._decode(*self.read(user_ids))

    def _decode(self, fields, offsets) -> FlatCache:
        return self.artifact.decode_fields(fields, offsets, self.model)

    # -- appending ----------------------------------------------------------------------------------------
    def _as_stored(self, name: str, v) -> np.ndarray:
        """A freshly encoded field in the dtype and shape a read returns (packed fields as int64)."""
        fm = self.artifact.fields[name]
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if fm["bits"]:
            return v.astype(np.int64).reshape(-1)
        v = v.astype(fm["dtype"])
        return v.reshape(-1) if name.startswith("tokens/") else v.reshape(len(v), fm["width"])

    @staticmethod
    def _appendable(codec) -> bool:
        """Token-local fields only (a new token's fields do not change the old tokens'), where per-user fields are
        only the row counts of ragged fields (an item-coded index: the new escapes follow the user's old ones); not
        a codec that reads positions or earlier tokens in the user's window (`token_local` False: predictive
        `item+pos` or `ema`, whose new tokens `_merge` codes from the whole window, `codes_tail`). A codec that
        reads the first layer's K/V (predictive `linear`) gets the new tokens' own."""
        fields = codec.fields()
        counts = {f.counts for f in fields if f.per == "ragged"}
        return (all(f.per != "user" or f.name in counts for f in fields)
                and getattr(codec, "axis", "token") != "channel" and getattr(codec, "token_local", True))

    def _encode(self, flat: FlatCache) -> dict[str, np.ndarray]:
        """A whole user's record."""
        return {k: self._as_stored(k, v) for k, v in self.plan.encode(flat).items()}

    def _merge(self, old: dict[str, np.ndarray], new: FlatCache, whole) -> dict[str, np.ndarray]:
        """The user's record `old` with the tokens `new` (exact streams, ids, side) appended (module docstring);
        `whole()` gives the user's decoded old tokens and the new ones as one flat cache, for codecs that re-encode
        the whole user."""
        out, ids, cache = {}, self.plan.encode_ids(new), None
        for t in self.plan.ids:
            name = f"tokens/{t.name}"
            if name in ids:  # event times coded at a few bits: below
                out[name] = np.concatenate([old[name], self._as_stored(name, ids[name])])
        if self.plan.time is not None:  # the anchor moves to the newest event: every token's gap is coded again
            cache = whole()
            times = self.plan.time.encode(np.asarray(cache.ids["timestamps"]), cache.offsets)
            out.update({f"time/{k}": self._as_stored(f"time/{k}", v) for k, v in times.items()})
        if self.plan.side_stored:
            for s in self.plan.side:
                name = f"tokens/{s.name}"
                out[name] = np.concatenate([old[name], self._as_stored(name, pack_side(new.side[s.name], s.bits))])
        for name, codec in self.plan.coded().items():
            names = [f"{name}/{f.name}" for f in codec.fields()]
            if self._appendable(codec):
                enc = codec.encode(self.plan.codec_input(new, name), new.offsets, **_items(codec, new.items),
                                   **_context(codec, self.plan.context(new.streams)))  # token-local
                out.update(self._appended(name, codec.fields(), old, enc))
            elif getattr(codec, "codes_tail", False):  # the new tokens alone, predicted from the whole window
                cache = whole() if cache is None else cache
                enc = codec.encode(self.plan.codec_input(new, name), cache.offsets, **_items(codec, cache.items),
                                   **_context(codec, self.plan.context(cache.streams)), tail=np.diff(new.offsets))
                out.update(self._appended(name, codec.fields(), old, enc))
            elif isinstance(codec, CollectiveCodec) and codec.user_dtype == "int8":
                out.update(self._merge_int8(name, codec, old, new.stream(name), new.items))
            else:  # per-user state: re-encode the user's stream from the decoded old vectors and the new ones
                cache = whole() if cache is None else cache
                enc = codec.encode(self.plan.codec_input(cache, name), cache.offsets, **_items(codec, cache.items),
                                   **_context(codec, self.plan.context(cache.streams)))  # predictive: first layer
                out.update({n_: self._as_stored(n_, enc[n_.split("/", 1)[1]]) for n_ in names})
        return out

    def _appended(self, name: str, fields, old: dict, enc: dict) -> dict[str, np.ndarray]:
        """Stream `name`'s `fields` of the record `old` with the new tokens' codes `enc` appended (per-user counts,
        such as escapes, add up)."""
        out = {}
        for f in fields:
            n_, add = f"{name}/{f.name}", self._as_stored(f"{name}/{f.name}", enc[f.name])
            out[n_] = old[n_] + add if f.per == "user" else np.concatenate([old[n_], add])
        return out

    def _merge_int8(self, name: str, codec: CollectiveCodec, old: dict, x: torch.Tensor,
                    items: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Collective with an int8 user part: new indices from the router (coded flat, or given the items: the new
        escapes follow the user's old ones); the new user values at the user's stored scale when they fit under it
        (old tokens unchanged), else the user's part requantised."""
        index, u = codec.encode_index(x, np.array([0, len(x)]), items)
        out = self._appended(name, codec.index_fields(), old, index)
        scale = old[f"{name}/scale"].astype(np.float32)  # (1, 1)
        q = torch.round(u / float(scale[0, 0]))
        if float(q.abs().max()) <= 127:
            user, new_scale = np.concatenate([old[f"{name}/user"], q.to(torch.int8).numpy()]), old[f"{name}/scale"]
        else:
            u_all = torch.cat([torch.from_numpy(old[f"{name}/user"].astype(np.float32) * scale[0, 0]), u])
            user, new_scale = quantize_per_user(u_all, np.array([0, len(u_all)]))
        return {**out, f"{name}/user": user, f"{name}/scale": np.asarray(new_scale, np.float16).reshape(1, 1)}

    def _put(self, uid: str, u: int | None, record: dict[str, np.ndarray]) -> int:
        if u is None:
            u = len(self._user_ids)
            self._user_ids.append(uid)
            self._lookup[uid] = u
        self._overlay[u] = record
        return u

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False, batch_users: int = 1024,
             metadata: dict | None = None) -> dict[str, int]:
        """Write a new artifact: every user (the file's, then those created by `append`) with the appends merged,
        atomically. The metadata is the source's with the byte accounting redone and an `appended` entry (users,
        the source file), updated by `metadata`; the metrics stay those measured when the source was compressed.
        Returns bytes per tensor."""
        from ckv_cli.pipeline.compress import accounting, full_width
        from ckv_cli.tasks import task_of

        users = np.arange(len(self._user_ids))
        lengths = self.token_counts(users)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def meta_for(ragged: dict[str, int]) -> dict:  # the escape rows the writer counted
            meta = {k: v for k, v in self.artifact.meta.items() if k not in WRITTEN_BY_WRITER}
            acct = accounting(self.plan, offsets, full_width(self.model), ragged=ragged)
            meta["accounting"] = {**acct, **task_of(self.model).accounting_extra(acct, self.plan, self.model, lengths)}
            meta["appended"] = {"users": self.appended_users, "source": str(self.artifact.path),
                                "source_checksums_sha256": _digest(self.artifact.meta.get("checksums", {}))}
            return {**meta, **(metadata or {})}

        return self.write_users(path, users, meta_for, force=force, batch_users=batch_users, lengths=lengths)

    def token_counts(self, users: np.ndarray) -> np.ndarray:
        """(B,) cached tokens of each user (indices; appends included)."""
        stored = np.diff(self.artifact.offsets).astype(np.int64)
        return np.array([self._n_tokens(self._overlay[u]) if u in self._overlay else int(stored[u])
                         for u in np.asarray(users, np.int64).tolist()], dtype=np.int64)

    def write_users(self, path: str | Path, users: np.ndarray, metadata, force: bool = False,
                    shared: bool = True, batch_users: int = 1024, lengths: np.ndarray | None = None) -> dict[str, int]:
        """Write the users `users` (indices, in that order; appends merged; `lengths` their token counts where the
        caller has them) as an artifact, or with `shared=False` as a shard of a sharded one
        (`ckv_cli.artifact.sharded`), atomically; returns bytes per tensor. `metadata` is a dict, or a function of
        the rows each ragged field (item-coded escapes) got, for a byte accounting made in the same pass."""
        from ckv_cli.artifact.writer import ArtifactWriter

        users = np.asarray(users, np.int64)
        names = self._user_ids
        lengths = self.token_counts(users) if lengths is None else lengths
        writer = ArtifactWriter(path, lengths, [names[u] for u in users], force=force, shared=shared)
        try:
            writer.start(self.plan)
            for a in range(0, len(users), batch_users):
                fields, offs = self._read(users[a : a + batch_users])
                writer.add(fields, offs)
            return writer.finish(metadata(writer.ragged_rows) if callable(metadata) else metadata)
        finally:
            writer.discard()

    def record(self, fields: dict[str, np.ndarray], offsets: np.ndarray, b: int) -> dict[str, np.ndarray]:
        """User `b`'s record (every field) out of a batch read (`_read`): its tokens' rows, its per-user row, and
        its rows of each ragged field (after the earlier users' rows, as their counts say)."""
        a, e = int(offsets[b]), int(offsets[b + 1])
        out = {}
        for k, v in fields.items():
            fm = self.artifact.fields[k]
            if fm["per"] == "user":
                out[k] = v[b : b + 1]
            elif fm["per"] == "ragged":
                n = np.asarray(fields[fm["counts"]], np.int64).reshape(-1)
                r = int(n[:b].sum())
                out[k] = v[r : r + int(n[b])]
            else:
                out[k] = v[a:e]
        return out


def check_student(artifact, model) -> None:
    """Refuse to read an artifact of `ckv compress --finetune` with any model but its fine-tuned student (the
    teacher's weights read it differently from what was measured): the artifact keeps the student's weights
    digest."""
    want = artifact.meta.get("student_weights_sha256")
    if want is None:
        return
    from ckv_cli.pipeline.compress import weights_sha256

    if weights_sha256(model) != want:
        name = artifact.meta.get("student_checkpoint", "its student checkpoint")
        raise CkvError(f"{artifact.path} is read by the fine-tuned student {name}: open it with that checkpoint's "
                       "model, not the teacher's or another")


def check_weights(model, checkpoint) -> None:
    """Refuse a model object whose weights are not the checkpoint file's (the artifact's sha256 names the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(checkpoint))
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{checkpoint}: cannot load checkpoint ({str(e).splitlines()[0][:120]})") from None
    mine = model.state_dict()
    if set(state) != set(mine) or any(state[k].shape != mine[k].shape or not torch.equal(state[k], mine[k].detach().cpu())
                                       for k in mine):
        raise CkvError(f"the model's weights are not those of {checkpoint}")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
