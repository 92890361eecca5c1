"""`ckv evaluate CHECKPOINT --sweep SPEC`: compress and evaluate a grid of codecs and budgets on one checkpoint in
one run, writing no artifact, for any task.

The task's teacher is built once (next-item: every user's teacher cache and reference scores; CTR: the reference
probabilities of the scored users' test samples, the exact tokens recomputed per entry, cheaper than holding
them); then, per grid entry, the plan is fitted on the seeded calibration tokens and the users are encoded,
decoded and scored by the same code as `ckv compress` (`ckv_cli.pipeline.compress.compress`). Each row has the
per-user bytes (NOTES §4, every user, ids and offsets included; streams that are a function of ids stored anyway
recomputed for every codec alike), each metric's delta with a paired-bootstrap 95% CI over users, the task's
fidelity numbers, and its time. Rows are sorted by per-user bytes; a row is on the Pareto front when no other row
has as few or fewer bytes and a better delta of the task's Pareto metric (NDCG@10; AUC).

A grid entry the codec refuses on this model (e.g. `itemid` on a layer whose K/V are not a function of the item)
is recorded as refused with the codec's message. `evict` (token eviction) runs here only for next-item models: its
dropped tokens are masked out of the appended event's attention, and its bytes are those it would store;
`ckv compress` refuses it. On CTR models `--sweep-users N` scores the test samples of N seeded test users (0 =
all; calibration and bytes always cover every user); `eventid` (every stream recomputed from the event ids) is a
lossless row there.

SPEC: `default`, or entries separated by ';', each `codec` or `codec:key=value,key=value`
(e.g. `collective:pool_size=1024;int4:group_size=64;pq:subvectors=8,bits=8`); `default;...` adds to the default.
"""
from __future__ import annotations

import csv
import inspect
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ckv_cli.codecs import EVENTID, REGISTRY
from ckv_cli.errors import CkvError
from ckv_cli.pipeline.compress import CompressOptions, compress, full_width, parse_params
from ckv_cli.tasks import CTR, NEXT_ITEM, task_of
from ckv_cli.tasks.ctr import DEFAULT_SWEEP_USERS, sweep_users

NOT_IMPLEMENTED: dict[str, str] = {}  # codec -> why: grid entries accepted but not built (listed as such); none now

GRIDS = {
    NEXT_ITEM.name: ("plain:dtype=float16", "bf16", "int8", "int4:group_size=32", "int4:group_size=64",
                     "lowrank:rank=2", "lowrank:rank=8", "lowrank:rank=16",
                     "pq:subvectors=2,bits=8", "pq:subvectors=4,bits=8", "pq:subvectors=8,bits=8",
                     "collective:pool_size=1024", "collective:pool_size=4096", "collective:pool_size=8192",
                     "collective:pool_size=4096,user_dim=1", "itemid", "evict:keep=0.25,policy=recent",
                     "evict:keep=0.5,policy=recent", "evict:keep=0.5,policy=keynorm",
                     "evict:keep=0.5,policy=keynorm_high"),
    # 256-wide streams (d_attn = 256; SDIM's long values d = 64): pool 1024 / 4096 = 10 / 12 bits per stream and
    # token; int4 at group 32 / 64 = 4.5 / 4.25 bits per value; lowrank 8 / 32 = 16 / 64 B; pq 8 / 32 subvectors.
    CTR.name: ("plain:dtype=float16", "bf16", "int8", "int4:group_size=32", "int4:group_size=64",
               "lowrank:rank=8", "lowrank:rank=32", "pq:subvectors=8,bits=8", "pq:subvectors=32,bits=8",
               "collective:pool_size=1024", "collective:pool_size=4096", "collective:pool_size=4096,user_dim=1",
               EVENTID, "evict:keep=0.25,policy=recent"),  # evict: a refused row (no keep mask for CTR caches)
}
DEFAULT_GRID = GRIDS[NEXT_ITEM.name]
EXTRA_PARAMS = {NEXT_ITEM.name: ("joint", "time_bits"), CTR.name: ("codes",)}  # parameters every codec takes on that task
PARETO_METRIC = NEXT_ITEM.pareto_metric
OK, REFUSED, MISSING = "ok", "refused", "not implemented"


