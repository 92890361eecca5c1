"""The uncompressed model against compressed artifacts, for every task: each artifact's decoded caches scored by
the task's protocol against the exact ones (the teacher batches of `ckv compress`), every metric's delta with a
paired-bootstrap 95% CI, fidelity, bytes, and (next-item) speed; and the gates a CI pipeline sets, each knowing
its metric's direction (`task.lower_is_better`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckv_cli.artifact.reader import Artifact
from ckv_cli.errors import CkvError
from ckv_cli.pipeline.compress import CompressOptions, Errors
from ckv_cli.tasks import CTR, NEXT_ITEM, Task, task_of


@dataclass
class Comparison:
    artifact: str
    users: int
    reference: dict[str, float]
    compressed: dict[str, float]
    delta: dict[str, dict[str, float]]  # metric -> {value, delta, relative, ci_low, ci_high}
    fidelity: dict
    accounting: dict
    speed: dict = field(default_factory=dict)
    task: str = NEXT_ITEM.name
    codec: str | None = None
    metrics: dict = field(default_factory=dict)  # the task's full report (what `ckv compress` reports)
    equals_compress_report: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def artifact_users(artifact: Artifact, ds, task: Task = NEXT_ITEM, require_all: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dataset user indices, artifact user indices) of the users both hold, in dataset order; `require_all`: a
    CkvError unless the artifact holds every user of the data."""
    ids = task.user_ids(ds)
    lookup = artifact.lookup
    pairs = [(d, lookup[str(u)]) for d, u in enumerate(ids) if str(u) in lookup]
    if not pairs:
        raise CkvError(f"{artifact.path} holds none of the {len(ids):,} users of {ds.name}")
    if require_all and len(pairs) < len(ids):
        missing = next(str(u) for u in ids if str(u) not in lookup)
        raise CkvError(f"{artifact.path} does not hold {len(ids) - len(pairs):,} of the {len(ids):,} users of "
                       f"{ds.name} (e.g. '{missing}'): another dataset?")
    both = np.array(pairs, dtype=np.int64)
    return both[:, 0], both[:, 1]


def check_source(artifact: Artifact, checkpoint_sha256: str) -> None:
    artifact.check_source(checkpoint_sha256)


def teacher_of(artifact: Artifact, model):
    """The model whose caches the artifact holds: `model`, unless the artifact was read by a fine-tuned student
    (`ckv compress --finetune`): then the teacher checkpoint its metadata names, checked against its sha256."""
    if artifact.meta.get("student_sha256") is None:
        return model
    from ckv_cli.io.files import sha256_file
    from ckv_cli.models.checkpoint import load_checkpoint

    path = Path(str(artifact.meta.get("checkpoint")))
    if not path.is_absolute() and not path.exists() and (Path(artifact.path).parent / path).exists():
        path = Path(artifact.path).parent / path  # recorded relative to the directory compress ran in
    try:
        digest = sha256_file(path)
    except OSError:
        raise CkvError(f"{artifact.path}: its caches are those of the teacher {path}, which cannot be read "
                       "(needed as the uncompressed reference)") from None
    if digest != artifact.meta.get("checkpoint_sha256"):
        raise CkvError(f"{artifact.path}: the teacher {path} changed since the artifact was made (sha256 differs)")
    return load_checkpoint(path)[0]


def compare_artifact(model, ds, artifact: Artifact, *, bootstrap: int = 1000, seed: int = 0, batch_users: int = 256,
                     speed_batch: int = 256, repeats: int = 5, advance=None, teacher=None,
                     exclude_seen: bool = True) -> Comparison:
    """`model` reads the decoded caches; the reference is the model whose caches the artifact holds (`model`
    itself, or the teacher of a fine-tuned student: `teacher`, default `teacher_of(artifact, model)`). Every user
    both hold is scored by the task's protocol, batch by batch exactly as `ckv compress` scores them, so the
    metrics are those compress reported for the artifact."""
    t0 = time.time()
    task = task_of(model)
    data_users, art_users = artifact_users(artifact, ds, task, require_all=task is CTR)
    reference_model = teacher_of(artifact, model) if teacher is None else teacher
    if task is CTR:
        counts = task.token_counts(model, ds)(0, len(task.user_ids(ds)))
        if not np.array_equal(counts[data_users], artifact.offsets[art_users + 1] - artifact.offsets[art_users]):
            raise CkvError(f"{artifact.path}: its users' event counts differ from those of --data {ds.name} "
                           "(another dataset or columns?)")
    opts = CompressOptions(bootstrap=bootstrap, seed=seed, exclude_seen=exclude_seen)
    scorer = task.scorer(reference_model, ds, opts, len(data_users), keep_per_user=True)
    errors = Errors()
    start = 0
    for tb in task.batches(reference_model, ds, data_users, batch_users, exclude_seen):
        n = len(tb.users)
        decoded = artifact.decode(art_users[start : start + n], model)
        start += n
        exact = tb.tokens
        same_items = "items" not in decoded.ids or np.array_equal(decoded.ids["items"], exact.ids["items"])
        if not np.array_equal(decoded.offsets, exact.offsets) or not same_items:
            raise CkvError(f"{artifact.path}: its cached histories differ from those of --data {ds.name} "
                           "(another dataset, split or window?)")
        errors.add(exact, decoded)
        scorer.add_batch(tb, decoded, model)
        if advance:
            advance(n)
    if hasattr(scorer, "finish"):
        scorer.finish()
    report = scorer.report(errors.recon())
    if errors.side[1]:
        report["signature_mismatch_rate"] = errors.side[0] / errors.side[1]
    delta = scorer.deltas(report, bootstrap, seed)
    reported = artifact.meta.get("metrics", {}) if isinstance(artifact.meta.get("metrics"), dict) else {}
    same = all(_close(reported.get(side, {}).get(k), report[side][k]) for side in ("uncompressed", "compressed")
               for k in task.metrics)
    if task is CTR:
        fidelity = {k: report[k] for k in ("samples", "users", "max_abs_prob_change", "signature_mismatch_rate")
                    if k in report}
    else:
        fidelity = report["fidelity"]
    speed = {}
    if task is NEXT_ITEM and speed_batch:
        speed = measure_speed(model, ds, artifact, data_users[:speed_batch], art_users[:speed_batch], repeats)
    return Comparison(str(artifact.path), len(data_users), report["uncompressed"], report["compressed"], delta,
                      fidelity, artifact.meta.get("accounting", {}), speed, task.name, artifact.meta.get("codec"),
                      report, same, round(time.time() - t0, 1))


