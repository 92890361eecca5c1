"""Reading CTR artifacts back (`ckv compress` on SIM, ETA, SDIM, TWIN; `ckv_cli.compress_ctr`): open one and
rebuild its plan without refitting, decode any user's cache, compare it against the uncompressed model
(`ckv evaluate CTR_CKPT ARTIFACT`), inspect it against data (`ckv inspect ARTIFACT --data`), and serve from it
(`CTRStore`).

    from ckv_cli import CTRStore
    store = CTRStore.open("sim.ckv.safetensors", "sim-ml1m-ctr.safetensors")  # checkpoint sha256 checked
    store.score(["42", "7"], ["Heat (1995)", "Fargo (1996)"])     # click probabilities (2, 2), "now"
    store.append("42", ["Fargo (1996)"], [5], [978300760], previous_timestamp=978300000)
    store.save("sim.ckv.v2.safetensors")                           # a new artifact with the appends merged

**Opening** (`CTRArtifact.open(path, model)`): the file is mapped read-only (`ckv_cli.store.SafetensorsMap`,
which checks the header's spans); the metadata must say format `ckv-artifact`, task `ctr`; the plan description
must fit the model (architecture, item count, cached streams and widths, signature mode); every field the plan
declares must be listed in the metadata and stored at its dtype and shape; the user offsets and id table must be
consistent; the shared tensors (pools) are loaded into fresh codecs (`load_shared`) and probed. Anything else is
a one-line CkvError. A batch read is one gather per field over the users' token ranges (bit-packed fields
unpacked at those positions only): nothing is read for the other users.

**A user's cache** (`fetch`): the decoded K/V (and signatures) of the user's last `max_len` events, as
`model.prefill` lays them out for a sample whose history is that window: the short branch holds the last
`short_len` of them, the long branch all of them. Only SIM's artifacts (and `eventid`'s) keep item ids; for the
other models, whose long branch does not read them, `CTRCache.items` is zeros. Scoring (`score`) runs
`model.score` on that cache for each candidate, "now" (after the user's last cached event); with the `eventid`
codec or plain fp32 it equals the model's forward on that history.

**Appending** (`append`): the new events' per-event streams are computed by the model (`event_streams`: a token's
K/V are a function of (item, rating bucket, gap bucket)) and encoded by the plan's codecs: token-local codecs
(plain, bf16, collective without user dims: the router picks each new token's pool entry; also lowrank, pq)
encode the new tokens alone and the old tokens' fields are kept bit for bit, which is exactly what `ckv compress`
of the extended log stores for them; codecs with per-user state (collective's user dims, KIVI) re-encode the
user's stream from the decoded old vectors and the new ones. The artifact keeps no timestamps, so the gap bucket
of a user's first appended event needs the time of the user's previous event: `previous_timestamp`
(remembered after the first append; a new user's first event is bucket 1, as in `build_ctr`). Appends live in
memory; `save(path)` writes a new artifact with them merged (atomically, `ArtifactWriter`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ckv_cli.artifact import (DECODE_ERRORS, FORMAT, FORMAT_VERSION, SAFETENSORS_DTYPE, SHARD_FORMAT, _sha,
                              check_field_tensors, check_listed_fields, checked_user_table, decode_metadata,
                              load_shared_into, stored_shape)
from ckv_cli.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ckv_cli.codecs import REGISTRY as CODECS
from ckv_cli.codecs import make_codec
from ckv_cli.compress_ctr import (EVENTID, CTROptions, CTRPlan, _groups, accounting, code_bits, ctr_report,
                                  event_streams, score_group, stream_dims)
from ckv_cli.data.ctr import N_GAPS, N_RATINGS, SPLITS, CTRData, gap_buckets
from ckv_cli.errors import CkvError
from ckv_cli.models.target_attention import BranchKV, CTRCache, CTRModel, gather_tokens, last_window
from ckv_cli.store import SafetensorsMap, token_index, unpack_at, user_indices

CTR_METRICS = ("AUC", "gAUC", "logloss")
LOWER_IS_BETTER = ("logloss",)
WRITTEN_BY_WRITER = ("format", "format_version", "plan", "fields", "ckv_version", "checksums")
ID_TABLE = {"users/id_bytes": "U8", "users/id_offsets": "I64"}


# ---------------------------------------------------------------------------------------------- the plan


def plan_from_ctr_description(model: CTRModel, desc, why=lambda s: CkvError(s)) -> CTRPlan:
    """A `CTRPlan` for `model` rebuilt from an artifact's plan description (metadata 'plan'), codecs unfitted
    (load their shared tensors next). `why(text)` makes the error raised for a description that does not fit."""
    if not isinstance(desc, dict):
        raise why("metadata 'plan' is missing or not a JSON object")
    missing = [k for k in ("task", "arch", "n_items", "codes", "items_stored", "stream_dims", "streams") if k not in desc]
    if missing:
        raise why(f"the plan lacks '{missing[0]}'")
    if desc["task"] != "ctr":
        raise why(f"the plan's task is {desc['task']!r}, not 'ctr'")
    if desc["arch"] != model.arch:
        raise CkvError(f"made from a {desc['arch']} checkpoint, the model is {model.arch}")
    if desc["n_items"] != model.config.n_items:
        raise CkvError(f"holds ids of {desc['n_items']!r} items, the checkpoint has {model.config.n_items:,}")
    dims = stream_dims(model)
    if desc["stream_dims"] != dims:
        raise CkvError(f"caches streams {desc['stream_dims']}, the checkpoint's are {dims}")
    streams = desc["streams"]
    if not isinstance(streams, dict) or set(streams) != set(dims):
        raise why(f"the plan's streams are not {', '.join(dims)}")
    eventid = all(e == EVENTID for e in streams.values())
    plan = CTRPlan(model, CTROptions(codec=EVENTID, params={}) if eventid else CTROptions(codec="plain", params={}))
    if not eventid:
        for name, entry in streams.items():
            if (not isinstance(entry, dict) or entry.get("codec") not in CODECS
                    or not isinstance(entry.get("params"), dict)):
                raise why(f"stream {name}: not a known codec and parameters")
            params = dict(entry["params"])
            d = params.pop("d", None)
            if d != dims[name]:
                raise why(f"stream {name}: width {d!r}, the model's is {dims[name]}")
            try:
                plan.streams[name] = make_codec(entry["codec"], d, params)
            except CkvError as e:
                raise why(f"stream {name}: {e}") from None
            except DECODE_ERRORS as e:
                raise why(f"stream {name}: {type(e).__name__}") from None
            if plan.streams[name].needs_items:
                raise why(f"stream {name}: codec {entry['codec']} is not one CTR artifacts use")
    want_codes = "recomputed" if eventid else (("derived", "stored") if code_bits(model) else ("none",))
    if desc["codes"] not in want_codes:
        raise why(f"the plan's signatures are {desc['codes']!r}")
    plan.codes = desc["codes"]
    if desc["items_stored"] != plan.store_items:
        raise why(f"the plan's items_stored is {desc['items_stored']!r}")
    return plan


# ---------------------------------------------------------------------------------------------- the file


class CTRArtifact:
    """A CTR artifact opened for a model: metadata, plan (codecs loaded), user table; fields read on demand from
    the memory-mapped file (module docstring). Open with `CTRArtifact.open(path, model)`."""

    def __init__(self, path: Path, mapped: SafetensorsMap, meta: dict, plan: CTRPlan, fields: dict[str, dict],
                 offsets: np.ndarray, user_ids: list[str]):
        self.path, self.mapped, self.meta, self.plan = path, mapped, meta, plan
        self.fields, self.offsets, self.user_ids = fields, offsets, user_ids
        self._lookup = {u: i for i, u in enumerate(user_ids)}

    @classmethod
    def open(cls, path: str | Path, model: CTRModel) -> "CTRArtifact":
        path = Path(path)
        mapped = SafetensorsMap(path)
        try:
            return cls._open(path, mapped, model)
        except BaseException:
            mapped.close()
            raise

    @classmethod
    def _open(cls, path: Path, mapped: SafetensorsMap, model: CTRModel) -> "CTRArtifact":
        raw, header, t = mapped.metadata or {}, mapped.header, mapped.tensors
        fmt = raw.get("format")
        if fmt == CHECKPOINT_FORMAT:
            raise CkvError(f"{path}: not a CTR artifact but a ckv checkpoint (ckv compress of a CTR model writes one)")
        if fmt == SHARD_FORMAT:
            raise CkvError(f"{path}: a shard of a sharded artifact; CTR artifacts are single files")
        if fmt != FORMAT:
            raise CkvError(f"{path}: not a ckv artifact (metadata 'format' is {fmt!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise CkvError(f"{path}: artifact format version {raw.get('format_version')!r}, this ckv reads "
                           f"{FORMAT_VERSION!r}")
        if raw.get("task") != "ctr":
            raise CkvError(f"{path}: an artifact of a next-item model, not of a CTR model (read it with CacheStore)")
        meta = decode_metadata(raw, path)
        for k in ("plan", "fields", "checksums", "accounting", "metrics"):
            if k in meta and not isinstance(meta[k], dict):
                raise CkvError(f"{path}: corrupted metadata entry '{k}' (not a JSON object)")

        def bad(why: str) -> CkvError:
            return CkvError(f"{path}: inconsistent artifact ({why})")

        try:
            plan = plan_from_ctr_description(model, meta.get("plan"), bad)
        except CkvError as e:
            if str(e).startswith(str(path)):
                raise
            raise CkvError(f"{path}: {e}") from None
        fields = meta.get("fields")
        declared = plan.fields()
        check_listed_fields(fields, declared, bad)
        n_offsets = fields["users/offsets"].get("count") if isinstance(fields["users/offsets"], dict) else None
        token_fields = [n for n, f in declared.items() if f.per == "token"]
        n_tokens = fields[token_fields[0]].get("count") if token_fields and isinstance(fields[token_fields[0]], dict) else None
        if type(n_offsets) is not int or type(n_tokens) is not int or n_offsets < 1 or n_tokens < 0:
            raise bad("metadata 'fields' gives no user or token count")
        n_users = n_offsets - 1
        check_field_tensors(fields, declared, header, n_tokens, n_users, bad)
        for name, dtype in ID_TABLE.items():
            info = header.get(name)
            if info is None or info["dtype"] != dtype or len(info["shape"]) != 1:
                raise bad(f"tensor '{name}' is missing or not a {dtype} vector")
        if list(header["users/id_offsets"]["shape"]) != [n_users + 1]:
            raise bad(f"tensor 'users/id_offsets' has shape {header['users/id_offsets']['shape']}, expected [{n_users + 1}]")
        for name in header:
            if name not in declared and name not in ID_TABLE and (
                    not name.startswith("shared/") or name.count("/") != 2 or name.split("/")[1] not in plan.streams):
                raise bad(f"unexpected tensor '{name}'")
        offsets = np.array(t["users/offsets"], dtype=np.int64)
        id_off = np.array(t["users/id_offsets"], dtype=np.int64)
        id_bytes = t["users/id_bytes"].tobytes()
        user_ids = checked_user_table(offsets, id_off, id_bytes, n_tokens, bad)
        load_shared_into(plan, {n: np.array(t[n]) for n in header if n.startswith("shared/")}, bad)
        return cls(path, mapped, meta, plan, fields, offsets, user_ids)

    # -- users
    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    def index(self, user_ids) -> np.ndarray:
        """Raw user ids (one or a sequence) -> user indices; a CkvError naming an unknown user."""
        return user_indices(self._lookup, user_ids, self.path)

    # -- checks
    def check_source(self, checkpoint_sha256: str) -> None:
        made_from = self.meta.get("checkpoint_sha256")
        if made_from != checkpoint_sha256:
            raise CkvError(f"{self.path} was made from another checkpoint (sha256 {str(made_from)[:12]}..., "
                           f"this checkpoint {checkpoint_sha256[:12]}...)")

    def verify(self) -> list[str]:
        """Names of tensors whose bytes no longer match the checksum written with them."""
        sums = self.meta.get("checksums", {})
        if not isinstance(sums, dict):
            return ["checksums"]
        t = self.mapped.tensors
        bad = [n for n in sorted(t) if sums.get(n) != _sha(t[n])]
        return bad + [n for n in sums if n not in t]

    # -- reading
    def read_fields(self, users) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stored fields of the given users (indices, any order: token fields concatenated in that order, bit-packed
        ones unpacked to int64; per-user fields one row per user) and their offsets (B + 1,)."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise CkvError(f"user index out of range ({self.path} has {self.n_users} users)")
        starts = self.offsets[users]
        lengths = self.offsets[users + 1] - starts
        tok = token_index(starts, lengths)
        t = self.mapped.tensors
        out = {}
        for name, fm in self.fields.items():
            if name == "users/offsets":
                continue
            if fm["per"] == "user":
                out[name] = np.array(t[name][users])
            elif fm["bits"]:
                out[name] = unpack_at(t[name], tok, fm["bits"])
            else:
                out[name] = np.array(t[name][tok])
        self.check_ranges(out)
        return out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def check_ranges(self, fields: dict[str, np.ndarray]) -> None:
        """Refuse indices a corrupted file could hold (pool entries, item, rating and gap ids) before decoding."""
        for stream, codec in self.plan.streams.items():
            idx = fields.get(f"{stream}/idx")
            if idx is not None and len(idx) and hasattr(codec, "pool_size") and int(idx.max()) >= codec.pool_size:
                raise CkvError(f"{self.path}: {stream} pool index {int(idx.max())} out of range (pool {codec.pool_size})")
        for name, n in (("tokens/items", self.plan.n_items + 1), ("tokens/ratings", N_RATINGS), ("tokens/gaps", N_GAPS)):
            v = fields.get(name)
            if v is not None and len(v) and int(v.max()) >= n:
                raise CkvError(f"{self.path}: {name.split('/')[1][:-1]} id {int(v.max())} out of range (< {n})")

    def decode_fields(self, fields, offsets) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        try:
            with np.errstate(all="ignore"):
                return self.plan.decode(fields, offsets)
        except DECODE_ERRORS as e:
            raise CkvError(f"{self.path}: cannot decode ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None

    def decode(self, users) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, np.ndarray], np.ndarray]:
        """(decoded streams (N, d), signatures (N, n) or None, the stored fields, offsets) of the given users."""
        fields, offsets = self.read_fields(users)
        streams, codes = self.decode_fields(fields, offsets)
        return streams, codes, fields, offsets

    def close(self) -> None:
        self.mapped.close()


def verify_ctr_artifact(path) -> tuple[list[str], dict]:
    """`ckv verify` on a single CTR artifact file, without the model: the safetensors header (spans, dtypes:
    `SafetensorsMap`), the metadata (format, task, 'fields' and 'checksums'), each declared field's tensor at the
    dtype and shape its declaration gives, the user offsets, and every tensor's checksum. (problems, summary);
    a file that cannot be read at all is a CkvError."""
    from ckv_cli.codecs import Field

    path = Path(path)
    mapped = SafetensorsMap(path)  # spans, dtypes, file size
    try:
        header, raw, t = mapped.header, mapped.metadata or {}, mapped.tensors
        if raw.get("format") != FORMAT or raw.get("task") != "ctr":
            raise CkvError(f"{path}: not a CTR artifact")
        meta = decode_metadata(raw, path)
        fields, sums = meta.get("fields"), meta.get("checksums")
        if not isinstance(fields, dict) or not isinstance(sums, dict) or "users/offsets" not in fields:
            raise CkvError(f"{path}: inconsistent artifact (metadata 'fields' or 'checksums' is missing or not a JSON object)")
        problems = []
        for name, fm in sorted(fields.items()):
            try:
                f = Field(name, fm["per"], dtype=fm["dtype"], width=int(fm["width"]), bits=int(fm["bits"]))
                want = ("U8" if f.bits else SAFETENSORS_DTYPE[f.dtype], list(stored_shape(name, f, int(fm["count"]))))
            except (KeyError, TypeError, ValueError):
                problems.append(f"{path.name}: field '{name}' has a corrupted declaration in metadata 'fields'")
                continue
            info = header.get(name)
            if info is None:
                problems.append(f"{path.name}: tensor '{name}' is missing")
            elif (info["dtype"], list(info["shape"])) != want:
                problems.append(f"{path.name}: tensor '{name}' is {info['dtype']} {info['shape']}, its field needs "
                                f"{want[0]} {want[1]}")
        problems += [f"{path.name}: tensor '{n}' does not match its checksum" for n in sorted(t) if sums.get(n) != _sha(t[n])]
        problems += [f"{path.name}: tensor '{n}' is missing" for n in sums if n not in t and n not in fields]
        offsets = np.asarray(t["users/offsets"]) if "users/offsets" in t else np.zeros(1, np.int64)
        if len(offsets) == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            problems.append(f"{path.name}: user offsets are not increasing from 0")
        summary = {"files": 1, "users": max(len(offsets) - 1, 0), "tokens": int(offsets[-1]) if len(offsets) else 0}
        return problems, summary
    finally:
        mapped.close()


# ---------------------------------------------------------------------------------------------- caches


def window_cache(model: CTRModel, streams: dict[str, torch.Tensor], codes: torch.Tensor | None,
                 items: np.ndarray | None, offsets: np.ndarray) -> CTRCache:
    """A batch of users' caches "now" from their decoded per-token streams (N, d) at `offsets`: each user's last
    `max_len` tokens right-padded, laid out as `model.prefill` lays out a history of those events. `items`:
    the tokens' item ids, or None (zeros: only SIM's search reads them)."""
    offsets = np.asarray(offsets, np.int64)
    ends = offsets[1:]
    starts = np.maximum(offsets[:-1], ends - model.config.max_len)
    lengths_np = ends - starts
    B, L = len(lengths_np), max(int(lengths_np.max()) if len(lengths_np) else 0, 1)
    tok = torch.from_numpy(token_index(starts, lengths_np))
    lengths = torch.from_numpy(lengths_np)
    slots = (torch.arange(L)[None, :] < lengths[:, None]).view(-1).nonzero().squeeze(1)

    def pad(x: torch.Tensor) -> torch.Tensor:
        x = x[tok]
        return x.new_zeros(B * L, *x.shape[1:]).index_copy_(0, slots, x).view(B, L, *x.shape[1:])

    branches = {}
    if "short.k" in streams:
        idx, v = last_window(lengths, model.config.short_len)
        branches["short"] = BranchKV(gather_tokens(pad(streams["short.k"]), idx), gather_tokens(pad(streams["short.v"]), idx),
                                     v.sum(1), positions=idx)
    if "long.v" in streams:
        branches["long"] = BranchKV(pad(streams["long.k"]) if "long.k" in streams else None, pad(streams["long.v"]),
                                    lengths, codes=pad(codes) if codes is not None else None)
    it = pad(torch.from_numpy(np.asarray(items, np.int64))) if items is not None else torch.zeros(B, L, dtype=torch.long)
    return CTRCache(branches, it, lengths)


def _view(x, b: int, C: int):
    return None if x is None else x[b : b + 1].expand(C, *x.shape[1:])


@torch.no_grad()
def score_cache(model: CTRModel, cache: CTRCache, user_rows: torch.Tensor, candidates: torch.Tensor,
                budget: int = 1 << 19) -> torch.Tensor:
    """Click probabilities (B, C) of candidate items (B, C) from a batch's caches: per user, `model.score` on a
    stride-0 view of its cache repeated over the candidates (chunks of at most `budget` candidate x token rows)."""
    B, C = candidates.shape
    out = torch.empty(B, C)
    L = max(int(cache.items.shape[1]), 1)
    step = max(1, budget // L)
    for b in range(B):
        for a in range(0, C, step):
            c = min(step, C - a)
            br = {n: BranchKV(_view(x.keys, b, c), _view(x.values, b, c), _view(x.lengths, b, c), _view(x.codes, b, c),
                              _view(x.positions, b, c)) for n, x in cache.branches.items()}
            sub = CTRCache(br, _view(cache.items, b, c), _view(cache.lengths, b, c))
            out[b, a : a + c] = torch.sigmoid(model.score(sub, user_rows[b : b + 1].expand(c), candidates[b, a : a + c]))
    return out


# ---------------------------------------------------------------------------------------------- evaluate


def compare_ctr_artifact(model: CTRModel, data: CTRData, art: CTRArtifact, *, bootstrap: int = 1000, seed: int = 0,
                         batch_users: int = 256, advance=None) -> dict:
    """Every test sample of `data` scored by `model.score` over the cache decoded from the artifact vs the
    uncompressed cache, batch by batch of users exactly as `ckv compress` scores them (`score_group`), so the
    metrics are those compress reported for the artifact. Refuses data whose users' histories differ from the
    artifact's (token counts, item ids where stored)."""
    t0 = time.time()
    lookup = art._lookup
    missing = [u for u in data.seq.user_ids if str(u) not in lookup]
    if missing:
        raise CkvError(f"{art.path} does not hold {len(missing):,} of the {data.seq.n_users:,} users of {data.name} "
                       f"(e.g. '{missing[0]}'): another dataset?")
    art_users = np.fromiter((lookup[str(u)] for u in data.seq.user_ids), np.int64, data.seq.n_users)
    offsets = data.seq.offsets.astype(np.int64)
    if not np.array_equal(np.diff(offsets), art.offsets[art_users + 1] - art.offsets[art_users]):
        raise CkvError(f"{art.path}: its users' event counts differ from those of --data {data.name} "
                       "(another dataset or columns?)")
    test = data.split_of == SPLITS.index("test")
    refs, news, done = [], [], []
    err = {n: [0.0, 0.0] for n in art.plan.dims}
    for a in range(0, data.seq.n_users, batch_users):
        b = min(a + batch_users, data.seq.n_users)
        lo, hi = int(offsets[a]), int(offsets[b])
        ev = slice(lo, hi)
        streams, codes = event_streams(model, data.seq.items[ev], data.rating_bucket[ev], data.gap_bucket[ev])
        dec, dcodes, fields, _ = art.decode(art_users[a:b])
        if "tokens/items" in fields and not np.array_equal(fields["tokens/items"], data.seq.items[ev]):
            raise CkvError(f"{art.path}: its users' item ids differ from those of --data {data.name}")
        for n in art.plan.dims:
            err[n][0] += float(((streams[n] - dec[n]) ** 2).sum())
            err[n][1] += float((streams[n] ** 2).sum())
        samples = lo + np.flatnonzero(test[lo:hi])
        for g in _groups(samples, data, 1 << 19):
            refs.append(torch.sigmoid(score_group(model, data, g, lo, streams, codes)).double().numpy())
            news.append(torch.sigmoid(score_group(model, data, g, lo, dec, dcodes)).double().numpy())
            done.append(g)
        if advance:
            advance(b - a)
    samples = np.concatenate(done) if done else np.zeros(0, np.int64)
    ref = np.concatenate(refs) if refs else np.zeros(0)
    new = np.concatenate(news) if news else np.zeros(0)
    metrics = ctr_report(data, samples, ref, new, bootstrap, seed)
    metrics["reconstruction_rel_mse"] = {n: e[0] / max(e[1], 1e-12) for n, e in err.items()}
    reported = art.meta.get("metrics", {})
    same = {side: {k: reported.get(side, {}).get(k) == metrics[side][k] for k in CTR_METRICS}
            for side in ("uncompressed", "compressed")}
    return {"artifact": str(art.path), "codec": art.meta.get("codec"), "metrics": metrics,
            "accounting": art.meta.get("accounting", {}), "compress_reported": {
                side: reported.get(side) for side in ("uncompressed", "compressed")},
            "equals_compress_report": all(v for s in same.values() for v in s.values()),
            "seconds": round(time.time() - t0, 1)}


