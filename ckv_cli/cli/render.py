"""What the CLI shows: tables and progress for people (Rich, on a terminal) and for pipelines (plain text, JSON).
The only module besides `app` that imports Rich; the library returns numbers and never prints."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


console = Console()
err_console = Console(stderr=True)


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A Rich table on a terminal; tab-separated plain text otherwise (stable for scripts)."""
    if console.is_terminal:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="left" if c == columns[0] else "right")
        for r in rows:
            table.add_row(*(fmt(v) for v in r))
        console.print(table)
    else:
        print(f"# {title}")
        print("\t".join(columns))
        for r in rows:
            print("\t".join(fmt(v) for v in r))
    sys.stdout.flush()


def write_json(path: str | Path | None, payload: dict) -> None:
    if not path:
        return
    from ckv_cli.io.files import atomic_write

    text = json.dumps(payload, indent=2, sort_keys=True, default=float)
    if str(path) == "-":
        print(text)
        return

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(Path(path), write)


@contextmanager
def progress(description: str, total: int | None):
    """Yields `advance(n=1, info=None)`, the callback the library reports progress through (`n` units of work
    done, `info` a short status such as an epoch's summary): a Rich bar on a terminal; plain lines on stderr
    otherwise (`LogLines`: one per status, so one per epoch, and one per 10% of the work), so that a CI log
    shows progress; nothing with CKV_NO_PROGRESS set."""
    if not err_console.is_terminal:
        if os.environ.get("CKV_NO_PROGRESS"):
            yield lambda n=1, info=None: None
        else:
            yield LogLines(description, total, sys.stderr)
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err_console, transient=False, disable=bool(os.environ.get("CKV_NO_PROGRESS")))
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None):
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


