"""`ckv evaluate CHECKPOINT --sweep SPEC`: compress and evaluate a grid of codecs and budgets on one checkpoint in
one run, writing no artifact (issue 6).

Every user's teacher cache and the reference scores are built once (`ckv_cli.compress.Teacher`); then, per grid
entry, the plan is fitted on the seeded calibration users taken from those caches and every user is encoded,
decoded and scored by the same code as `ckv compress` (`ckv_cli.compress.compress`, protocol of
`ckv_cli.evaluate.PROTOCOL`). Each row has the per-user bytes (NOTES §4: item ids and offsets included; first
layers recomputed from item ids for every codec alike), each ranking metric's delta with a paired-bootstrap 95%
CI over users, fidelity to the uncompressed scores, and its time. Rows are sorted by per-user bytes; a row is on
the Pareto front when no other row has as few or fewer bytes and a better NDCG@10 delta.

A grid entry the codec refuses on this model (e.g. `itemid` on a layer whose K/V are not a function of the item)
is recorded as refused with the codec's message. `evict` (token eviction, `ckv_cli.codecs.evict`) runs here only:
its dropped tokens are masked out of the appended event's attention, and its bytes are those it would store (the
kept tokens' fp16 vectors, a 1-bit keep flag per token for the key-norm rules); `ckv compress` refuses it.

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

import numpy as np

from ckv_cli.codecs import REGISTRY
from ckv_cli.compress import CompressOptions, Teacher, compress, parse_params
from ckv_cli.errors import CkvError
from ckv_cli.evaluate import PROTOCOL, target_ranks
from ckv_cli.metrics import RANKING_METRICS, paired_bootstrap, per_user_ranking, ranking_metrics

NOT_IMPLEMENTED: dict[str, str] = {}  # codec -> why: grid entries accepted but not built (listed as such); none now

DEFAULT_GRID = ("plain:dtype=float16", "bf16", "int8", "int4:group_size=32", "int4:group_size=64",
                "lowrank:rank=2", "lowrank:rank=8", "lowrank:rank=16",
                "pq:subvectors=2,bits=8", "pq:subvectors=4,bits=8", "pq:subvectors=8,bits=8",
                "collective:pool_size=1024", "collective:pool_size=4096", "collective:pool_size=8192",
                "collective:pool_size=4096,user_dim=1", "itemid", "evict:keep=0.25,policy=recent",
                "evict:keep=0.5,policy=recent", "evict:keep=0.5,policy=keynorm",
                "evict:keep=0.5,policy=keynorm_high")

PARETO_METRIC = "NDCG@10"
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


def parse_sweep(spec: str, default_grid: tuple[str, ...] = DEFAULT_GRID, extra_codecs: tuple[str, ...] = (),
                extra_params: tuple[str, ...] = ()) -> list[SweepSpec]:
    """'default' or 'codec[:k=v,...];...' -> grid entries (duplicates dropped, first kept). Unknown codecs,
    unknown parameter names and malformed entries raise a one-line CkvError; values are checked by the codec
    when the entry runs (a value it refuses makes a refused row). The CTR sweep passes its own default grid, its
    parameterless `eventid` codec (`extra_codecs`) and the parameters every codec takes there (`extra_params`)."""
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


def parse_sweep_entry(entry: str, extra_codecs: tuple[str, ...] = (), extra_params: tuple[str, ...] = ()) -> SweepSpec:
    codec, sep, rest = entry.partition(":")
    codec = codec.strip()
    known = sorted(REGISTRY) + sorted(set(NOT_IMPLEMENTED) - set(REGISTRY)) + sorted(extra_codecs)
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
    """True where no other row has <= bytes and a strictly better (higher) delta."""
    return [not any(b2 <= b and d2 > d for j, (b2, d2) in enumerate(zip(per_user_bytes, deltas)) if j != i)
            for i, (b, d) in enumerate(zip(per_user_bytes, deltas))]


def _row_from_result(spec: SweepSpec, result, ref_pu: dict, reference: dict, bootstrap: int, seed: int,
                     seconds: float) -> dict:
    a, m = result.accounting, result.metrics
    new_pu = per_user_ranking(result.per_user["rank_new"])
    compressed = ranking_metrics(result.per_user["rank_new"])
    ci = paired_bootstrap(ref_pu, new_pu, n=bootstrap, seed=seed)
    metrics = {}
    for k in reference:
        d = compressed[k] - reference[k]
        metrics[k] = {"value": compressed[k], "delta": d, "relative": d / reference[k] if reference[k] else 0.0,
                      "ci_low": ci[k][0], "ci_high": ci[k][1]}
    f = m["fidelity"]
    return {
        "spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": OK, "message": "",
        "bytes_per_token": a["bytes_per_token"], "per_user_bytes": a["per_user_bytes"],
        "per_user_ratio_fp16": a["per_user_ratio_fp16"], "per_user_ratio_fp32": a["per_user_ratio_fp32"],
        "shared_bytes": a["shared_bytes"], "total_ratio_fp16": a["total_ratio_fp16"],
        "per_user_breakdown": a["per_user_breakdown"], "metrics": metrics,
        "top10_overlap": f["top10_overlap"], "kl_mean": f["kl_mean"], "hit10_flips": f["hit10_flips"],
        "hit10_gained": f["hit10_gained"], "hit10_lost": f["hit10_lost"],
        "reconstruction_rel_mse": m["reconstruction_rel_mse"], "plan": result.plan.describe(),
        "seconds": round(seconds, 2),
    }


def _row_not_run(spec: SweepSpec, status: str, message: str, seconds: float = 0.0) -> dict:
    return {"spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": status,
            "message": message, "seconds": round(seconds, 2)}


def order_rows(rows: list[dict], metric: str = PARETO_METRIC) -> list[dict]:
    """Rows that ran sorted by per-user bytes (then by label), then refused, then not implemented; Pareto flags
    (on `metric`'s delta, higher is better) set on the rows that ran (False on the others)."""
    ran = sorted((r for r in rows if r["status"] == OK), key=lambda r: (r["per_user_bytes"], r["spec"]))
    flags = pareto_flags([r["per_user_bytes"] for r in ran], [r["metrics"][metric]["delta"] for r in ran])
    for r, flag in zip(ran, flags):
        r["pareto"] = flag
    rest = [r for r in rows if r["status"] == REFUSED] + [r for r in rows if r["status"] == MISSING]
    for r in rest:
        r["pareto"] = False
    return ran + rest


def run_sweep(model, ds, specs: list[SweepSpec], *, calib_users: int = 1000, batch_users: int = 256, seed: int = 0,
              bootstrap: int = 1000, advance: Callable[..., None] | None = None,
              on_spec: Callable[[str], None] | None = None) -> dict:
    """Run every grid entry on one model and dataset; returns the JSON-able sweep report (rows ordered, Pareto
    marked). `advance(n)` counts users (those of the teacher pass, then those of each entry that runs)."""
    t_all = time.perf_counter()
    t = time.perf_counter()
    if on_spec:
        on_spec("teacher caches")
    teacher = Teacher.build(model, ds, batch_users, advance)
    ref_ranks = np.concatenate([target_ranks(tb.ref_scores, tb.targets) for tb in teacher.batches])
    reference, ref_pu = ranking_metrics(ref_ranks), per_user_ranking(ref_ranks)
    teacher_seconds = time.perf_counter() - t
    base = CompressOptions(calib_users=calib_users, batch_users=batch_users, seed=seed)
    rows = []
    for spec in specs:
        if on_spec:
            on_spec(spec.label)
        if spec.codec in NOT_IMPLEMENTED:
            rows.append(_row_not_run(spec, MISSING, NOT_IMPLEMENTED[spec.codec]))
            if advance:
                advance(ds.n_users)
            continue
        t = time.perf_counter()
        done = [0]

        def counted(n: int, *a, done=done):
            done[0] += n
            if advance:
                advance(n, *a)

        try:
            result = compress(model, ds, replace(base, codec=spec.codec, params=dict(spec.params)), advance=counted,
                              teacher=teacher, keep_fields=False)
        except CkvError as e:
            rows.append(_row_not_run(spec, REFUSED, str(e), time.perf_counter() - t))
            if advance:
                advance(ds.n_users - done[0])
            continue
        if not np.array_equal(result.per_user["rank_ref"], ref_ranks):
            raise CkvError("internal: the reference ranks changed between sweep entries")
        rows.append(_row_from_result(spec, result, ref_pu, reference, bootstrap, seed, time.perf_counter() - t))
    return {
        "dataset": ds.name, "data_fingerprint": ds.fingerprint, "users": ds.n_users,
        "tokens": int(teacher.flat.offsets[-1]), "full_fp16_bytes_per_token": 2 * len(model.layers) * sum(model.kv_dims),
        "protocol": f"test split, history prefilled and compressed, last event appended via extend; {PROTOCOL}",
        "bytes_note": "per-user bytes count every per-token and per-user field (item ids and offsets included); "
                      "for every codec the first layer is recomputed from the item ids, not stored",
        "ci": f"paired bootstrap over users, {bootstrap} resamples, 95%", "pareto_metric": PARETO_METRIC,
        "seed": seed, "calib_users": min(calib_users, ds.n_users), "bootstrap": bootstrap,
        "reference": reference, "rows": order_rows(rows), "teacher_seconds": round(teacher_seconds, 2),
        "seconds": round(time.perf_counter() - t_all, 2),
    }


# ---------------------------------------------------------------- outputs


CSV_COLUMNS = (["spec", "codec", "params", "status", "pareto", "bytes_per_token", "per_user_bytes", "per_user_ratio_fp16",
                "per_user_ratio_fp32", "shared_bytes", "total_ratio_fp16"]
               + [f"{k}_{p}" for k in RANKING_METRICS for p in ("delta", "ci_low", "ci_high", "relative")]
               + ["top10_overlap", "kl_mean", "hit10_flips", "seconds", "message"])


def csv_rows(payload: dict) -> list[dict]:
    out = []
    for r in payload["rows"]:
        row = {c: r.get(c, "") for c in CSV_COLUMNS}
        row["params"] = ",".join(f"{k}={v}" for k, v in r["params"].items())
        for k, m in r.get("metrics", {}).items():
            for p in ("delta", "ci_low", "ci_high", "relative"):
                row[f"{k}_{p}"] = m[p]
        out.append(row)
    return out


def write_csv(path: str | Path | None, payload: dict, columns: list[str] | None = None,
              to_rows: Callable[[dict], list[dict]] | None = None) -> None:
    """One line per row, CSV_COLUMNS (or `columns`, filled by `to_rows(payload)`: the CTR sweep's), written
    atomically (a temporary file renamed into place)."""
    if not path:
        return
    from ckv_cli.checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns or CSV_COLUMNS)
            w.writeheader()
            w.writerows((to_rows or csv_rows)(payload))

    atomic_write(Path(path), write)


