"""PNG figures for `ckv inspect --plot` (matplotlib, an optional extra: `pip install 'ckv-cli[plot]'`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ckv_cli.errors import CkvError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CkvError("--plot needs matplotlib: pip install 'ckv-cli[plot]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    from ckv_cli.io.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    _pyplot().close(fig)
    return path


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def plot_spectrum(analysis: dict, title: str, path: Path) -> Path:
    """Cumulative variance share against the number of principal components, one line per stream."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, info in analysis["streams"].items():
        spec = np.asarray(info["spectrum"])
        ax.plot(np.arange(1, len(spec) + 1), spec, label=name, linestyle="-" if name.endswith("k") else "--")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.01)
    return _finish(fig, ax, title, "principal components", "share of variance", path)


def plot_pool_usage(usage: dict, title: str, path: Path) -> Path:
    """Tokens per pool entry, entries sorted from most to least used, one line per stream."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, u in usage.items():
        counts = np.sort(np.asarray(u["counts"]))[::-1]
        ax.plot(np.arange(1, len(counts) + 1), np.maximum(counts, 0.5), label=f"{name} ({u['used']}/{u['pool_size']} used)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, title, "pool entry (by rank)", "tokens", path)


def plot_sweep(rows: list[dict], title: str, path: Path, metric: str = "NDCG@10") -> Path:
    """`ckv evaluate --sweep --plot`: each row's `metric` delta (95% CI as error bars) against its per-user bytes
    per token, log x-axis; `collective` rows highlighted, the Pareto front drawn as a step line."""
    plt = _pyplot()
    ran = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5))
    codecs = sorted({r["codec"] for r in ran if r["codec"] != "collective"})
    palette = [plt.cm.tab10(i) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]  # no red: red is collective's
    colours = {c: palette[i % len(palette)] for i, c in enumerate(codecs)}
    for codec in codecs + ["collective"]:
        sel = [r for r in ran if r["codec"] == codec]
        if not sel:
            continue
        x = np.array([r["bytes_per_token"] for r in sel])
        m = [r["metrics"][metric] for r in sel]
        y = np.array([v["delta"] for v in m])
        err = np.array([[v["delta"] - v["ci_low"] for v in m], [v["ci_high"] - v["delta"] for v in m]])
        coll = codec == "collective"
        ax.errorbar(x, y, yerr=np.maximum(err, 0), fmt="*" if coll else "o", markersize=12 if coll else 6,
                    color="crimson" if coll else colours[codec], ecolor="crimson" if coll else colours[codec],
                    elinewidth=1.5 if coll else 0.8, capsize=3, label=codec, zorder=3 if coll else 2)
        for r, xi, yi in zip(sel, x, y):
            label = ",".join(f"{k}={v}" for k, v in r["params"].items()) or r["codec"]
            ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6,
                        color="crimson" if coll else "0.3")
    front = sorted((r for r in ran if r.get("pareto")), key=lambda r: r["bytes_per_token"])
    if front:
        ax.step([r["bytes_per_token"] for r in front], [r["metrics"][metric]["delta"] for r in front], where="post",
                color="0.5", linestyle="--", linewidth=0.8, label="Pareto front", zorder=1)
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_xlabel("per-user bytes per token (all layers, item ids included)")
    ax.set_ylabel(f"{metric} delta vs uncompressed (95% CI)")
    skipped = [f"{r['spec']} ({r['status']})" for r in rows if r["status"] != "ok"]
    if skipped:
        fig.text(0.01, 0.005, "not shown: " + "; ".join(skipped), fontsize=6, color="0.4", va="bottom")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
