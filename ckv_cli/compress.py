"""`ckv compress`: fit a cache plan on calibration users, encode every user's teacher cache, measure what the
compression costs on the held-out next item, and account for every byte (NOTES §4).

Accuracy protocol: each user's history up to the last known event is prefilled by the full model (the
teacher cache) and compressed; the last known event is appended with `extend` through the decoded cache, and
its output ranks all items for the held-out item. The uncompressed reference appends through the exact cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs import CachePlan, build_plan
from ckv_cli.data.sequences import SequenceData
from ckv_cli.kv.extract import FlatCache, flatten, iter_test_caches, unflatten
from ckv_cli.metrics import ranking_metrics
from ckv_cli.models.base import item_layer_kv, last_hidden


@dataclass
class CompressOptions:
    codec: str = "collective"
    params: dict = field(default_factory=lambda: {"pool_size": 4096, "user_dim": 0, "layout": "residual"})
    share: tuple[str, ...] = ("k", "v")
    recompute_item_layers: bool = True
    calib_users: int = 1000
    batch_users: int = 256
    distill_steps: int = 0
    seed: int = 0


@dataclass
class CompressResult:
    plan: CachePlan
    fields: dict[str, np.ndarray]
    offsets: np.ndarray
    user_ids: list[str]
    accounting: dict
    metrics: dict


def make_plan(model, opts: CompressOptions) -> CachePlan:
    d_k, d_v = model.kv_dims
    return build_plan(opts.codec, opts.params, n_layers=len(model.layers), d_k=d_k, d_v=d_v,
                      n_items=model.config.n_items, timestamps=model.arch == "hstu",
                      share=tuple(opts.share), recompute_item_layers=opts.recompute_item_layers)


def concat_flat(parts: list[FlatCache]) -> FlatCache:
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    n_layers = len(parts[0].keys)
    return FlatCache(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     [torch.cat([p.keys[i] for p in parts]) for i in range(n_layers)],
                     [torch.cat([p.values[i] for p in parts]) for i in range(n_layers)],
                     np.concatenate([p.items for p in parts]), np.concatenate([p.timestamps for p in parts]))


def fit_plan(model, ds: SequenceData, opts: CompressOptions, on_stream: Callable[[str], None] | None = None) -> CachePlan:
    """Calibration: a seeded sample of users' teacher caches."""
    plan = make_plan(model, opts)
    rng = np.random.default_rng(opts.seed)
    users = np.sort(rng.choice(ds.n_users, size=min(opts.calib_users, ds.n_users), replace=False))
    flat = concat_flat([flatten(b.cache) for b in iter_test_caches(model, ds, users, opts.batch_users)])
    torch.manual_seed(opts.seed)
    plan.fit(flat, opts.seed, on_stream)
    return plan


@torch.no_grad()
def scores_after_last_event(model, cache, batch) -> torch.Tensor:
    _, h = model.extend(cache, batch.last_items, batch.last_ts)
    return model.score_all(last_hidden(h, torch.ones(len(batch.users), dtype=torch.long)))  # (B, n_items + 1)


def accounting(plan: CachePlan, offsets: np.ndarray, kv_dims: tuple[int, int], n_layers: int) -> dict:
    """Bytes per NOTES §4. Full cache = every layer's K and V of every cached token; compressed per-user =
    every per-token and per-user field as stored (indices, user values, scales, item ids, timestamps, offsets);
    shared = pools, routers, bases. Model weights are needed by both and counted by neither."""
    n_tokens, n_users = int(offsets[-1]), len(offsets) - 1
    per_token_full = n_layers * (kv_dims[0] + kv_dims[1])
    full16, full32 = n_tokens * per_token_full * 2, n_tokens * per_token_full * 4
    breakdown = {name: f.nbytes(n_tokens if f.per == "token" else (n_users + 1 if name == "users/offsets" else n_users))
                 for name, f in plan.fields().items()}
    per_user = sum(breakdown.values())
    shared = {f"shared/{s}/{n}": int(t.numel() * t.element_size()) for s, c in plan.streams.items()
              if not isinstance(c, str) for n, t in c.shared().items()}
    shared_total = sum(shared.values())
    return {
        "users": n_users, "tokens": n_tokens, "full_fp16_bytes": full16, "full_fp32_bytes": full32,
        "per_user_bytes": per_user, "shared_bytes": shared_total,
        "bytes_per_token": per_user / max(n_tokens, 1), "full_fp16_bytes_per_token": per_token_full * 2,
        "per_user_ratio_fp16": per_user / max(full16, 1), "per_user_ratio_fp32": per_user / max(full32, 1),
        "total_ratio_fp16": (per_user + shared_total) / max(full16, 1),
        "total_ratio_fp32": (per_user + shared_total) / max(full32, 1),
        "per_user_breakdown": breakdown, "shared_breakdown": shared,
    }


