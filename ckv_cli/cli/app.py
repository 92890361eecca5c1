"""The `ckv` command line: a thin shell over the library (one function per command). The model says which task it
serves (`ckv_cli.tasks.task_of`); every command works the same way for every task."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ckv_cli import __version__
from ckv_cli.errors import CkvError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Compress the per-user KV caches of sequential recommenders.")

MAX_SEED = 2**32 - 1  # numpy's seeds


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _positive(value: float | None) -> float | None:
    """A finite number > 0 (Typer's `min` takes no open bound)."""
    if _finite(value) is not None and value <= 0:
        raise typer.BadParameter(f"Input should be greater than 0, got {value:g}")
    return value


DataOpt = Annotated[str, typer.Option("--data", "-d", help="Named dataset (ml-1m, ml-100k; ml-1m-ctr for the CTR task) or a log file (.csv, .tsv, .inter, ratings.dat, .parquet).")]
ColumnsOpt = Annotated[Optional[str], typer.Option("--columns", help="Column mapping for CSV/TSV logs, e.g. 'user=uid,item=movie,timestamp=ts,rating=stars'.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this path ('-' for stdout).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, max=4096, help="CPU threads [1..4096; default: every core this process may use, or OMP_NUM_THREADS where set].")]
SeedOpt = Annotated[int, typer.Option(min=0, max=MAX_SEED, help=f"Seed for every random choice [0..{MAX_SEED}].")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files (never an input of the command).")]


def parse_columns(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("user", "item", "timestamp", "rating"):
            raise CkvError(f"bad --columns entry '{part}': expected user=..., item=..., timestamp=..., rating=...")
        out[key.strip()] = value.strip()
    return out


def _version(value: bool):
    if value:
        print(f"ckv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False):
    pass


def _command() -> str:
    return " ".join(["ckv"] + sys.argv[1:])


def _inputs(*pairs) -> None:
    """Declare the command's input files to its output guard (`ckv_cli.io.guarded`): no output may be one of
    them, even with --force (same path, a hard link or a symlink; an index brings its shard files)."""
    from ckv_cli.io.guarded import current

    guard = current()
    if guard is None:
        return
    for what, path in pairs:
        if isinstance(path, (list, tuple)):  # (several artifacts: each named; the --data file and its side files)
            for p in path:
                guard.add_input(p, what if what == "the --data file" else f"{what} {p}")
        elif path is not None:
            guard.add_input(path, what)


def _data_files(data: str | None) -> list[Path]:
    """The files `--data` reads: a named dataset's cached files, or the log file and the side files its reader
    also reads (a RecBole `.item` beside an `.inter`, `movies.dat` beside a `.dat`)."""
    from ckv_cli.data.ctr import ctr_base
    from ckv_cli.data.datasets import DATASETS, cache_dir

    if not data:
        return []
    base = ctr_base(data) or data
    if base in DATASETS:
        return [cache_dir() / base / member for member in DATASETS[base].files]
    path = Path(base)
    side = {".inter": path.with_suffix(".item"), ".dat": path.with_name("movies.dat")}.get(path.suffix.lower())
    return [path] + ([side] if side is not None else [])


def _claim(path, force: bool, option: str) -> None:
    """Claim an output before any work: refused when it exists (without --force), is an input, is given to two
    options, is a directory or a device, or its directory cannot take it."""
    from ckv_cli.io.files import check_output

    check_output(path, force, option)


def _claim_plot(plot: Path | None, name: str | None, force: bool) -> None:
    """--plot DIR: a directory (created if missing) and the figure file it will hold."""
    from ckv_cli.io.guarded import current

    _check_plot_dir(plot)
    guard = current()
    if plot is None or guard is None:
        return
    guard.claim_dir(plot, "--plot")
    if name:
        guard.claim(Path(plot) / name, force, "--plot")


def _make_plot_dir(plot: Path) -> None:
    from ckv_cli.io.guarded import os_error

    try:
        plot.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, plot, "create the directory") from None


def _report_drops(ds) -> None:
    seq = getattr(ds, "seq", ds)
    if getattr(seq, "columns", None):
        print(f"note: {seq.name}: columns recognised by name: "
              + ", ".join(f"{role}={col}" for role, col in seq.columns.items()) + " (--columns overrides)",
              file=sys.stderr)
    _note_drops(seq.dropped_users, seq.dropped_events)


def _note_drops(users: int, events: int) -> None:
    if users or events:
        print(f"note: dropped {users:,} users with fewer than 3 events"
              + (f" and {events:,} events of items the checkpoint does not know" if events else ""), file=sys.stderr)


def _load(checkpoint: Path, data: str, columns: str | None):
    """(model, metadata, task, data read for that model: through its item vocabulary, unknown items dropped)."""
    from ckv_cli.models.checkpoint import load_checkpoint
    from ckv_cli.tasks import task_of

    model, meta = load_checkpoint(checkpoint)
    task = task_of(model)
    ds = task.load(data, parse_columns(columns), meta, model)
    _report_drops(ds)
    return model, meta, task, ds


def _check_device(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CkvError(f"--device {device} is not usable here: {str(e).splitlines()[0]}") from None


def _check_plot_dir(plot: Path | None) -> None:
    if plot is not None and plot.exists() and not plot.is_dir():
        raise CkvError(f"--plot {plot} exists and is not a directory")


# ---------------------------------------------------------------------------------------------- train


@app.command()
def train(
    arch: Annotated[str, typer.Option("--arch", help="Model: sasrec or hstu (next-item); sim, eta, sdim, twin or nohistory (CTR).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).")],
    epochs: Annotated[Optional[int], typer.Option(min=1, max=100000, help="Maximum epochs (early stopping on validation NDCG@10, or AUC for CTR) [next-item: 100, CTR: 1].")] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, max=100000, help="Epochs without a better validation metric before stopping [next-item: 5, CTR: 1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=1 << 20, help="Users (next-item) or samples (CTR) per step [128 / 256].")] = None,
    lr: Annotated[float, typer.Option(max=10.0, callback=_positive, help="Adam learning rate, > 0.")] = 1e-3,
    d: Annotated[int, typer.Option(min=1, max=65536, help="Model (embedding) width.")] = 64,
    layers: Annotated[int, typer.Option(min=1, max=1024, help="Attention layers (next-item models).")] = 2,
    max_len: Annotated[Optional[int], typer.Option(min=1, max=1 << 20, help="History window: tokens cached per user [next-item: 200, CTR: 1000].")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, callback=_finite, help="Dropout rate [next-item: 0.2, CTR: 0].")] = None,
    negatives: Annotated[int, typer.Option(min=0, max=1 << 20, help="Sampled-softmax negatives per position (0 = full softmax; next-item models).")] = 128,
    shared_negatives: Annotated[bool, typer.Option("--shared-negatives", help="Draw the negatives once per user, not per position (cheaper, weaker; next-item models).")] = False,
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="Validation (early stopping) and test ranking: without the history window's items (the published protocol) or with them (re-consumption logs; next-item models).")] = True,
    heads: Annotated[Optional[int], typer.Option(min=1, max=1024, help="Attention heads [next-item: 1, CTR: 8].")] = None,
    attn_dim: Annotated[int, typer.Option(min=1, max=65536, help="Target-attention width (CTR models).")] = 256,
    top_k: Annotated[Optional[int], typer.Option(min=1, max=1 << 20, help="Long-history tokens read per candidate (CTR) [50; TWIN 100].")] = None,
    train_samples: Annotated[int, typer.Option(min=0, help="CTR: train on this many training events, a seeded random subset (0 = all).")] = 0,
    device: Annotated[str, typer.Option(help="Torch device to train on: cpu, cuda, cuda:1, ...")] = "cpu",
    max_minutes: Annotated[float, typer.Option(min=0.0, callback=_finite, help="Wall-clock budget: stop after the epoch that passes it (0 = none).")] = 0.0,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (same arch and config; next-item models).")] = None,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing checkpoint (and --json file). An interrupted run then keeps it and saves its best epoch as OUT-stem.partial.safetensors.")] = False,
    json_out: JsonOpt = None,
):
    """Train a model with its published recipe and write a self-describing checkpoint. Nothing is written before
    training ends; an interrupt (Ctrl-C, SIGTERM, SIGHUP) after an epoch saves the best epoch so far, marked
    partial, and exits 128 + the signal; a loss that turns NaN stops with one line and writes nothing."""
    from ckv_cli.data.ctr import ctr_base
    from ckv_cli.models import REGISTRY, TASKS
    from ckv_cli.threads import set_threads

    if arch not in REGISTRY:
        raise CkvError(f"unknown --arch '{arch}' (choose from: {', '.join(REGISTRY)})")
    _inputs(("the --data file", _data_files(data)), ("the --init checkpoint", init))
    partial = out.with_name((out.stem if out.suffix else out.name) + ".partial.safetensors") if out.exists() else None
    _claim(out, force, "-o")
    _claim(json_out, force, "--json")
    if partial is not None:  # an interrupt keeps the old checkpoint and writes the best epoch so far beside it
        _claim(partial, True, "-o (partial)")
    _check_device(device)
    threads = set_threads(threads)  # the number in use, passed on to the training loop
    if TASKS[arch] == "ctr":
        if init is not None:
            raise CkvError("--init continues next-item models only")
        model_cfg = {"d": d, "d_attn": attn_dim, "n_heads": heads or 8, "max_len": max_len or 1000,
                     "dropout": dropout or 0.0, **({"top_k": top_k} if top_k else {})}
        _train_ctr(arch, data, out, columns, model_cfg, epochs or 1, patience or 1, batch_size or 256, lr,
                   train_samples, device, max_minutes, threads, seed, json_out, partial)
        return
    if (base := ctr_base(data)) is not None:
        raise CkvError(f"--data {data} is the CTR task; {arch} is a next-item model (use --data {base})")
    _train_next_item(arch, data, out, columns, init, epochs or 100, patience or 5, batch_size or 128, lr,
                     {"d": d, "n_layers": layers, "max_len": max_len or 200, "dropout": 0.2 if dropout is None else dropout,
                      **({"n_heads": heads} if heads else {})},
                     negatives, shared_negatives, device, max_minutes, threads, seed, json_out, exclude_seen, partial)


def _stopped(metrics: dict, max_minutes: float) -> str:
    return f", stopped by --max-minutes {max_minutes:g}" if metrics.get("time_budget_spent") else ""


def _train_next_item(arch, data, out, columns, init, epochs, patience, batch_size, lr, model_cfg, negatives,
                     shared_negatives, device, max_minutes, threads, seed, json_out, exclude_seen=True,
                     partial=None) -> None:
    from ckv_cli.cli.render import print_table, progress, write_json
    from ckv_cli.data import load
    from ckv_cli.train.next_item import TrainConfig, model_config, train_to_checkpoint

    init_state = None
    if init is not None:
        from ckv_cli.models.checkpoint import load_checkpoint

        init_model, init_meta = load_checkpoint(init)
        if init_meta["arch"] != arch:
            raise CkvError(f"--init {init} is a {init_meta['arch']} checkpoint, not {arch}")
        init_state = init_model.state_dict()
        model_cfg.update({k: init_meta["config"][k] for k in ("d", "n_layers", "max_len", "n_heads")})
    model_config(arch, 1, model_cfg)  # refuse a bad config before reading any data
    ds = load(data, parse_columns(columns))
    _report_drops(ds)
    if init is not None and init_meta.get("data_fingerprint") != ds.fingerprint:
        raise CkvError(f"--init {init} was trained on other data (fingerprint {init_meta.get('data_fingerprint')}, "
                       f"this data {ds.fingerprint})")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, n_negatives=negatives, patience=patience,
                      seed=seed, model=model_cfg, device=device, shared_negatives=shared_negatives,
                      max_seconds=max_minutes * 60, threads=threads, exclude_seen=exclude_seen)
    steps = -(-int((ds.lengths() >= 4).sum()) // batch_size)  # users with two or more training events
    with progress(f"train {arch}", total=epochs * steps) as advance:
        metrics, history = train_to_checkpoint(
            ds, arch, cfg, out, command=_command(), init_state=init_state, on_step=advance,
            on_epoch=lambda e, loss, val: advance(0, f"epoch {e} loss {loss:.3f} val NDCG@10 {val:.4f}"),
            partial_out=partial)
    test, seconds = metrics["test"], metrics["train_seconds"]
    print_table(f"{arch} on {ds.name}: test (all items ranked{', seen items too' if not exclude_seen else ''})",
                ["metric", "value"], [[k, v] for k, v in test.items()])
    print(f"wrote {out} ({metrics['epochs']} epochs, best {metrics['best_epoch']}, {seconds:.0f} s"
          f"{_stopped(metrics, max_minutes)})")
    write_json(json_out, {"checkpoint": str(out), "arch": arch, "dataset": ds.name, **metrics, "history": history})


def _train_ctr(arch, data, out, columns, model_cfg, epochs, patience, batch_size, lr, train_samples, device,
               max_minutes, threads, seed, json_out, partial=None) -> None:
    from ckv_cli.cli.render import print_table, progress, write_json
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.train.ctr import CTRTrainConfig, model_config, train_ctr_to_checkpoint

    model_config(arch, 1, 1, 1, model_cfg)  # refuse a bad config before reading any data
    ds = load_ctr(data, parse_columns(columns), max_history=model_cfg["max_len"])
    _report_drops(ds)
    cfg = CTRTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, threads=threads,
                         device=device, max_seconds=max_minutes * 60, train_samples=train_samples, model=model_cfg)
    n = min(train_samples or len(ds.samples("train")), len(ds.samples("train")))
    with progress(f"train {arch}", total=epochs * -(-n // batch_size)) as advance:
        metrics, history = train_ctr_to_checkpoint(
            ds, arch, cfg, out, command=_command(), on_step=advance,
            on_epoch=lambda h: advance(0, f"epoch {h['epoch']} loss {h['loss']:.4f} val AUC {h['valid_AUC']:.4f}"),
            partial_out=partial)
    print_table(f"{arch} on {ds.name}: test ({metrics['test']['samples']:,} samples)", ["metric", "value"],
                [[k, v] for k, v in metrics["test"].items()])
    print(f"wrote {out} ({metrics['epochs']} epochs, best {metrics['best_epoch']}, {metrics['train_seconds']:.0f} s"
          f"{_stopped(metrics, max_minutes)})")
    write_json(json_out, {"checkpoint": str(out), "arch": arch, "dataset": ds.name, **metrics, "history": history})


# ---------------------------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `ckv train`.")],
    artifacts: Annotated[Optional[list[Path]], typer.Argument(help="Artifacts written by `ckv compress` from this checkpoint.")] = None,
    data: DataOpt = "",
    split: Annotated[str, typer.Option(help="test or valid (artifacts hold test-time caches: test only).")] = "test",
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="Remove the items of the user's history window from the ranking (the published protocol) or rank them too (next-item models).")] = True,
    bootstrap: Annotated[int, typer.Option(min=0, max=1000000, help="Paired-bootstrap resamples over users for the CI of each delta.")] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the bootstrap (with --sweep also of calibration and fitting).")] = 0,
    max_delta: Annotated[Optional[list[str]], typer.Option("--max-delta", help="Gate: METRIC=DROP, absolute (NDCG@10=0.005) or relative (NDCG@10=1%); repeatable; logloss=... gates a rise. Exit 1 when exceeded.")] = None,
    max_delta_ci: Annotated[Optional[list[str]], typer.Option("--max-delta-ci", help="Gate on the noise: METRIC=DROP; exit 1 unless the 95% CI of the change rules out a drop larger than DROP (its worse end decides; repeatable).")] = None,
    max_ratio: Annotated[Optional[float], typer.Option("--max-ratio", min=0.0, callback=_finite, help="Gate: largest allowed per-user bytes as a fraction of the fp16 full cache (0.02 = 2%).")] = None,
    min_overlap: Annotated[Optional[float], typer.Option("--min-overlap", min=0.0, max=1.0, callback=_finite, help="Gate: smallest allowed top-10 overlap with the uncompressed model's ranking [0..1] (next-item).")] = None,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", min=0.0, callback=_finite, help="Gate: largest allowed mean KL divergence from the uncompressed next-item distribution (next-item).")] = None,
    speed_batch: Annotated[int, typer.Option(min=1, max=1 << 20, help="Users in the batch timed for speed (next-item models).")] = 256,
    repeats: Annotated[int, typer.Option(min=1, max=10000, help="Timed repeats for speed (median reported).")] = 5,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Compress and evaluate a grid of codecs on this checkpoint, writing no artifact: 'default' or 'codec[:KEY=VALUE,...];...', e.g. 'collective:pool_size=1024;int4:group_size=64;pq:subvectors=8,bits=8'.")] = None,
    calib_users: Annotated[Optional[int], typer.Option(min=1, max=1 << 30, help="With --sweep: users whose caches fit each codec (seeded sample; default 1000).")] = None,
    sweep_users: Annotated[Optional[int], typer.Option("--sweep-users", min=0, max=1 << 30, help="With --sweep on a CTR model: score the test samples of this many seeded test users (default 1500; 0 = all).")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="With --sweep: also write the table as CSV to this path.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --sweep: write a PNG of the Pareto metric's delta against bytes per token into this directory (needs ckv-cli[plot]).")] = None,
    threads: ThreadsOpt = None,
    columns: ColumnsOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
):
    """Evaluate a checkpoint, and each artifact against it: metrics, deltas with 95% CI, fidelity, bytes, speed.
    With --sweep: compress and evaluate a grid of codecs and budgets on the checkpoint in one run (no artifact)."""
    from ckv_cli.cli.render import print_table, progress, write_json
    from ckv_cli.evaluate.compare import Gates, check_gates, gate_warnings
    from ckv_cli.models.checkpoint import load_checkpoint
    from ckv_cli.tasks import CTR, task_of
    from ckv_cli.threads import set_threads

    if not data:
        raise CkvError("missing option '--data'")
    _inputs(("the checkpoint", checkpoint), ("the --data file", _data_files(data)), ("the artifact", artifacts or []))
    _claim(json_out, force, "--json")
    if sweep is not None:
        _claim(csv_out, force, "--csv")
        _claim_plot(plot, checkpoint.stem + ".sweep.png", force)
    set_threads(threads)
    model, meta = load_checkpoint(checkpoint)
    task = task_of(model)
    gates = Gates(max_delta or [], max_delta_ci or [], max_ratio, min_overlap, max_kl)
    gated = bool(gates)
    artifacts = artifacts or []
    if sweep_users is not None and task is not CTR:
        raise CkvError("--sweep-users goes with --sweep on a CTR model (a next-item sweep scores every user)")
    if sweep is not None:
        _sweep(model, meta, task, checkpoint, data, columns, sweep, artifacts, split, exclude_seen, gated, bootstrap,
               seed, calib_users, sweep_users, json_out, csv_out, plot)
        return
    if csv_out is not None or plot is not None or calib_users is not None:
        raise CkvError("--csv, --plot and --calib-users go with --sweep")
    if task is not CTR and split not in ("test", "valid"):
        raise CkvError(f"unknown --split '{split}' (choose test or valid)")
    if artifacts and task is CTR and split != "test":
        raise CkvError("artifacts are compared on the test split (drop --split)")
    if artifacts and task is not CTR and split != "test":
        raise CkvError("artifacts are compared on the test split (drop --split)")
    gates.check(task)
    if gated and not artifacts:
        raise CkvError("--max-delta, --max-delta-ci, --max-ratio, --min-overlap and --max-kl gate artifacts: name at "
                       "least one artifact")
    if artifacts:
        comparisons, ds = _compare(model, task, checkpoint, data, columns, meta, artifacts, bootstrap, seed,
                                   speed_batch, repeats, exclude_seen)
        seen = _seen_note(task, model, ds, exclude_seen)
        failures = check_gates(comparisons, gates)
        warnings = gate_warnings(comparisons, gates)
        write_json(json_out, {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name,
                              "comparisons": [c.as_dict() for c in comparisons], "targets_in_window": seen,
                              "gates": {**gates.as_dict(), "failures": failures, "warnings": warnings}})
        for line in warnings:
            print(f"ckv: {line}", file=sys.stderr)
        for line in failures:
            print(f"ckv: {line}", file=sys.stderr)
        if failures:
            raise typer.Exit(1)
        return
    ds = task.load(data, parse_columns(columns), meta, model)
    _report_drops(ds)
    seen = _seen_note(task, model, ds, exclude_seen)
    t = time.time()
    with progress("evaluate", total=task.n_eval(ds, split)) as advance:
        metrics = task.evaluate(model, ds, split, exclude_seen, progress=advance)
    if task is CTR:
        title = f"{meta['arch']} on {ds.name}: {split} ({metrics['samples']:,} samples, {metrics['users']:,} users)"
        payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name, "split": split,
                   "metrics": metrics, "seconds": round(time.time() - t, 2)}
    else:
        title = (f"{meta['arch']} on {ds.name}: {split} ({ds.n_users:,} users, all {ds.n_items:,} items ranked"
                 f"{', history window excluded' if exclude_seen else ', seen items ranked too'})")
        payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name, "split": split,
                   "exclude_seen": exclude_seen, "users": ds.n_users, "metrics": metrics,
                   "targets_in_window": seen, "seconds": round(time.time() - t, 2)}
    print_table(title, ["metric", "value"], [[k, v] for k, v in metrics.items()])
    write_json(json_out, payload)


