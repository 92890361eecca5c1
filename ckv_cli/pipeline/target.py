"""`ckv compress --target` (issue 18 part 4): among candidate settings (codec, pool size, user dims, layout, time
bits), keep the one with the smallest total bytes (per-user bytes of every user of the log + shared bytes) that
meets a fidelity target on held-out calibration users. Next-item models.

The calibration users are split (seeded, by user) into a fitting part and a validation part; each setting is fitted
on the first and scored on the second against the uncompressed model (same protocol as `ckv compress`). Targets:
- `overlap=0.9`: mean top-10 overlap with the uncompressed model >= 0.9;
- `NDCG@10=1%` / `HR@10=0.005`: the metric's drop on the validation users at most 1% (relative) / 0.005 (absolute);
- `kl=0.02`: mean KL divergence of the scores at most 0.02.
Settings are tried in increasing order of per-user bytes (known before fitting); the search stops once the next
setting's per-user bytes alone exceed the best total found (it could not be smaller). Every setting tried is
returned with its bytes and metric, so the caller can print them.

The validation users are few (a fifth of the calibration users by default): a rank-metric target on them is noisy
(NDCG@10 on 200 users has a standard error of several percent); `overlap` and `kl` are far steadier. And the
search keeps the cheapest of many noisy passes, so a setting that just clears the target on the validation users
tends to fall short on the others (measured on the HSTU sample: 0.9065 on 200 validation users, 0.886 on 5,040
held-out ones). So a setting meets the target only when its measure clears it by `margin` standard errors of its
mean over the validation users (per-user values; for a metric's drop, of the paired per-user differences):
`margin=1.2816`, a one-sided 90% bound, by default; 0 compares the mean alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from ckv_cli.errors import CkvError
from ckv_cli.metrics import RANKING_METRICS, per_user_ranking
from ckv_cli.pipeline.compress import CompressOptions, accounting, full_width, make_plan
from ckv_cli.pipeline.holdout import fit_plan_on, score_plan, teacher_subset
from ckv_cli.pipeline.sizing import declared_bytes, user_split
from ckv_cli.tasks.next_item import Teacher, teacher_batches


MARGIN = 1.2816  # standard errors a setting's measure must clear the target by: a one-sided 90% bound


@dataclass(frozen=True)
class Target:
    metric: str  # "overlap", "kl" or a ranking metric (NDCG@10, HR@10, ...)
    value: float
    relative: bool = False  # ranking metrics: the drop as a fraction of the uncompressed value

    def met(self, fidelity: dict, ref: dict, new: dict, per_user: dict | None = None,
            margin: float = MARGIN) -> tuple[bool, float, float]:
        """(met, the measured quantity: overlap, KL, or the metric's drop, its conservative end: the measure moved
        `margin` standard errors of its mean toward failing, from `per_user` values (rank_ref, rank_new,
        top10_overlap, kl); without them the measure itself). Met when the conservative end meets the target."""
        if self.metric == "overlap":
            measured, values = fidelity["top10_overlap"], None if per_user is None else per_user["top10_overlap"]
        elif self.metric == "kl":
            measured, values = fidelity["kl_mean"], None if per_user is None else per_user["kl"]
        else:
            measured, values = ref[self.metric] - new[self.metric], None
            if per_user is not None:
                values = (per_user_ranking(per_user["rank_ref"])[self.metric]
                          - per_user_ranking(per_user["rank_new"])[self.metric])
            if self.relative:
                scale = ref[self.metric] if ref[self.metric] else float("inf")
                measured, values = measured / scale, None if values is None else values / scale
        se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if values is not None and len(values) > 1 else 0.0
        if self.metric == "overlap":
            bound = measured - margin * se
            return bound >= self.value, measured, bound
        bound = measured + margin * se
        return bound <= self.value, measured, bound


def parse_target(spec: str) -> Target:
    """'overlap=0.9', 'kl=0.02', 'NDCG@10=1%' (relative drop) or 'NDCG@10=0.005' (absolute drop)."""
    key, sep, value = str(spec).partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not value:
        raise CkvError(f"bad --target '{spec}': expected METRIC=VALUE, e.g. overlap=0.9 or NDCG@10=1%")
    relative = value.endswith("%")
    try:
        number = float(value[:-1]) / 100 if relative else float(value)
    except ValueError:
        raise CkvError(f"bad --target '{spec}': '{value}' is not a number") from None
    names = {"overlap": "overlap", "top10_overlap": "overlap", "kl": "kl", **{m.lower(): m for m in RANKING_METRICS}}
    if key.lower() not in names:
        raise CkvError(f"bad --target '{spec}': unknown metric '{key}' (known: overlap, kl, {', '.join(RANKING_METRICS)})")
    metric = names[key.lower()]
    if metric in ("overlap", "kl") and relative:
        raise CkvError(f"bad --target '{spec}': {metric} takes a plain number")
    if metric == "overlap" and not 0 < number <= 1:
        raise CkvError(f"bad --target '{spec}': overlap must be in (0, 1]")
    if number < 0:
        raise CkvError(f"bad --target '{spec}': the value must be >= 0")
    return Target(metric, number, relative)


@dataclass(frozen=True)
class Setting:
    codec: str
    params: tuple[tuple[str, object], ...]
    time_bits: int = 0

    @property
    def label(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params)
        return self.codec + (":" + p if p else "") + (f" time_bits={self.time_bits}" if self.time_bits else "")

    def options(self, base: CompressOptions) -> CompressOptions:
        params = dict(self.params)
        if self.time_bits:
            params["time_bits"] = self.time_bits
        return replace(base, codec=self.codec, params=params)


def default_settings(timestamps: bool) -> list[Setting]:
    """The grid searched when the caller gives none: collective (pool sizes, one user dim, concat layout) and
    predictive (linear, linear+item) at fp16 pools, fitted in the model's Fisher metric (but the concat layout's);
    for models that read event times, times at 4 or 6 bits or int32."""
    grid, fisher = [], ("metric", "fisher")
    for m in (256, 512, 1024, 2048, 4096, 8192):
        grid.append(("collective", (("pool_size", m), ("pool_dtype", "fp16"), fisher)))
        grid.append(("predictive", (("pool_size", m), ("max_rows", "pool"), fisher)))
    for m in (1024, 4096):
        grid.append(("collective", (("pool_size", m), ("user_dim", 1), ("pool_dtype", "fp16"), fisher)))
        grid.append(("collective", (("pool_size", m), ("user_dim", 1), ("layout", "concat"), ("pool_dtype", "fp16"))))
        grid.append(("predictive", (("pool_size", m), ("predictor", "linear+item"), ("max_rows", "pool"), fisher)))
    times = (4, 6, 0) if timestamps else (0,)  # 0: int32, the most bytes (skipped once a cheaper setting met it)
    return [Setting(c, p, t) for (c, p), t in itertools.product(grid, times)]


@dataclass
class SearchResult:
    target: Target
    chosen: Setting | None
    tried: list[dict] = field(default_factory=list)  # label, per_user_bytes, shared_bytes, total_bytes, measured, met
    fit_users: int = 0
    val_users: int = 0
    margin: float = MARGIN


def calibration_teacher(model, ds, users: np.ndarray, batch_users: int = 256, exclude_seen: bool = True) -> Teacher:
    """The teacher caches and reference scores of `users` only (dataset indices): what the search fits and scores."""
    from ckv_cli.spec import FlatCache

    batches = list(teacher_batches(model, ds, np.asarray(users, dtype=np.int64), batch_users, exclude_seen))
    if not batches:
        raise CkvError("the target search needs calibration users")
    return Teacher(FlatCache.concat([tb.tokens for tb in batches]), batches)


def _bytes_before_fit(model, opts: CompressOptions, n_users: int, n_tokens: int) -> int:
    """Per-user bytes of every user of the log, from the plan's declared fields (no fitting needed)."""
    return declared_bytes(make_plan(model, opts), n_users, n_tokens)