def compress(model, ds: SequenceData, opts: CompressOptions, plan: CachePlan | None = None,
             advance: Callable[[int], None] | None = None, on_stream=None) -> CompressResult:
    torch.manual_seed(opts.seed)
    distilled = None
    if plan is None:
        plan = fit_plan(model, ds, opts, on_stream)
        if opts.distill_steps:
            from ckv_cli.distill import DistillOptions, distill

            distilled = distill(model, ds, plan, DistillOptions(steps=opts.distill_steps, seed=opts.seed))
    users = np.arange(ds.n_users)
    item_kv = lambda items, pos: item_layer_kv(model, items, pos)  # noqa: E731
    chunks: dict[str, list[np.ndarray]] = {}
    lengths, ranks_t, ranks_c, overlap = [], [], [], []
    err_num: dict[str, float] = {}
    err_den: dict[str, float] = {}
    for batch in iter_test_caches(model, ds, users, opts.batch_users):
        flat = flatten(batch.cache)
        enc = plan.encode(flat)
        dec = plan.decode(enc, flat.offsets, item_kv)
        for name in plan.streams:
            a, b = flat.stream(name), dec.stream(name)
            err_num[name] = err_num.get(name, 0.0) + float(((a - b) ** 2).sum())
            err_den[name] = err_den.get(name, 0.0) + float((a ** 2).sum())
        for k, v in enc.items():
            chunks.setdefault(k, []).append(v)
        lengths.append(np.diff(flat.offsets))
        s_t = scores_after_last_event(model, batch.cache, batch)
        s_c = scores_after_last_event(model, unflatten(dec), batch)
        tgt = batch.targets[:, None]
        ranks_t.append((s_t > s_t.gather(1, tgt)).sum(1).numpy())
        ranks_c.append((s_c > s_c.gather(1, tgt)).sum(1).numpy())
        top_t, top_c = s_t.topk(10).indices, s_c.topk(10).indices
        overlap.append((top_t[:, :, None] == top_c[:, None, :]).any(2).float().mean(1).numpy())
        if advance:
            advance(len(batch.users))
    fields = {k: np.concatenate(v) for k, v in chunks.items()}
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    rt, rc = np.concatenate(ranks_t), np.concatenate(ranks_c)
    teacher, student = ranking_metrics(rt), ranking_metrics(rc)
    metrics = {
        "protocol": "test split, history prefilled and compressed, last event appended via extend, all items ranked",
        "uncompressed": teacher, "compressed": student,
        "delta": {k: student[k] - teacher[k] for k in teacher},
        "relative_delta": {k: (student[k] - teacher[k]) / teacher[k] if teacher[k] else 0.0 for k in teacher},
        "fidelity": {"top10_overlap": float(np.concatenate(overlap).mean()),
                     "hit10_flips": int(((rt < 10) != (rc < 10)).sum())},
        "reconstruction_rel_mse": {k: err_num[k] / max(err_den[k], 1e-12) for k in err_num},
    }
    if distilled:
        metrics["distillation"] = {"steps": len(distilled), "first": distilled[0], "last": distilled[-1]}
    acct = accounting(plan, offsets, model.kv_dims, len(model.layers))
    return CompressResult(plan, fields, offsets, [str(u) for u in ds.user_ids], acct, metrics)


def compress_to_artifact(model, meta: dict, checkpoint_path, ds: SequenceData, opts: CompressOptions, out,
                         force: bool = False, advance=None, command: str = "", on_stream=None) -> dict:
    """Compress, write the artifact atomically, check its bytes against the accounting; returns the report."""
    from pathlib import Path

    from ckv_cli.artifact import write_artifact
    from ckv_cli.data.datasets import sha256_file
    from ckv_cli.errors import CkvError

    result = compress(model, ds, opts, advance=advance, on_stream=on_stream)
    report = {
        "artifact": str(out), "checkpoint": str(checkpoint_path), "checkpoint_sha256": sha256_file(Path(checkpoint_path)),
        "arch": meta["arch"], "dataset": ds.name, "data_fingerprint": ds.fingerprint, "seed": opts.seed,
        "codec": opts.codec, "params": opts.params, "share": list(opts.share),
        "recompute_item_layers": opts.recompute_item_layers, "calib_users": min(opts.calib_users, ds.n_users),
        "plan": result.plan.describe(), "accounting": result.accounting, "metrics": result.metrics,
    }
    metadata = {k: v for k, v in report.items() if k not in ("artifact", "plan")}
    metadata["command"] = command
    stored = write_artifact(out, result.plan, result.fields, result.offsets, result.user_ids, metadata, force=force)
    on_disk = sum(v for k, v in stored.items() if k in result.accounting["per_user_breakdown"])
    if on_disk != result.accounting["per_user_bytes"]:
        raise CkvError(f"internal: per-user bytes on disk ({on_disk}) differ from the accounting "
                       f"({result.accounting['per_user_bytes']})")
    report["stored_tensor_bytes"] = int(sum(stored.values()))
    report["file_bytes"] = Path(out).stat().st_size
    return report
