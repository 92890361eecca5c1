"""The `ckv` command line: a thin shell over the library (one function per command)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ckv_cli import __version__
from ckv_cli.errors import CkvError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Compress the per-user KV caches of sequential recommenders.")

DataOpt = Annotated[str, typer.Option("--data", "-d", help="Named dataset (ml-1m, ml-100k) or a log file (.csv, .tsv, .inter, ratings.dat, .parquet).")]
ColumnsOpt = Annotated[Optional[str], typer.Option("--columns", help="Column mapping for CSV/TSV logs, e.g. 'user=uid,item=movie,timestamp=ts,rating=stars'.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this path ('-' for stdout).")]


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


@app.command()
def train(
    arch: Annotated[str, typer.Option("--arch", help="Model: sasrec or hstu (next-item); sim, eta, sdim, twin or nohistory (CTR).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).")],
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Maximum epochs (early stopping on validation NDCG@10, or AUC for CTR) [next-item: 100, CTR: 1].")] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, help="Epochs without a better validation metric before stopping [next-item: 5, CTR: 1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Users (next-item) or samples (CTR) per step [128 / 256].")] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    d: Annotated[int, typer.Option(min=1, help="Model (embedding) width.")] = 64,
    layers: Annotated[int, typer.Option(min=1, help="Attention layers (next-item models).")] = 2,
    max_len: Annotated[Optional[int], typer.Option(min=1, help="History window: tokens cached per user [next-item: 200, CTR: 1000].")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Dropout rate [next-item: 0.2, CTR: 0].")] = None,
    negatives: Annotated[int, typer.Option(help="Sampled-softmax negatives per position (0 = full softmax; next-item models).")] = 128,
    shared_negatives: Annotated[bool, typer.Option("--shared-negatives", help="Draw the negatives once per user, not per position (cheaper, weaker; next-item models).")] = False,
    heads: Annotated[Optional[int], typer.Option(min=1, help="Attention heads [next-item: 1, CTR: 8].")] = None,
    attn_dim: Annotated[int, typer.Option(min=1, help="Target-attention width (CTR models).")] = 256,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Long-history tokens read per candidate (CTR) [50; TWIN 100].")] = None,
    train_samples: Annotated[int, typer.Option(min=0, help="CTR: train on this many training events, a seeded random subset (0 = all).")] = 0,
    device: Annotated[str, typer.Option(help="Torch device to train on: cpu, cuda, cuda:1, ...")] = "cpu",
    max_minutes: Annotated[float, typer.Option(help="Wall-clock budget: stop after the epoch that passes it (0 = none).")] = 0.0,
    threads: Annotated[int, typer.Option(min=0, help="Torch CPU threads (0 = torch's default).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (same arch and config; next-item models).")] = None,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing checkpoint.")] = False,
    json_out: JsonOpt = None,
):
    """Train a model with its published recipe and write a self-describing checkpoint."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.models import REGISTRY, TASKS

    if arch not in REGISTRY:
        raise CkvError(f"unknown --arch '{arch}' (choose from: {', '.join(REGISTRY)})")
    check_output(out, force)
    check_output(json_out)
    _check_device(device)
    if TASKS[arch] == "ctr":
        if init is not None:
            raise CkvError("--init continues next-item models only")
        model_cfg = {"d": d, "d_attn": attn_dim, "n_heads": heads or 8, "max_len": max_len or 1000,
                     "dropout": dropout or 0.0, **({"top_k": top_k} if top_k else {})}
        _train_ctr(arch, data, out, columns, model_cfg, epochs or 1, patience or 1, batch_size or 256, lr,
                   train_samples, device, max_minutes, threads, seed, json_out)
        return
    if data.endswith("-ctr"):
        raise CkvError(f"--data {data} is the CTR task; {arch} is a next-item model (use --data {data[:-4]})")
    _train_next_item(arch, data, out, columns, init, epochs or 100, patience or 5, batch_size or 128, lr,
                     {"d": d, "n_layers": layers, "max_len": max_len or 200, "dropout": 0.2 if dropout is None else dropout,
                      **({"n_heads": heads} if heads else {})},
                     negatives, shared_negatives, device, max_minutes, threads, seed, json_out)


