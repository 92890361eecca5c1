"""`ckv compress`: fit a cache plan on calibration users, encode every user's teacher cache, measure what the
compression costs on the held-out next item, and account for every byte (NOTES §4).

Accuracy protocol: each user's history up to the last known event is prefilled by the full model (the
teacher cache) and compressed; the last known event is appended with `extend` through the decoded cache, and
its output ranks every item outside the history window for the held-out item (the published protocol,
`ckv_cli.evaluate.PROTOCOL`). The uncompressed reference appends through the exact cache.

One code path serves a single artifact and a sweep of many plans (`ckv_cli.sweep`): `compress` reads its
teacher batches either streamed (built per batch of users, then dropped: memory bounded by the batch) or from a
`Teacher` built once and held in memory (every user's flat cache and reference scores, shared by every plan).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ckv_cli.codecs import CachePlan, build_plan
from ckv_cli.data.sequences import SequenceData
from ckv_cli.errors import CkvError
from ckv_cli.evaluate import PROTOCOL, fidelity_summary, score_fidelity, scores_after_last_event
from ckv_cli.kv.extract import CacheBatch, FlatCache, flatten, iter_test_caches, teacher_cache_lengths, unflatten
from ckv_cli.metrics import RANKING_METRICS, per_user_ranking, ranking_metrics
from ckv_cli.models.base import item_layer_kv


@dataclass
class CompressOptions:
    codec: str = "collective"
    params: dict = field(default_factory=lambda: {"pool_size": 8192, "user_dim": 0, "layout": "residual"})
    share: tuple[str, ...] = ("k", "v")
    recompute_item_layers: bool = True
    calib_users: int = 1000
    batch_users: int = 256
    distill_steps: int = 0
    finetune: bool = False  # with distill_steps: the model trains too, as a student copy (`ckv_cli.distill`)
    seed: int = 0


class FieldSink(Protocol):
    """Where `compress` streams each batch's encoded fields (`ckv_cli.artifact.ArtifactWriter`)."""

    def start(self, plan: CachePlan) -> None: ...  # once, when the plan is fitted

    def add(self, fields: dict[str, np.ndarray], offsets: np.ndarray) -> None: ...  # each batch, in user order


@dataclass
class CompressResult:
    plan: CachePlan
    fields: dict[str, np.ndarray]  # empty when the caller asked not to keep them (a sweep, a streamed artifact)
    offsets: np.ndarray | None  # None when streamed into an artifact (the file holds them)
    user_ids: Sequence  # the dataset's raw user ids, in order (the artifact stores str() of each)
    accounting: dict
    metrics: dict
    per_user: dict[str, np.ndarray] = field(default_factory=dict)  # rank_ref, rank_new, top10_overlap, kl (U,),
    # empty when streamed into an artifact (the metrics then come from running sums: `Scored`)
    student: object = None  # the fine-tuned model that reads the artifact (`CompressOptions.finetune`), else None


def parse_params(specs: list[str], what: str = "--param") -> dict:
    """['bits=8', 'axis=token', 'tolerance=1e-3'] -> {'bits': 8, 'axis': 'token', 'tolerance': 0.001}: ints, then
    floats, else the string. `what` names the option in the one-line error."""
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise CkvError(f"bad {what} '{spec}': expected KEY=VALUE")
        value = value.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def make_plan(model, opts: CompressOptions) -> CachePlan:
    d_k, d_v = model.kv_dims
    return build_plan(opts.codec, opts.params, n_layers=len(model.layers), d_k=d_k, d_v=d_v,
                      n_items=model.config.n_items, timestamps=model.arch == "hstu",
                      share=tuple(opts.share), recompute_item_layers=opts.recompute_item_layers)