SEEN_NOTE = 0.2  # a share of test targets inside the history window worth a note


def _seen_note(task, model, ds, exclude_seen: bool) -> float | None:
    """The share of test targets that lie in their history window (next-item); a note on stderr when it is large
    enough that the protocol decides the numbers."""
    share = task.seen_share(model, ds)
    if share is not None and share >= SEEN_NOTE:
        advice = ("they cannot be ranked with the history window excluded: --include-seen ranks them" if exclude_seen
                  else "--exclude-seen (the published protocol) would leave them unrankable")
        print(f"note: {share:.0%} of the test targets are items of their own history window (a re-consumption "
              f"log?); {advice}", file=sys.stderr)
    return share


def _compare(model, task, checkpoint, data, columns, meta, paths, bootstrap, seed, speed_batch, repeats,
             exclude_seen=True):
    """Each artifact against the checkpoint, refused before any work (and before the data is read) when made from
    another checkpoint or damaged on disk."""
    from ckv_cli.artifact.sharded import open_artifact
    from ckv_cli.cli.render import print_comparison, progress
    from ckv_cli.evaluate.compare import compare_artifact
    from ckv_cli.io.files import sha256_file

    sha = sha256_file(checkpoint)
    opened = []
    try:
        for p in paths:
            art = open_artifact(p)
            opened.append(art)
            art.check_source(sha)
            art.check_model(model)
            bad = art.verify()
            if bad:
                raise CkvError(f"{art.path}: tensor '{bad[0]}' does not match its checksum (damaged on disk?)")
        ds = task.load(data, parse_columns(columns), meta, model)
        _report_drops(ds)
        comparisons = []
        for art in opened:
            with progress(f"evaluate {art.path.name}", total=art.n_users) as advance:
                comparisons.append(compare_artifact(model, ds, art, bootstrap=bootstrap, seed=seed,
                                                    speed_batch=speed_batch, repeats=repeats, advance=advance,
                                                    exclude_seen=exclude_seen))
    finally:
        for art in opened:
            art.close()
    print_comparison(comparisons)
    return comparisons, ds