def _train_next_item(arch, data, out, columns, init, epochs, patience, batch_size, lr, model_cfg, negatives,
                     shared_negatives, device, max_minutes, threads, seed, json_out) -> None:
    from ckv_cli.data import load
    from ckv_cli.report import print_table, progress, write_json
    from ckv_cli.train import TrainConfig, train_to_checkpoint

    init_state = None
    if init is not None:
        from ckv_cli.checkpoint import load_checkpoint

        init_model, init_meta = load_checkpoint(init)
        if init_meta["arch"] != arch:
            raise CkvError(f"--init {init} is a {init_meta['arch']} checkpoint, not {arch}")
        init_state = init_model.state_dict()
        model_cfg.update({k: init_meta["config"][k] for k in ("d", "n_layers", "max_len", "n_heads")})
    ds = load(data, parse_columns(columns))
    _report_drops(ds)
    if init is not None and init_meta.get("data_fingerprint") != ds.fingerprint:
        raise CkvError(f"--init {init} was trained on other data (fingerprint {init_meta.get('data_fingerprint')}, "
                       f"this data {ds.fingerprint})")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, n_negatives=negatives, patience=patience,
                      seed=seed, model=model_cfg, device=device, shared_negatives=shared_negatives,
                      max_seconds=max_minutes * 60, threads=threads)
    steps = -(-int((ds.lengths() >= 4).sum()) // batch_size)  # users with two or more training events
    with progress(f"train {arch}", total=epochs * steps) as advance:
        metrics, history = train_to_checkpoint(
            ds, arch, cfg, out, command=" ".join(["ckv"] + sys.argv[1:]), init_state=init_state, on_step=advance,
            on_epoch=lambda e, loss, val: advance(0, f"epoch {e} loss {loss:.3f} val NDCG@10 {val:.4f}"))
    test, seconds = metrics["test"], metrics["train_seconds"]
    print_table(f"{arch} on {ds.name}: test (all items ranked)", ["metric", "value"], [[k, v] for k, v in test.items()])
    print(f"wrote {out} ({metrics['epochs']} epochs, best {metrics['best_epoch']}, {seconds:.0f} s"
          f"{', interrupted' if metrics['interrupted'] else ''})")
    write_json(json_out, {"checkpoint": str(out), "arch": arch, "dataset": ds.name, **metrics, "history": history})


def _train_ctr(arch, data, out, columns, model_cfg, epochs, patience, batch_size, lr, train_samples, device,
               max_minutes, threads, seed, json_out) -> None:
    from ckv_cli.ctr import CTRTrainConfig, model_config, train_ctr_to_checkpoint
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import print_table, progress, write_json

    model_config(arch, 1, 1, 1, model_cfg)  # refuse a bad config before reading any data
    ds = load_ctr(data, parse_columns(columns), max_history=model_cfg["max_len"])
    _report_drops(ds.seq)
    cfg = CTRTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, threads=threads,
                         device=device, max_seconds=max_minutes * 60, train_samples=train_samples, model=model_cfg)
    n = min(train_samples or len(ds.samples("train")), len(ds.samples("train")))
    with progress(f"train {arch}", total=epochs * -(-n // batch_size)) as advance:
        metrics, history = train_ctr_to_checkpoint(
            ds, arch, cfg, out, command=" ".join(["ckv"] + sys.argv[1:]), on_step=advance,
            on_epoch=lambda h: advance(0, f"epoch {h['epoch']} loss {h['loss']:.4f} val AUC {h['valid_AUC']:.4f}"))
    print_table(f"{arch} on {ds.name}: test ({metrics['test']['samples']:,} samples)", ["metric", "value"],
                [[k, v] for k, v in metrics["test"].items()])
    print(f"wrote {out} ({metrics['epochs']} epochs, best {metrics['best_epoch']}, {metrics['train_seconds']:.0f} s)")
    write_json(json_out, {"checkpoint": str(out), "arch": arch, "dataset": ds.name, **metrics, "history": history})


def _check_device(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CkvError(f"--device {device} is not usable here: {str(e).splitlines()[0]}") from None


def _checkpoint_and_data(checkpoint: Path, data: str, columns: str | None):
    """A checkpoint and the data read through its item vocabulary (unknown items dropped and counted)."""
    from ckv_cli.checkpoint import load_checkpoint
    from ckv_cli.data import load

    model, meta = load_checkpoint(checkpoint)
    if getattr(model, "task", "next-item") == "ctr":
        raise CkvError(f"{checkpoint} is a CTR model ({meta['arch']}); this command reads next-item models "
                       "(sasrec, hstu) for now")
    if data.endswith("-ctr") and not Path(data).exists():
        raise CkvError(f"--data {data} is the CTR task; {checkpoint} is a next-item model (use --data {data[:-4]})")
    ds = load(data, parse_columns(columns), item_vocab=meta["item_vocab"])
    _report_drops(ds)
    return model, meta, ds


def _report_drops(ds) -> None:
    if ds.dropped_users or ds.dropped_events:
        print(f"note: dropped {ds.dropped_users:,} users with fewer than 3 events"
              + (f" and {ds.dropped_events:,} events of items the checkpoint does not know" if ds.dropped_events else ""),
              file=sys.stderr)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `ckv train`.")],
    artifacts: Annotated[Optional[list[Path]], typer.Argument(help="Artifacts written by `ckv compress` from this checkpoint.")] = None,
    data: DataOpt = "",
    split: Annotated[str, typer.Option(help="test or valid (artifacts hold test-time caches: test only).")] = "test",
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="Remove the items of the user's history window from the ranking (the published protocol) or rank them too.")] = True,
    bootstrap: Annotated[int, typer.Option(help="Paired-bootstrap resamples over users for the CI of each delta.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap (with --sweep also of calibration and fitting).")] = 0,
    max_delta: Annotated[Optional[list[str]], typer.Option("--max-delta", help="Gate: METRIC=DROP, absolute (NDCG@10=0.005) or relative (NDCG@10=1%); repeatable. Exit 1 when exceeded.")] = None,
    max_ratio: Annotated[Optional[float], typer.Option("--max-ratio", min=0.0, help="Gate: largest allowed per-user bytes as a fraction of the fp16 full cache (0.02 = 2%).")] = None,
    speed_batch: Annotated[int, typer.Option(min=1, help="Users in the batch timed for speed.")] = 256,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats for speed (median reported).")] = 5,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Compress and evaluate a grid of codecs on this checkpoint, writing no artifact: 'default' or 'codec[:KEY=VALUE,...];...', e.g. 'collective:pool_size=1024;int4:group_size=64;pq:subvectors=8,bits=8'.")] = None,
    calib_users: Annotated[Optional[int], typer.Option(help="With --sweep: users whose caches fit each codec (seeded sample; default 1000).")] = None,
    sweep_users: Annotated[Optional[int], typer.Option("--sweep-users", help="With --sweep on a CTR model: score the test samples of this many seeded test users (default 1500; 0 = all).")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="With --sweep: also write the table as CSV to this path.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --sweep: write a PNG of NDCG@10 delta against bytes per token into this directory (needs ckv-cli[plot]).")] = None,
    columns: ColumnsOpt = None,
    json_out: JsonOpt = None,
):
    """Evaluate a checkpoint, and each artifact against it: metrics, deltas with 95% CI, fidelity, bytes, speed.
    With --sweep: compress and evaluate a grid of codecs and budgets on the checkpoint in one run (no artifact)."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.compare import check_gates, parse_gate
    from ckv_cli.evaluate import evaluate_model
    from ckv_cli.metrics import RANKING_METRICS
    from ckv_cli.report import print_table, progress, write_json

    if not data:
        raise CkvError("missing option '--data'")
    if _task_of(checkpoint) == "ctr":
        if sweep is not None:  # ckv_cli/sweep_ctr.py
            _sweep_ctr(checkpoint, data, columns, sweep, artifacts or [], split, bool(max_delta) or max_ratio is not None,
                       bootstrap, seed, calib_users, sweep_users, json_out, csv_out, plot)
            return
        if artifacts and sweep is None:  # CTR artifacts against their checkpoint: ckv_cli/store_ctr.py
            if csv_out is not None or plot is not None or calib_users is not None:
                raise CkvError("--csv, --plot and --calib-users go with --sweep")
            _evaluate_ctr_artifacts(checkpoint, artifacts, data, columns, split, bootstrap, seed, max_delta or [],
                                    max_ratio, json_out)
            return
        if max_delta or max_ratio is not None:
            raise CkvError("--max-delta and --max-ratio gate artifacts: name at least one artifact")
        _evaluate_ctr(checkpoint, data, columns, split, json_out)
        return
    if sweep_users is not None:
        raise CkvError("--sweep-users goes with --sweep on a CTR model (a next-item sweep scores every user)")
    if sweep is not None:
        _sweep(checkpoint, data, columns, sweep, artifacts or [], split, exclude_seen, bool(max_delta) or max_ratio is not None,
               bootstrap, seed, calib_users, json_out, csv_out, plot)
        return
    if csv_out is not None or plot is not None or calib_users is not None:
        raise CkvError("--csv, --plot and --calib-users go with --sweep")
    if split not in ("test", "valid"):
        raise CkvError(f"unknown --split '{split}' (choose test or valid)")
    artifacts = artifacts or []
    if artifacts and (split != "test" or not exclude_seen):
        raise CkvError("artifacts are compared on the test split, seen items excluded (drop --split/--include-seen)")
    for g in max_delta or []:
        parse_gate(g, list(RANKING_METRICS))
    if (max_delta or max_ratio is not None) and not artifacts:
        raise CkvError("--max-delta and --max-ratio gate artifacts: name at least one artifact")
    check_output(json_out)
    model, meta, ds = _checkpoint_and_data(checkpoint, data, columns)
    if artifacts:
        comparisons = _compare(model, checkpoint, ds, artifacts, bootstrap, seed, speed_batch, repeats)
        payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name,
                   "comparisons": [c.as_dict() for c in comparisons]}
        failures = check_gates(comparisons, max_delta or [], max_ratio)
        payload["gates"] = {"max_delta": max_delta or [], "max_ratio": max_ratio, "failures": failures}
        write_json(json_out, payload)
        for line in failures:
            print(f"ckv: {line}", file=sys.stderr)
        if failures:
            raise typer.Exit(1)
        return
    t = time.time()
    with progress("evaluate", total=ds.n_users) as advance:
        metrics = evaluate_model(model, ds, split, exclude_seen, progress=advance)
    print_table(f"{meta['arch']} on {ds.name}: {split} ({ds.n_users:,} users, all {ds.n_items:,} items ranked"
                f"{', history window excluded' if exclude_seen else ', seen items ranked too'})", ["metric", "value"], [[k, v] for k, v in metrics.items()])
    write_json(json_out, {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name, "split": split,
                          "exclude_seen": exclude_seen, "users": ds.n_users, "metrics": metrics,
                          "seconds": round(time.time() - t, 2)})


def _task_of(checkpoint: Path) -> str:
    from ckv_cli.checkpoint import read_metadata
    from ckv_cli.models import TASKS

    return TASKS.get(read_metadata(checkpoint).get("arch"), "next-item")


def _evaluate_ctr(checkpoint: Path, data: str, columns: str | None, split: str, json_out) -> None:
    from ckv_cli.checkpoint import check_output, load_checkpoint
    from ckv_cli.ctr import evaluate_ctr
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import print_table, progress, write_json

    check_output(json_out)
    model, meta = load_checkpoint(checkpoint)
    ds = load_ctr(data, parse_columns(columns), max_history=model.config.max_len, item_vocab=meta["item_vocab"])
    _report_drops(ds.seq)
    ds = ds.with_user_vocab(meta.get("user_vocab") or [])
    t = time.time()
    with progress("evaluate", total=len(ds.samples(split))) as advance:
        metrics = evaluate_ctr(model, ds, split, progress=advance)
    print_table(f"{meta['arch']} on {ds.name}: {split} ({metrics['samples']:,} samples, {metrics['users']:,} users)",
                ["metric", "value"], [[k, v] for k, v in metrics.items()])
    write_json(json_out, {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name, "split": split,
                          "metrics": metrics, "seconds": round(time.time() - t, 2)})


def _evaluate_ctr_artifacts(checkpoint: Path, artifacts: list[Path], data: str, columns: str | None, split: str,
                            bootstrap: int, seed: int, max_delta: list[str], max_ratio: float | None, json_out) -> None:
    """`ckv evaluate CTR_CKPT ARTIFACT...`: each artifact's decoded caches against the uncompressed model on the
    test split (ckv_cli/store_ctr.py); gates exit 1 with one line each."""
    from ckv_cli.checkpoint import check_output, load_checkpoint
    from ckv_cli.compare import parse_gate
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import progress, write_json
    from ckv_cli.store_ctr import (CTR_METRICS, check_ctr_gates, compare_ctr_artifact, open_ctr_artifacts,
                                   print_ctr_comparison)

    if split != "test":
        raise CkvError("artifacts are compared on the test split (drop --split)")
    for g in max_delta:
        parse_gate(g, list(CTR_METRICS))
    if bootstrap < 0:
        raise CkvError(f"--bootstrap must be >= 0, got {bootstrap}")
    check_output(json_out)
    model, meta = load_checkpoint(checkpoint)
    opened = open_ctr_artifacts(model, checkpoint, artifacts)  # refused before the data is read
    try:
        ds = load_ctr(data, parse_columns(columns), max_history=model.config.max_len, item_vocab=meta["item_vocab"])
        _report_drops(ds.seq)
        ds = ds.with_user_vocab(meta.get("user_vocab") or [])
        comparisons = []
        for art in opened:
            with progress(f"evaluate {art.path.name}", total=ds.seq.n_users) as advance:
                c = compare_ctr_artifact(model, ds, art, bootstrap=bootstrap, seed=seed, advance=advance)
            print_ctr_comparison(c)
            comparisons.append(c)
    finally:
        for art in opened:
            art.close()
    failures = check_ctr_gates(comparisons, max_delta, max_ratio)
    write_json(json_out, {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name,
                          "comparisons": comparisons,
                          "gates": {"max_delta": max_delta, "max_ratio": max_ratio, "failures": failures}})
    for line in failures:
        print(f"ckv: {line}", file=sys.stderr)
    if failures:
        raise typer.Exit(1)


def _sweep(checkpoint, data, columns, spec, artifacts, split, exclude_seen, gated, bootstrap, seed, calib_users,
           json_out, csv_out, plot) -> None:
    from ckv_cli.checkpoint import check_output
    from ckv_cli.report import print_sweep, progress, write_json
    from ckv_cli.sweep import parse_sweep, run_sweep, write_csv

    if gated:
        raise CkvError("--sweep takes no gates (--max-delta, --max-ratio): gate one artifact of `ckv compress` instead")
    if artifacts:
        raise CkvError("--sweep compresses the checkpoint itself: name no artifacts")
    if split != "test" or not exclude_seen:
        raise CkvError("--sweep evaluates on the test split, seen items excluded (drop --split/--include-seen)")
    if calib_users is not None and calib_users < 1:
        raise CkvError(f"--calib-users must be >= 1, got {calib_users}")
    specs = parse_sweep(spec)
    check_output(json_out)
    check_output(csv_out)
    if plot is not None and plot.exists() and not plot.is_dir():
        raise CkvError(f"--plot {plot} exists and is not a directory")
    model, meta, ds = _checkpoint_and_data(checkpoint, data, columns)
    with progress("sweep", total=ds.n_users * (1 + len(specs))) as advance:
        payload = run_sweep(model, ds, specs, calib_users=calib_users or 1000, seed=seed, bootstrap=bootstrap,
                            advance=advance, on_spec=lambda label: advance(0, label))
    payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], **payload}
    print_sweep(payload)
    write_json(json_out, payload)
    write_csv(csv_out, payload)
    if plot is not None:
        from ckv_cli.plots import plot_sweep

        plot.mkdir(parents=True, exist_ok=True)
        title = f"{meta['arch']} ({checkpoint.name}) on {ds.name}: NDCG@10 delta vs per-user bytes"
        print(f"wrote {plot_sweep(payload['rows'], title, plot / (checkpoint.stem + '.sweep.png'))}")


def _sweep_ctr(checkpoint, data, columns, spec, artifacts, split, gated, bootstrap, seed, calib_users, sweep_users,
               json_out, csv_out, plot) -> None:
    """`ckv evaluate CTR_CHECKPOINT --sweep SPEC` (ckv_cli/sweep_ctr.py)."""
    from ckv_cli.checkpoint import check_output, load_checkpoint
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import progress, write_json
    from ckv_cli.sweep_ctr import DEFAULT_SWEEP_USERS, parse_ctr_sweep, print_ctr_sweep, run_ctr_sweep, write_ctr_csv
    from ckv_cli.sweep_ctr import sweep_users as pick_users

    if gated:
        raise CkvError("--sweep takes no gates (--max-delta, --max-ratio): gate one artifact of `ckv compress` instead")
    if artifacts:
        raise CkvError("--sweep compresses the checkpoint itself: name no artifacts")
    if split != "test":
        raise CkvError("--sweep evaluates on the test split (drop --split)")
    if calib_users is not None and calib_users < 1:
        raise CkvError(f"--calib-users must be >= 1, got {calib_users}")
    if sweep_users is not None and sweep_users < 0:
        raise CkvError(f"--sweep-users must be >= 0 (0 = every test user), got {sweep_users}")
    if bootstrap < 0:
        raise CkvError(f"--bootstrap must be >= 0, got {bootstrap}")
    specs = parse_ctr_sweep(spec)
    check_output(json_out)
    check_output(csv_out)
    if plot is not None and plot.exists() and not plot.is_dir():
        raise CkvError(f"--plot {plot} exists and is not a directory")
    model, meta = load_checkpoint(checkpoint)
    ds = load_ctr(data, parse_columns(columns), max_history=model.config.max_len, item_vocab=meta["item_vocab"])
    _report_drops(ds.seq)
    ds = ds.with_user_vocab(meta.get("user_vocab") or [])
    n_users = DEFAULT_SWEEP_USERS if sweep_users is None else sweep_users
    with progress("sweep", total=len(pick_users(ds, n_users, seed)) * len(specs)) as advance:
        payload = run_ctr_sweep(model, ds, specs, calib_users=calib_users or 1000, seed=seed, bootstrap=bootstrap,
                                users=n_users, advance=advance, on_spec=lambda label: advance(0, label))
    payload = {"checkpoint": str(checkpoint), "arch": meta["arch"], **payload}
    print_ctr_sweep(payload)
    write_json(json_out, payload)
    write_ctr_csv(csv_out, payload)
    if plot is not None:
        from ckv_cli.plots import plot_sweep

        plot.mkdir(parents=True, exist_ok=True)
        title = f"{meta['arch']} ({checkpoint.name}) on {ds.name}: AUC delta vs per-user bytes"
        print(f"wrote {plot_sweep(payload['rows'], title, plot / (checkpoint.stem + '.sweep.png'), metric='AUC')}")


def _compare(model, checkpoint, ds, artifacts, bootstrap, seed, speed_batch, repeats):
    from ckv_cli.compare import check_source, compare_artifact
    from ckv_cli.shard import open_artifact
    from ckv_cli.data.datasets import sha256_file
    from ckv_cli.report import print_comparison, progress

    sha = sha256_file(checkpoint)
    opened = [open_artifact(a) for a in artifacts]
    for art in opened:  # refuse before any work
        check_source(art, sha)
        art.check_model(model)
        bad = art.verify()
        if bad:
            raise CkvError(f"{art.path}: tensor '{bad[0]}' does not match its checksum (damaged on disk?)")
    comparisons = []
    for art in opened:
        with progress(f"evaluate {art.path.name}", total=art.n_users) as advance:
            comparisons.append(compare_artifact(model, ds, art, bootstrap=bootstrap, seed=seed, speed_batch=speed_batch,
                                                repeats=repeats, advance=advance))
    print_comparison(comparisons)
    return comparisons


@app.command()
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `ckv train`.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact to write (.safetensors).")],
    codec: Annotated[str, typer.Option(help="Compression method (see the README for the list).")] = "collective",
    pool_size: Annotated[Optional[int], typer.Option(help="Global pool entries per stream (collective) [next-item models 8192, CTR models 4096].")] = None,
    user_dim: Annotated[int, typer.Option(help="User-specific dims per token per stream (collective).")] = 0,
    layout: Annotated[str, typer.Option(help="residual (pool + low-rank basis) or concat (the paper's).")] = "residual",
    user_dtype: Annotated[str, typer.Option(help="Storage of the user dims: int8 (per-user scale) or fp16.")] = "int8",
    share: Annotated[str, typer.Option(help="Streams to pool: k, v or k,v (the others stay fp16).")] = "k,v",
    recompute_item_layers: Annotated[bool, typer.Option(help="Recompute first-layer K/V from item ids instead of storing them.")] = True,
    calib_users: Annotated[int, typer.Option(min=1, help="Users whose caches fit the pool (seeded sample).")] = 1000,
    batch_users: Annotated[int, typer.Option(min=1, help="Users encoded per batch (bounds memory).")] = 256,
    distill_steps: Annotated[int, typer.Option(min=0, help="Distillation steps after the gradient-free initialisation (0 = none).")] = 0,
    finetune: Annotated[bool, typer.Option("--finetune", help="With --distill-steps: fine-tune a copy of the model too; it reads the artifact and is written beside it as OUT.student.safetensors (evaluate the artifact with that checkpoint).")] = False,
    engine: Annotated[str, typer.Option(help="Where users are encoded: local (this process) or ray (a Ray Data job; needs ckv-cli[ray]). ray writes shards, like --shard-size.")] = "local",
    shard_size: Annotated[Optional[int], typer.Option(help="Write shards of this many users (a multiple of --batch-users) and an index: -o NAME.index.json. Default with --engine ray: 65536.")] = None,
    address: Annotated[Optional[str], typer.Option(help="With --engine ray: the Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --engine ray: encoding actors (one CPU, one model and plan each).")] = 2,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="Codec parameter KEY=VALUE for any codec, repeatable (e.g. --codec pq --param subvectors=16 --param bits=8).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing artifact.")] = False,
    json_out: JsonOpt = None,
):
    """Distil a checkpoint's per-user KV caches into a shared pool plus small per-user codes."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.compress import CompressOptions, compress_to_artifact, parse_params
    from ckv_cli.report import print_compress, progress, write_json

    if checkpoint.is_file() and _task_of(checkpoint) == "ctr":  # SIM, ETA, SDIM, TWIN: ckv_cli/compress_ctr.py
        from ckv_cli.compress_ctr import compress_ctr_command

        compress_ctr_command(checkpoint, data, out, codec=codec, pool_size=pool_size, user_dim=user_dim, layout=layout,
                             user_dtype=user_dtype, share=share, calib_users=calib_users, batch_users=batch_users,
                             param=param, seed=seed, columns=columns, force=force, json_out=json_out,
                             refused={"--engine": engine != "local", "--shard-size": shard_size is not None,
                                      "--address": address is not None, "--distill-steps": distill_steps > 0,
                                      "--finetune": finetune,
                                      "--no-recompute-item-layers": not recompute_item_layers},
                             command=" ".join(["ckv"] + sys.argv[1:]))
        return
    sharded = engine != "local" or shard_size is not None
    if finetune and distill_steps <= 0:
        raise CkvError("--finetune needs --distill-steps > 0 (the model trains during distillation)")
    if finetune and sharded:
        raise CkvError("--finetune writes one artifact: it does not go with --engine ray or --shard-size yet")
    if engine not in ("local", "ray"):
        raise CkvError(f"unknown --engine '{engine}' (choose local or ray)")
    if engine == "ray":
        from ckv_cli.engines.ray_engine import require_ray

        require_ray()
    if address is not None and engine != "ray":
        raise CkvError("--address goes with --engine ray")
    if sharded:
        from ckv_cli.shard import DEFAULT_SHARD_USERS, is_index

        shard_size = shard_size or DEFAULT_SHARD_USERS
        if not is_index(out):
            raise CkvError(f"sharded output is an index: -o must end with .json (e.g. NAME.index.json), got {out}")
    check_output(out, force)
    check_output(json_out)
    if finetune:
        from ckv_cli.compress import student_path

        check_output(student_path(out), force)
    model, meta, ds = _checkpoint_and_data(checkpoint, data, columns)
    params = ({"pool_size": 8192 if pool_size is None else pool_size, "user_dim": user_dim, "layout": layout,
               "user_dtype": user_dtype} if codec == "collective" else {})
    params.update(parse_params(param or []))
    opts = CompressOptions(codec=codec, params=params, share=tuple(s.strip() for s in share.split(",") if s.strip()),
                           recompute_item_layers=recompute_item_layers, calib_users=calib_users,
                           batch_users=batch_users, distill_steps=distill_steps, finetune=finetune, seed=seed)
    t = time.time()
    with progress("compress", total=ds.n_users) as advance:
        if sharded:
            from ckv_cli.shard import compress_sharded

            report = compress_sharded(model, meta, checkpoint, ds, opts, out, shard_size, engine=engine,
                                      workers=workers, address=address, force=force, advance=advance,
                                      command=" ".join(["ckv"] + sys.argv[1:]),
                                      on_stream=lambda name: advance(0, f"fitting {name}"))
        else:
            report = compress_to_artifact(model, meta, checkpoint, ds, opts, out, force=force, advance=advance,
                                          command=" ".join(["ckv"] + sys.argv[1:]),
                                          on_stream=lambda name: advance(0, f"fitting {name}"))
    report["seconds"] = round(time.time() - t, 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print_compress(report)
    write_json(json_out, report)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An artifact (ckv compress): one file, an index (.json) of shards or one shard; or a checkpoint (ckv train).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Dataset: reconstruction error of an artifact; the cache analysis of a checkpoint.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="The artifact's checkpoint (default: the path in its metadata).")] = None,
    users: Annotated[int, typer.Option(min=1, help="Users sampled for the analysis / reconstruction error.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the user sample.")] = 0,
    target_error: Annotated[float, typer.Option(help="Held-out relative error the recommended pool size and user dim must reach (a rule of thumb: on the sample checkpoints, pools of 4096-8192 at ~0.2 kept NDCG@10 within 0.4-1.6%).")] = 0.25,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write PNG figures into this directory (needs ckv-cli[plot]).")] = None,
    columns: ColumnsOpt = None,
    json_out: JsonOpt = None,
):
    """Explain an artifact (tensors, bytes, pool use, integrity) or analyse a checkpoint's caches."""
    from ckv_cli.checkpoint import check_output

    check_output(json_out)
    if plot is not None and plot.exists() and not plot.is_dir():
        raise CkvError(f"--plot {plot} exists and is not a directory")
    if not path.exists():
        raise CkvError(f"not found: {path}")
    kind = _file_kind(path)
    from ckv_cli.compress_ctr import inspect_ctr_artifact, is_ctr_artifact

    if kind == "artifact" and path.is_file() and is_ctr_artifact(path) and data:  # against data: store_ctr.py
        ok = _inspect_ctr_artifact_data(path, data, checkpoint, users, seed, columns, json_out)
    elif kind == "artifact" and path.is_file() and is_ctr_artifact(path):  # a CTR model's artifact (compress_ctr.py)
        ok = inspect_ctr_artifact(path, data, json_out)
    elif kind == "artifact":
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
):
    """Check an artifact on disk: each shard's and the shared file's sha256 against the index, every header,
    every tensor's checksum, and that every user appears exactly once. Prints what differs; exit 1 on any problem."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.report import write_json
    from ckv_cli.shard import verify_path

    check_output(json_out)
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


def _file_kind(path: Path) -> str:
    from ckv_cli.artifact import FORMAT, SHARD_FORMAT
    from ckv_cli.checkpoint import read_header, read_metadata
    from ckv_cli.shard import is_index

    if is_index(path):
        return "artifact"
    fmt = read_header(path)[1].get("format")
    if fmt in (FORMAT, SHARD_FORMAT):
        return "artifact"
    read_metadata(path)  # raises the checkpoint reader's one-line error for anything else
    return "checkpoint"


def _inspect_artifact(path, data, checkpoint, users, seed, plot, columns, json_out) -> bool:
    from ckv_cli.compare import check_source
    from ckv_cli.data.datasets import sha256_file
    from ckv_cli.inspection import artifact_inventory, pool_usage, reconstruction_error
    from ckv_cli.report import print_inspect_artifact, write_json
    from ckv_cli.shard import open_artifact, shards_summary

    art = open_artifact(path)
    report = {"path": str(path), "kind": "artifact",
              "metadata": {k: v for k, v in art.meta.items() if k not in ("checksums", "fields")},
              "tensors": artifact_inventory(art), "pool_usage": pool_usage(art)}
    if hasattr(art, "shards"):
        report["shards"] = shards_summary(art)
    report["corrupted_tensors"] = art.verify()
    if data:
        ckpt = checkpoint or Path(str(art.meta.get("checkpoint", "")))
        if not ckpt.is_file():
            raise CkvError(f"reconstruction error needs the artifact's checkpoint: {ckpt} not found (pass --checkpoint)")
        check_source(art, sha256_file(ckpt))
        model, _, ds = _checkpoint_and_data(ckpt, data, columns)
        art.check_model(model)
        report["reconstruction_rel_error"], report["reconstruction_users"] = reconstruction_error(model, ds, art, users, seed)
    print_inspect_artifact(report)
    if plot is not None and report["pool_usage"]:
        from ckv_cli.plots import plot_pool_usage

        plot.mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_pool_usage(report['pool_usage'], path.name, plot / (path.stem + '.pool_usage.png'))}")
    for u in report["pool_usage"].values():
        u["counts"] = u["counts"].tolist()
    write_json(json_out, report)
    for name in report["corrupted_tensors"]:
        print(f"ckv: integrity check failed: tensor '{name}' does not match its checksum ({path})", file=sys.stderr)
    return not report["corrupted_tensors"]


def _inspect_ctr_artifact_data(path, data, checkpoint, users, seed, columns, json_out) -> bool:
    """`ckv inspect CTR_ARTIFACT --data`: the header view, then pool usage and the decoded K/V against the model's
    on a sample of the data's users (ckv_cli/store_ctr.py)."""
    from ckv_cli.checkpoint import load_checkpoint
    from ckv_cli.compress_ctr import describe_ctr_artifact, inspect_ctr_artifact
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import write_json
    from ckv_cli.store_ctr import inspect_ctr_data, print_ctr_inspect_data

    meta = describe_ctr_artifact(path)["metadata"]
    ckpt = checkpoint or Path(str(meta.get("checkpoint", "")))
    if not ckpt.is_file():
        raise CkvError(f"reconstruction error needs the artifact's checkpoint: {ckpt} not found (pass --checkpoint)")
    model, cmeta = load_checkpoint(ckpt)
    if getattr(model, "task", "") != "ctr":
        raise CkvError(f"{ckpt} is a next-item model; {path} is an artifact of a CTR model")
    ds = load_ctr(data, parse_columns(columns), max_history=model.config.max_len, item_vocab=cmeta["item_vocab"])
    _report_drops(ds.seq)
    report = inspect_ctr_data(path, model, ckpt, ds, users, seed)  # refuses another checkpoint, damaged tensors
    ok = inspect_ctr_artifact(path, None, None)
    print_ctr_inspect_data(report)
    for u in report["pool_usage"].values():
        u["counts"] = u["counts"].tolist()
    write_json(json_out, {"path": str(path), "kind": "artifact", "task": "ctr", **describe_ctr_artifact(path),
                          "checkpoint": str(ckpt), **report})
    return ok and not report["corrupted_tensors"]


