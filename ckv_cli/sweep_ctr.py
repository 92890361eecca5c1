"""`ckv evaluate CTR_CHECKPOINT --data ml-1m-ctr --sweep SPEC`: the codec sweep of issue 6 for the target-attention
CTR models (SIM, ETA, SDIM, TWIN), writing no artifact.

Each grid entry runs through the code of `ckv compress` on a CTR model (`ckv_cli.compress_ctr.compress_ctr`, no
sink): the plan is fitted on the seeded calibration users' training-split events (as `ckv compress`: calibration
covers every user), then the tokens of the **scored users** are encoded, decoded and their test samples scored
over the decoded cache. Scored users = a seeded sample of `--sweep-users` of the users that have test samples
(0 = all of them; on ML-1M only 1,209 of 6,040 users have any, so the default 1500 scores all of them); users
without test samples are not encoded (they change no metric; the bytes are counted for every user all the same).
The uncompressed scores of the scored samples are computed once per model (the first entry that runs, its time
reported apart as `teacher_seconds`) and reused by every other entry; the per-event K/V streams are recomputed per
batch by each entry (a linear map of the event embedding, ~1.5 s over the test users' 365k tokens of TWIN,
cheaper than holding 1.5 GB of them).

A row: per-user bytes (NOTES §4, as `ckv compress` counts them over every user), AUC / gAUC / logloss deltas with
the paired-bootstrap 95% CIs over test users of `ckv compress`'s report, the largest change of a predicted
probability, and seconds. Rows are sorted by per-user bytes; the Pareto front is on the AUC delta. A codec that
refuses the model makes a refused row with its message. `eventid` (store each token's item, rating bucket and gap
bucket, recompute the K/V with the model) is a lossless grid row: on these models a token's cache is a function of
its event.

SPEC as in `ckv_cli.sweep` (`default`, or `codec[:k=v,...];...`), plus the codec `eventid` and the parameter
`codes=stored|derived` (ETA / SDIM signatures) on any codec.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ckv_cli.codecs import REGISTRY
from ckv_cli.compress_ctr import (DEFAULT_POOL, EVENTID, PROTOCOL, compress_ctr, parse_ctr_options,
                                  stream_dims)
from ckv_cli.data.ctr import SPLITS, CTRData
from ckv_cli.errors import CkvError
from ckv_cli.sweep import (MISSING, NOT_IMPLEMENTED, OK, REFUSED, SweepSpec, _human, collective_verdict,
                           order_rows, parse_sweep, verdict_line, write_csv)

# 256-wide streams (d_attn = 256; SDIM's long values d = 64): pool 1024 / 4096 = 10 / 12 bits per stream and token;
# int4 at group 32 / 64 = 4.5 / 4.25 bits per value; lowrank 8 / 32 = 16 / 64 B; pq 8 / 32 subvectors = 8 / 32 B.
DEFAULT_GRID = ("plain:dtype=float16", "bf16", "int8", "int4:group_size=32", "int4:group_size=64",
                "lowrank:rank=8", "lowrank:rank=32", "pq:subvectors=8,bits=8", "pq:subvectors=32,bits=8",
                "collective:pool_size=1024", "collective:pool_size=4096", "collective:pool_size=4096,user_dim=1",
                EVENTID, "evict:keep=0.25,policy=recent")  # evict: a refused row (compress_ctr has no keep mask)
PARETO_METRIC = "AUC"
CTR_METRICS = ("AUC", "gAUC", "logloss")
DEFAULT_SWEEP_USERS = 1500
COLLECTIVE_DEFAULTS = {"pool_size": DEFAULT_POOL, "user_dim": 0, "layout": "residual"}  # as `ckv compress`


def parse_ctr_sweep(spec: str) -> list[SweepSpec]:
    """'default' (the CTR grid) or entries, as `ckv_cli.sweep.parse_sweep`; `eventid` and `codes=` accepted."""
    return parse_sweep(spec, DEFAULT_GRID, extra_codecs=(EVENTID,), extra_params=("codes",))


def sweep_users(data: CTRData, n: int, seed: int) -> np.ndarray:
    """A seeded sample of `n` of the users that have test samples (all of them when n is 0 or more than there
    are), sorted."""
    if n < 0:
        raise CkvError(f"--sweep-users must be >= 0 (0 = every test user), got {n}")
    test_users = np.unique(data.users[data.split_of == SPLITS.index("test")])
    if n == 0 or n >= len(test_users):
        return test_users
    return np.sort(np.random.default_rng(seed).choice(test_users, size=n, replace=False))


def _options(spec: SweepSpec, calib_users: int, batch_users: int, seed: int, bootstrap: int):
    params = dict(spec.params)
    if spec.codec == "collective":
        params = {**COLLECTIVE_DEFAULTS, **params}
    opts = parse_ctr_options(spec.codec, params, "k,v", calib_users, batch_users, seed)
    opts.bootstrap = bootstrap
    return opts


def _row(spec: SweepSpec, res: dict, seconds: float) -> dict:
    a, m = res["accounting"], res["metrics"]
    ci = m.get("delta_ci95", {})
    metrics = {}
    for k in CTR_METRICS:
        ref, d = m["uncompressed"][k], m["delta"][k]
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        metrics[k] = {"value": m["compressed"][k], "delta": d, "relative": d / ref if ref else 0.0,
                      "ci_low": lo, "ci_high": hi}
    return {
        "spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": OK, "message": "",
        "bytes_per_token": a["bytes_per_token"], "per_user_bytes": a["per_user_bytes"],
        "per_user_ratio_fp16": a["per_user_ratio_fp16"], "per_user_ratio_fp32": a["per_user_ratio_fp32"],
        "shared_bytes": a["shared_bytes"], "total_ratio_fp16": a["total_ratio_fp16"],
        "long_only_ratio_fp16": a["long_only"]["per_user_ratio_fp16"], "per_user_breakdown": a["per_user_breakdown"],
        "metrics": metrics, "max_abs_prob_change": m["max_abs_prob_change"],
        "signature_mismatch_rate": m.get("signature_mismatch_rate"),
        "reconstruction_rel_mse": m["reconstruction_rel_mse"], "plan": res["plan"].describe(),
        "seconds": round(seconds, 2),
    }


def _not_run(spec: SweepSpec, status: str, message: str, seconds: float = 0.0) -> dict:
    return {"spec": spec.label, "codec": spec.codec, "params": dict(spec.params), "status": status,
            "message": message, "seconds": round(seconds, 2)}


def run_ctr_sweep(model, data: CTRData, specs: list[SweepSpec], *, calib_users: int = 1000, batch_users: int = 256,
                  seed: int = 0, bootstrap: int = 1000, users: int = DEFAULT_SWEEP_USERS,
                  advance: Callable[..., None] | None = None, on_spec: Callable[[str], None] | None = None) -> dict:
    """Run every grid entry on one CTR model and its data; returns the JSON-able sweep report (rows ordered, Pareto
    on the AUC delta). `advance(n)` counts scored users, once per entry."""
    t_all = time.perf_counter()
    dims = stream_dims(model)  # "caches nothing per user" for a model without a history branch
    scored = sweep_users(data, users, seed)
    test = data.split_of == SPLITS.index("test")
    reference: dict = {}
    rows, result = [], None
    for spec in specs:
        if on_spec:
            on_spec(spec.label)
        if spec.codec in NOT_IMPLEMENTED and spec.codec not in REGISTRY:
            rows.append(_not_run(spec, MISSING, NOT_IMPLEMENTED[spec.codec]))
            if advance:
                advance(len(scored))
            continue
        t = time.perf_counter()
        done = [0]

        def counted(n: int, *a, done=done):
            done[0] += n
            if advance:
                advance(n, *a)

        first = "ref" not in reference
        try:
            opts = _options(spec, calib_users, batch_users, seed, bootstrap)
            res = compress_ctr(model, data, opts, advance=counted, users=scored, reference=reference)
        except CkvError as e:
            rows.append(_not_run(spec, REFUSED, str(e), time.perf_counter() - t))
            if advance:
                advance(len(scored) - done[0])
            continue
        seconds = time.perf_counter() - t - (reference["seconds"] if first else 0.0)
        rows.append(_row(spec, res, seconds))
        result = res
    in_scope = np.isin(data.users, scored)
    payload = {
        "task": "ctr", "dataset": data.name, "data_fingerprint": data.fingerprint, "users": data.seq.n_users,
        "tokens": int(data.seq.offsets[-1]), "streams": [[n, d] for n, d in dims.items()], "full_fp16_bytes_per_token": 2 * sum(dims.values()),
        "scored": {"users": int(len(scored)), "samples": int((test & in_scope).sum()),
                   "tokens": int(np.diff(data.seq.offsets)[scored].sum()),
                   "test_users": int(len(np.unique(data.users[test]))), "test_samples": int(test.sum()),
                   "sweep_users": users},
        "protocol": f"{PROTOCOL}; scored: the test samples of a seeded sample of test users (--sweep-users)",
        "bytes_note": "per-user bytes as `ckv compress` counts them over every user (NOTES §4): every per-token and "
                      "per-user field (item ids where stored, offsets) of every cached stream, short window included",
        "ci": f"paired bootstrap over scored test users, {bootstrap} resamples, 95%", "pareto_metric": PARETO_METRIC,
        "seed": seed, "calib_users": calib_users, "bootstrap": bootstrap,
        "reference": result["metrics"]["uncompressed"] if result else {},
        "rows": order_rows(rows, PARETO_METRIC), "teacher_seconds": reference.get("seconds", 0.0),
        "seconds": round(time.perf_counter() - t_all, 2),
    }
    return payload


# ---------------------------------------------------------------- outputs


CSV_COLUMNS = (["spec", "codec", "params", "status", "pareto", "bytes_per_token", "per_user_bytes",
                "per_user_ratio_fp16", "per_user_ratio_fp32", "shared_bytes", "total_ratio_fp16", "long_only_ratio_fp16"]
               + [f"{k}_{p}" for k in CTR_METRICS for p in ("delta", "ci_low", "ci_high", "relative")]
               + ["max_abs_prob_change", "signature_mismatch_rate", "seconds", "message"])


def csv_rows(payload: dict) -> list[dict]:
    out = []
    for r in payload["rows"]:
        row = {c: r.get(c, "") for c in CSV_COLUMNS}
        row["params"] = ",".join(f"{k}={v}" for k, v in r["params"].items())
        if row["signature_mismatch_rate"] is None:
            row["signature_mismatch_rate"] = ""
        for k, m in r.get("metrics", {}).items():
            for p in ("delta", "ci_low", "ci_high", "relative"):
                row[f"{k}_{p}"] = m[p]
        out.append(row)
    return out


def write_ctr_csv(path, payload: dict) -> None:
    write_csv(path, payload, CSV_COLUMNS, csv_rows)


def _scope(payload: dict) -> str:
    s = payload["scored"]
    return (f"{s['samples']:,} test samples of {s['users']:,} of the {s['test_users']:,} test users scored "
            f"({s['test_samples']:,} test samples in all; --sweep-users {s['sweep_users']})")


def undercut(payload: dict) -> list[dict]:
    """Rows smaller than every collective row and not distinguishably worse than the best of them
    (`ckv_cli.sweep.collective_verdict`'s `undercuts`), as rows."""
    specs = {e["baseline"] for e in collective_verdict(payload, PARETO_METRIC)["undercuts"]}
    return [r for r in payload["rows"] if r["spec"] in specs]


def ctr_verdict_line(payload: dict) -> str:
    """`ckv_cli.sweep.verdict_line` on the AUC delta, with why `eventid` undercuts collective when it does."""
    line = verdict_line(payload, PARETO_METRIC, digits=5)
    if any(r["codec"] == EVENTID for r in undercut(payload)):
        line += (" The K/V of a token are a function of its event (item, rating bucket, gap bucket), so storing the "
                 "event ids and recomputing the cache is lossless, and here smaller than every collective row.")
    return line


def collective_best(payload: dict) -> bool:
    """The issue 6 bar on one CTR model (`collective_verdict` on the AUC delta, undercutting rows included)."""
    return bool(collective_verdict(payload, PARETO_METRIC)["collective_best"])


def markdown_table(payload: dict) -> str:
    ref = payload["reference"]
    head = (f"Uncompressed on the scored samples: AUC {ref['AUC']:.4f}, gAUC {ref['gAUC']:.4f}, logloss "
            f"{ref['logloss']:.4f}. " if ref else "")
    lines = [head + f"{_scope(payload)}; bytes over all {payload['users']:,} users, {payload['tokens']:,} cached "
             f"tokens; full cache {payload['full_fp16_bytes_per_token']} B/token at fp16 ("
             + ", ".join(f"{n} {d}" for n, d in payload["streams"]) + "). Deltas with 95% paired-bootstrap "
             "CIs over test users; * = Pareto front (no row with <= bytes has a better AUC delta).", "",
             "| codec | bytes/token | per-user vs fp16 / fp32 | shared | dAUC [95% CI] | dgAUC [95% CI] | "
             "dlogloss [95% CI] | max abs dp | seconds | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["status"] == OK:
            m = r["metrics"]
            lines.append(f"| `{r['spec']}` | {r['bytes_per_token']:.2f} | {r['per_user_ratio_fp16']:.2%} / "
                         f"{r['per_user_ratio_fp32']:.2%} | {_human(r['shared_bytes'])} | {_ci5(m['AUC'])} | "
                         f"{_ci5(m['gAUC'])} | {_ci5(m['logloss'])} | {r['max_abs_prob_change']:.4f} | "
                         f"{r['seconds']:.1f} | {'*' if r['pareto'] else ''} |")
        else:
            lines.append(f"| `{r['spec']}` | {r['status']}: {r['message'].replace('|', '/')} | | | | | | | | |")
    return "\n".join(lines)


def _ci5(m: dict) -> str:
    return f"{m['delta']:+.5f} [{m['ci_low']:+.5f}, {m['ci_high']:+.5f}]"


def print_ctr_sweep(payload: dict) -> None:
    """The Rich table of `ckv evaluate CTR_CHECKPOINT --sweep`."""
    from ckv_cli.report import print_table

    ref = payload["reference"]
    rows = []
    for r in payload["rows"]:
        if r["status"] != OK:
            rows.append([r["spec"], r["status"], *[""] * 6, f"{r['seconds']:.1f}", ""])
            continue
        m = r["metrics"]
        rows.append([r["spec"], f"{r['bytes_per_token']:.2f}",
                     f"{r['per_user_ratio_fp16']:.2%} / {r['per_user_ratio_fp32']:.2%}", _human(r["shared_bytes"]),
                     _ci5(m["AUC"]), _ci5(m["gAUC"]), _ci5(m["logloss"]), f"{r['max_abs_prob_change']:.4f}",
                     f"{r['seconds']:.1f}", "*" if r["pareto"] else ""])
    ref_txt = f"uncompressed AUC {ref['AUC']:.4f} / gAUC {ref['gAUC']:.4f}; " if ref else ""
    print_table(f"CTR sweep on {payload['dataset']}: {_scope(payload)}; {ref_txt}deltas with 95% CI (paired "
                "bootstrap); * = Pareto front (AUC delta vs per-user bytes)",
                ["codec", "B/token", "per-user vs fp16 / fp32", "shared", "dAUC [95% CI]", "dgAUC [95% CI]",
                 "dlogloss [95% CI]", "max |dp|", "s", "Pareto"], rows)
    for r in payload["rows"]:
        if r["status"] != OK:
            print(f"{r['spec']}: {r['status']}: {r['message']}")
    print(ctr_verdict_line(payload))
    print(f"reference scores: {payload['teacher_seconds']:.1f} s; whole sweep: {payload['seconds']:.1f} s")


__all__ = ["CSV_COLUMNS", "DEFAULT_GRID", "DEFAULT_SWEEP_USERS", "PARETO_METRIC", "collective_best",
           "ctr_verdict_line", "markdown_table", "parse_ctr_sweep", "print_ctr_sweep", "run_ctr_sweep",
           "sweep_users", "undercut", "write_ctr_csv"]
