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
                     speed_batch: int = 256, repeats: int = 5, advance=None, teacher=None) -> Comparison:
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
    opts = CompressOptions(bootstrap=bootstrap, seed=seed)
    scorer = task.scorer(reference_model, ds, opts, len(data_users), keep_per_user=True)
    errors = Errors()
    start = 0
    for tb in task.batches(reference_model, ds, data_users, batch_users):
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
            store.rank_next(user_ids, new_items=batch.last_items, new_timestamps=batch.last_ts, k=10)

        t_full, t_comp, t_dec = (_median_seconds(fn, repeats) for fn in (from_full, compressed, decoded))
    return {"users": len(data_users), "repeats": repeats, "full_fp16_in_memory_s": t_full,
            "compressed_domain_s": t_comp, "decode_then_attend_s": t_dec,
            "speedup": t_full / t_comp if t_comp else float("nan"), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- gates


def parse_gate(spec: str, metrics: list[str]) -> tuple[str, float, bool]:
    """'NDCG@10=0.01' (absolute drop) or 'NDCG@10=1%' (relative drop) -> (metric, value, relative)."""
    name, sep, value = spec.partition("=")
    name = name.strip()
    if not sep or name not in metrics:
        raise CkvError(f"bad --max-delta '{spec}': expected METRIC=VALUE with METRIC one of {', '.join(metrics)}")
    relative = value.strip().endswith("%")
    try:
        number = float(value.strip().rstrip("%")) / (100 if relative else 1)
    except ValueError:
        raise CkvError(f"bad --max-delta '{spec}': '{value}' is not a number") from None
    if not np.isfinite(number):
        raise CkvError(f"bad --max-delta '{spec}': the allowed change must be a finite number")
    if number < 0:
        raise CkvError(f"bad --max-delta '{spec}': the allowed drop must be >= 0")
    return name, number, relative


def check_gates(comparisons: list[Comparison], max_delta: list[str], max_ratio: float | None) -> list[str]:
    """One line per failed gate. A metric gate fails when the metric gets worse by more than allowed (ranking
    metrics, AUC and gAUC drop; logloss rises: the task knows each direction); the ratio gate fails when per-user
    bytes exceed `max_ratio` of fp16."""
    from ckv_cli.tasks import TASKS

    failures = []
    for c in comparisons:
        task = TASKS[c.task]
        for name, allowed, relative in (parse_gate(g, list(c.reference)) for g in max_delta):
            d = c.delta[name]
            worse = task.worse(name, d["delta"])
            amount = worse / abs(c.reference[name]) if relative and c.reference[name] else worse
            if amount > allowed:
                verb = "rose" if name in task.lower_is_better else "dropped"
                digits = 4 if task is NEXT_ITEM else 6
                shown = f"{amount:.2%} > {allowed:.2%}" if relative else f"{amount:.{digits}f} > {allowed:.{digits}f}"
                failures.append(f"gate failed: {name} {verb} {shown} ({c.artifact})")
        ratio = c.accounting.get("per_user_ratio_fp16")
        if max_ratio is not None and ratio is not None and ratio > max_ratio:
            failures.append(f"gate failed: per-user ratio vs fp16 {ratio:.4%} > {max_ratio:.4%} ({c.artifact})")
    return failures