def _close(a, b) -> bool:
    """Equal up to float rounding (compress sums per batch what compare averages over every user)."""
    return isinstance(a, (int, float)) and abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_speed(model, ds, artifact: Artifact, data_users, art_users, repeats: int) -> dict:
    """Time to rank the next item for one batch of users (append the last event, score every item, top 10),
    median of `repeats`: from the full cache held in memory as fp16 (cast to fp32 to attend), and from the
    artifact through `CacheStore` (memory-mapped file, attention over the compressed form) and through decoding
    it first (decode-then-attend)."""
    from ckv_cli.serve.next_item import CacheStore
    from ckv_cli.tasks.next_item import iter_test_caches, scores_after_last_event

    batch = next(iter_test_caches(model, ds, data_users, len(data_users)))
    full = batch.cache
    full16 = [k.half() for k in full.keys], [v.half() for v in full.values]
    user_ids = [artifact.user_ids[u] for u in art_users]

    def from_full():
        cache = type(full)([k.float() for k in full16[0]], [v.float() for v in full16[1]], full.lengths, full.items, full.timestamps)
        scores_after_last_event(model, cache, batch).topk(10)

    def decoded():
        scores_after_last_event(model, model.unflatten(artifact.decode(art_users, model)), batch).topk(10)

    with CacheStore.open(artifact.path, model) as store:  # the file stays mapped until closed
        def compressed():
            store.rank_next(user_ids, new_items=batch.last_items, new_timestamps=batch.last_ts, k=10,
                            query_timestamps=batch.target_ts)

        t_full, t_comp, t_dec = (_median_seconds(fn, repeats) for fn in (from_full, compressed, decoded))
    return {"users": len(data_users), "repeats": repeats, "full_fp16_in_memory_s": t_full,
            "compressed_domain_s": t_comp, "decode_then_attend_s": t_dec,
            "speedup": t_full / t_comp if t_comp else float("nan"), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- gates


def parse_gate(spec: str, metrics: list[str], option: str = "--max-delta") -> tuple[str, float, bool]:
    """'NDCG@10=0.01' (absolute drop) or 'NDCG@10=1%' (relative drop) -> (metric, value, relative)."""
    name, sep, value = spec.partition("=")
    name = name.strip()
    if not sep or name not in metrics:
        raise CkvError(f"bad {option} '{spec}': expected METRIC=VALUE with METRIC one of {', '.join(metrics)}")
    relative = value.strip().endswith("%")
    try:
        number = float(value.strip().rstrip("%")) / (100 if relative else 1)
    except ValueError:
        raise CkvError(f"bad {option} '{spec}': '{value}' is not a number") from None
    if not np.isfinite(number):
        raise CkvError(f"bad {option} '{spec}': the allowed change must be a finite number")
    if number < 0:
        raise CkvError(f"bad {option} '{spec}': the allowed drop must be >= 0")
    return name, number, relative


@dataclass
class Gates:
    """What a CI pipeline gates on (each metric knows its direction from the task):
    - `max_delta`: the point estimate may not get worse by more than allowed (METRIC=DROP, absolute or `%`);
    - `max_delta_ci`: the 95% CI must rule out a change worse than allowed: its worse end (the low end of a
      higher-is-better metric, the high end of logloss) decides, so noise fails the gate instead of passing it;
    - `max_ratio`: per-user bytes as a fraction of the fp16 cache;
    - `min_overlap`, `max_kl`: fidelity to the uncompressed model's rankings (next-item models)."""

    max_delta: list[str] = field(default_factory=list)
    max_delta_ci: list[str] = field(default_factory=list)
    max_ratio: float | None = None
    min_overlap: float | None = None
    max_kl: float | None = None

    def __bool__(self) -> bool:
        return bool(self.max_delta or self.max_delta_ci) or any(
            v is not None for v in (self.max_ratio, self.min_overlap, self.max_kl))

    def check(self, task: Task) -> None:
        """Refuse gates on metrics the task does not report, before any work."""
        for spec in self.max_delta:
            parse_gate(spec, list(task.metrics))
        for spec in self.max_delta_ci:
            parse_gate(spec, list(task.metrics), "--max-delta-ci")
        if task is not NEXT_ITEM and (self.min_overlap is not None or self.max_kl is not None):
            raise CkvError("--min-overlap and --max-kl gate next-item rankings; this is a CTR model")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _worse(task: Task, c: Comparison, name: str, delta: float, relative: bool) -> float:
    worse = task.worse(name, delta)
    return worse / abs(c.reference[name]) if relative and c.reference[name] else worse


def check_gates(comparisons: list[Comparison], max_delta: list[str] | Gates, max_ratio: float | None = None) -> list[str]:
    """One line per failed gate (`Gates`; the old call `check_gates(comparisons, max_delta, max_ratio)` still
    works). A metric gate fails when the metric gets worse by more than allowed (ranking metrics, AUC and gAUC
    drop; logloss rises: the task knows each direction)."""
    from ckv_cli.tasks import TASKS

    gates = max_delta if isinstance(max_delta, Gates) else Gates(max_delta=list(max_delta), max_ratio=max_ratio)
    failures = []
    for c in comparisons:
        task = TASKS[c.task]
        digits = 4 if task is NEXT_ITEM else 6
        for name, allowed, relative in (parse_gate(g, list(c.reference)) for g in gates.max_delta):
            amount = _worse(task, c, name, c.delta[name]["delta"], relative)
            if amount > allowed:
                verb = "rose" if name in task.lower_is_better else "dropped"
                shown = f"{amount:.2%} > {allowed:.2%}" if relative else f"{amount:.{digits}f} > {allowed:.{digits}f}"
                failures.append(f"gate failed: {name} {verb} {shown} ({c.artifact})")
        for name, allowed, relative in (parse_gate(g, list(c.reference), "--max-delta-ci") for g in gates.max_delta_ci):
            d = c.delta[name]
            end = d["ci_high"] if name in task.lower_is_better else d["ci_low"]  # the worse end of the CI
            amount = _worse(task, c, name, end, relative)
            if not amount <= allowed:  # a NaN CI (no bootstrap) fails too
                shown = f"{amount:.2%} > {allowed:.2%}" if relative else f"{amount:.{digits}f} > {allowed:.{digits}f}"
                failures.append(f"gate failed: the 95% CI of {name} does not rule out a change worse than allowed "
                                f"(worst end {shown}) ({c.artifact})")
        ratio = c.accounting.get("per_user_ratio_fp16")
        if gates.max_ratio is not None and ratio is not None and ratio > gates.max_ratio:
            failures.append(f"gate failed: per-user ratio vs fp16 {ratio:.4%} > {gates.max_ratio:.4%} ({c.artifact})")
        overlap, kl = c.fidelity.get("top10_overlap"), c.fidelity.get("kl_mean")
        if gates.min_overlap is not None and overlap is not None and overlap < gates.min_overlap:
            failures.append(f"gate failed: top-10 overlap {overlap:.4f} < {gates.min_overlap:.4f} ({c.artifact})")
        if gates.max_kl is not None and kl is not None and kl > gates.max_kl:
            failures.append(f"gate failed: mean KL {kl:.4f} > {gates.max_kl:.4f} ({c.artifact})")
    return failures


def gate_warnings(comparisons: list[Comparison], gates: Gates) -> list[str]:
    """A warning per metric gate whose threshold is finer than the noise: the 95% CI of the delta is wider than the
    allowed change, so the gate's verdict is decided by which users happened to be evaluated."""
    out = []
    for c in comparisons:
        for option, specs in (("--max-delta", gates.max_delta), ("--max-delta-ci", gates.max_delta_ci)):
            for name, allowed, relative in (parse_gate(g, list(c.reference), option) for g in specs):
                d = c.delta[name]
                half = (d["ci_high"] - d["ci_low"]) / 2
                if relative and c.reference[name]:
                    half /= abs(c.reference[name])
                if np.isfinite(half) and half > allowed:
                    shown = f"±{half:.2%} against {allowed:.2%}" if relative else f"±{half:.4g} against {allowed:.4g}"
                    out.append(f"warning: {option} {name}: the 95% CI is wider than the threshold ({shown}); "
                               f"{c.users:,} users cannot resolve it ({c.artifact}); see docs/protocol.md#gates")
    return out