def check_ctr_gates(comparisons: list[dict], max_delta: list[str], max_ratio: float | None) -> list[str]:
    """One line per failed gate: a metric gate fails when the metric gets worse by more than allowed (AUC and gAUC
    drop, logloss rises); the ratio gate when per-user bytes exceed `max_ratio` of fp16 (`compare.check_gates`'
    rules for CTR metrics)."""
    from ckv_cli.compare import parse_gate

    failures = []
    for c in comparisons:
        m = c["metrics"]
        for name, allowed, relative in (parse_gate(g, list(CTR_METRICS)) for g in max_delta):
            worse = m["delta"][name] * (1 if name in LOWER_IS_BETTER else -1)
            ref = m["uncompressed"][name]
            amount = worse / abs(ref) if relative and ref else worse
            if amount > allowed:
                verb = "rose" if name in LOWER_IS_BETTER else "dropped"
                shown = f"{amount:.2%} > {allowed:.2%}" if relative else f"{amount:.6f} > {allowed:.6f}"
                failures.append(f"gate failed: {name} {verb} {shown} ({c['artifact']})")
        ratio = c["accounting"].get("per_user_ratio_fp16")
        if max_ratio is not None and ratio is not None and ratio > max_ratio:
            failures.append(f"gate failed: per-user ratio vs fp16 {ratio:.4%} > {max_ratio:.4%} ({c['artifact']})")
    return failures


