"""Tasks: what a model is scored on. A task owns its data view, the split, the teacher batches (every user's exact
tokens and what scoring needs), the scoring of a decoded cache, the metrics with their direction, and what the
accounting adds. The compress loop, the artifact reader, the stores, compare and the sweep work for any task;
models say which task they serve (`model.task`), and nothing outside `ckv_cli/models/` knows an architecture.

    task = task_of(model)           # NEXT_ITEM or CTR
    data = task.load("ml-1m", None, checkpoint_metadata)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckv_cli.errors import CkvError
from ckv_cli.tasks import ctr as ctr_mod
from ckv_cli.tasks import next_item as next_item_mod


def calibration_sample(n_users: int, calib_users: int, seed: int, holdout: bool = False) -> np.ndarray:
    """The next-item calibration users (indices, sorted): a seeded sample of min(calib_users, n_users); with
    `holdout` (`--calib-holdout`) at most half the users, so that at least half are held out of calibration."""
    cap = max(1, n_users // 2) if holdout else n_users
    return np.sort(np.random.default_rng(seed).choice(n_users, size=min(calib_users, cap), replace=False))


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]
    lower_is_better: tuple[str, ...]
    pareto_metric: str
    protocol: str
    compress_protocol: str
    default_pool: int

    def worse(self, metric: str, delta: float) -> float:
        """How much worse a change of `delta` in `metric` is (positive = worse)."""
        return delta if metric in self.lower_is_better else -delta

    def n_tokens(self, model, data) -> int:
        """Cached tokens of every user of `data` (what an artifact of it encodes; `token_counts` summed)."""
        return int(np.sum(self.token_counts(model, data)(0, len(self.user_ids(data)))))


class NextItemTask(Task):
    """Leave-one-out next-item ranking (`ckv_cli.tasks.next_item`)."""

    def load(self, spec: str, columns: dict | None, meta: dict | None = None, model=None):
        """The data read through the checkpoint's item vocabulary (unknown items dropped and counted)."""
        from ckv_cli.data import load
        from ckv_cli.data.ctr import ctr_base

        if (base := ctr_base(spec)) is not None:
            raise CkvError(f"--data {spec} is the CTR task; this is a next-item model (use --data {base})")
        return load(spec, columns, item_vocab=(meta or {}).get("item_vocab"))

    def evaluate(self, model, data, split: str = "test", exclude_seen: bool = True, progress=None) -> dict:
        if split not in ("test", "valid"):
            raise CkvError(f"unknown --split '{split}' (choose test or valid)")
        return next_item_mod.evaluate_model(model, data, split, exclude_seen, progress=progress)

    def n_eval(self, data, split: str) -> int:
        return data.n_users

    def seq(self, data):
        return data

    def user_ids(self, data):
        return data.user_ids

    def token_counts(self, model, data):
        """Tokens of users [a, b) as the teacher caches them: `counts(a, b)`."""
        return lambda a, b: next_item_mod.teacher_cache_lengths(data, model.config.max_len, a, b)

    def calibration(self, model, data, opts, users: np.ndarray, teacher=None):
        from ckv_cli.spec import FlatCache

        if teacher is not None:
            flat = teacher.flat.select(users)
        else:
            flat = FlatCache.concat([model.flatten(b.cache) for b in
                                     next_item_mod.iter_test_caches(model, data, users, opts.batch_users)])
        return flat, {"users": int(len(users)), "tokens": flat.n_tokens}

    def calibration_users(self, data, opts) -> np.ndarray:
        return calibration_sample(data.n_users, opts.calib_users, opts.seed, getattr(opts, "calib_holdout", False))

    def batches(self, model, data, users, batch_users: int, exclude_seen: bool = True):
        return next_item_mod.teacher_batches(model, data, range(data.n_users) if users is None else users, batch_users,
                                             exclude_seen)

    def teacher(self, model, data, batch_users: int, users=None, advance=None, exclude_seen: bool = True):
        return next_item_mod.Teacher.build(model, data, batch_users, advance, exclude_seen)

    def seen_share(self, model, data) -> float | None:
        return next_item_mod.targets_in_window(data, model.config.max_len)

    def scorer(self, model, data, opts, n_users: int | None, keep_per_user: bool):
        return next_item_mod.Scored(n_users, keep_per_user, getattr(opts, "exclude_seen", True))

    def memo(self, model, data, plan):
        return None

    def accounting_extra(self, acct: dict, plan, model, lengths: np.ndarray) -> dict:
        """What this task adds to the byte accounting of users whose token counts are `lengths`."""
        return {}

    def check_codec(self, codec: str) -> None:
        pass