@dataclass(frozen=True)
class SweepSpec:
    codec: str
    params: tuple[tuple[str, object], ...] = ()  # in the order given

    @property
    def label(self) -> str:
        return self.codec + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")


def _codec_parameters(codec: str) -> list[str]:
    sig = inspect.signature(REGISTRY[codec].__init__)
    return [n for n in sig.parameters if n not in ("self", "d")]


def parse_sweep(spec: str, default_grid: tuple[str, ...] = DEFAULT_GRID, extra_codecs: tuple[str, ...] = (EVENTID,),
                extra_params: tuple[str, ...] = ()) -> list[SweepSpec]:
    """'default' or 'codec[:k=v,...];...' -> grid entries (duplicates dropped, first kept). Unknown codecs,
    unknown parameter names and malformed entries raise a one-line CkvError; values are checked by the codec
    when the entry runs (a value it refuses makes a refused row)."""
    entries = [e.strip() for e in str(spec).split(";")]
    if not any(entries):
        raise CkvError("empty --sweep: give 'default' or entries like 'collective:pool_size=1024;int4:group_size=64'")
    out: list[SweepSpec] = []
    for entry in entries:
        if not entry:
            continue
        if entry == "default":
            out += [parse_sweep_entry(e, extra_codecs, extra_params) for e in default_grid]
        else:
            out.append(parse_sweep_entry(entry, extra_codecs, extra_params))
    seen, unique = set(), []
    for s in out:
        if s.label not in seen:
            seen.add(s.label)
            unique.append(s)
    return unique


def parse_task_sweep(spec: str, task) -> list[SweepSpec]:
    """`parse_sweep` with the task's default grid and the parameters every codec takes on it."""
    return parse_sweep(spec, GRIDS[task.name], extra_params=EXTRA_PARAMS[task.name])


def parse_sweep_entry(entry: str, extra_codecs: tuple[str, ...] = (EVENTID,), extra_params: tuple[str, ...] = ()) -> SweepSpec:
    codec, sep, rest = entry.partition(":")
    codec = codec.strip()
    known = sorted(REGISTRY) + sorted(set(NOT_IMPLEMENTED) - set(REGISTRY)) + sorted(set(extra_codecs) - set(REGISTRY))
    if codec not in known:
        raise CkvError(f"bad --sweep entry '{entry}': unknown codec '{codec}' (known: {', '.join(known)})")
    if sep and not rest.strip():
        raise CkvError(f"bad --sweep entry '{entry}': expected codec:KEY=VALUE,KEY=VALUE after the colon")
    items = [p.strip() for p in rest.split(",")] if sep else []
    if any(not p for p in items):
        raise CkvError(f"bad --sweep entry '{entry}': empty parameter (stray ',')")
    params = parse_params(items, what=f"--sweep entry '{entry}': parameter")
    if codec in REGISTRY or codec in extra_codecs:
        allowed = (_codec_parameters(codec) if codec in REGISTRY else []) + list(extra_params)
        for k in params:
            if k not in allowed:
                raise CkvError(f"bad --sweep entry '{entry}': codec '{codec}' has no parameter '{k}' "
                               f"(it takes: {', '.join(allowed) or 'none'})")
    return SweepSpec(codec, tuple(params.items()))


# ---------------------------------------------------------------- running


def pareto_flags(per_user_bytes: list[float], deltas: list[float]) -> list[bool]:
    """True where no other row has <= bytes and a strictly better delta (`deltas` oriented: higher is better)."""
    return [not any(b2 <= b and d2 > d for j, (b2, d2) in enumerate(zip(per_user_bytes, deltas)) if j != i)
            for i, (b, d) in enumerate(zip(per_user_bytes, deltas))]


def _row(spec: SweepSpec, result, bootstrap: int, seed: int, seconds: float) -> dict:
    a, m = result.accounting, result.metrics
    row = {
        "spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": OK, "message": "",
        "bytes_per_token": a["bytes_per_token"], "per_user_bytes": a["per_user_bytes"],
        "per_user_ratio_fp16": a["per_user_ratio_fp16"], "per_user_ratio_fp32": a["per_user_ratio_fp32"],
        "shared_bytes": a["shared_bytes"], "total_ratio_fp16": a["total_ratio_fp16"],
        "per_user_breakdown": a["per_user_breakdown"], "metrics": result.scorer.deltas(m, bootstrap, seed),
        **result.scorer.row(m), "reconstruction_rel_mse": m["reconstruction_rel_mse"],
        "plan": result.plan.describe(), "seconds": round(seconds, 2)}
    if "long_only" in a:
        row["long_only_ratio_fp16"] = a["long_only"]["per_user_ratio_fp16"]
    return row