def _sweep(model, meta, task, checkpoint, data, columns, spec, artifacts, split, exclude_seen, gated, bootstrap, seed,
           calib_users, sweep_users, json_out, csv_out, plot) -> None:
    from ckv_cli.cli.render import print_sweep, progress, write_json
    from ckv_cli.evaluate.sweep import parse_task_sweep, run_sweep, write_csv
    from ckv_cli.tasks import CTR
    from ckv_cli.tasks.ctr import DEFAULT_SWEEP_USERS, sweep_users as pick_users

    if gated:
        raise CkvError("--sweep takes no gates (--max-delta, --max-ratio): gate one artifact of `ckv compress` instead")
    if artifacts:
        raise CkvError("--sweep compresses the checkpoint itself: name no artifacts")
    if task is CTR and split != "test":
        raise CkvError("--sweep evaluates on the test split (drop --split)")
    if task is not CTR and (split != "test" or not exclude_seen):
        raise CkvError("--sweep evaluates on the test split, seen items excluded (drop --split/--include-seen)")
    specs = parse_task_sweep(spec, task)  # (the outputs were claimed when the command started)
    ds = task.load(data, parse_columns(columns), meta, model)
    _report_drops(ds)
    n_users = DEFAULT_SWEEP_USERS if sweep_users is None else sweep_users
    per_spec = len(pick_users(ds, n_users, seed)) if task is CTR else len(task.user_ids(ds))
    total = per_spec * len(specs) + (0 if task is CTR else per_spec)
    with progress("sweep", total=total) as advance:
        payload = run_sweep(model, ds, specs, calib_users=calib_users or 1000, seed=seed, bootstrap=bootstrap,
                            users=n_users, advance=advance, on_spec=lambda label: advance(0, label))
    payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], **payload}
    print_sweep(payload)
    write_json(json_out, payload)
    write_csv(csv_out, payload)
    if plot is not None:
        from ckv_cli.evaluate.plots import plot_sweep

        _make_plot_dir(plot)
        metric = task.pareto_metric
        title = f"{meta['arch']} ({checkpoint.name}) on {ds.name}: {metric} delta vs per-user bytes"
        print(f"wrote {plot_sweep(payload['rows'], title, plot / (checkpoint.stem + '.sweep.png'), metric=metric)}")