def search(model, teacher: Teacher, calib: np.ndarray, target: Target, base: CompressOptions,
           settings: list[Setting] | None = None, val_fraction: float = 0.2, progress=None,
           log_counts: tuple[int, int] | None = None, margin: float = MARGIN) -> SearchResult:
    """The smallest-total setting meeting `target` on held-out calibration users (`calib`: dataset user indices,
    a subset of `teacher`'s users); the log's bytes are counted over every user of `teacher`, or over `log_counts`
    (users, tokens) when `teacher` holds only some users (`calibration_teacher`). `settings` default to
    `default_settings` (with event times at a few bits for models that read them); `margin`: the standard errors a
    setting must clear the target by (module docstring)."""
    n_users, n_tokens = log_counts or (teacher.n_users, teacher.flat.n_tokens)
    settings = settings if settings is not None else default_settings(model.cache_spec().reads_times)
    calib = np.asarray(calib, dtype=np.int64)
    fit_idx, val_idx = user_split(len(calib), val_fraction, base.seed)
    fit_users, val_users = calib[fit_idx], calib[val_idx]
    val = teacher_subset(teacher, val_users)
    position = {int(u): i for i, u in enumerate(int(u) for tb in teacher.batches for u in tb.users)}
    fit_rows = np.array([position[int(u)] for u in fit_users], dtype=np.int64)
    ranked = []
    for s in settings:
        opts = s.options(base)
        try:
            ranked.append((_bytes_before_fit(model, opts, n_users, n_tokens), s, opts))
        except CkvError as e:
            ranked.append((float("inf"), s, e))
    ranked.sort(key=lambda r: (r[0], r[1].label))
    out = SearchResult(target, None, fit_users=len(fit_users), val_users=len(val_users), margin=margin)
    best_total = float("inf")
    fisher: dict = {}  # the fitting users' Fisher matrices, per stream grouping: the same for every setting
    for per_user, s, opts in ranked:
        if isinstance(opts, CkvError):
            out.tried.append({"setting": s.label, "status": f"refused: {opts}"})
            continue
        if per_user >= best_total:
            out.tried.append({"setting": s.label, "per_user_bytes": per_user, "status": "skipped: per-user bytes alone "
                              "exceed the best total found"})
            continue
        if progress:
            progress(s.label)
        try:
            plan = fit_plan_on(model, teacher, fit_rows, opts, fisher_cache=fisher)
        except CkvError as e:
            out.tried.append({"setting": s.label, "per_user_bytes": per_user, "status": f"refused: {e}"})
            continue
        scored, summary = score_plan(model, plan, val)
        recon = {k: n / max(d, 1e-12) for k, (n, d) in summary.items()}
        ref, new, fid = scored.metrics()
        met, measured, bound = target.met(fid, ref, new, scored.per_user, margin)
        acct = accounting(plan, None, full_width(model), counts=(n_users, n_tokens))
        total = acct["per_user_bytes"] + acct["shared_bytes"]
        out.tried.append({"setting": s.label, "per_user_bytes": acct["per_user_bytes"],
                          "shared_bytes": acct["shared_bytes"], "total_bytes": total,
                          "total_ratio_fp16": acct["total_ratio_fp16"], "per_user_ratio_fp16": acct["per_user_ratio_fp16"],
                          "measured": measured, "bound": bound, "met": bool(met),
                          "top10_overlap": fid["top10_overlap"],
                          "recon": recon, "status": "ok"})
        if met and total < best_total:
            best_total, out.chosen = total, s
    return out


