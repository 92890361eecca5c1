"""`ckv compress` for every model: fit a cache plan on calibration tokens, encode every user's exact tokens, decode
them, score what the compression costs under the model's task (`ckv_cli.tasks`), and account for every byte
(NOTES §4).

One loop (`run_plan`) serves a single artifact, a sharded one and a sweep of many plans (`ckv_cli.evaluate.sweep`):
the task's teacher batches come streamed (built per batch of users, then dropped: memory bounded by the batch) or
from a `teacher` built once and held (a sweep). Each batch: `plan.encode` -> the sink (a streaming artifact writer)
-> `plan.decode` through the model that reads the cache -> reconstruction error -> the task's scorer.

Bytes (NOTES §4): full cache = every declared stream of every cached token at fp16 / fp32; compressed per-user =
every per-token and per-user field as stored (indices, user values, scales, ids, offsets); shared = pools, routers,
bases, tables. Model weights are needed by the full and the compressed cache alike and are counted by neither.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from ckv_cli.codecs import CachePlan, build_plan
from ckv_cli.codecs.plan import CTR as CTR_LAYOUT
from ckv_cli.codecs.plan import NEXT_ITEM as NEXT_ITEM_LAYOUT
from ckv_cli.errors import CkvError
from ckv_cli.spec import FlatCache
from ckv_cli.tasks import CTR, task_of

SIDE_MODES = ("derived", "stored")


@dataclass
class CompressOptions:
    codec: str = "collective"
    params: dict = field(default_factory=lambda: {"pool_size": 8192, "user_dim": 0, "layout": "residual"})
    share: tuple[str, ...] = ("k", "v")
    recompute_item_layers: bool = True  # streams that are a function of ids stored anyway are recomputed
    calib_users: int = 1000
    batch_users: int = 256
    distill_steps: int = 0
    finetune: bool = False  # with distill_steps: the model trains too, as a student copy (`ckv_cli.pipeline.distill`)
    seed: int = 0
    calib_tokens: int = 32768  # CTR: a seeded sample of the calibration users' training tokens
    codes: str = "derived"  # side fields (ETA / SDIM signatures): derived from the decoded cache, or stored exactly
    bootstrap: int = 200  # CTR: paired-bootstrap resamples of the report's CIs
    exclude_seen: bool = True  # next-item: the window's items removed from the ranking (the published protocol)
    calib_holdout: bool = False  # next-item: calibrate on at most half the users (the others held out)


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
    per_user: dict[str, np.ndarray] = field(default_factory=dict)  # next-item: rank_ref, rank_new, top10_overlap,
    # kl (U,), when kept
    student: object = None  # the fine-tuned model that reads the artifact (`CompressOptions.finetune`), else None
    scorer: object = None  # the task's scorer (a sweep reads its per-user values / samples)
    calibration: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)


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
        if isinstance(value, float) and not math.isfinite(value):
            raise CkvError(f"bad {what} '{spec}': {value} is not a finite number")
        out[key.strip()] = value
    return out


def make_plan(model, opts: CompressOptions, pool_size: int | None = None) -> CachePlan:
    """The unfitted plan of `opts`. With `params['pool_size']` 'auto' or 'balanced' (`ckv_cli.pipeline.sizing`) every
    pool gets `pool_size` (default: the largest candidate, which every other parameter accepts, e.g. `index_bits`
    up to its width); `fit` chooses the size."""
    from ckv_cli.pipeline.sizing import AUTO, BALANCED, CANDIDATES

    task = task_of(model)
    task.check_codec(opts.codec)
    if opts.codes not in SIDE_MODES:
        raise CkvError(f"codes must be one of {', '.join(SIDE_MODES)}, got {opts.codes!r}")
    ctr = task is CTR
    params = dict(opts.params)
    if params.get("pool_size") in (AUTO, BALANCED):
        if ctr:
            raise CkvError(f"--pool-size {params['pool_size']} is for next-item models (a CTR model calibrates on "
                           "sampled tokens)")
        params["pool_size"] = pool_size or max(CANDIDATES)
    tables = getattr(model, "time_bias_tables", None)
    weights = tables() if opts.params.get("time_bits") and tables is not None else None
    plan = build_plan(model.cache_spec(), opts.codec, params, n_items=model.config.n_items,
                      share=tuple(opts.share), recompute_free=opts.recompute_item_layers,
                      side_stored=opts.codes == "stored", layout=CTR_LAYOUT if ctr else NEXT_ITEM_LAYOUT,
                      arch=getattr(model, "arch", None) if ctr else None, time_weights=weights)
    if plan.fisher_groups():  # refused here, before any data is read
        if ctr:
            raise CkvError(f"metric=fisher is for next-item models (it weighs errors by the next-item distribution); "
                           f"this is a {task.name} model")
        if opts.params.get("pool_size") == AUTO:
            raise CkvError("--pool-size auto sizes pools by their squared error; it does not take metric=fisher (use "
                           "--pool-size N or balanced)")
    return plan


def fit_plan(model, ds, opts: CompressOptions, on_stream: Callable[[str], None] | None = None,
             teacher=None) -> CachePlan:
    """Calibration: the task's calibration tokens (taken from `teacher` when given, else built)."""
    return fit(model, ds, opts, on_stream, teacher)[0]