def _inspect_checkpoint(path, data, users, seed, target_error, plot, columns, json_out) -> None:
    from ckv_cli.checkpoint import read_metadata
    from ckv_cli.report import print_inspect_checkpoint, write_json

    meta = read_metadata(path)
    report = {"path": str(path), "kind": "checkpoint",
              "metadata": {k: v for k, v in meta.items() if k != "item_vocab"}, "n_items": json.loads(meta["config"])["n_items"]}
    if data:
        from ckv_cli.inspection import analyse_checkpoint

        model, _, ds = _checkpoint_and_data(path, data, columns)
        report["analysis"] = analyse_checkpoint(model, ds, users, seed, target_error)
    elif plot is not None:
        raise CkvError("--plot on a checkpoint needs --data (the figures come from its caches)")
    print_inspect_checkpoint(report)
    if plot is not None:
        from ckv_cli.plots import plot_spectrum

        plot.mkdir(parents=True, exist_ok=True)
        title = f"{meta['arch']} on {data}: spectrum of the cached K/V ({users} users)"
        print(f"wrote {plot_spectrum(report['analysis'], title, plot / (path.stem + '.spectrum.png'))}")
    write_json(json_out, report)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    """Entry point: every CkvError and usage error becomes one line on stderr and a non-zero exit."""
    try:
        rc = app(standalone_mode=False)  # Click returns (not raises) the code of a typer.Exit in this mode
        if rc == 130:  # Typer turns Ctrl-C into a returned 130, silently
            print("ckv: interrupted", file=sys.stderr)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except CkvError as e:
        print(f"ckv: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("ckv: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # Typer's (or Click's) usage errors
            print(f"ckv: error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