def describe(result: SearchResult) -> dict:
    """JSON-able: the target, the setting chosen (None when none met it), every setting tried."""
    t = result.target
    return {"target": {"metric": t.metric, "value": t.value, "relative": t.relative, "margin_se": result.margin},
            "chosen": result.chosen.label if result.chosen else None, "fit_users": result.fit_users,
            "validation_users": result.val_users, "tried": result.tried}


def target_options(model, ds, opts: CompressOptions, target: Target, progress=None) -> tuple[CompressOptions, dict]:
    """`ckv compress --target`: search the default settings on `opts`' calibration users; (the options of the
    setting chosen, `describe` of the search). Refused when no setting meets the target (the settings tried go with
    the error's report)."""
    from ckv_cli.tasks import NEXT_ITEM, task_of

    task = task_of(model)
    if task is not NEXT_ITEM:
        raise CkvError("--target searches next-item models' settings (a CTR model calibrates on sampled tokens)")
    calib = task.calibration_users(ds, opts)
    if len(calib) < 2:
        raise CkvError(f"--target needs at least 2 calibration users, got {len(calib)}")
    teacher = calibration_teacher(model, ds, calib, opts.batch_users, opts.exclude_seen)
    result = search(model, teacher, calib, target, opts, default_settings(model.cache_spec().reads_times),
                    progress=progress, log_counts=(len(task.user_ids(ds)), task.n_tokens(model, ds)))
    if result.chosen is None:
        best = max((r for r in result.tried if r.get("status") == "ok"), default=None,
                   key=lambda r: r["measured"] if target.metric == "overlap" else -r["measured"])
        near = f"; closest: {best['setting']} ({best['measured']:.4g})" if best else ""
        raise CkvError(f"--target {target.metric}={target.value:g}: no setting tried met it on the "
                       f"{result.val_users:,} validation users{near}")
    return result.chosen.options(opts), describe(result)