def concat_flat(parts: list[FlatCache], consume: bool = False) -> FlatCache:
    """Users of `parts` back to back. `consume` drops each part's K/V tensors once joined (one stream at a time),
    so the peak is about 1.25x the result instead of 2x; the parts are unusable afterwards."""
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    n_layers = len(parts[0].keys)
    keys, values = [], []
    for i in range(n_layers):
        for name, dest in (("keys", keys), ("values", values)):
            dest.append(torch.cat([getattr(p, name)[i] for p in parts]))
            if consume:
                for p in parts:
                    getattr(p, name)[i] = None
    return FlatCache(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), keys, values,
                     np.concatenate([p.items for p in parts]), np.concatenate([p.timestamps for p in parts]))


def slice_flat(flat: FlatCache, a: int, b: int) -> FlatCache:
    """Users [a, b) of a flat cache, as views (no copy)."""
    lo, hi = int(flat.offsets[a]), int(flat.offsets[b])
    return FlatCache(flat.offsets[a : b + 1] - lo, [k[lo:hi] for k in flat.keys], [v[lo:hi] for v in flat.values],
                     flat.items[lo:hi], flat.timestamps[lo:hi])


def select_users(flat: FlatCache, users: np.ndarray) -> FlatCache:
    """The tokens of `users` (indices into the flat cache's users, in the order given), copied."""
    users = np.asarray(users, dtype=np.int64)
    starts, lengths = flat.offsets[users], np.diff(flat.offsets)[users]
    idx = torch.from_numpy(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)] or [np.zeros(0, np.int64)]))
    return FlatCache(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     [k[idx] for k in flat.keys], [v[idx] for v in flat.values],
                     flat.items[idx.numpy()], flat.timestamps[idx.numpy()])


# ---------------------------------------------------------------- teacher caches and reference scores


@dataclass
class TeacherBatch:
    """One batch of users' teacher caches (flat) and what scoring needs: the last known event, the held-out
    target, and the scores of the uncompressed model after appending that event (`ref_scores`, (B, n_items + 1))."""

    users: np.ndarray
    flat: FlatCache
    last_items: torch.Tensor
    last_ts: torch.Tensor
    targets: torch.Tensor
    ref_scores: torch.Tensor

    def cache_batch(self, cache) -> CacheBatch:
        """A `CacheBatch` over `cache` (the decoded cache: its item ids are the teacher's, so the same window
        items are masked)."""
        return CacheBatch(self.users, cache, self.last_items, self.last_ts, self.targets)


def teacher_batches(model, ds: SequenceData, users: np.ndarray | range, batch_users: int) -> Iterator[TeacherBatch]:
    """Streamed: each batch's teacher cache is prefilled, flattened and scored, then left to the caller. `users`
    may be a `range` (nothing per user is built for users not yet reached)."""
    for b in iter_test_caches(model, ds, users, batch_users):
        yield TeacherBatch(b.users, flatten(b.cache), b.last_items, b.last_ts, b.targets,
                           scores_after_last_event(model, b.cache, b))


@dataclass
class Teacher:
    """Every user's teacher cache (flat, concatenated in dataset order) and reference scores, built once and
    shared by every plan of a sweep. `batches` are views into `flat`."""

    flat: FlatCache
    batches: list[TeacherBatch]

    @classmethod
    def build(cls, model, ds: SequenceData, batch_users: int = 256, advance: Callable[[int], None] | None = None) -> "Teacher":
        batches = []
        for tb in teacher_batches(model, ds, np.arange(ds.n_users), batch_users):
            batches.append(tb)
            if advance:
                advance(len(tb.users))
        flat = concat_flat([tb.flat for tb in batches], consume=True)
        start = 0
        for tb in batches:  # replace each batch's copy by a view into the concatenated cache
            tb.flat = slice_flat(flat, start, start + len(tb.users))
            start += len(tb.users)
        return cls(flat, batches)


def calibration_users(n_users: int, opts: CompressOptions) -> np.ndarray:
    rng = np.random.default_rng(opts.seed)
    return np.sort(rng.choice(n_users, size=min(opts.calib_users, n_users), replace=False))