def _row_not_run(spec: SweepSpec, status: str, message: str, seconds: float = 0.0) -> dict:
    return {"spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": status,
            "message": message, "seconds": round(seconds, 2)}


def order_rows(rows: list[dict], metric: str = PARETO_METRIC, lower_is_better: bool = False) -> list[dict]:
    """Rows that ran sorted by per-user bytes (then by label), then refused, then not implemented; Pareto flags
    (on `metric`'s delta) set on the rows that ran (False on the others)."""
    ran = sorted((r for r in rows if r["status"] == OK), key=lambda r: (r["per_user_bytes"], r["spec"]))
    sign = -1 if lower_is_better else 1
    flags = pareto_flags([r["per_user_bytes"] for r in ran], [sign * r["metrics"][metric]["delta"] for r in ran])
    for r, flag in zip(ran, flags):
        r["pareto"] = flag
    rest = [r for r in rows if r["status"] == REFUSED] + [r for r in rows if r["status"] == MISSING]
    for r in rest:
        r["pareto"] = False
    return ran + rest


def run_sweep(model, ds, specs: list[SweepSpec], *, calib_users: int = 1000, batch_users: int = 256, seed: int = 0,
              bootstrap: int = 1000, users: int = DEFAULT_SWEEP_USERS, advance: Callable[..., None] | None = None,
              on_spec: Callable[[str], None] | None = None) -> dict:
    """Run every grid entry on one model and dataset; returns the JSON-able sweep report (rows ordered, Pareto
    marked). `advance(n)` counts users (those of the teacher pass, then those of each entry that runs).
    `users`: CTR models only, the test users scored (`ckv_cli.tasks.ctr.sweep_users`)."""
    task = task_of(model)
    t_all = time.perf_counter()
    if on_spec:
        on_spec("teacher caches")
    spec = model.cache_spec()
    if not spec.streams:
        raise CkvError("the model caches nothing per user (no history is read): there is nothing to compress")
    scored = sweep_users(ds, users, seed) if task is CTR else None
    t = time.perf_counter()
    teacher = task.teacher(model, ds, batch_users, users=scored, advance=advance if task is NEXT_ITEM else None)
    teacher_seconds = time.perf_counter() - t
    base = CompressOptions(calib_users=calib_users, batch_users=batch_users, seed=seed, bootstrap=bootstrap)
    rows, reference = [], {}
    for s in specs:
        if on_spec:
            on_spec(s.label)
        if s.codec in NOT_IMPLEMENTED and s.codec not in REGISTRY:
            rows.append(_row_not_run(s, MISSING, NOT_IMPLEMENTED[s.codec]))
            if advance:
                advance(teacher.n_users)
            continue
        t = time.perf_counter()
        done = [0]

        def counted(n: int, *a, done=done):
            done[0] += n
            if advance:
                advance(n, *a)

        try:
            params = dict(s.params)
            extra = {k: params.pop(k) for k in ("codes",) if k in params}
            if task is CTR and s.codec == "collective":
                params = {"pool_size": CTR.default_pool, "user_dim": 0, "layout": "residual", **params}
            result = compress(model, ds, replace(base, codec=s.codec, params=params, **extra), advance=counted,
                              teacher=teacher, keep_fields=False)
        except CkvError as e:
            rows.append(_row_not_run(s, REFUSED, str(e), time.perf_counter() - t))
            if advance:
                advance(teacher.n_users - done[0])
            continue
        reference = result.metrics["uncompressed"]
        rows.append(_row(s, result, bootstrap, seed, time.perf_counter() - t))
    lower = task.pareto_metric in task.lower_is_better
    payload = {
        "task": task.name, "dataset": ds.name, "data_fingerprint": ds.fingerprint, "users": len(task.user_ids(ds)),
        "tokens": int(task.seq(ds).offsets[-1]) if task is CTR else int(teacher.flat.offsets[-1]),
        "full_fp16_bytes_per_token": 2 * full_width(model), "protocol": task.compress_protocol,
        "ci": f"paired bootstrap over {'scored test ' if task is CTR else ''}users, {bootstrap} resamples, 95%",
        "pareto_metric": task.pareto_metric, "seed": seed,
        "calib_users": calib_users if task is CTR else min(calib_users, len(task.user_ids(ds))),
        "bootstrap": bootstrap, "reference": reference, "rows": order_rows(rows, task.pareto_metric, lower),
        "teacher_seconds": round(teacher_seconds, 2), "seconds": round(time.perf_counter() - t_all, 2)}
    if task is CTR:
        import numpy as np

        from ckv_cli.data.ctr import SPLITS

        test = ds.split_of == SPLITS.index("test")
        payload.update({
            "streams": [[s.name, s.width] for s in spec.streams],
            "scored": {"users": int(len(scored)), "samples": int((test & np.isin(ds.users, scored)).sum()),
                       "tokens": int(np.diff(ds.seq.offsets)[scored].sum()),
                       "test_users": int(len(np.unique(ds.users[test]))), "test_samples": int(test.sum()),
                       "sweep_users": users},
            "protocol": f"{task.compress_protocol}; scored: the test samples of a seeded sample of test users "
                        "(--sweep-users)",
            "bytes_note": "per-user bytes as `ckv compress` counts them over every user (NOTES §4): every per-token "
                          "and per-user field (item ids where stored, offsets) of every cached stream, short window "
                          "included"})
    else:
        payload["bytes_note"] = ("per-user bytes count every per-token and per-user field (item ids and offsets "
                                 "included); for every codec the first layer is recomputed from the item ids, not stored")
    return payload


