"""Tables and progress for people (Rich, on a terminal) and for pipelines (plain text, JSON)."""
from __future__ import annotations

import json
import math
import os
import sys
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
    from ckv_cli.checkpoint import atomic_write

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
    """Yields `advance(n)`; draws a bar only on a terminal."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err_console, transient=False, disable=not err_console.is_terminal or bool(os.environ.get("CKV_NO_PROGRESS")))
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None):
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return str(n)


def print_compress(report: dict) -> None:
    """The table `ckv compress` ends with: bytes (both denominators) and accuracy before/after."""
    a, m = report["accounting"], report["metrics"]
    rows = [
        ["users / cached tokens", f"{a['users']:,} / {a['tokens']:,}"],
        ["full cache, fp16", _human(a["full_fp16_bytes"])],
        ["full cache, fp32", _human(a["full_fp32_bytes"])],
        ["compressed per-user (all users)", _human(a["per_user_bytes"])],
        ["  bytes per token (all layers)", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
        ["shared (pools, routers, bases)", _human(a["shared_bytes"])],
        ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:.2%} / {a['per_user_ratio_fp32']:.2%}"],
        ["total ratio vs fp16 / fp32", f"{a['total_ratio_fp16']:.2%} / {a['total_ratio_fp32']:.2%}"],
    ]
    for k in ("NDCG@10", "HR@10", "NDCG@50", "HR@50"):
        rows.append([f"{k}: uncompressed -> compressed",
                     f"{m['uncompressed'][k]:.4f} -> {m['compressed'][k]:.4f} ({m['delta'][k]:+.4f}, {m['relative_delta'][k]:+.2%})"])
    rows.append(["top-10 overlap with uncompressed", f"{m['fidelity']['top10_overlap']:.3f}"])
    rows.append(["users whose hit@10 flips", f"{m['fidelity']['hit10_flips']:,}"])
    if "seconds" in report:
        rows.append(["time / peak memory", f"{report['seconds']:.0f} s / {report.get('peak_rss_mb', 0):,.0f} MB"])
    print_table(f"ckv compress: {report['arch']} on {report['dataset']} -> {report['artifact']}", ["", "value"], rows)