def fit_plan(model, ds: SequenceData, opts: CompressOptions, on_stream: Callable[[str], None] | None = None,
             teacher: Teacher | None = None) -> CachePlan:
    """Calibration: a seeded sample of users' teacher caches (taken from `teacher` when given, else prefilled)."""
    plan = make_plan(model, opts)
    users = calibration_users(ds.n_users, opts)
    if teacher is not None:
        flat = select_users(teacher.flat, users)
    else:
        flat = concat_flat([flatten(b.cache) for b in iter_test_caches(model, ds, users, opts.batch_users)])
    torch.manual_seed(opts.seed)
    plan.fit(flat, opts.seed, on_stream)
    return plan


# ---------------------------------------------------------------- bytes


def accounting(plan: CachePlan, offsets: np.ndarray | None, kv_dims: tuple[int, int], n_layers: int,
               counts: tuple[int, int] | None = None, breakdown: dict[str, int] | None = None) -> dict:
    """Bytes per NOTES §4. Full cache = every layer's K and V of every cached token; compressed per-user =
    every per-token and per-user field as stored (indices, user values, scales, item ids, timestamps, offsets);
    shared = pools, routers, bases. Model weights are needed by both and counted by neither. `counts` (users,
    tokens) stands in for `offsets` where those are not held (a streamed artifact); `breakdown` (per-user bytes
    per field) for the sizes computed from the counts where the users are split over shards (`ckv_cli.shard`:
    each shard packs its own last partial byte and holds its own offsets). Fields with one row per kept token
    (`evict`) count the tokens the plan keeps of `offsets`' users."""
    n_users, n_tokens = counts if counts is not None else (len(offsets) - 1, int(offsets[-1]))
    per_token_full = n_layers * (kv_dims[0] + kv_dims[1])
    fields = plan.fields()
    if breakdown is None and offsets is None and any(f.per == "kept" for f in fields.values()):
        raise CkvError("internal: counting an evicting plan's bytes needs the user offsets")
    kept = plan.kept_tokens(offsets) if offsets is not None else n_tokens
    breakdown = breakdown or {name: f.nbytes({"token": n_tokens, "kept": kept}.get(
                                  f.per, n_users + 1 if name == "users/offsets" else n_users))
                              for name, f in fields.items()}
    per_user = sum(breakdown.values())
    shared = {f"shared/{s}/{n}": int(t.numel() * t.element_size()) for s, c in plan.streams.items()
              if not isinstance(c, str) for n, t in c.shared().items()}
    shared_total = sum(shared.values())
    return {**ratios(n_users, n_tokens, per_token_full, per_user, shared_total),
            "per_user_breakdown": breakdown, "shared_breakdown": shared}


def ratios(n_users: int, n_tokens: int, per_token_full: int, per_user: int, shared_total: int) -> dict:
    """NOTES §4's totals and ratios; `per_token_full` = values per token of the full cache (fp16: x 2 bytes)."""
    full16, full32 = n_tokens * per_token_full * 2, n_tokens * per_token_full * 4
    return {
        "users": n_users, "tokens": n_tokens, "full_fp16_bytes": full16, "full_fp32_bytes": full32,
        "per_user_bytes": per_user, "shared_bytes": shared_total,
        "bytes_per_token": per_user / max(n_tokens, 1), "full_fp16_bytes_per_token": per_token_full * 2,
        "per_user_ratio_fp16": per_user / max(full16, 1), "per_user_ratio_fp32": per_user / max(full32, 1),
        "total_ratio_fp16": (per_user + shared_total) / max(full16, 1),
        "total_ratio_fp32": (per_user + shared_total) / max(full32, 1),
    }


# ---------------------------------------------------------------- the one encode / decode / score loop