# ---------------------------------------------------------------- outputs


def csv_columns(payload: dict) -> list[str]:
    ctr = payload.get("task") == CTR.name
    metrics = CTR.metrics if ctr else NEXT_ITEM.metrics
    return (["spec", "codec", "params", "status", "pareto", "bytes_per_token", "per_user_bytes", "per_user_ratio_fp16",
             "per_user_ratio_fp32", "shared_bytes", "total_ratio_fp16"] + (["long_only_ratio_fp16"] if ctr else [])
            + [f"{k}_{p}" for k in metrics for p in ("delta", "ci_low", "ci_high", "relative")]
            + (["max_abs_prob_change", "signature_mismatch_rate"] if ctr else ["top10_overlap", "kl_mean", "hit10_flips"])
            + ["seconds", "message"])


CSV_COLUMNS = csv_columns({"task": NEXT_ITEM.name})


def csv_rows(payload: dict) -> list[dict]:
    columns = csv_columns(payload)
    out = []
    for r in payload["rows"]:
        row = {c: r.get(c, "") for c in columns}
        row["params"] = ",".join(f"{k}={v}" for k, v in r["params"].items())
        if row.get("signature_mismatch_rate") is None:
            row["signature_mismatch_rate"] = ""
        if payload.get("task") != CTR.name:
            row.pop("signature_mismatch_rate")
        for k, m in r.get("metrics", {}).items():
            for p in ("delta", "ci_low", "ci_high", "relative"):
                row[f"{k}_{p}"] = m[p]
        out.append(row)
    return out


def write_csv(path: str | Path | None, payload: dict) -> None:
    """One line per row (`csv_columns` of the payload's task), written atomically."""
    if not path:
        return
    from ckv_cli.io.files import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=csv_columns(payload))
            w.writeheader()
            w.writerows(csv_rows(payload))

    atomic_write(Path(path), write)


def _ci(m: dict, digits: int = 4) -> str:
    return f"{m['delta']:+.{digits}f} [{m['ci_low']:+.{digits}f}, {m['ci_high']:+.{digits}f}]"