def print_ctr_comparison(c: dict) -> None:
    from ckv_cli.report import _human, print_table

    m, a = c["metrics"], c["accounting"]
    ci = m.get("delta_ci95", {})
    rows = []
    for k in CTR_METRICS:
        lo_hi = f"[{ci[k][0]:+.5f}, {ci[k][1]:+.5f}]" if k in ci else ""
        rows.append([k, f"{m['uncompressed'][k]:.5f}", f"{m['compressed'][k]:.5f}", f"{m['delta'][k]:+.6f}", lo_hi])
    print_table(f"{c['artifact']} ({c['codec']}): test {m['samples']:,} samples / {m['users']:,} users, decoded "
                "from the artifact vs uncompressed", ["metric", "uncompressed", "compressed", "delta", "95% CI"], rows)
    if "per_user_bytes" in a:
        print_table("bytes (as ckv compress reports them)", ["", "value"], [
            ["per-user (all users)", _human(a["per_user_bytes"])],
            ["bytes per token", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
            ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:.3%} / {a['per_user_ratio_fp32']:.3%}"],
            ["shared (pools)", _human(a["shared_bytes"])],
            ["metrics equal the compress report", "yes" if c["equals_compress_report"] else "no"],
            ["time", f"{c['seconds']:.1f} s"]])


