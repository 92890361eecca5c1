"""Calibration out of sample (issue 18 part 2): the users whose caches fit a plan are never the users whose
metrics are reported. Next-item models.

Two rules, both seeded:
- `reserve` (the rule of `ckv compress --calib-holdout`, drawn by its own seeded permutation, so the users differ
  from compress's sample; docs/fidelity.md's tables were measured with it): calibration users = a seeded sample of
  min(calib_users, n_users // 2) users; every user is encoded with the one plan, but metrics are reported over the
  other users only (at least half of the log). The reconstruction error reported is the held-out users'.
- `folds` (a measurement, not an artifact): users split into k seeded folds; fold f is encoded by a plan fitted
  on (a sample of at most calib_users of) the other folds' users, so every user is scored out of sample. k plans
  exist, so shared bytes are those of one of them (they are the same size).

`heldout_compress` runs either on a `Teacher` (every user's teacher cache and reference scores, built once) and
returns the metrics with paired-bootstrap 95% CIs over the reported users, the fidelity, the held-out
reconstruction error and the bytes (per-user bytes over the whole log, shared bytes of the plan);
`insample_compress` is the protocol without a hold-out, for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs import CachePlan
from ckv_cli.errors import CkvError
from ckv_cli.metrics import paired_bootstrap, per_user_ranking, ranking_metrics
from ckv_cli.pipeline.compress import CompressOptions, accounting, full_width, make_plan, run_plan
from ckv_cli.tasks import calibration_sample
from ckv_cli.tasks.fisher import fisher_grams
from ckv_cli.tasks.next_item import Scored, Teacher, TeacherBatch, fidelity_summary


@dataclass
class Split:
    """Calibration users and reported users (indices into the dataset's users, sorted) and the rule's name."""

    calib: np.ndarray
    report: np.ndarray
    rule: str


def reserve_split(n_users: int, calib_users: int, seed: int) -> Split:
    """Seeded sample of min(calib_users, n_users // 2) calibration users; the others are reported."""
    if n_users < 2:
        raise CkvError(f"held-out calibration needs at least 2 users, got {n_users}")
    n_cal = max(1, min(calib_users, n_users // 2))
    perm = np.random.default_rng(seed).permutation(n_users)
    return Split(np.sort(perm[:n_cal]), np.sort(perm[n_cal:]),
                 f"reserve: {n_cal:,} calibration users (min(calib_users, users // 2)), metrics over the other "
                 f"{n_users - n_cal:,}")


def fold_splits(n_users: int, folds: int, calib_users: int, seed: int) -> list[Split]:
    """k seeded folds; fold f is reported, a seeded sample of at most `calib_users` of the other folds calibrates."""
    if folds < 2 or folds > n_users:
        raise CkvError(f"folds must be between 2 and the number of users ({n_users}), got {folds}")
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(n_users), folds)
    out = []
    for f in range(folds):
        rest = np.concatenate([p for g, p in enumerate(parts) if g != f])
        cal = rng.permutation(rest)[:calib_users]
        out.append(Split(np.sort(cal), np.sort(parts[f]), f"fold {f + 1} of {folds}"))
    return out


def teacher_subset(teacher: Teacher, users: np.ndarray) -> Teacher:
    """The teacher of `users` only (dataset user indices), batches kept in dataset order."""
    users = np.asarray(users, dtype=np.int64)
    top = max(int(users.max()) + 1 if len(users) else 0, max(int(tb.users.max()) + 1 for tb in teacher.batches))
    want = np.zeros(top, bool)
    want[users] = True
    batches, parts = [], []
    start = 0
    for tb in teacher.batches:
        rows = np.nonzero(want[np.asarray(tb.users)])[0]
        if len(rows):
            sel = torch.from_numpy(rows)
            batches.append(TeacherBatch(np.asarray(tb.users)[rows], tb.tokens.select(rows), tb.last_items[sel],
                                        tb.last_ts[sel], tb.targets[sel], tb.ref_scores[sel], tb.exclude_seen,
                                        None if tb.target_ts is None else tb.target_ts[sel]))
            parts.append(start + rows)
        start += len(tb.users)
    if not batches:
        raise CkvError("no user of the teacher was selected")
    flat = teacher.flat.select(np.concatenate(parts))
    return Teacher(flat, batches)


def fit_plan_on(model, teacher: Teacher, users: np.ndarray, opts: CompressOptions,
                plan: CachePlan | None = None, fisher_cache: dict | None = None) -> CachePlan:
    """`plan` (default: `make_plan(model, opts)`) fitted on the teacher caches of `users` only. `fisher_cache`
    keeps the Fisher matrices (`metric=fisher`) of calls on the same users, by stream grouping."""
    plan = plan or make_plan(model, opts)
    groups, fisher = plan.fisher_groups(), None
    if groups:  # metric=fisher: the Fisher matrices of these users' teacher batches
        key = tuple(sorted(groups.items()))
        cache = {} if fisher_cache is None else fisher_cache
        if key not in cache:  # `users` are rows of the teacher (its users in its order), as `select` takes them
            of_rows = np.concatenate([np.asarray(tb.users) for tb in teacher.batches])[np.asarray(users, dtype=np.int64)]
            cache[key] = fisher_grams(model, teacher_subset(teacher, of_rows).batches, groups, seed=opts.seed,
                                      exclude_seen=opts.exclude_seen)
        fisher = cache[key]
    torch.manual_seed(opts.seed)
    plan.fit(teacher.flat.select(np.asarray(users, dtype=np.int64)), opts.seed, fisher=fisher)
    return plan


def score_plan(model, plan: CachePlan, teacher: Teacher) -> tuple[Scored, dict]:
    """Encode, decode and score `teacher`'s users through a fitted plan: (the scorer with per-user values kept,
    {"err": per stream (squared error, squared norm)})."""
    scorer = Scored(teacher.n_users, keep_per_user=True, exclude_seen=teacher.batches[0].exclude_seen)
    _, errors = run_plan(model, plan, teacher.batches, scorer, keep_fields=False)
    scorer.finish()
    return scorer, errors.summary()


@dataclass
class HeldOutResult:
    rule: str
    calib_users: int
    report_users: int
    accounting: dict  # per-user bytes of every user of the log + the plan's shared bytes
    reference: dict
    compressed: dict
    ci: dict  # metric -> (delta, low, high)
    fidelity: dict
    recon: dict  # held-out relative reconstruction error per stream
    per_user: dict  # rank_ref, rank_new, top10_overlap, kl over the reported users (dataset order per fold)
    plans: list


def _result(rule, calib_users, per_user, err, plans, teacher, model, bootstrap, seed) -> HeldOutResult:
    ref, new = ranking_metrics(per_user["rank_ref"]), ranking_metrics(per_user["rank_new"])
    ci = paired_bootstrap(per_user_ranking(per_user["rank_ref"]), per_user_ranking(per_user["rank_new"]),
                          n=bootstrap, seed=seed)
    acct = accounting(plans[0], teacher.flat.offsets, full_width(model))
    return HeldOutResult(rule, calib_users, len(per_user["rank_ref"]), acct, ref, new,
                         {k: (new[k] - ref[k], *ci[k]) for k in ref}, fidelity_summary(per_user),
                         {k: n / max(d, 1e-12) for k, (n, d) in err.items()}, per_user, plans)


def heldout_compress(model, teacher: Teacher, opts: CompressOptions, *, folds: int = 0,
                     plan_factory: Callable[[], CachePlan] | None = None, bootstrap: int = 1000,
                     on_fit: Callable[[Split], None] | None = None) -> HeldOutResult:
    """Fit on calibration users and score held-out users only (`reserve_split`, or `fold_splits` with folds >= 2).
    `plan_factory()` makes a fresh unfitted plan (default `make_plan(model, opts)`)."""
    n_users = teacher.n_users
    splits = (fold_splits(n_users, folds, opts.calib_users, opts.seed) if folds
              else [reserve_split(n_users, opts.calib_users, opts.seed)])
    parts, err, plans = [], {}, []
    for split in splits:
        if on_fit:
            on_fit(split)
        plan = fit_plan_on(model, teacher, split.calib, opts, plan_factory() if plan_factory else None)
        plans.append(plan)
        scorer, summary = score_plan(model, plan, teacher_subset(teacher, split.report))
        parts.append(scorer.per_user)
        for k, (num, den) in summary.items():
            e = err.setdefault(k, [0.0, 0.0])
            e[0] += num
            e[1] += den
    per_user = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rule = splits[0].rule if not folds else f"{folds} folds, each fitted on at most {opts.calib_users:,} users of the others"
    return _result(rule, len(splits[0].calib), per_user, err, plans, teacher, model, bootstrap, opts.seed)


def insample_compress(model, teacher: Teacher, opts: CompressOptions, bootstrap: int = 1000) -> HeldOutResult:
    """The protocol without a hold-out, for comparison: fitted on `calib_users` seeded users, every user scored
    (in-sample for the calibration users; with fewer users than calib_users, all of them)."""
    n_users = teacher.n_users
    users = calibration_sample(n_users, opts.calib_users, opts.seed)
    plan = fit_plan_on(model, teacher, users, opts)
    scorer, summary = score_plan(model, plan, teacher)
    return _result(f"in-sample: {len(users):,} calibration users among the {n_users:,} scored", len(users),
                   scorer.per_user, summary, [plan], teacher, model, bootstrap, opts.seed)