class Scored:
    """What scoring every user leaves: the users' token offsets and, per user, the target's rank under the
    reference and the compressed cache, the top-10 overlap and the KL divergence (`score_fidelity`).

    The offsets and per-user values are kept (`keep_per_user`: a sweep resamples them) or only counted and
    summed (a streamed artifact, whose file holds the offsets: nothing per user is held, so memory stays flat
    in the number of users; `offsets` is None and `n_tokens` counts the tokens). Kept values go into arrays
    allocated once when the number of users is known: lists of small per-batch arrays, each allocated after
    the batch's large temporaries, kept glibc's heap from reusing or trimming them, and the resident set grew
    by ~20 kB per user (`bench/compress_memory.py`). Summed, the metrics have the definitions of
    `ranking_metrics` and `fidelity_summary` (means of the same per-user values) and differ from them only by
    float rounding: sums per batch in float64 where numpy sums all users pairwise."""

    def __init__(self, n_users: int | None, keep_per_user: bool = True):
        self.n, self.keep, self.done, self.n_tokens = n_users, keep_per_user, 0, 0
        self.offsets = np.zeros((n_users or 0) + 1, dtype=np.int64) if keep_per_user else None
        self._lengths: list[np.ndarray] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._parts: dict[str, list[np.ndarray]] = {}
        self._sums: dict[str, float] = {}
        self._counts = {"hit10_flips": 0, "hit10_gained": 0, "hit10_lost": 0}
        self._err: dict[str, list[float]] = {}  # stream -> [squared error, squared norm] of the decoded cache

    def add_error(self, name: str, teacher: torch.Tensor, decoded: torch.Tensor) -> None:
        e = self._err.setdefault(name, [0.0, 0.0])
        e[0] += float(((teacher - decoded) ** 2).sum())
        e[1] += float((teacher ** 2).sum())

    def recon(self) -> dict[str, float]:
        """Relative squared reconstruction error per stream, over every token added."""
        return {k: num / max(den, 1e-12) for k, (num, den) in self._err.items()}

    def summary(self) -> dict:
        """The running sums (plain numbers: JSON-able), for `merged` (shards scored apart; not kept per user)."""
        return {"done": self.done, "n_tokens": self.n_tokens, "sums": dict(self._sums), "counts": dict(self._counts),
                "err": {k: list(v) for k, v in self._err.items()}}

    @classmethod
    def merged(cls, summaries: list[dict]) -> "Scored":
        """One `Scored` (sums only) over the users of several: their `summary()`s added."""
        out = cls(None, keep_per_user=False)
        for s in summaries:
            out.done += s["done"]
            out.n_tokens += s["n_tokens"]
            for k, v in s["sums"].items():
                out._sums[k] = out._sums.get(k, 0.0) + v
            for k, v in s["counts"].items():
                out._counts[k] += v
            for k, (num, den) in s["err"].items():
                e = out._err.setdefault(k, [0.0, 0.0])
                e[0] += num
                e[1] += den
        return out

    def add(self, offsets: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """One batch (consecutive users): its offsets and `score_fidelity`'s per-user values."""
        b = len(offsets) - 1
        if self.n is not None and self.done + b > self.n:
            raise CkvError(f"internal: more than the {self.n:,} users announced")
        self.n_tokens += int(offsets[-1] - offsets[0])
        if self.keep and self.n is None:  # lists, joined by `finish`
            self._lengths.append(np.diff(offsets))
            for k, v in values.items():
                self._parts.setdefault(k, []).append(v)
        elif self.keep:  # arrays allocated once
            self.offsets[self.done + 1 : self.done + b + 1] = self.offsets[self.done] + (offsets[1:] - offsets[0])
            for k, v in values.items():
                if k not in self._arrays:
                    self._arrays[k] = np.empty(self.n, dtype=v.dtype)
                self._arrays[k][self.done : self.done + b] = v
        else:  # sums and counts
            for side in ("rank_ref", "rank_new"):
                for k, v in per_user_ranking(values[side]).items():
                    self._sums[f"{side}/{k}"] = self._sums.get(f"{side}/{k}", 0.0) + float(v.sum())
            for k in ("top10_overlap", "kl"):
                self._sums[k] = self._sums.get(k, 0.0) + float(values[k].sum(dtype=np.float64))
            rr, rn = values["rank_ref"], values["rank_new"]
            self._counts["hit10_flips"] += int(((rr < 10) != (rn < 10)).sum())
            self._counts["hit10_gained"] += int(((rr >= 10) & (rn < 10)).sum())
            self._counts["hit10_lost"] += int(((rr < 10) & (rn >= 10)).sum())
        self.done += b

    def finish(self) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(offsets, per-user values), both only if kept (else None and empty)."""
        if self.n is None and self.keep:
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._arrays = {k: np.concatenate(v) for k, v in self._parts.items()}
            self._lengths, self._parts = [], {}
        elif self.n is not None and self.done != self.n:
            raise CkvError(f"internal: {self.done:,} of the {self.n:,} users announced were scored")
        return self.offsets, self._arrays

    @property
    def per_user(self) -> dict[str, np.ndarray]:
        return self._arrays

    def metrics(self) -> tuple[dict, dict, dict]:
        """(ranking metrics uncompressed, compressed, fidelity summary), from the kept values or the sums."""
        if self.keep:
            per_user = self._arrays
            return ranking_metrics(per_user["rank_ref"]), ranking_metrics(per_user["rank_new"]), fidelity_summary(per_user)
        n = self.done
        mean = (lambda key: self._sums[key] / n) if n else (lambda key: float("nan"))  # noqa: E731
        ref, new = ({k: mean(f"{side}/{k}") for k in RANKING_METRICS} for side in ("rank_ref", "rank_new"))
        return ref, new, {"top10_overlap": mean("top10_overlap"), "kl_mean": mean("kl"), **self._counts}


def run_plan(model, plan: CachePlan, batches: Iterable[TeacherBatch], advance: Callable[[int], None] | None = None,
             keep_fields: bool = True, sink: Callable[[dict[str, np.ndarray], np.ndarray], None] | None = None,
             n_users: int | None = None, keep_per_user: bool = True,
             ) -> tuple[dict[str, np.ndarray], Scored, dict[str, float]]:
    """Encode, decode and score each teacher batch through `plan`. Returns (fields, scores, relative
    reconstruction error per stream); `fields` is empty unless `keep_fields`. `sink(fields, offsets)` receives
    each batch's encoded fields as soon as they exist (a streaming writer). `n_users`, the number of users the
    batches hold when known, lets the per-user values go into arrays allocated once (`Scored`)."""
    item_kv = lambda items, pos: item_layer_kv(model, items, pos)  # noqa: E731
    chunks: dict[str, list[np.ndarray]] = {}
    scored = Scored(n_users, keep_per_user)
    for tb in batches:
        flat = tb.flat
        enc = plan.encode(flat)
        if sink is not None:
            sink(enc, flat.offsets)
        dec = plan.decode(enc, flat.offsets, item_kv)
        for name in plan.streams:
            scored.add_error(name, flat.stream(name), dec.stream(name))
        if keep_fields:
            for k, v in enc.items():
                chunks.setdefault(k, []).append(v)
        cache = unflatten(dec)
        s_c = scores_after_last_event(model, cache, tb.cache_batch(cache))
        scored.add(flat.offsets, score_fidelity(tb.ref_scores, s_c, tb.targets))
        if advance:
            advance(len(tb.users))
    fields = {k: np.concatenate(v) for k, v in chunks.items()}
    scored.finish()
    return fields, scored, scored.recon()


def fit_and_distill(model, ds: SequenceData, opts: CompressOptions, on_stream=None, teacher: Teacher | None = None,
                    student=None):
    """(fitted plan, distillation history or None): calibration (`fit_plan`), then `opts.distill_steps` steps.
    With `opts.finetune`, `student` (`ckv_cli.distill.make_student(model)`) is fine-tuned in place too."""
    if opts.finetune and (not opts.distill_steps or student is None):
        raise CkvError("--finetune needs --distill-steps > 0" if not opts.distill_steps
                       else "internal: fine-tuning needs a student model")
    torch.manual_seed(opts.seed)
    plan = fit_plan(model, ds, opts, on_stream, teacher=teacher)
    if not opts.distill_steps:
        return plan, None
    from ckv_cli.distill import DistillOptions, distill

    return plan, distill(model, ds, plan, DistillOptions(steps=opts.distill_steps, seed=opts.seed, finetune=opts.finetune),
                         student=student)


def metrics_report(scored: Scored, recon: dict[str, float]) -> dict:
    """The metrics entry of a report: ranking metrics without and with compression, deltas, fidelity, error."""
    teacher_m, student, fidelity = scored.metrics()
    return {
        "protocol": f"test split, history prefilled and compressed, last event appended via extend; {PROTOCOL}",
        "uncompressed": teacher_m, "compressed": student,
        "delta": {k: student[k] - teacher_m[k] for k in teacher_m},
        "relative_delta": {k: (student[k] - teacher_m[k]) / teacher_m[k] if teacher_m[k] else 0.0 for k in teacher_m},
        "fidelity": fidelity,
        "reconstruction_rel_mse": recon,
    }


def run_metadata(meta: dict, checkpoint_path, checkpoint_sha256: str, ds: SequenceData, opts: CompressOptions) -> dict:
    """What an artifact records of the run that made it (besides plan, accounting, metrics and command)."""
    return {"checkpoint": str(checkpoint_path), "checkpoint_sha256": checkpoint_sha256, "arch": meta["arch"],
            "dataset": ds.name, "data_fingerprint": ds.fingerprint, "seed": opts.seed, "codec": opts.codec,
            "params": opts.params, "share": list(opts.share), "recompute_item_layers": opts.recompute_item_layers,
            "calib_users": min(opts.calib_users, ds.n_users)}


def compress(model, ds: SequenceData, opts: CompressOptions, plan: CachePlan | None = None,
             advance: Callable[[int], None] | None = None, on_stream=None, teacher: Teacher | None = None,
             keep_fields: bool = True, sink: FieldSink | None = None, student=None) -> CompressResult:
    """Fit (unless `plan` is given), encode, decode and score every user. With `teacher` the caches and reference
    scores come from it (a sweep); without, they are built batch by batch and dropped (bounded memory). With
    `sink`, each batch's fields go to it as they are encoded (`sink.start(plan)` first) and neither they nor
    the offsets and per-user values are kept (`offsets` is None, `per_user` empty; the metrics come from running
    sums: `Scored`).

    With `opts.finetune` a copy of `model` (or `student` when given) is fine-tuned with the plan
    (`ckv_cli.distill`) and reads the decoded caches: `model`, the teacher, still builds every cache and the
    reference scores ("uncompressed" = the teacher's metrics, "compressed" = the student's); the result's
    `student` is that model."""
    torch.manual_seed(opts.seed)
    distilled = None
    if opts.finetune and student is None:
        if plan is not None:
            raise CkvError("internal: a given plan with finetune needs its fine-tuned student")
        from ckv_cli.distill import make_student

        student = make_student(model)
    if plan is None:
        plan, distilled = fit_and_distill(model, ds, opts, on_stream, teacher=teacher, student=student)
    batches = teacher.batches if teacher is not None else teacher_batches(model, ds, range(ds.n_users), opts.batch_users)
    if sink is not None:
        sink.start(plan)
    n_users = len(teacher.flat.offsets) - 1 if teacher is not None else ds.n_users
    reader = student if student is not None else model  # reads the decoded caches (batches: the teacher's)
    fields, scored, recon = run_plan(reader, plan, batches, advance, keep_fields and sink is None,
                                     sink.add if sink is not None else None, n_users=n_users,
                                     keep_per_user=sink is None)
    offsets, per_user = scored.offsets, scored.per_user
    metrics = metrics_report(scored, recon)
    if distilled:
        metrics["distillation"] = {"steps": len(distilled), "finetune": bool(opts.finetune),
                                   "first": distilled[0], "last": distilled[-1]}
    acct = accounting(plan, offsets, model.kv_dims, len(model.layers), counts=(scored.done, scored.n_tokens))
    return CompressResult(plan, fields, offsets, ds.user_ids, acct, metrics, per_user, student=student)


def student_path(out) -> Path:
    """Where `ckv compress --finetune -o OUT` writes the fine-tuned student: OUT with `.student.safetensors`
    in place of its last suffix (`x.ckv.safetensors` -> `x.ckv.student.safetensors`)."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix else out.name) + ".student.safetensors")


def weights_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes; in name order): the same for a
    model object and for one loaded from a checkpoint written from it (`CacheStore` checks it)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def compress_to_artifact(model, meta: dict, checkpoint_path, ds: SequenceData, opts: CompressOptions, out,
                         force: bool = False, advance=None, command: str = "", on_stream=None) -> dict:
    """Compress, streaming each batch's fields into the artifact as they are encoded (memory flat in the number
    of users: `ArtifactWriter`), check the bytes laid out against the accounting, write the file atomically;
    returns the report. An existing output without `force` is refused before any work."""
    from ckv_cli.artifact import ArtifactWriter
    from ckv_cli.checkpoint import check_output, save_checkpoint
    from ckv_cli.codecs.evict import refuse_artifact
    from ckv_cli.data.datasets import sha256_file

    refuse_artifact(opts.codec)
    student_out = student_path(out) if opts.finetune else None
    if student_out is not None:
        check_output(student_out, force)  # before any work
    writer = ArtifactWriter(out, lambda a, b: teacher_cache_lengths(ds, model.config.max_len, a, b), ds.user_ids,
                            force=force)
    student_written = False
    try:
        checkpoint_sha256 = sha256_file(Path(checkpoint_path))
        result = compress(model, ds, opts, advance=advance, on_stream=on_stream, sink=writer)
        report = {"artifact": str(out), **run_metadata(meta, checkpoint_path, checkpoint_sha256, ds, opts),
                  "plan": result.plan.describe(), "accounting": result.accounting, "metrics": result.metrics}
        if student_out is not None:  # the model that reads this artifact (what the metrics measured)
            save_checkpoint(result.student, student_out, dataset=meta.get("dataset", ds.name),
                            fingerprint=meta.get("data_fingerprint", ds.fingerprint), item_vocab=meta["item_vocab"],
                            metrics={"compressed_test": result.metrics["compressed"]},
                            train={"finetuned_from": str(checkpoint_path), "finetuned_from_sha256": checkpoint_sha256,
                                   "distill_steps": opts.distill_steps, "seed": opts.seed, "artifact": str(out),
                                   "command": command}, force=force)
            student_written = True
            report.update({"finetune": True, "student_checkpoint": str(student_out),
                           "student_sha256": sha256_file(student_out),
                           "student_weights_sha256": weights_sha256(result.student)})
        metadata = {k: v for k, v in report.items() if k not in ("artifact", "plan")}
        metadata["command"] = command
        laid_out = writer.tensor_bytes
        on_disk = sum(v for k, v in laid_out.items() if k in result.accounting["per_user_breakdown"])
        if on_disk != result.accounting["per_user_bytes"]:
            raise CkvError(f"internal: per-user bytes on disk ({on_disk}) differ from the accounting "
                           f"({result.accounting['per_user_bytes']})")
        stored = writer.finish(metadata)
    except BaseException:
        if student_written:  # no student without its artifact
            student_out.unlink(missing_ok=True)
        raise
    finally:
        writer.discard()
    report["stored_tensor_bytes"] = int(sum(stored.values()))
    report["file_bytes"] = Path(out).stat().st_size
    return report