class CTRTask(Task):
    """CTR on a rating log (`ckv_cli.tasks.ctr`)."""

    def load(self, spec: str, columns: dict | None, meta: dict | None = None, model=None):
        """The CTR view of the log (histories up to the model's window), users mapped onto the checkpoint's rows."""
        from ckv_cli.data.ctr import load_ctr

        meta = meta or {}
        ds = load_ctr(spec, columns, max_history=model.config.max_len if model is not None else 1000,
                      item_vocab=meta.get("item_vocab"))
        return ds.with_user_vocab(meta.get("user_vocab") or []) if meta else ds

    def evaluate(self, model, data, split: str = "test", exclude_seen: bool = True, progress=None) -> dict:
        return ctr_mod.evaluate_ctr(model, data, split, progress=progress)

    def n_eval(self, data, split: str) -> int:
        return len(data.samples(split))

    def seq(self, data):
        return data.seq

    def user_ids(self, data):
        return data.seq.user_ids

    def token_counts(self, model, data):
        lengths = np.diff(data.seq.offsets).astype(np.int64)
        return lambda a, b: lengths[a:b]

    def calibration(self, model, data, opts, users=None, teacher=None):
        return ctr_mod.calibration(model, data, opts)

    def calibration_users(self, data, opts):
        return None

    def batches(self, model, data, users, batch_users: int, exclude_seen: bool = True):
        return ctr_mod.batches(model, data, users, batch_users)

    def teacher(self, model, data, batch_users: int, users=None, advance=None, exclude_seen: bool = True):
        return ctr_mod.Teacher(model, data, users, batch_users, advance)

    def seen_share(self, model, data) -> float | None:
        return None

    def scorer(self, model, data, opts, n_users, keep_per_user):
        return ctr_mod.Scorer(model, data, opts.bootstrap, opts.seed)

    def memo(self, model, data, plan):
        return ctr_mod.memo(model, data, plan)

    def accounting_extra(self, acct: dict, plan, model, lengths: np.ndarray) -> dict:
        short = int(np.minimum(lengths, model.config.short_len).sum())
        return {"denominator": ctr_mod.denominator(plan),
                "long_only": ctr_mod.long_only(plan, acct, int(lengths.sum()), short, model.config.short_len)}

    def check_codec(self, codec: str) -> None:
        if codec == "evict":
            raise CkvError("codec evict is for next-item models only (CTR caches do not take its keep mask yet)")
        if codec == "itemid":
            raise CkvError("codec itemid: a CTR token's K/V are a function of its event (item, rating, gap), not of "
                           "the item alone: use eventid")


NEXT_ITEM = NextItemTask(next_item_mod.NAME, next_item_mod.METRICS, next_item_mod.LOWER_IS_BETTER,
                         next_item_mod.PARETO_METRIC, next_item_mod.PROTOCOL, next_item_mod.COMPRESS_PROTOCOL, 8192)
CTR = CTRTask(ctr_mod.NAME, ctr_mod.METRICS, ctr_mod.LOWER_IS_BETTER, ctr_mod.PARETO_METRIC, ctr_mod.PROTOCOL,
              ctr_mod.COMPRESS_PROTOCOL, ctr_mod.DEFAULT_POOL)
TASKS = {NEXT_ITEM.name: NEXT_ITEM, CTR.name: CTR}


def task_of(model) -> Task:
    name = getattr(model, "task", NEXT_ITEM.name)
    if name not in TASKS:
        raise CkvError(f"unknown task '{name}' of the model (known: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["CTR", "NEXT_ITEM", "TASKS", "Task", "calibration_sample", "task_of"]