def _ci(m: dict) -> str:
    return f"{m['delta']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"


def collective_verdict(payload: dict, metric: str = PARETO_METRIC) -> dict:
    """Does `collective` have the best `metric` delta at equal or smaller per-user bytes than every baseline? For
    each baseline row (every row that ran and is not collective): `dominated` when a collective row with <= its
    bytes has a delta at least as good, `beats` when collective rows with <= its bytes exist but all are worse,
    `smaller` when no collective row is that small, and `undercuts` when it is moreover not distinguishably worse
    than the best collective row (a delta at least as good, or CIs that overlap: `eventid`, lossless, against a
    collective row whose delta is a noise-level +0.00004 on the CTR models), which makes the answer no as well.
    The rule leans against collective on purpose: fewer bytes and no measurable loss is a win for the baseline."""
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


def verdict_line(payload: dict, metric: str = PARETO_METRIC, digits: int = 4) -> str:
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
    return head + (" — " + "; ".join(parts) if parts else "") + "."


def markdown_table(payload: dict) -> str:
    """The sweep as a Markdown table (rows as ordered, Pareto rows marked with a star), then refused and
    not-implemented entries."""
    ref = payload["reference"]
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
                         f"{r['per_user_ratio_fp32']:.2%} | {_human(r['shared_bytes'])} | {_ci(m['NDCG@10'])} | "
                         f"{_ci(m['HR@10'])} | {m['NDCG@50']['delta']:+.4f} | {m['MRR']['delta']:+.4f} | "
                         f"{r['top10_overlap']:.3f} | {r['kl_mean']:.4f} | {r['hit10_flips']:,} | {r['seconds']:.1f} | "
                         f"{'*' if r['pareto'] else ''} |")
        else:
            lines.append(f"| `{r['spec']}` | {r['status']}: {r['message'].replace('|', '/')} | | | | | | | | | | | |")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{int(n):,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)