# ---------------------------------------------------------------------------------------------- compress


def _pool_size(value: str | None):
    """--pool-size: None, 'auto', 'balanced', or an integer in [2, 2**24]."""
    if value is None or value.strip().lower() in ("auto", "balanced"):
        return None if value is None else value.strip().lower()
    try:
        n = int(value)
    except ValueError:
        raise CkvError(f"--pool-size takes an integer, auto or balanced, got {value!r}") from None
    if not 2 <= n <= 1 << 24:
        raise CkvError(f"--pool-size must be between 2 and {1 << 24}, got {n}")
    return n


@app.command()
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `ckv train`.")],
    data: DataOpt,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact to write (.safetensors; an index .json with --shard-size, --shards or --engine ray).")] = None,
    codec: Annotated[Optional[str], typer.Option(help="Compression method (collective, predictive, recompute, plain, bf16, int8, int4, lowrank, pq, itemid: docs/baselines.md); recompute (eventid) stores the ids a stream is a function of [next-item models: predictive, or collective with --user-dim, --layout or --user-dtype; CTR models: collective].", show_default=False)] = None,
    pool_size: Annotated[Optional[str], typer.Option(help="Global pool entries per stream (collective, predictive); auto: per stream the size with the least total bytes whose held-out reconstruction error is <= 0.10; balanced: the largest pool (64 to 8192) whose entries take no more bytes than its indices over the log's tokens, halved while that keeps the per-user bytes within 1% of fp16 (next-item models; docs/fidelity.md) [next-item models balanced (8192 when the workers read a Parquet dataset), CTR models 4096].")] = None,
    user_dim: Annotated[int, typer.Option(min=0, max=65535, help="User-specific dims per token per stream (collective).")] = 0,
    layout: Annotated[str, typer.Option(help="residual (pool + low-rank basis) or concat (the paper's).")] = "residual",
    user_dtype: Annotated[str, typer.Option(help="Storage of the user dims: int8 (per-user scale) or fp16.")] = "int8",
    share: Annotated[str, typer.Option(help="Streams to pool: k, v or k,v (the others stay fp16).")] = "k,v",
    recompute_item_layers: Annotated[bool, typer.Option(help="Recompute first-layer K/V from item ids instead of storing them (next-item models).")] = True,
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="The report's ranking protocol: without the history window's items (published) or with them (next-item models).")] = True,
    calib_users: Annotated[int, typer.Option(min=1, max=1 << 30, help="Users whose caches fit the pool (seeded sample).")] = 1000,
    target: Annotated[Optional[str], typer.Option("--target", help="Search codec, pool size, user dims and layout on held-out calibration users and keep the smallest total size meeting this, e.g. overlap=0.9, kl=0.02, NDCG@10=1% (relative drop) or HR@10=0.005 (absolute); prints the settings tried (next-item models; replaces --codec, --pool-size, --user-dim, --layout).")] = None,
    calib_holdout: Annotated[Optional[bool], typer.Option("--calib-holdout/--calib-in-sample", show_default=False, help="Calibrate on at most half the users (min(--calib-users, users // 2)), so that the report's held-out metrics and reconstruction error cover at least half of them, or on up to --calib-users of all users (next-item models) [one artifact file: --calib-holdout; sharded output draws its own sample].")] = None,
    batch_users: Annotated[int, typer.Option(min=1, max=1 << 20, help="Users encoded per batch (bounds memory).")] = 256,
    distill_steps: Annotated[int, typer.Option(min=0, max=1 << 30, help="Distillation steps after the gradient-free initialisation (0 = none; next-item models).")] = 0,
    finetune: Annotated[bool, typer.Option("--finetune", help="With --distill-steps: fine-tune a copy of the model too; it reads the artifact and is written beside it as OUT.student.safetensors (evaluate the artifact with that checkpoint).")] = False,
    engine: Annotated[str, typer.Option(help="Where users are encoded: local (this process) or ray (a Ray Data job; needs ckv-cli[ray]). ray writes shards, like --shard-size.")] = "local",
    shard_size: Annotated[Optional[int], typer.Option(min=1, help="Write shards of this many users (a multiple of --batch-users; contiguous ranges of the user order) and an index: -o NAME.index.json. Default with --engine ray: 65536.")] = None,
    shards: Annotated[Optional[int], typer.Option(min=1, max=1 << 20, help="Write this many shards, users assigned by a hash of their id (docs/scale-out.md), and an index: -o NAME.index.json. With --engine ray and a Parquet dataset (a directory or glob of .parquet files) the log is read on the workers.")] = None,
    update: Annotated[Optional[Path], typer.Option(help="Append the new events in --data to this artifact (an index .json or one file) through its own plan, rewriting only what holds touched users (docs/scale-out.md).")] = None,
    address: Annotated[Optional[str], typer.Option(help="With --engine ray: the Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=1 << 16, help="With --engine ray: encoding actors (one CPU, one model and plan each).")] = 2,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="Codec parameter KEY=VALUE for any codec, repeatable (e.g. --codec pq --param subvectors=16 --param bits=8; CTR models also codes=stored|derived, calib_tokens=N, bootstrap=N).")] = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing artifact (and --json file; a sharded one is replaced as a unit).")] = False,
    json_out: JsonOpt = None,
):
    """Distil a checkpoint's per-user KV caches into a shared pool plus small per-user codes."""
    from ckv_cli.cli.render import progress
    from ckv_cli.models.checkpoint import load_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact, parse_params, student_path
    from ckv_cli.tasks import CTR, task_of
    from ckv_cli.threads import set_threads

    _inputs(("the checkpoint", checkpoint), ("the --data file", _data_files(data)))
    set_threads(threads)
    sharded = engine != "local" or shard_size is not None or shards is not None
    if checkpoint.is_file() and _task_name(checkpoint) == CTR.name:
        given = [k for k, v in {"--engine": engine != "local", "--shard-size": shard_size is not None,
                                "--shards": shards is not None, "--update": update is not None,
                                "--address": address is not None, "--distill-steps": distill_steps > 0,
                                "--finetune": finetune, "--no-recompute-item-layers": not recompute_item_layers,
                                "--include-seen": not exclude_seen,
                                "--calib-holdout" if calib_holdout else "--calib-in-sample": calib_holdout is not None}.items() if v]
        if given:
            raise CkvError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to next-item models; "
                           f"{checkpoint} is a CTR model")
    if update is not None:
        plan_given = {k: v for k, v in {"codec": codec, "pool_size": _pool_size(pool_size),
                                        "user_dim": user_dim or None, "layout": layout if layout != "residual" else None,
                                        "user_dtype": user_dtype if user_dtype != "int8" else None,
                                        "share": [x.strip() for x in share.split(",") if x.strip()] if share != "k,v" else None,
                                        "recompute_item_layers": False if not recompute_item_layers else None}.items()
                      if v is not None}
        plan_given.update(parse_params(param or []))
        others = [k for k, v in {"-o": out is not None, "--engine": engine != "local", "--shard-size": shard_size is not None,
                                 "--shards": shards is not None, "--address": address is not None,
                                 "--distill-steps": distill_steps > 0, "--finetune": finetune}.items() if v]
        if others:
            raise CkvError(f"--update rewrites the artifact in place, in this process, with its own plan: drop {', '.join(others)}")
        return _compress_update(checkpoint, update, data, columns, plan_given, batch_users, json_out, force)
    if out is None:
        raise CkvError("Missing option '--out' / '-o'.")
    if shards is not None and shard_size is not None:
        raise CkvError("--shards (users by hash) and --shard-size (users by range) both choose the shard assignment: give one")
    if finetune and distill_steps <= 0:
        raise CkvError("--finetune needs --distill-steps > 0 (the model trains during distillation)")
    goal = None
    if target is not None:
        from ckv_cli.pipeline.target import parse_target

        if sharded:
            raise CkvError("--target writes one artifact: it does not go with --engine ray, --shard-size or --shards yet")
        goal = parse_target(target)
    if calib_holdout is None:
        calib_holdout = not sharded  # the users reported are held out of calibration wherever the log allows
    elif calib_holdout and sharded:
        raise CkvError("--calib-holdout writes one artifact: sharded output (--engine ray, --shard-size, --shards) draws its own calibration sample")
    if finetune and sharded:
        raise CkvError("--finetune writes one artifact: it does not go with --engine ray, --shard-size or --shards yet")
    if engine not in ("local", "ray"):
        raise CkvError(f"unknown --engine '{engine}' (choose local or ray)")
    if engine == "ray":
        from ckv_cli.pipeline.ray_engine import require_ray

        require_ray()
    if address is not None and engine != "ray":
        raise CkvError("--address goes with --engine ray")
    if sharded:
        from ckv_cli.artifact.sharded import DEFAULT_SHARD_USERS, is_index

        shard_size = shard_size or DEFAULT_SHARD_USERS  # (--shards assigns by hash: the size is not read)
        if not is_index(out):
            raise CkvError(f"sharded output is an index: -o must end with .json (e.g. NAME.index.json), got {out}")
    _claim(out, force, "-o")
    _claim(json_out, force, "--json")
    if finetune:
        _claim(student_path(out), force, "--finetune student")
    pool = _pool_size(pool_size)
    model, meta = load_checkpoint(checkpoint)
    task = task_of(model)
    from ckv_cli.pipeline.defaults import default_params
    from ckv_cli.pipeline.sizing import BALANCED

    codec, params = default_params(model, task, codec, pool, user_dim, layout, user_dtype, recompute_item_layers)
    params.update(parse_params(param or []))
    extra = {}
    if task is CTR:
        extra = {k: params.pop(k) for k in ("codes", "calib_tokens", "bootstrap") if k in params}
        for k in ("calib_tokens", "bootstrap"):
            if k in extra and (type(extra[k]) is not int or extra[k] < (1 if k == "calib_tokens" else 0)):
                raise CkvError(f"--param {k} must be an integer >= {1 if k == 'calib_tokens' else 0}, got {extra[k]!r}")
    opts = CompressOptions(codec=codec, params=params, share=tuple(s.strip() for s in share.split(",") if s.strip()),
                           recompute_item_layers=recompute_item_layers, calib_users=calib_users,
                           batch_users=batch_users, distill_steps=distill_steps, finetune=finetune, seed=seed,
                           exclude_seen=exclude_seen, calib_holdout=calib_holdout and task is not CTR, **extra)
    from ckv_cli.pipeline.compress import make_plan

    make_plan(model, opts)  # refuse bad options before the data is read
    if engine == "ray" and shards is not None and task is not CTR:
        from ckv_cli.pipeline.ray_read import compress_distributed, dataset_files

        if dataset_files(data) is not None:  # read on the workers: the driver never holds the log
            if opts.params.get("pool_size") == BALANCED:  # nor counts its tokens: the task's fixed default
                from dataclasses import replace

                opts = replace(opts, params={**opts.params, "pool_size": task.default_pool})
            t = time.time()
            with progress("compress", total=None) as advance:
                report = compress_distributed(model, meta, checkpoint, data, parse_columns(columns), opts, out, shards,
                                              workers=workers, address=address, force=force, advance=advance,
                                              command=_command(),
                                              on_stream=lambda name: advance(0, f"fitting {name}"))
            _note_drops(report["read"]["dropped_users"], report["read"]["dropped_events"])
            return _finish_compress(report, t, json_out)
    ds = task.load(data, parse_columns(columns), meta, model)
    _report_drops(ds)
    t = time.time()
    searched = None
    if goal is not None:
        from ckv_cli.cli.render import print_target_search
        from ckv_cli.pipeline.target import target_options

        with progress("target search", total=None) as advance:
            opts, searched = target_options(model, ds, opts, goal, progress=lambda label: advance(0, label))
        print_target_search(searched)
    with progress("compress", total=len(task.user_ids(ds))) as advance:
        if sharded:
            from ckv_cli.pipeline.shard import compress_sharded

            report = compress_sharded(model, meta, checkpoint, ds, opts, out, shard_size, engine=engine,
                                      workers=workers, address=address, force=force, advance=advance, n_shards=shards,
                                      command=_command(), on_stream=lambda name: advance(0, f"fitting {name}"))
        else:
            report = compress_to_artifact(model, meta, checkpoint, ds, opts, out, force=force, advance=advance,
                                          command=_command(), on_stream=lambda name: advance(0, f"fitting {name}"))
    _finish_compress(report, t, json_out, searched)