def fit(model, ds, opts: CompressOptions, on_stream=None, teacher=None,
        calib_users: np.ndarray | None = None) -> tuple[CachePlan, dict]:
    """`calib_users` (increasing user indices) replaces the task's seeded sample (a sharded read draws its own:
    `ckv_cli.data.partition`). With `pool_size` 'auto' the pool of each stream is sized on the calibration caches
    first, with 'balanced' from the log's token count (`ckv_cli.pipeline.sizing`; `info['pool_sizing']` says what was
    chosen and why)."""
    from ckv_cli.pipeline.sizing import AUTO, BALANCED, auto_plan, balanced_plan

    plan = make_plan(model, opts)
    task = task_of(model)
    users = task.calibration_users(ds, opts) if calib_users is None else calib_users
    flat, info = task.calibration(model, ds, opts, users, teacher=teacher)
    sizing = None
    groups, fisher = plan.fisher_groups(), None
    if groups:  # next-item only (make_plan refuses the others)
        from ckv_cli.tasks.fisher import data_grams

        if on_stream:
            on_stream("the Fisher metric")
        fisher = data_grams(model, ds, users, groups, opts.batch_users, opts.seed, opts.exclude_seen)
    if opts.params.get("pool_size") == AUTO:
        plan, sizing = auto_plan(model, lambda m: make_plan(model, opts, m), flat, task.n_tokens(model, ds), opts.seed)
    elif opts.params.get("pool_size") == BALANCED:
        plan, sizing = balanced_plan(lambda m: make_plan(model, opts, m), task.n_tokens(model, ds),
                                     len(task.user_ids(ds)), full_width(model))
    if sizing is not None:
        info = {**info, "pool_sizing": sizing}
    torch.manual_seed(opts.seed)
    plan.fit(flat, opts.seed, on_stream, fisher=fisher)
    if fisher is not None:
        info = {**info, "fisher": {"streams": {k: list(v) for k, v in groups.items()}, "users": int(len(users))}}
    return plan, info


def fit_and_distill(model, ds, opts: CompressOptions, on_stream=None, teacher=None, student=None,
                    calib_users: np.ndarray | None = None):
    """(fitted plan, distillation history or None, calibration info): calibration (`fit`, on `calib_users` when
    given), then `opts.distill_steps` steps. With `opts.finetune`, `student`
    (`ckv_cli.pipeline.distill.make_student(model)`) is fine-tuned in place too."""
    if opts.finetune and (not opts.distill_steps or student is None):
        raise CkvError("--finetune needs --distill-steps > 0" if not opts.distill_steps
                       else "internal: fine-tuning needs a student model")
    torch.manual_seed(opts.seed)
    plan, info = fit(model, ds, opts, on_stream, teacher=teacher, calib_users=calib_users)
    if not opts.distill_steps:
        return plan, None, info
    from ckv_cli.pipeline.distill import DistillOptions, distill
    from ckv_cli.tasks.next_item import temperature_of

    dopts = DistillOptions(steps=opts.distill_steps, seed=opts.seed, finetune=opts.finetune,
                           temperature=temperature_of(model))  # the model's own softmax (1 for RecBole's dot scores)
    return plan, distill(model, ds, plan, dopts, student=student), info


# ---------------------------------------------------------------- bytes