def open_ctr_artifacts(model: CTRModel, checkpoint, paths) -> list[CTRArtifact]:
    """Open each artifact for the model, refusing (before any work) one made from another checkpoint or whose
    tensors do not match their checksums."""
    from ckv_cli.data.datasets import sha256_file

    sha = sha256_file(Path(checkpoint))
    opened = []
    try:
        for p in paths:
            if not Path(p).exists():
                raise CkvError(f"artifact not found: {p}")
            art = CTRArtifact.open(p, model)
            opened.append(art)
            art.check_source(sha)
            bad = art.verify()
            if bad:
                raise CkvError(f"{art.path}: tensor '{bad[0]}' does not match its checksum (damaged on disk?)")
    except BaseException:
        for a in opened:
            a.close()
        raise
    return opened


# ---------------------------------------------------------------------------------------------- inspect


@torch.no_grad()
def inspect_ctr_data(path, model: CTRModel, checkpoint, data: CTRData, n_users: int = 500, seed: int = 0) -> dict:
    """`ckv inspect CTR_ARTIFACT --data`: pool usage per stream, and the relative squared error of the decoded
    streams (and the share of signature bits changed, where derived) against the model's on a seeded sample of
    the data's users."""
    from ckv_cli.inspection import pool_usage

    art = open_ctr_artifacts(model, checkpoint, [path])[0]
    try:
        usage = pool_usage(art)
        rng = np.random.default_rng(seed)
        both = np.flatnonzero(np.fromiter((str(u) in art._lookup for u in data.seq.user_ids), bool, data.seq.n_users))
        if not len(both):
            raise CkvError(f"{path} holds none of the {data.seq.n_users:,} users of {data.name}")
        users = np.sort(rng.choice(both, size=min(n_users, len(both)), replace=False))
        art_users = art.index([str(data.seq.user_ids[u]) for u in users])
        err = {n: [0.0, 0.0] for n in art.plan.dims}
        flips = [0, 0]
        off = data.seq.offsets.astype(np.int64)
        for a in range(0, len(users), 64):
            part = users[a : a + 64]
            ev = token_index(off[part], off[part + 1] - off[part])
            ref, codes = event_streams(model, data.seq.items[ev], data.rating_bucket[ev], data.gap_bucket[ev])
            dec, dcodes, _, aoff = art.decode(art_users[a : a + 64])
            if not np.array_equal(np.diff(aoff), off[part + 1] - off[part]):
                raise CkvError(f"{path}: its users' event counts differ from those of --data {data.name}")
            for n in art.plan.dims:
                err[n][0] += float(((ref[n] - dec[n]) ** 2).sum())
                err[n][1] += float((ref[n] ** 2).sum())
            if codes is not None and dcodes is not None:
                flips[0] += int((codes != dcodes).sum())
                flips[1] += codes.numel()
        out = {"pool_usage": usage, "reconstruction_rel_mse": {n: e[0] / max(e[1], 1e-12) for n, e in err.items()},
               "reconstruction_users": int(len(users)), "corrupted_tensors": art.verify()}
        if flips[1]:
            out["signature_mismatch_rate"] = flips[0] / flips[1]
        return out
    finally:
        art.close()