def _finish_compress(report: dict, t0: float, json_out: Path | None, searched: list | None = None) -> None:
    """The compress report's run time and peak memory, the target search when there was one; printed and --json."""
    from ckv_cli.cli.render import print_compress, write_json

    report["seconds"] = round(time.time() - t0, 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if searched is not None:
        report["target_search"] = searched
    print_compress(report)
    write_json(json_out, report)


def _compress_update(checkpoint: Path, artifact: Path, data: str, columns: str | None, plan_given: dict,
                     batch_users: int, json_out: Path | None, force: bool) -> None:
    """`ckv compress --update`: the new events appended through the artifact's plan (`ckv_cli.serve.update`)."""
    from ckv_cli.cli.render import print_update, progress, write_json
    from ckv_cli.models.checkpoint import load_checkpoint
    from ckv_cli.serve.update import load_new_events, update_artifact

    _claim(artifact, True, "--update")  # rewritten in place (replaced as a unit): no other output may be it
    _claim(json_out, force, "--json")
    model, meta = load_checkpoint(checkpoint)
    new = load_new_events(data, parse_columns(columns), meta.get("item_vocab"))
    if new.dropped_events:
        print(f"note: dropped {new.dropped_events:,} new events of items the checkpoint does not know", file=sys.stderr)
    with progress("update", total=len(new.user_ids)) as advance:
        report = update_artifact(model, checkpoint, artifact, new, plan_given, batch_users, command=_command(),
                                 data_name=data, advance=advance)
    print_update(report)
    write_json(json_out, report)


# ---------------------------------------------------------------------------------------------- inspect, verify


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An artifact (ckv compress): one file, an index (.json) of shards or one shard; or a checkpoint (ckv train).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Dataset: reconstruction error of an artifact; the cache analysis of a next-item checkpoint.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="The artifact's checkpoint (default: the path in its metadata).")] = None,
    users: Annotated[int, typer.Option(min=1, max=1 << 30, help="Users sampled for the analysis / reconstruction error.")] = 500,
    seed: SeedOpt = 0,
    target_error: Annotated[float, typer.Option(callback=_positive, help="Held-out relative error (> 0) the recommended pool size and user dim must reach (a rule of thumb: on the sample checkpoints, pools of 4096-8192 at ~0.2 kept NDCG@10 within 0.4-1.6%).")] = 0.25,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write PNG figures into this directory (needs ckv-cli[plot]).")] = None,
    threads: ThreadsOpt = None,
    columns: ColumnsOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
):
    """Explain an artifact (tensors, bytes, pool use, integrity) or analyse a checkpoint's caches."""
    from ckv_cli.threads import set_threads

    _inputs(("the inspected file", path), ("the --checkpoint", checkpoint), ("the --data file", _data_files(data)))
    _check_plot_dir(plot)
    set_threads(threads)
    if not path.exists():
        raise CkvError(f"not found: {path}")
    kind = _file_kind(path)
    if kind == "artifact" and data and checkpoint is None:  # the checkpoint its metadata names is read too
        _inputs(("the artifact's checkpoint", _artifact_checkpoint(path)))
    _claim(json_out, force, "--json")
    _claim_plot(plot, path.stem + (".pool_usage.png" if kind == "artifact" else ".spectrum.png"), force)
    if kind == "artifact":
        ok = _inspect_artifact(path, data, checkpoint, users, seed, plot, columns, json_out)
    else:
        _inspect_checkpoint(path, data, users, seed, target_error, plot, columns, json_out)
        ok = True
    if not ok:
        raise typer.Exit(1)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="An artifact: the index (.json) of a sharded one, or one file.")],
    json_out: JsonOpt = None,
    force: ForceOpt = False,
):
    """Check an artifact on disk: each shard's and the shared file's sha256 against the index, every header,
    every tensor's checksum, and that every user appears exactly once. Prints what differs; exit 1 on any problem."""
    from ckv_cli.artifact.sharded import verify_path
    from ckv_cli.cli.render import write_json

    _inputs(("the verified artifact", path))
    _claim(json_out, force, "--json")
    if not path.exists():
        raise CkvError(f"not found: {path}")
    problems, summary = verify_path(path)
    for line in problems:
        print(f"FAILED {line}")
    what = (f"{summary['shards']} shards + shared file" if "shards" in summary else "1 file")
    print(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: {path} ({what}, {summary['users']:,} users, "
          f"{summary['tokens']:,} tokens)")
    write_json(json_out, {"path": str(path), "ok": not problems, "problems": problems, **summary})
    if problems:
        raise typer.Exit(1)


def _task_name(checkpoint: Path) -> str:
    """The task of a checkpoint's model, from its metadata alone (the arch's registered task)."""
    from ckv_cli.models import TASKS
    from ckv_cli.models.checkpoint import read_metadata

    return TASKS.get(read_metadata(checkpoint).get("arch"), "next-item")


def _artifact_checkpoint(path: Path) -> Path | None:
    """The checkpoint an artifact's metadata names (what `inspect --data` reads without --checkpoint)."""
    from ckv_cli.artifact.format import decode_meta
    from ckv_cli.artifact.sharded import is_index, read_index
    from ckv_cli.io.safetensors import read_header

    try:
        ckpt = read_index(path)["metadata"].get("checkpoint") if is_index(path) else decode_meta(
            read_header(path)[1].get("checkpoint") or "")
    except (CkvError, ValueError):
        return None  # the reader says what is wrong with the artifact later
    return Path(str(ckpt)) if ckpt else None


def _file_kind(path: Path) -> str:
    from ckv_cli.artifact.format import FORMAT, SHARD_FORMAT
    from ckv_cli.artifact.sharded import is_index
    from ckv_cli.io.safetensors import read_header
    from ckv_cli.models.checkpoint import read_metadata

    if is_index(path):
        return "artifact"
    fmt = read_header(path)[1].get("format")
    if fmt in (FORMAT, SHARD_FORMAT):
        return "artifact"
    read_metadata(path)  # raises the checkpoint reader's one-line error for anything else
    return "checkpoint"


def _inspect_artifact(path, data, checkpoint, users, seed, plot, columns, json_out) -> bool:
    from ckv_cli.artifact.sharded import open_artifact, shards_summary
    from ckv_cli.cli.render import print_inspect_artifact, write_json
    from ckv_cli.evaluate.inspect import artifact_inventory, pool_usage, reconstruction_error
    from ckv_cli.io.files import sha256_file

    with open_artifact(path) as art:
        report = {"path": str(path), "kind": "artifact", "task": art.task,
                  "metadata": {k: v for k, v in art.meta.items() if k not in ("checksums", "fields")},
                  "tensors": artifact_inventory(art), "pool_usage": pool_usage(art)}
        if hasattr(art, "shards"):
            report["shards"] = shards_summary(art)
        report["corrupted_tensors"] = art.verify()
        if data:
            ckpt = checkpoint or Path(str(art.meta.get("checkpoint", "")))
            if not ckpt.is_file():
                raise CkvError(f"reconstruction error needs the artifact's checkpoint: {ckpt} not found (pass --checkpoint)")
            art.check_source(sha256_file(ckpt))
            model, _, _, ds = _load(ckpt, data, columns)
            art.check_model(model)
            report["checkpoint"] = str(ckpt)
            report.update(reconstruction_error(model, ds, art, users, seed))
            report["reconstruction_rel_mse"] = report["reconstruction_rel_error"]  # the name CTR reports used
    print_inspect_artifact(report)
    if plot is not None and report["pool_usage"]:
        from ckv_cli.evaluate.plots import plot_pool_usage

        _make_plot_dir(plot)
        print(f"wrote {plot_pool_usage(report['pool_usage'], path.name, plot / (path.stem + '.pool_usage.png'))}")
    for u in report["pool_usage"].values():
        u["counts"] = u["counts"].tolist()
    write_json(json_out, report)
    for name in report["corrupted_tensors"]:
        print(f"ckv: integrity check failed: tensor '{name}' does not match its checksum ({path})", file=sys.stderr)
    return not report["corrupted_tensors"]


def _inspect_checkpoint(path, data, users, seed, target_error, plot, columns, json_out) -> None:
    from ckv_cli.cli.render import print_inspect_checkpoint, write_json
    from ckv_cli.models.checkpoint import read_metadata

    meta = read_metadata(path)
    report = {"path": str(path), "kind": "checkpoint",
              "metadata": {k: v for k, v in meta.items() if k not in ("item_vocab", "user_vocab")},
              "n_items": json.loads(meta["config"])["n_items"]}
    if data:
        from ckv_cli.evaluate.inspect import analyse_checkpoint
        from ckv_cli.tasks import NEXT_ITEM

        model, _, task, ds = _load(path, data, columns)
        if task is not NEXT_ITEM:
            raise CkvError(f"{path} is a CTR model ({meta['arch']}): the cache analysis reads next-item models "
                           "(sasrec, hstu); a CTR model's caches are a function of the event (docs/results.md)")
        report["analysis"] = analyse_checkpoint(model, ds, users, seed, target_error)
    elif plot is not None:
        raise CkvError("--plot on a checkpoint needs --data (the figures come from its caches)")
    print_inspect_checkpoint(report)
    if plot is not None:
        from ckv_cli.evaluate.plots import plot_spectrum

        _make_plot_dir(plot)
        title = f"{meta['arch']} on {data}: spectrum of the cached K/V ({users} users)"
        print(f"wrote {plot_spectrum(report['analysis'], title, plot / (path.stem + '.spectrum.png'))}")
    write_json(json_out, report)


# ---------------------------------------------------------------------------------------------- import


@app.command("import")
def import_(
    framework: Annotated[str, typer.Argument(help="Where the checkpoint comes from: recbole (RecBole 1.2 SASRec) or gr (generative-recommenders HSTU / SASRec).")],
    src: Annotated[Path, typer.Argument(help="The framework's checkpoint file (RecBole's saved/*.pth; generative-recommenders' ckpts/*).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ckv checkpoint to write (.safetensors).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="The interaction log the model was trained on (named dataset or file). recbole: rebuilds RecBole's item numbering from it and the filters in the checkpoint's config.")] = None,
    item_vocab: Annotated[Optional[Path], typer.Option("--item-vocab", help="Raw item id of each embedding row: a JSON list (RecBole's field2id_token['item_id'], '[PAD]' first) or one id per line. gr default: row i is id i.")] = None,
    gin: Annotated[Optional[Path], typer.Option("--gin", help="gr: the run's .gin file (the checkpoint holds no config).")] = None,
    bind: Annotated[Optional[list[str]], typer.Option("--bind", help="gr: a gin binding NAME=VALUE, repeatable, on top of --gin or instead of it (e.g. hstu_encoder.num_blocks=2).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    json_out: JsonOpt = None,
):
    """Convert another framework's checkpoint into a ckv checkpoint (read without executing anything from it);
    evaluate, compress, inspect and CacheStore then work on it as on any ckv checkpoint."""
    from ckv_cli.cli.render import write_json
    from ckv_cli.importers import import_checkpoint

    _inputs(("the checkpoint", src), ("the --data file", _data_files(data)), ("the --item-vocab file", item_vocab),
            ("the --gin file", gin))
    _claim(out, force, "-o")
    _claim(json_out, force, "--json")
    options = {"data": data, "item_vocab": None if item_vocab is None else str(item_vocab)}
    if framework == "gr":
        options.update(gin=None if gin is None else str(gin), binds=bind)
    elif gin is not None or bind:
        raise CkvError("--gin and --bind are options of 'ckv import gr' (a RecBole checkpoint carries its config)")
    imported = import_checkpoint(framework, src, out, force=force, **options)
    cfg = imported.model.config
    print(f"wrote {out}: {imported.model.arch} from {imported.source['framework']} {imported.source['model']} "
          f"({cfg.n_items:,} items, d={cfg.d}, {cfg.n_layers} layers, window {cfg.max_len}; "
          f"item vocabulary {imported.notes.get('item_vocab')}); source sha256 {imported.source['sha256'][:16]}")
    write_json(json_out, {"checkpoint": str(out), "arch": imported.model.arch, "source": imported.source,
                          "dataset": imported.dataset, "notes": imported.notes})


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    """Entry point: every CkvError and usage error becomes one line on stderr and a non-zero exit; Ctrl-C,
    SIGTERM and SIGHUP one line and exit 128 + the signal number (`ckv_cli.io.signals`), after every temporary
    file is removed. Every output is claimed by the command's `OutputGuard` before its work starts."""
    from ckv_cli.io.guarded import OutputGuard
    from ckv_cli.io.signals import Interrupted, handle_signals

    Interrupted.last = None
    try:
        with handle_signals(), OutputGuard():
            rc = app(standalone_mode=False)  # Click returns (not raises) the code of a typer.Exit in this mode
        if rc == 130:  # Typer turns a KeyboardInterrupt into a returned 130, silently
            stop = Interrupted.last or Interrupted()
            print(stop.message(), file=sys.stderr)
            sys.exit(stop.exit_code)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except CkvError as e:
        print(f"ckv: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt) as e:
        stop = e if isinstance(e, Interrupted) else Interrupted.last or Interrupted()
        print(stop.message(), file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # Typer's (or Click's) usage errors
            print(f"ckv: error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        oom = _out_of_memory(e)
        if oom:
            print(f"ckv: error: {oom}", file=sys.stderr)
            sys.exit(2)
        raise


def _out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (a --d, --max-len or --negatives far too large for this machine)."""
    import re

    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))):
        return None
    m = re.search(r"allocate (\d+) bytes", text)
    size = f" (an allocation of {int(m.group(1)):,} bytes failed)" if m else ""
    return f"out of memory{size}: use smaller sizes (--d, --max-len, --batch-size, --negatives, --batch-users)"


if __name__ == "__main__":
    main()