class LogLines:
    """`advance(n=1, info=None)` for a log nobody watches as a terminal (a CI log, `nohup`, a container): plain
    lines on `stream`, one per `info` (so one per epoch) and one each time another `every` share of the total
    is done (10% by default), or at least every `seconds` when the total is unknown:

        train sasrec: epoch 1 loss 6.012 val NDCG@10 0.0412 (14 s)
        compress: 3,072/6,040 (50%) 41 s
    """

    def __init__(self, description: str, total: int | None, stream, every: float = 0.1, seconds: float = 60.0,
                 clock=time.monotonic):
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], got {every}")
        self.description, self.total, self.stream = description, total, stream
        self.every, self.seconds, self.clock = every, seconds, clock
        self.done, self.start = 0, clock()
        self.last_line = self.start
        self.next_share = every

    def __call__(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        now = self.clock()
        if info:
            self._line(f"{info} ({now - self.start:.0f} s)", now)
        if not n:
            return
        if self.total:
            share = self.done / self.total
            if share + 1e-12 >= self.next_share:
                while self.next_share <= share + 1e-12:
                    self.next_share += self.every
                self._line(f"{self.done:,}/{self.total:,} ({share:.0%}) {now - self.start:.0f} s", now)
        elif now - self.last_line >= self.seconds:
            self._line(f"{self.done:,} done, {now - self.start:.0f} s", now)

    def _line(self, text: str, now: float) -> None:
        self.last_line = now
        print(f"{self.description}: {text}", file=self.stream, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return str(n)


def print_update(report: dict) -> None:
    """What `ckv compress --update` changed."""
    u = report["update"]
    rows = [["users appended to / created", f"{u['users_appended']:,} / {u['users_created']:,}"],
            ["events appended", f"{u['events']:,}" + (f" ({u['dropped_events']:,} of unknown items dropped)"
                                                       if u["dropped_events"] else "")]]
    if "shards" in report:
        rows += [["shards rewritten / added / total", f"{len(report['shards_rewritten']):,} / "
                                                       f"{len(report['shards_added']):,} / {report['shards']:,}"],
                 ["update number", f"{report['generation']}"]]
    rows += [["files written", ", ".join(report["files_written"]) or "none"],
             ["files removed", ", ".join(report["files_removed"]) or "none"],
             ["seconds", f"{report['seconds']:.1f}"]]
    print_table(f"ckv compress --update: {report['artifact']}", ["", "value"], rows)


def _calibration_rows(cal: dict | None) -> list[list[str]]:
    """Rows on calibration: in-sample or not, and the held-out users' metrics and reconstruction error."""
    if not cal:
        return []
    rows = [["calibration users / scored users", f"{cal['users']:,} / {cal['scored_users']:,}"
             + (" (in-sample: every scored user calibrated)" if cal["in_sample"] else "")]]
    held = cal.get("held_out")
    if held:
        rows.append([f"held out of calibration ({held['users']:,} users): NDCG@10, HR@10",
                     f"{held['relative_delta']['NDCG@10']:+.2%}, {held['relative_delta']['HR@10']:+.2%}; top-10 overlap "
                     f"{held['fidelity']['top10_overlap']:.3f}"])
        err = held["reconstruction_rel_mse"]
    else:
        err = {}
    coded = {k: v for k, v in err.items() if v > 0}
    if coded:
        rows.append(["reconstruction error, held-out (rel. MSE)", ", ".join(f"{k} {v:.4f}" for k, v in coded.items())])
    elif cal["in_sample"]:
        rows.append(["reconstruction error", "in-sample only (no user held out: --calib-holdout)"])
    return rows


def print_target_search(search: dict) -> None:
    """`ckv compress --target`: every setting tried (bytes, the measured value, met) and the one kept."""
    t = search["target"]
    goal = f"{t['metric']}={t['value'] * 100:g}%" if t["relative"] else f"{t['metric']}={t['value']:g}"
    rows = []
    for r in search["tried"]:
        if r.get("status") == "ok":
            rows.append([r["setting"], f"{r['per_user_ratio_fp16']:.2%}", f"{r['total_ratio_fp16']:.2%}",
                         f"{r['measured']:.4f}", f"{r['bound']:.4f}", "yes" if r["met"] else "no"])
        else:
            rows.append([r["setting"], "", "", "", "", r["status"]])
    print_table(f"--target {goal} on {search['validation_users']:,} held-out calibration users (fitted on "
                f"{search['fit_users']:,}; met when the measure clears it by {t['margin_se']:g} standard errors); "
                f"kept: {search['chosen']}",
                ["setting", "per-user / fp16", "total / fp16", "measured", "bound", "met"], rows)


def print_compress(report: dict) -> None:
    """The table `ckv compress` ends with: bytes (both denominators) and accuracy before/after."""
    a, m = report["accounting"], report["metrics"]
    ctr = report.get("task") == "ctr"
    pct = ".3%" if ctr else ".2%"
    rows = [["users / cached tokens", f"{a['users']:,} / {a['tokens']:,}"]]
    if ctr:
        rows.append(["streams", ", ".join(f"{n} ({d})" for n, d in report["streams"].items()) + f"; signatures {report['codes']}"])
    rows += [
        [f"full cache, fp16{' (all streams)' if ctr else ''}", _human(a["full_fp16_bytes"])],
        ["full cache, fp32", _human(a["full_fp32_bytes"])],
        ["compressed per-user (all users)", _human(a["per_user_bytes"])],
        [f"  bytes per token ({'all streams' if ctr else 'all layers'})", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
        [f"shared ({'pools, bases' if ctr else 'pools, routers, bases'})", _human(a["shared_bytes"])],
        ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:{pct}} / {a['per_user_ratio_fp32']:{pct}}"],
        ["total ratio vs fp16 / fp32", f"{a['total_ratio_fp16']:{pct}} / {a['total_ratio_fp32']:{pct}}"],
    ]
    if ctr:
        rows.append(["long branch only (short window from event ids)", f"{a['long_only']['per_user_ratio_fp16']:.3%} of its fp16"])
        ci = m.get("delta_ci95", {})
        for k in ("AUC", "gAUC", "logloss"):
            c = f" [{ci[k][0]:+.4f}, {ci[k][1]:+.4f}]" if k in ci else ""
            rows.append([f"{k}: uncompressed -> compressed",
                         f"{m['uncompressed'][k]:.4f} -> {m['compressed'][k]:.4f} ({m['delta'][k]:+.5f}{c})"])
        rows.append(["test samples / users", f"{m['samples']:,} / {m['users']:,}"])
        if "signature_mismatch_rate" in m:
            rows.append(["signature bits changed", f"{m['signature_mismatch_rate']:.3%}"])
    else:
        sides = "teacher -> fine-tuned student, compressed" if report.get("student_checkpoint") else "uncompressed -> compressed"
        for k in ("NDCG@10", "HR@10", "NDCG@50", "HR@50"):
            rows.append([f"{k}: {sides}",
                         f"{m['uncompressed'][k]:.4f} -> {m['compressed'][k]:.4f} ({m['delta'][k]:+.4f}, {m['relative_delta'][k]:+.2%})"])
        rows.append(["top-10 overlap with uncompressed", f"{m['fidelity']['top10_overlap']:.3f}"])
        rows.append(["users whose hit@10 flips", f"{m['fidelity']['hit10_flips']:,}"])
        rows += _calibration_rows(m.get("calibration"))
    if "engine" in report:
        e = report["engine"]
        size = f"of {e['shard_size']:,} users" if "shard_size" in e else "by user-id hash"
        rows.append([f"shards ({e['name']}, {e['workers']} worker(s))",
                     f"{e['shards']:,} {size}; encode {e['encode_seconds']:.0f} s, "
                     f"{e['tokens_per_second_per_worker']:,.0f} tokens/s per worker"])
        if "read" in report:
            r = report["read"]
            rows.append(["read on the workers", f"{r['events']:,} events of {r['users']:,} users from {r['files']:,} "
                                                f"file(s), {e.get('read_seconds', 0):.0f} s"])
    sizing = report.get("pool_sizing")
    if sizing and sizing.get("rule") == "balanced":
        rows.append([f"pool size balanced: {sizing['pool_size']:,}", sizing["reason"]])
    elif sizing:
        chosen = ", ".join(f"{n} {c['pool_size']}{'' if c['met'] else ' (target not met)'}"
                           for n, c in sizing["streams"].items())
        rows.append([f"pool size auto (held-out error <= {sizing['target_error']:g})", chosen])
    if report.get("fisher"):
        f = report["fisher"]
        rows.append(["pool metric: Fisher", f"{', '.join(f['streams'])} fitted and routed in the model's Fisher metric "
                                            f"({f['users']:,} calibration users)"])
    for w in report.get("warnings", []):
        rows.append(["warning", w])
    if report.get("student_checkpoint"):
        rows.append(["fine-tuned student (evaluate with it)", report["student_checkpoint"]])
    if "seconds" in report:
        rows.append(["time / peak memory", f"{report['seconds']:.0f} s / {report.get('peak_rss_mb', 0):,.0f} MB"])
    print_table(f"ckv compress: {report['arch']} on {report['dataset']} -> {report['artifact']}", ["", "value"], rows)


def print_comparison(comparisons) -> None:
    """`ckv evaluate` with artifacts: one table per artifact (metrics with the delta's 95% CI), then fidelity,
    bytes and speed."""
    for c in comparisons:
        ctr = c.task == "ctr"
        v, dd = (5, 6) if ctr else (4, 4)  # digits of values (and CIs), of deltas
        rows = []
        for k, d in c.delta.items():
            ci = f"[{d['ci_low']:+.{v}f}, {d['ci_high']:+.{v}f}]"
            rows.append([k, f"{c.reference[k]:.{v}f}", f"{c.compressed[k]:.{v}f}", f"{d['delta']:+.{dd}f}", ci,
                         f"{d['relative']:+.2%}"])
        what = (f"test {c.fidelity.get('samples', 0):,} samples / {c.fidelity.get('users', 0):,} users, decoded from the "
                "artifact vs uncompressed" if ctr else "test split, all items ranked")
        print_table(f"{c.artifact}{f' ({c.codec})' if ctr else ''}: {c.users:,} users, {what} (95% CI: paired bootstrap)",
                    ["metric", "uncompressed", "compressed", "delta", "95% CI", "relative"], rows)
        f, a, s = c.fidelity, c.accounting, c.speed
        info = []
        if ctr:
            info.append(["largest change of a probability", f"{f.get('max_abs_prob_change', 0):.4f}"])
            if "signature_mismatch_rate" in f:
                info.append(["signature bits changed", f"{f['signature_mismatch_rate']:.3%}"])
        else:
            info += [["top-10 overlap with uncompressed", f"{f['top10_overlap']:.3f}"],
                     ["KL(uncompressed || compressed), mean", f"{f['kl_mean']:.4f}"],
                     ["hit@10 flips (gained / lost)", f"{f['hit10_flips']:,} ({f['hit10_gained']:,} / {f['hit10_lost']:,})"]]
        if a and "per_user_bytes" in a:
            pct = ".3%" if ctr else ".2%"
            info += [["bytes per token (all streams)", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
                     ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:{pct}} / {a['per_user_ratio_fp32']:{pct}}"],
                     ["shared (pools, routers, bases)", _human(a["shared_bytes"])],
                     ["total ratio vs fp16 / fp32", f"{a['total_ratio_fp16']:{pct}} / {a['total_ratio_fp32']:{pct}}"]]
        info.append(["metrics equal the compress report", "yes" if c.equals_compress_report else "no"])
        if s:
            info += [[f"rank next items of {s['users']} users: full fp16 cache in memory", f"{s['full_fp16_in_memory_s'] * 1e3:.1f} ms"],
                     ["  artifact, attention over the compressed form", f"{s['compressed_domain_s'] * 1e3:.1f} ms"],
                     ["  artifact, decoded then attended", f"{s['decode_then_attend_s'] * 1e3:.1f} ms"],
                     [f"  speed-up, compressed form (median of {s['repeats']}, {s['threads']} threads)", f"{s['speedup']:.2f}x"]]
        info.append(["time", f"{c.seconds:.1f} s"])
        print_table(f"{c.artifact}: fidelity, bytes, speed", ["", "value"], info)


_META_SHOWN = ("format", "task", "arch", "dataset", "codec", "params", "share", "codes", "seed", "calib_users", "checkpoint",
               "checkpoint_sha256", "data_fingerprint", "format_version", "ckv_version", "command", "shard", "engine")


def print_inspect_artifact(r: dict) -> None:
    meta = r["metadata"]
    what = "CTR artifact" if r.get("task") == "ctr" else "ckv artifact"
    print_table(f"{r['path']}: {what} of {meta.get('arch', '?')} on {meta.get('dataset', '?')}", ["key", "value"],
                [[k, meta[k] if isinstance(meta[k], str) else json.dumps(meta[k])] for k in _META_SHOWN if k in meta])
    print_table("tensors", ["name", "dtype", "shape", "bytes"],
                [[t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["bytes"]] for t in r["tensors"]])
    if "shards" in r:
        s = r["shards"]
        print_table(f"{s['count']} shards (users in index order) + shared tensors in {s['shared']['file']}",
                    ["file", "users", "first / last user id", "tokens", "bytes"],
                    [[f["file"], f"{f['users'][0]:,}..{f['users'][1] - 1:,}", f"{f['first_user_id']} / {f['last_user_id']}",
                      f"{f['tokens']:,}", f"{f['bytes']:,}"] for f in s["files"]])
    a = meta.get("accounting")
    if a:
        print_table("bytes (per-user part apart from the shared part)", ["", "value"], [
            ["users / cached tokens", f"{a['users']:,} / {a['tokens']:,}"],
            ["bytes per token (all layers)", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
            ["per-user bytes (all users)", _human(a["per_user_bytes"])],
            ["shared bytes (pools, routers, bases)", _human(a["shared_bytes"])],
            ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:.2%} / {a['per_user_ratio_fp32']:.2%}"],
            ["total ratio vs fp16 / fp32", f"{a['total_ratio_fp16']:.2%} / {a['total_ratio_fp32']:.2%}"],
            ["integrity", "ok" if not r["corrupted_tensors"] else f"{len(r['corrupted_tensors'])} tensor(s) do not match their checksum"]])
    m = meta.get("metrics")
    if isinstance(m, dict) and isinstance(m.get("delta"), dict) and isinstance(m.get("uncompressed"), dict):
        print_table("metrics measured by ckv compress (from the metadata)", ["metric", "uncompressed", "delta"],
                    [[k, m["uncompressed"].get(k, float("nan")), f"{v:+.5f}"] for k, v in m["delta"].items()
                     if isinstance(v, (int, float))])
    if r["pool_usage"]:
        print_table("pool utilisation", ["stream", "entries used", "entropy (bits)", "entropy / max", "top-10 share"],
                    [[s, f"{u['used']:,} / {u['pool_size']:,}", u["entropy_bits"], u["entropy_share"], u["top10_share"]]
                     for s, u in r["pool_usage"].items()])
        coded = {s: u for s, u in r["pool_usage"].items() if "index_bits" in u}
        if coded:
            print_table("item-coded indices", ["stream", "list position (bits)", "tokens escaped", "entries listed"],
                        [[s, u["index_bits"], f"{u['escape_rate']:.2%}", f"{u['list_entries']:,}"] for s, u in coded.items()])
    if "reconstruction_rel_error" in r:
        rows = [[s, e] for s, e in r["reconstruction_rel_error"].items()]
        if "signature_mismatch_rate" in r:
            rows.append(["signature bits changed", f"{r['signature_mismatch_rate']:.3%}"])
        print_table(f"reconstruction error against the teacher cache ({r['reconstruction_users']:,} users)",
                    ["stream", "relative squared error"], rows)
    bad = r["corrupted_tensors"]
    print(f"integrity: {'all tensors match their checksums' if not bad else f'{len(bad)} tensor(s) corrupted: ' + ', '.join(bad)}")


def print_inspect_checkpoint(r: dict) -> None:
    meta = r["metadata"]
    rows = [[k, meta[k] if isinstance(meta[k], str) else json.dumps(meta[k])]
            for k in ("arch", "config", "dataset", "data_fingerprint", "format_version", "ckv_version", "source")
            if k in meta]
    print_table(f"{r['path']}: ckv checkpoint ({r['n_items']:,} items)", ["key", "value"], rows)
    an = r.get("analysis")
    if not an:
        print("(add --data to analyse the checkpoint's caches)")
        return
    rows = []
    for name, s in an["streams"].items():
        top = s["energy_top"]
        rows.append([name, s["d"], top.get(1, float("nan")), top.get(8, float("nan")), s["components_for_90"],
                     s["components_for_99"], s["same_item_cosine"], s["random_pair_cosine"], s["unexplained_by_item"],
                     s["unexplained_by_item_position"], "yes" if s["item_function"] else "no"])
    print_table(f"cached K/V of {an['users']:,} users ({an['tokens']:,} tokens)",
                ["stream", "d", "top-1 var", "top-8 var", "PCs 90%", "PCs 99%", "same-item cos", "random cos",
                 "unexpl. item", "unexpl. item+pos", "item function"], rows)
    rows = [[name, m, e["rel_error"], *(e["after_user_dims"][k] for k in (1, 4, 8))]
            for name, s in an["streams"].items() for m, e in s.get("pool_errors", {}).items()]
    if rows:
        print_table("pool k-means relative error (then with r user dims)", ["stream", "pool", "r=0", "r=1", "r=4", "r=8"], rows)
    rec = an["recommendation"]
    if "pool_size" in rec:
        print(f"recommended: --pool-size {rec['pool_size']} --user-dim {rec['user_dim']} (estimated relative error "
              f"{rec['estimated_rel_error']:.3f} <= {an['target_rel_error']}; {rec['bytes_per_token']:.2f} B/token, "
              f"{rec['per_user_ratio_fp16']:.2%} of fp16); recompute from item ids: {', '.join(an['recompute_from_items']) or 'none'}")
    else:
        print(f"recommended: {rec['note']}")


def print_sweep(payload: dict) -> None:
    """`ckv evaluate --sweep`: one row per grid entry, sorted by per-user bytes, Pareto rows starred; refused and
    not-implemented entries after them with their reason."""
    from ckv_cli.evaluate.sweep import scope_line, verdict_line

    ref = payload["reference"]
    rows = []
    if payload.get("task") == "ctr":
        for r in payload["rows"]:
            if r["status"] != "ok":
                rows.append([r["spec"], r["status"], *[""] * 6, f"{r['seconds']:.1f}", ""])
                continue
            m = r["metrics"]
            rows.append([r["spec"], f"{r['bytes_per_token']:.2f}",
                         f"{r['per_user_ratio_fp16']:.2%} / {r['per_user_ratio_fp32']:.2%}", _human(r["shared_bytes"]),
                         _ci(m["AUC"], 5), _ci(m["gAUC"], 5), _ci(m["logloss"], 5), f"{r['max_abs_prob_change']:.4f}",
                         f"{r['seconds']:.1f}", "*" if r["pareto"] else ""])
        ref_txt = f"uncompressed AUC {ref['AUC']:.4f} / gAUC {ref['gAUC']:.4f}; " if ref else ""
        print_table(f"CTR sweep on {payload['dataset']}: {scope_line(payload)}; {ref_txt}deltas with 95% CI (paired "
                    "bootstrap); * = Pareto front (AUC delta vs per-user bytes)",
                    ["codec", "B/token", "per-user vs fp16 / fp32", "shared", "dAUC [95% CI]", "dgAUC [95% CI]",
                     "dlogloss [95% CI]", "max |dp|", "s", "Pareto"], rows)
    else:
        for r in payload["rows"]:
            if r["status"] != "ok":
                rows.append([r["spec"], r["status"], *[""] * 9, f"{r['seconds']:.1f}", ""])
                continue
            m = r["metrics"]
            rows.append([r["spec"], f"{r['bytes_per_token']:.2f}", f"{r['per_user_ratio_fp16']:.2%} / {r['per_user_ratio_fp32']:.2%}",
                         _human(r["shared_bytes"]), _ci(m["NDCG@10"]), _ci(m["HR@10"]), f"{m['NDCG@50']['delta']:+.4f}",
                         f"{m['MRR']['delta']:+.4f}", f"{r['top10_overlap']:.3f}", f"{r['kl_mean']:.4f}",
                         f"{r['hit10_flips']:,}", f"{r['seconds']:.1f}", "*" if r["pareto"] else ""])
        print_table(f"sweep on {payload['dataset']}: {payload['users']:,} users, {payload['tokens']:,} cached tokens, "
                    f"uncompressed NDCG@10 {ref['NDCG@10']:.4f} / HR@10 {ref['HR@10']:.4f}; deltas with 95% CI (paired "
                    f"bootstrap); * = Pareto front (NDCG@10 delta vs per-user bytes)",
                    ["codec", "B/token", "per-user vs fp16 / fp32", "shared", "dNDCG@10 [95% CI]", "dHR@10 [95% CI]",
                     "dNDCG@50", "dMRR", "top-10 overlap", "KL", "hit@10 flips", "s", "Pareto"], rows)
    for r in payload["rows"]:
        if r["status"] != "ok":
            print(f"{r['spec']}: {r['status']}: {r['message']}")
    if payload.get("task") == "ctr":
        print(verdict_line(payload))
        print(f"reference scores: {payload['teacher_seconds']:.1f} s; whole sweep: {payload['seconds']:.1f} s")
    else:
        print(f"teacher caches and reference scores: {payload['teacher_seconds']:.1f} s; whole sweep: {payload['seconds']:.1f} s")


def _ci(m: dict, digits: int = 4) -> str:
    return f"{m['delta']:+.{digits}f} [{m['ci_low']:+.{digits}f}, {m['ci_high']:+.{digits}f}]"