def collective_verdict(payload: dict, metric: str | None = None) -> dict:
    """Does `collective` have the best `metric` delta at equal or smaller per-user bytes than every baseline? For
    each baseline row (every row that ran and is not collective): `dominated` when a collective row with <= its
    bytes has a delta at least as good, `beats` when collective rows with <= its bytes exist but all are worse,
    `smaller` when no collective row is that small, and `undercuts` when it is moreover not distinguishably worse
    than the best collective row (a delta at least as good, or CIs that overlap: `eventid`, lossless, against a
    collective row whose delta is a noise-level +0.00004 on the CTR models), which makes the answer no as well.
    The rule leans against collective on purpose: fewer bytes and no measurable loss is a win for the baseline."""
    metric = metric or payload.get("pareto_metric", PARETO_METRIC)
    ran = [r for r in payload["rows"] if r["status"] == OK]
    coll = [r for r in ran if r["codec"] == "collective"]
    out = {"metric": metric, "collective_rows": len(coll), "beats": [], "dominated": [], "smaller": [], "undercuts": []}
    for b in ran:
        if b["codec"] == "collective":
            continue
        cheaper = [c for c in coll if c["per_user_bytes"] <= b["per_user_bytes"]]
        if not cheaper:
            top = max(coll, key=lambda c: c["metrics"][metric]["delta"]) if coll else None
            if top and (b["metrics"][metric]["delta"] >= top["metrics"][metric]["delta"]
                        or b["metrics"][metric]["ci_high"] >= top["metrics"][metric]["ci_low"]):
                out["undercuts"].append({"baseline": b["spec"], "baseline_bytes_per_token": b["bytes_per_token"],
                                         "baseline_delta": b["metrics"][metric]["delta"]})
            else:
                out["smaller"].append({"baseline": b["spec"]})
            continue
        best = max(cheaper, key=lambda c: (c["metrics"][metric]["delta"], -c["per_user_bytes"]))
        mb, mc = b["metrics"][metric], best["metrics"][metric]
        entry = {"baseline": b["spec"], "baseline_bytes_per_token": b["bytes_per_token"], "baseline_delta": mb["delta"],
                 "collective": best["spec"], "collective_bytes_per_token": best["bytes_per_token"],
                 "collective_delta": mc["delta"],
                 "cis_overlap": bool(mb["ci_low"] <= mc["ci_high"] and mc["ci_low"] <= mb["ci_high"])}
        out["beats" if mb["delta"] > mc["delta"] else "dominated"].append(entry)
    out["collective_best"] = bool(coll) and not out["beats"] and not out["undercuts"]
    return out


def undercut(payload: dict) -> list[dict]:
    """Rows smaller than every collective row and not distinguishably worse than the best of them, as rows."""
    specs = {e["baseline"] for e in collective_verdict(payload)["undercuts"]}
    return [r for r in payload["rows"] if r["spec"] in specs]


def collective_best(payload: dict) -> bool:
    return bool(collective_verdict(payload)["collective_best"])


def verdict_line(payload: dict, metric: str | None = None, digits: int | None = None) -> str:
    ctr = payload.get("task") == CTR.name
    metric = metric or payload.get("pareto_metric", PARETO_METRIC)
    digits = digits if digits is not None else (5 if ctr else 4)
    v = collective_verdict(payload, metric)
    if not v["collective_rows"]:
        return f"No `collective` row ran, so there is nothing to compare ({metric} delta)."
    head = (f"`collective` has the best {metric} delta at equal or smaller per-user bytes than every baseline: "
            f"**{'yes' if v['collective_best'] else 'no'}**")
    parts = []
    if v["undercuts"]:
        parts.append("undercut by " + "; ".join(
            f"`{e['baseline']}` ({e['baseline_bytes_per_token']:.2f} B/token, {e['baseline_delta']:+.{digits}f}), smaller "
            "than every collective row and not distinguishably worse than the best of them" for e in v["undercuts"]))
    if v["beats"]:
        parts.append("beaten by " + "; ".join(
            f"`{e['baseline']}` ({e['baseline_bytes_per_token']:.2f} B/token, {e['baseline_delta']:+.{digits}f}) against "
            f"the best collective at <= its bytes, `{e['collective']}` ({e['collective_bytes_per_token']:.2f} B/token, "
            f"{e['collective_delta']:+.{digits}f}){', CIs overlap' if e['cis_overlap'] else ''}" for e in v["beats"]))
    if v["dominated"]:
        parts.append("at least as good as " + ", ".join(f"`{e['baseline']}`" for e in v["dominated"]) + " at fewer or equal bytes")
    if v["smaller"]:
        parts.append("no collective row is as small as " + ", ".join(f"`{e['baseline']}`" for e in v["smaller"]))
    line = head + (" — " + "; ".join(parts) if parts else "") + "."
    if ctr and any(r["codec"] == EVENTID for r in undercut(payload)):
        line += (" The K/V of a token are a function of its event (item, rating bucket, gap bucket), so storing the "
                 "event ids and recomputing the cache is lossless, and here smaller than every collective row.")
    return line