def print_ctr_inspect_data(r: dict) -> None:
    from ckv_cli.report import print_table

    rows = [[n, f"{u['used']:,} / {u['pool_size']:,}", f"{u['entropy_share']:.1%}", f"{u['top10_share']:.2%}"]
            for n, u in r["pool_usage"].items()]
    if rows:
        print_table("pool usage per stream", ["stream", "entries used", "entropy / max", "top-10 share"], rows)
    rows = [[n, f"{e:.4g}"] for n, e in r["reconstruction_rel_mse"].items()]
    if "signature_mismatch_rate" in r:
        rows.append(["signature bits changed", f"{r['signature_mismatch_rate']:.3%}"])
    print_table(f"decoded vs the model's K/V ({r['reconstruction_users']:,} users of --data)",
                ["stream", "relative squared error"], rows)


# ---------------------------------------------------------------------------------------------- the store


class CTRStore:
    """Users' CTR caches served from an artifact (module docstring). Open with `CTRStore.open`."""

    def __init__(self, art: CTRArtifact, model: CTRModel, item_vocab: list[str] | None, user_vocab: list[str] | None,
                 checkpoint_sha256: str | None = None):
        self.artifact, self.model, self.plan = art, model.eval(), art.plan
        self.item_vocab, self._item_lookup = item_vocab, None
        self._user_rows = {str(u): i + 1 for i, u in enumerate(user_vocab or [])}
        self._user_ids = list(art.user_ids)
        self._lookup = {u: i for i, u in enumerate(self._user_ids)}
        self._overlay: dict[int, dict[str, np.ndarray]] = {}  # user index -> every field of that user
        self._last_ts: dict[int, int] = {}
        self._sha = checkpoint_sha256

    @classmethod
    def open(cls, path: str | Path, model, checkpoint: str | Path | None = None) -> "CTRStore":
        """Open a CTR artifact for a CTR checkpoint: `model` is a checkpoint path (loaded; its sha256 is checked
        against the artifact's), or a model object (then `checkpoint`, the file it came from, is hashed and
        checked when given, and its item and user vocabularies used)."""
        from ckv_cli.checkpoint import load_checkpoint

        meta = None
        if isinstance(model, (str, Path)):
            checkpoint = Path(model)
            model, meta = load_checkpoint(checkpoint)
        elif checkpoint is not None:
            _, meta = load_checkpoint(checkpoint)
        if getattr(model, "task", None) != "ctr":
            raise CkvError("CTRStore serves CTR models (sim, eta, sdim, twin); use CacheStore for next-item models")
        model.eval()
        if next(model.parameters()).device.type != "cpu":
            raise CkvError("the store runs on the CPU: pass the model moved there (model.cpu())")
        sha = None
        if checkpoint is not None:
            from ckv_cli.data.datasets import sha256_file

            try:
                sha = sha256_file(Path(checkpoint))
            except OSError as e:
                raise CkvError(f"cannot read {checkpoint}: {e.strerror or e}") from None
        art = CTRArtifact.open(path, model)
        try:
            if sha is not None:
                art.check_source(sha)
        except BaseException:
            art.close()
            raise
        meta = meta or {}
        return cls(art, model, meta.get("item_vocab"), meta.get("user_vocab"), sha)

    def close(self) -> None:
        self.artifact.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- users and items
    def users(self) -> list[str]:
        """Raw ids of every user (the file's, then those created by `append`)."""
        return list(self._user_ids)

    def __len__(self) -> int:
        return len(self._user_ids)

    def __contains__(self, user_id) -> bool:
        return str(user_id) in self._lookup

    def index(self, user_ids) -> np.ndarray:
        return user_indices(self._lookup, user_ids, self.artifact.path)

    def item_index(self, items) -> np.ndarray:
        """Items -> indices 1..n_items: strings are raw ids (the checkpoint's vocabulary), integers indices."""
        if isinstance(items, torch.Tensor):
            items = items.cpu().numpy()
        n = self.plan.n_items
        if isinstance(items, (str, int, np.integer)):
            items = [items]
        has_str = any(isinstance(x, str) for x in np.asarray(items, dtype=object).ravel())
        if not has_str:
            arr = np.asarray(items)
            if arr.size and arr.dtype.kind not in "iu":
                raise CkvError(f"items must be raw item ids (strings) or item indices (integers), got {arr.dtype}")
            arr = arr.astype(np.int64)
            if arr.size and (int(arr.min()) < 1 or int(arr.max()) > n):
                raise CkvError(f"item index {int(arr[(arr < 1) | (arr > n)].ravel()[0])} is not in 1..{n}")
            return arr
        if self.item_vocab is None:
            raise CkvError("raw item ids need the checkpoint's item vocabulary: open the store with a checkpoint, "
                           "or pass item indices")
        if self._item_lookup is None:
            self._item_lookup = {str(v): i for i, v in enumerate(self.item_vocab) if i > 0}
        arr = np.asarray(items, dtype=object)
        out = np.empty(arr.shape, np.int64)
        for pos, x in np.ndenumerate(arr):
            if not isinstance(x, str) or x not in self._item_lookup:
                raise CkvError(f"item {x!r} is not in the checkpoint's item vocabulary")
            out[pos] = self._item_lookup[x]
        return out

    def user_rows(self, users: np.ndarray) -> torch.Tensor:
        """The model's user-embedding row of each user (0 = a user the checkpoint never saw)."""
        return torch.tensor([self._user_rows.get(self._user_ids[u], 0) for u in users], dtype=torch.long)

    # -- reading
    def _read(self, users: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        users = np.asarray(users, np.int64)
        if not any(int(u) in self._overlay for u in users):
            return self.artifact.read_fields(users)
        recs = [self._overlay[int(u)] if int(u) in self._overlay else self.artifact.read_fields([u])[0] for u in users]
        names = [n for n in self.artifact.fields if n != "users/offsets"]
        fields = {n: np.concatenate([r[n] for r in recs]) for n in names}
        lengths = [self._n_tokens(r) for r in recs]
        return fields, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def _n_tokens(self, record: dict[str, np.ndarray]) -> int:
        name = next(n for n, fm in self.artifact.fields.items() if fm["per"] == "token")
        return len(record[name])

    def read(self, user_ids) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stored fields of a batch of users (appends included) and their offsets."""
        return self._read(self.index(user_ids))

    @torch.no_grad()
    def fetch(self, user_ids) -> CTRCache:
        """Decoded caches of a batch of users (raw ids): each user's last `max_len` events, as `model.prefill`
        lays out a history of those events (items zeros where the artifact keeps none: only SIM reads them)."""
        return self._cache(self.index(user_ids))

    def _cache(self, users: np.ndarray) -> CTRCache:
        fields, offsets = self._read(users)
        streams, codes = self.artifact.decode_fields(fields, offsets)
        return window_cache(self.model, streams, codes, fields.get("tokens/items"), offsets)

    def score(self, user_ids, candidate_items) -> np.ndarray:
        """Click probabilities (B, C) of candidates for each user "now" (after its last cached event): one list of
        candidates for all users, or one list per user (B lists of C); raw item ids or indices."""
        users = self.index(user_ids)
        cand = self.item_index(candidate_items)
        if cand.ndim == 1:
            cand = np.broadcast_to(cand[None], (len(users), len(cand)))
        if cand.ndim != 2 or len(cand) != len(users):
            raise CkvError(f"candidate_items: give one list for all users or one list per user ({len(users)} users)")
        if len(users) == 0 or cand.shape[1] == 0:
            return np.zeros((len(users), cand.shape[1]), np.float32)
        cache = self._cache(users)
        if int(cache.lengths.min()) < 1:
            raise CkvError("a user has no cached event")
        return score_cache(self.model, cache, self.user_rows(users), torch.from_numpy(np.array(cand, dtype=np.int64))).numpy()

    # -- appending
    @torch.no_grad()
    def append(self, user_id, items, ratings, timestamps, previous_timestamp: int | None = None,
               create: bool = False) -> None:
        """Append a user's new events (items: raw ids or indices; ratings: as in the log, bucketed as `build_ctr`
        does; timestamps in seconds, non-decreasing) through the model and the codecs (module docstring).
        `previous_timestamp`: the time of the user's last cached event (the artifact keeps none), needed for the
        first new event's gap bucket unless this store appended to the user before. An unknown user is an error
        unless `create` (then its first event is the user's first)."""
        uid = str(user_id)
        if uid not in self._lookup and not create:
            raise CkvError(f"user '{uid}' is not in {self.artifact.path} (create=True adds a new user)")
        new_items = self.item_index(items).reshape(-1)
        T = len(new_items)
        ratings, ts = np.asarray(ratings, dtype=np.float64).reshape(-1), np.asarray(timestamps).reshape(-1)
        if T == 0:
            raise CkvError("no new events to append")
        if len(ratings) != T or len(ts) != T:
            raise CkvError(f"{T} items, {len(ratings)} ratings and {len(ts)} timestamps: give one of each per event")
        if ts.dtype.kind not in "iu" or (np.diff(ts) < 0).any():
            raise CkvError("timestamps must be integers (seconds), non-decreasing")
        if not np.isfinite(ratings).all():
            raise CkvError("ratings must be finite numbers")
        u = self._lookup.get(uid)
        old, n_old = None, 0
        if u is not None:
            old, _ = self._read(np.array([u]))
            n_old = self._n_tokens(old)
        prev = self._last_ts.get(u) if u is not None else None
        if previous_timestamp is not None:
            prev = int(previous_timestamp)
        if n_old and prev is None:
            raise CkvError(f"user '{uid}' has cached events and the artifact keeps no timestamps: pass "
                           "previous_timestamp (the time of the user's last event) for the first new event's gap")
        if n_old and int(ts[0]) < prev:
            raise CkvError(f"the first new event ({int(ts[0])}) is older than the user's previous event ({prev})")
        ts = ts.astype(np.int64)
        if n_old:
            gaps = gap_buckets(np.r_[prev, ts], np.r_[False, np.zeros(T, bool)])[1:]
        else:
            first = np.zeros(T, bool)
            first[0] = True
            gaps = gap_buckets(ts, first)
        ev = {"items": new_items, "ratings": np.clip(np.floor(ratings).astype(np.int64), 1, N_RATINGS - 1), "gaps": gaps}
        streams, codes = event_streams(self.model, ev["items"], ev["ratings"], ev["gaps"])
        enc = self.plan.encode(ev, streams, codes, np.array([0, T]))
        record = {}
        for name in self.artifact.fields:
            if name == "users/offsets":
                continue
            stream = name.rsplit("/", 1)[0]
            codec = self.plan.streams.get(stream)
            if old is None:
                record[name] = self._as_stored(name, enc[name])
            elif codec is not None and not self._token_local(codec):
                continue  # re-encoded whole below
            else:
                record[name] = np.concatenate([old[name], self._as_stored(name, enc[name])])
        whole_streams = [s for s, c in self.plan.streams.items() if not self._token_local(c)]
        if old is not None and whole_streams:
            dec, _ = self.artifact.decode_fields(old, np.array([0, n_old]))
            for stream in whole_streams:
                codec = self.plan.streams[stream]
                whole = codec.encode(torch.cat([dec[stream], streams[stream]]), np.array([0, n_old + T]))
                for f in codec.fields():
                    record[f"{stream}/{f.name}"] = self._as_stored(f"{stream}/{f.name}", whole[f.name])
        if u is None:
            u = len(self._user_ids)
            self._user_ids.append(uid)
            self._lookup[uid] = u
        self._overlay[u] = record
        self._last_ts[u] = int(ts[-1])

    @staticmethod
    def _token_local(codec) -> bool:
        return not any(f.per == "user" for f in codec.fields()) and getattr(codec, "axis", "token") != "channel"

    def _as_stored(self, name: str, v) -> np.ndarray:
        fm = self.artifact.fields[name]
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if fm["bits"]:
            return v.astype(np.int64).reshape(-1)
        v = v.astype(fm["dtype"])
        return v.reshape(-1) if name.startswith("tokens/") else v.reshape(len(v), fm["width"])

    @property
    def appended_users(self) -> list[str]:
        return [self._user_ids[u] for u in sorted(self._overlay)]

    def save(self, path: str | Path, force: bool = False, batch_users: int = 1024) -> dict[str, int]:
        """Write a new artifact: every user (the file's, then those created by `append`) with the appends merged,
        atomically. The metadata is the source's with the byte accounting redone and an `appended` entry; the
        metrics stay those measured when the source was compressed. Returns bytes per tensor."""
        from ckv_cli.artifact import ArtifactWriter

        n = len(self._user_ids)
        lengths = np.diff(self.artifact.offsets).astype(np.int64)
        lengths = np.concatenate([lengths, np.zeros(n - len(lengths), np.int64)])
        for u, rec in self._overlay.items():
            lengths[u] = self._n_tokens(rec)
        meta = {k: v for k, v in self.artifact.meta.items() if k not in WRITTEN_BY_WRITER}
        short = int(np.minimum(lengths, self.model.config.short_len).sum())
        meta["accounting"] = accounting(self.plan, n, int(lengths.sum()), short)
        meta["appended"] = {"users": self.appended_users, "source": str(self.artifact.path),
                            "source_checksums_sha256": _digest(self.artifact.meta.get("checksums", {}))}
        writer = ArtifactWriter(path, lengths, list(self._user_ids), force=force)
        try:
            writer.start(self.plan)
            for a in range(0, n, batch_users):
                fields, offsets = self._read(np.arange(a, min(a + batch_users, n)))
                writer.add(fields, offsets)
            return writer.finish(meta)
        finally:
            writer.discard()


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


__all__ = ["CTRArtifact", "CTRStore", "check_ctr_gates", "compare_ctr_artifact", "inspect_ctr_data",
           "open_ctr_artifacts", "plan_from_ctr_description", "score_cache", "verify_ctr_artifact", "window_cache"]
