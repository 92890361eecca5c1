"""The uncompressed model against compressed artifacts, user by user: task metrics with a paired-bootstrap
confidence interval of each delta, fidelity to the uncompressed scores, bytes, and speed.

Protocol (that of `ckv compress`): each user's history minus its last event is the cache (exact for the
reference, decoded from the artifact for the candidate); the last event is appended with `extend` through it
and its output ranks all items but the window's for the held-out item (`ckv_cli.evaluate.PROTOCOL`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ckv_cli.artifact import Artifact
from ckv_cli.data.sequences import SequenceData
from ckv_cli.errors import CkvError
from ckv_cli.evaluate import fidelity_summary, score_fidelity, scores_after_last_event
from ckv_cli.kv.extract import flatten, iter_test_caches, unflatten
from ckv_cli.metrics import paired_bootstrap, per_user_ranking, ranking_metrics
from ckv_cli.models.base import item_layer_kv


@dataclass
class Comparison:
    artifact: str
    users: int
    reference: dict[str, float]
    compressed: dict[str, float]
    delta: dict[str, dict[str, float]]  # metric -> {delta, relative, ci_low, ci_high}
    fidelity: dict
    accounting: dict
    speed: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def artifact_users(artifact: Artifact, ds: SequenceData) -> tuple[np.ndarray, np.ndarray]:
    """(dataset user indices, artifact user indices) of the users both hold, in dataset order."""
    lookup = {u: i for i, u in enumerate(artifact.user_ids)}
    pairs = [(d, lookup[str(u)]) for d, u in enumerate(ds.user_ids) if str(u) in lookup]
    if not pairs:
        raise CkvError(f"{artifact.path} holds none of the {ds.n_users:,} users of {ds.name}")
    both = np.array(pairs, dtype=np.int64)
    return both[:, 0], both[:, 1]


def check_source(artifact: Artifact, checkpoint_sha256: str) -> None:
    """Refuse an artifact made from another checkpoint (its metadata keeps the checkpoint's sha256). An artifact
    of `ckv compress --finetune` is read by its fine-tuned student (`student_sha256`): the student is accepted,
    the teacher it was compressed from is refused (reading it with the teacher's weights is not what was
    measured)."""
    made_from = artifact.meta.get("checkpoint_sha256")
    student = artifact.meta.get("student_sha256")
    if student is not None:
        if checkpoint_sha256 == student:
            return
        name = artifact.meta.get("student_checkpoint", "its student checkpoint")
        if checkpoint_sha256 == made_from:
            raise CkvError(f"{artifact.path} is read by the fine-tuned student {name}, not by the teacher checkpoint "
                           f"it was compressed from: use {name}")
        raise CkvError(f"{artifact.path} is read by the fine-tuned student {name} (sha256 {str(student)[:12]}...), "
                       f"not by this checkpoint ({checkpoint_sha256[:12]}...)")
    if made_from != checkpoint_sha256:
        raise CkvError(f"{artifact.path} was made from another checkpoint (sha256 {str(made_from)[:12]}..., "
                       f"this checkpoint {checkpoint_sha256[:12]}...)")


def teacher_of(artifact: Artifact, model):
    """The model whose caches the artifact holds: `model`, unless the artifact was read by a fine-tuned student
    (`ckv compress --finetune`): then the teacher checkpoint its metadata names, checked against its sha256."""
    if artifact.meta.get("student_sha256") is None:
        return model
    from pathlib import Path

    from ckv_cli.checkpoint import load_checkpoint
    from ckv_cli.data.datasets import sha256_file

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


def compare_artifact(model, ds: SequenceData, artifact: Artifact, *, bootstrap: int = 1000, seed: int = 0,
                     batch_users: int = 256, speed_batch: int = 256, repeats: int = 5, advance=None,
                     teacher=None) -> Comparison:
    """`model` reads the decoded caches; the reference is the model whose caches the artifact holds (`model`
    itself, or the teacher of a fine-tuned student: `teacher`, default `teacher_of(artifact, model)`)."""
    data_users, art_users = artifact_users(artifact, ds)
    reference_model = teacher_of(artifact, model) if teacher is None else teacher
    item_kv = lambda items, pos: item_layer_kv(model, items, pos)  # noqa: E731
    parts: dict[str, list[np.ndarray]] = {}
    for start, batch in zip(range(0, len(data_users), batch_users), iter_test_caches(reference_model, ds, data_users, batch_users)):
        decoded = artifact.decode(art_users[start : start + len(batch.users)], item_kv)
        teacher = flatten(batch.cache)
        if not np.array_equal(decoded.offsets, teacher.offsets) or not np.array_equal(decoded.items, teacher.items):
            raise CkvError(f"{artifact.path}: its cached histories differ from those of --data {ds.name} "
                           "(another dataset, split or window?)")
        s_ref = scores_after_last_event(reference_model, batch.cache, batch)
        s_new = scores_after_last_event(model, unflatten(decoded), batch)
        for k, v in score_fidelity(s_ref, s_new, batch.targets).items():
            parts.setdefault(k, []).append(v)
        if advance:
            advance(len(batch.users))
    per_user = {k: np.concatenate(v) for k, v in parts.items()}
    ref_pu, new_pu = per_user_ranking(per_user["rank_ref"]), per_user_ranking(per_user["rank_new"])
    reference, compressed = ranking_metrics(per_user["rank_ref"]), ranking_metrics(per_user["rank_new"])
    delta = {}
    for k, (low, high) in paired_bootstrap(ref_pu, new_pu, n=bootstrap, seed=seed).items():
        d = compressed[k] - reference[k]
        delta[k] = {"delta": d, "relative": d / reference[k] if reference[k] else 0.0, "ci_low": low, "ci_high": high}
    speed = measure_speed(model, ds, artifact, data_users[:speed_batch], art_users[:speed_batch], repeats)
    return Comparison(str(artifact.path), len(data_users), reference, compressed, delta, fidelity_summary(per_user),
                      artifact.meta.get("accounting", {}), speed)


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
    from ckv_cli.store import CacheStore

    batch = next(iter_test_caches(model, ds, data_users, len(data_users)))
    full = batch.cache
    full16 = [k.half() for k in full.keys], [v.half() for v in full.values]
    item_kv = lambda items, pos: item_layer_kv(model, items, pos)  # noqa: E731
    user_ids = [artifact.user_ids[u] for u in art_users]

    def from_full():
        cache = type(full)([k.float() for k in full16[0]], [v.float() for v in full16[1]], full.lengths, full.items, full.timestamps)
        scores_after_last_event(model, cache, batch).topk(10)

    def decoded():
        scores_after_last_event(model, unflatten(artifact.decode(art_users, item_kv)), batch).topk(10)

    with CacheStore.open(artifact.path, model) as store:  # the file stays mapped until closed
        def compressed():
            store.rank_next(user_ids, new_items=batch.last_items, new_timestamps=batch.last_ts, k=10)

        t_full, t_comp, t_dec = (_median_seconds(fn, repeats) for fn in (from_full, compressed, decoded))
    return {"users": len(data_users), "repeats": repeats, "full_fp16_in_memory_s": t_full,
            "compressed_domain_s": t_comp, "decode_then_attend_s": t_dec,
            "speedup": t_full / t_comp if t_comp else float("nan"), "threads": torch.get_num_threads()}


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
    if number < 0:
        raise CkvError(f"bad --max-delta '{spec}': the allowed drop must be >= 0")
    return name, number, relative


def check_gates(comparisons: list[Comparison], max_delta: list[str], max_ratio: float | None) -> list[str]:
    """One line per failed gate. A metric gate fails when the metric drops by more than allowed (all ranking
    metrics are higher-is-better); the ratio gate fails when per-user bytes exceed `max_ratio` of fp16."""
    failures = []
    for c in comparisons:
        gates = [parse_gate(g, list(c.reference)) for g in max_delta]
        for name, allowed, relative in gates:
            drop = -c.delta[name]["relative" if relative else "delta"]
            if drop > allowed:
                shown = (f"{drop:.2%} > {allowed:.2%}" if relative else f"{drop:.4f} > {allowed:.4f}")
                failures.append(f"gate failed: {name} dropped {shown} ({c.artifact})")
        ratio = c.accounting.get("per_user_ratio_fp16")
        if max_ratio is not None and ratio is not None and ratio > max_ratio:
            failures.append(f"gate failed: per-user ratio vs fp16 {ratio:.4%} > {max_ratio:.4%} ({c.artifact})")
    return failures