def scope_line(payload: dict) -> str:
    s = payload["scored"]
    return (f"{s['samples']:,} test samples of {s['users']:,} of the {s['test_users']:,} test users scored "
            f"({s['test_samples']:,} test samples in all; --sweep-users {s['sweep_users']})")


def markdown_table(payload: dict) -> str:
    """The sweep as a Markdown table (rows as ordered, Pareto rows marked with a star), then refused and
    not-implemented entries."""
    ref = payload["reference"]
    if payload.get("task") == CTR.name:
        head = (f"Uncompressed on the scored samples: AUC {ref['AUC']:.4f}, gAUC {ref['gAUC']:.4f}, logloss "
                f"{ref['logloss']:.4f}. " if ref else "")
        lines = [head + f"{scope_line(payload)}; bytes over all {payload['users']:,} users, {payload['tokens']:,} "
                 f"cached tokens; full cache {payload['full_fp16_bytes_per_token']} B/token at fp16 ("
                 + ", ".join(f"{n} {d}" for n, d in payload["streams"]) + "). Deltas with 95% paired-bootstrap "
                 "CIs over test users; * = Pareto front (no row with <= bytes has a better AUC delta).", "",
                 "| codec | bytes/token | per-user vs fp16 / fp32 | shared | dAUC [95% CI] | dgAUC [95% CI] | "
                 "dlogloss [95% CI] | max abs dp | seconds | Pareto |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in payload["rows"]:
            if r["status"] == OK:
                m = r["metrics"]
                lines.append(f"| `{r['spec']}` | {r['bytes_per_token']:.2f} | {r['per_user_ratio_fp16']:.2%} / "
                             f"{r['per_user_ratio_fp32']:.2%} | {human(r['shared_bytes'])} | {_ci(m['AUC'], 5)} | "
                             f"{_ci(m['gAUC'], 5)} | {_ci(m['logloss'], 5)} | {r['max_abs_prob_change']:.4f} | "
                             f"{r['seconds']:.1f} | {'*' if r['pareto'] else ''} |")
            else:
                lines.append(f"| `{r['spec']}` | {r['status']}: {r['message'].replace('|', '/')} | | | | | | | | |")
        return "\n".join(lines)
    lines = [f"Uncompressed: NDCG@10 {ref['NDCG@10']:.4f}, HR@10 {ref['HR@10']:.4f} ({payload['users']:,} users, "
             f"{payload['tokens']:,} cached tokens; full cache {payload['full_fp16_bytes_per_token']} B/token at fp16). "
             "Deltas with 95% paired-bootstrap CIs; * = Pareto front (no row with <= bytes has a better NDCG@10 delta).",
             "",
             "| codec | bytes/token | per-user vs fp16 / fp32 | shared | dNDCG@10 [95% CI] | dHR@10 [95% CI] | dNDCG@50 | "
             "dMRR | top-10 overlap | KL | hit@10 flips | seconds | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["status"] == OK:
            m = r["metrics"]
            lines.append(f"| `{r['spec']}` | {r['bytes_per_token']:.2f} | {r['per_user_ratio_fp16']:.2%} / "
                         f"{r['per_user_ratio_fp32']:.2%} | {human(r['shared_bytes'])} | {_ci(m['NDCG@10'])} | "
                         f"{_ci(m['HR@10'])} | {m['NDCG@50']['delta']:+.4f} | {m['MRR']['delta']:+.4f} | "
                         f"{r['top10_overlap']:.3f} | {r['kl_mean']:.4f} | {r['hit10_flips']:,} | {r['seconds']:.1f} | "
                         f"{'*' if r['pareto'] else ''} |")
        else:
            lines.append(f"| `{r['spec']}` | {r['status']}: {r['message'].replace('|', '/')} | | | | | | | | | | | |")
    return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{int(n):,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)