def accounting(plan: CachePlan, offsets: np.ndarray | None, per_token_full: int,
               counts: tuple[int, int] | None = None, breakdown: dict[str, int] | None = None,
               ragged: dict[str, int] | None = None) -> dict:
    """Bytes per NOTES §4 (module docstring). `per_token_full` = values per token of the full cache (the sum of the
    declared stream widths). `counts` (users, tokens) stands in for `offsets` where those are not held;
    `breakdown` (per-user bytes per field) for the sizes computed from the counts where the users are split over
    shards (`ckv_cli.pipeline.shard`: each shard packs its own last partial byte and holds its own offsets).
    Fields with one row per kept token (`evict`) count the tokens the plan keeps of `offsets`' users; ragged fields
    (escaped indices) count the rows encoded, `ragged` (field -> rows)."""
    n_users, n_tokens = counts if counts is not None else (len(offsets) - 1, int(offsets[-1]))
    fields = plan.fields()
    if breakdown is None and offsets is None and any(f.per == "kept" for f in fields.values()):
        raise CkvError("internal: counting an evicting plan's bytes needs the user offsets")
    missing = [n for n, f in fields.items() if f.per == "ragged" and n not in (ragged or {})]
    if breakdown is None and missing:
        raise CkvError(f"internal: counting {missing[0]}'s bytes needs its rows")
    kept = plan.kept_tokens(offsets) if offsets is not None else n_tokens
    breakdown = breakdown or {name: f.nbytes({"token": n_tokens, "kept": kept}.get(
                                  f.per, ragged[name] if f.per == "ragged" else
                                  n_users + 1 if name == "users/offsets" else n_users))
                              for name, f in fields.items()}
    per_user = sum(breakdown.values())
    shared = {f"shared/{s}/{n}": int(t.numel() * t.element_size()) for s, c in plan.shared_owners().items()
              for n, t in c.shared().items()}
    return {**ratios(n_users, n_tokens, per_token_full, per_user, sum(shared.values())),
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


def full_width(model) -> int:
    """Values per token of the model's full cache: the sum of its declared stream widths."""
    return sum(s.width for s in model.cache_spec().streams)


def data_accounting(plan: CachePlan, model, ds, rows: "RaggedRows | None" = None) -> dict:
    """The accounting over every user of `ds` as the task caches them (token counts from the data alone; the rows
    of ragged fields from `rows`, those encoded: scaled to every token, and marked so, when not every user was)."""
    task = task_of(model)
    n = len(task.user_ids(ds))
    lengths = np.asarray(task.token_counts(model, ds)(0, n), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ragged = rows.over(int(offsets[-1])) if rows is not None else None
    acct = accounting(plan, offsets, full_width(model), ragged=ragged)
    if rows is not None and rows.rows and rows.tokens != int(offsets[-1]):
        acct["ragged_rows_estimated"] = True  # from the share of the tokens encoded (a subset of users)
    return {**acct, **task.accounting_extra(acct, plan, model, lengths)}


@dataclass
class RaggedRows:
    """Rows of each ragged field encoded so far (escaped indices of item-coded indices) and the tokens they came
    from: a ragged field's bytes are known only once its users are encoded."""

    rows: dict[str, int] = field(default_factory=dict)
    tokens: int = 0

    def add(self, plan: CachePlan, enc: dict[str, np.ndarray], n_tokens: int) -> None:
        for name, f in plan.fields().items():
            if f.per == "ragged":
                self.rows[name] = self.rows.get(name, 0) + len(enc[name])
        self.tokens += n_tokens

    def over(self, n_tokens: int) -> dict[str, int]:
        """Rows for `n_tokens` tokens: those counted when every token was encoded, else scaled by the share."""
        if n_tokens == self.tokens or not self.tokens:
            return dict(self.rows)
        return {k: int(round(v * n_tokens / self.tokens)) for k, v in self.rows.items()}


# ---------------------------------------------------------------- the one encode / decode / score loop


class Errors:
    """Relative squared reconstruction error per stream, and the share of side-field values (signatures) changed,
    over every token added. With `held_out` ((users,) bool by dataset user index: not a calibration user) the
    error over the held-out users' tokens is kept apart too (`held`)."""

    def __init__(self, held_out: np.ndarray | None = None):
        self.err: dict[str, list[float]] = {}
        self.side = [0, 0]
        self.held_out = held_out
        self.held: Errors | None = Errors() if held_out is not None else None

    def add(self, exact: FlatCache, decoded: FlatCache, users: np.ndarray | None = None) -> None:
        """One batch; `users` (its dataset user indices) selects the held-out users' tokens for `held`."""
        token_mask = None
        if self.held is not None and users is not None:
            token_mask = torch.from_numpy(np.repeat(self.held_out[np.asarray(users)], np.diff(exact.offsets)))
        for name, x in exact.streams.items():
            sq, x2 = (x - decoded.streams[name]) ** 2, x ** 2  # (N, d) each, computed once
            e = self.err.setdefault(name, [0.0, 0.0])
            e[0] += float(sq.sum())
            e[1] += float(x2.sum())
            if token_mask is not None:  # the held-out users' tokens (rows)
                h = self.held.err.setdefault(name, [0.0, 0.0])
                h[0] += float(sq[token_mask].sum())
                h[1] += float(x2[token_mask].sum())
        for name, v in exact.side.items():
            if name in decoded.side:
                self.side[0] += int((v != decoded.side[name]).sum())
                self.side[1] += v.numel()

    def recon(self) -> dict[str, float]:
        return {k: num / max(den, 1e-12) for k, (num, den) in self.err.items()}

    def summary(self) -> dict:
        return {k: list(v) for k, v in self.err.items()}

    def merge(self, summary: dict) -> None:
        for k, (num, den) in summary.items():
            e = self.err.setdefault(k, [0.0, 0.0])
            e[0] += num
            e[1] += den


def calibration_summary(n_calib: int, n_users: int, held: dict | None) -> dict:
    """What the report says of calibration: how many users fitted the plan, whether the metrics are in-sample, and
    (`held`: `Scored.held_report`) the metrics and reconstruction error of the users held out of calibration."""
    n_held = n_users - n_calib
    out = {"users": n_calib, "scored_users": n_users, "held_out_users": n_held, "in_sample": n_held == 0}
    if n_held == 0:
        out["note"] = (f"in-sample: all {n_users:,} users calibrated the plan, and the metrics and reconstruction "
                       "error are over those same users (flattered); --calib-holdout keeps half of them out")
    else:
        out["note"] = (f"the metrics cover every user, {n_calib:,} of them calibration users (in-sample); "
                       f"'held_out' covers the other {n_held:,} only")
    if held is not None:
        out["held_out"] = held
    return out


def run_plan(model, plan: CachePlan, batches: Iterable, scorer, advance: Callable[[int], None] | None = None,
             keep_fields: bool = True, sink: Callable[[dict[str, np.ndarray], np.ndarray], None] | None = None,
             reader=None, memo=None, rows: RaggedRows | None = None,
             held_out: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], Errors]:
    """Encode, decode and score each teacher batch through `plan`; `reader` (default `model`) reads the decoded
    caches. Returns (fields, errors); `fields` is empty unless `keep_fields`. `sink(fields, offsets)` receives each
    batch's encoded fields as soon as they exist (a streaming writer). `memo`: (fields of every distinct token,
    each global token's distinct row) for token-local streams (`ckv_cli.tasks.ctr.memo`). `rows` counts the rows of
    ragged fields encoded (their bytes). `held_out` ((users,) bool, dataset user index -> not a calibration user)
    keeps the held-out users' error apart (`Errors.held`)."""
    reader = model if reader is None else reader
    chunks: dict[str, list[np.ndarray]] = {}
    errors = Errors(held_out)
    for tb in batches:
        flat = tb.tokens
        if memo is not None:
            enc = plan.encode(flat, memo[0], memo[1][tb.events])
        else:
            enc = plan.encode(flat)
        if sink is not None:
            sink(enc, flat.offsets)
        if rows is not None:
            rows.add(plan, enc, flat.n_tokens)
        dec = plan.decode(enc, flat.offsets, reader)
        errors.add(flat, dec, tb.users if held_out is not None else None)
        if keep_fields:
            for k, v in enc.items():
                chunks.setdefault(k, []).append(v)
        scorer.add_batch(tb, dec, reader)
        if advance:
            advance(len(tb.users))
    return {k: np.concatenate(v) for k, v in chunks.items()}, errors


def compress(model, ds, opts: CompressOptions, plan: CachePlan | None = None,
             advance: Callable[[int], None] | None = None, on_stream=None, teacher=None,
             keep_fields: bool = True, sink: FieldSink | None = None, student=None, users=None) -> CompressResult:
    """Fit (unless `plan` is given), encode, decode and score the users. With `teacher` (the task's, built once)
    the batches come from it (a sweep); without, they are built batch by batch and dropped (bounded memory);
    `users` (indices) restricts encoding and scoring to those users (calibration and the accounting still cover
    every user). With `sink`, each batch's fields go to it as they are encoded (`sink.start(plan)` first) and the
    scorer keeps running sums only (memory flat in the number of users).

    With `opts.finetune` a copy of `model` (or `student` when given) is fine-tuned with the plan
    (`ckv_cli.pipeline.distill`) and reads the decoded caches: `model`, the teacher, still builds every cache and
    the reference scores ("uncompressed" = the teacher's metrics, "compressed" = the student's)."""
    task = task_of(model)
    t0 = time.time()
    torch.manual_seed(opts.seed)
    model.eval()
    distilled, info = None, {}
    if opts.finetune and student is None:
        if plan is not None:
            raise CkvError("internal: a given plan with finetune needs its fine-tuned student")
        from ckv_cli.pipeline.distill import make_student

        student = make_student(model)
    held_out = None
    if plan is None:
        calib = task.calibration_users(ds, opts)  # seeded: the users `fit` calibrates on (None: CTR samples tokens)
        plan, distilled, info = fit_and_distill(model, ds, opts, on_stream, teacher=teacher, student=student,
                                                calib_users=calib)
        if calib is not None:
            held_out = np.ones(len(task.user_ids(ds)), dtype=bool)
            held_out[calib] = False
    t_fit = time.time() - t0
    if teacher is not None:
        batches, n_users = teacher.batches, teacher.n_users
    else:
        batches = task.batches(model, ds, users, opts.batch_users, opts.exclude_seen)
        n_users = len(users) if users is not None else len(task.user_ids(ds))
    memo = task.memo(model, ds, plan)
    if memo is not None:
        info["distinct_events_encoded"] = memo[2]
    if sink is not None:
        sink.start(plan)
    scorer = task.scorer(model, ds, opts, n_users, keep_per_user=sink is None)
    if held_out is not None and hasattr(scorer, "hold_out"):
        scorer.hold_out(held_out)
    else:
        held_out = None
    rows = RaggedRows()
    fields, errors = run_plan(model, plan, batches, scorer, advance, keep_fields and sink is None,
                              sink.add if sink is not None else None, reader=student, memo=memo, rows=rows,
                              held_out=held_out)
    offsets = None
    if hasattr(scorer, "finish"):
        offsets, _ = scorer.finish()
    metrics = scorer.report(errors.recon())
    if held_out is not None:
        metrics["calibration"] = calibration_summary(int((~held_out).sum()), len(held_out), scorer.held_report(
            errors.held.recon()))
    if errors.side[1]:
        metrics["signature_mismatch_rate"] = errors.side[0] / errors.side[1]
    if distilled:
        metrics["distillation"] = {"steps": len(distilled), "finetune": bool(opts.finetune),
                                   "first": distilled[0], "last": distilled[-1]}
    acct = data_accounting(plan, model, ds, rows)
    return CompressResult(plan, fields, offsets, task.user_ids(ds), acct, metrics,
                          getattr(scorer, "per_user", {}), student=student, scorer=scorer, calibration=info,
                          timing={"fit_seconds": round(t_fit, 1), "total_seconds": round(time.time() - t0, 1)})


# ---------------------------------------------------------------- into an artifact


def run_metadata(meta: dict, checkpoint_path, checkpoint_sha256: str, ds, opts: CompressOptions, model) -> dict:
    """What an artifact records of the run that made it (besides plan, accounting, metrics and command)."""
    task = task_of(model)
    out = {"checkpoint": str(checkpoint_path), "checkpoint_sha256": checkpoint_sha256, "arch": meta["arch"],
           "dataset": ds.name, "data_fingerprint": ds.fingerprint, "seed": opts.seed, "codec": opts.codec,
           "params": opts.params, "share": list(opts.share)}
    if task is CTR:
        spec = model.cache_spec()
        out.update({"task": "ctr", "branches": sorted({s.name.split(".")[0] for s in spec.streams}),
                    "streams": spec.widths, "calib_users": opts.calib_users, "calib_tokens": opts.calib_tokens})
    else:
        out.update({"recompute_item_layers": opts.recompute_item_layers,
                    "calib_users": len(task.calibration_users(ds, opts))})
        if opts.calib_holdout:
            out["calib_holdout"] = True
    return out


def student_path(out) -> Path:
    """Where `ckv compress --finetune -o OUT` writes the fine-tuned student: OUT with `.student.safetensors`
    in place of its last suffix (`x.ckv.safetensors` -> `x.ckv.student.safetensors`)."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix else out.name) + ".student.safetensors")


def weights_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes; in name order): the same for a
    model object and for one loaded from a checkpoint written from it (the stores check it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def compress_to_artifact(model, meta: dict, checkpoint_path, ds, opts: CompressOptions, out,
                         force: bool = False, advance=None, command: str = "", on_stream=None) -> dict:
    """Compress, streaming each batch's fields into the artifact as they are encoded (memory flat in the number
    of users: `ArtifactWriter`), check the bytes laid out against the accounting, write the file atomically;
    returns the report. An existing output without `force` is refused before any work."""
    from ckv_cli.artifact.writer import ArtifactWriter
    from ckv_cli.codecs.evict import refuse_artifact
    from ckv_cli.io.files import check_output, sha256_file
    from ckv_cli.io.guarded import transaction, where
    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.pipeline.sizing import shared_warning

    task = task_of(model)
    refuse_artifact(opts.codec)
    student_out = student_path(out) if opts.finetune else None
    if student_out is not None:
        check_output(student_out, force, "--finetune student")  # before any work
    writer = ArtifactWriter(out, task.token_counts(model, ds), task.user_ids(ds), force=force)
    try:
        with transaction():  # the student and the artifact: both renamed into place at the end, or neither
            checkpoint_sha256 = sha256_file(Path(checkpoint_path))
            result = compress(model, ds, opts, advance=advance, on_stream=on_stream, sink=writer)
            acct = result.accounting
            report = {"artifact": str(out), **run_metadata(meta, checkpoint_path, checkpoint_sha256, ds, opts, model)}
            if result.calibration and task is CTR:
                report["calibration"] = result.calibration
            if task is CTR:
                report["codes"] = result.plan.side_mode
            if "pool_sizing" in result.calibration:
                report["pool_sizing"] = result.calibration["pool_sizing"]
            if "fisher" in result.calibration:
                report["fisher"] = result.calibration["fisher"]
            report.update({"plan": result.plan.describe(), "accounting": acct, "metrics": result.metrics})
            warning = shared_warning(acct)
            if warning:
                report["warnings"] = [warning]
            if student_out is not None:  # the model that reads this artifact (what the metrics measured)
                save_checkpoint(result.student, student_out, dataset=meta.get("dataset", ds.name),
                                fingerprint=meta.get("data_fingerprint", ds.fingerprint), item_vocab=meta["item_vocab"],
                                metrics={"compressed_test": result.metrics["compressed"]},
                                train={"finetuned_from": str(checkpoint_path), "finetuned_from_sha256": checkpoint_sha256,
                                       "distill_steps": opts.distill_steps, "seed": opts.seed, "artifact": str(out),
                                       "command": command}, force=force)
                report.update({"finetune": True, "student_checkpoint": str(student_out),
                               "student_sha256": sha256_file(where(student_out)),  # staged until the block ends
                               "student_weights_sha256": weights_sha256(result.student)})
            metadata = {k: v for k, v in report.items() if k not in ("artifact", "plan")}
            metadata["command"] = command
            laid_out = writer.tensor_bytes
            on_disk = sum(v for k, v in laid_out.items() if k in acct["per_user_breakdown"])
            if on_disk != acct["per_user_bytes"]:
                raise CkvError(f"internal: per-user bytes on disk ({on_disk}) differ from the accounting "
                               f"({acct['per_user_bytes']})")
            shared_disk = sum(v for k, v in laid_out.items() if k.startswith("shared/"))
            if shared_disk != acct["shared_bytes"]:
                raise CkvError(f"internal: shared bytes on disk ({shared_disk}) differ from the accounting "
                               f"({acct['shared_bytes']})")
            stored = writer.finish(metadata)
    finally:
        writer.discard()
    if task is CTR:
        report["timing"] = result.timing
        report["per_user_bytes_on_disk"] = int(sum(v for k, v in stored.items() if k in acct["per_user_breakdown"]))
    report["stored_tensor_bytes"] = int(sum(stored.values()))
    report["file_bytes"] = Path(out).stat().st_size
    return report
