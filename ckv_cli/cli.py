"""The `ckv` command line: a thin shell over the library (one function per command)."""
from __future__ import annotations

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
    arch: Annotated[str, typer.Option("--arch", help="Model: sasrec or hstu.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).")],
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping on validation NDCG@10).")] = 100,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation NDCG@10 before stopping.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Users per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    d: Annotated[int, typer.Option(help="Model width.")] = 64,
    layers: Annotated[int, typer.Option(help="Attention layers.")] = 2,
    max_len: Annotated[int, typer.Option(help="History window (tokens cached per user).")] = 200,
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = 0.2,
    negatives: Annotated[int, typer.Option(help="Sampled-softmax negatives per step.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (same arch and config).")] = None,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing checkpoint.")] = False,
    json_out: JsonOpt = None,
):
    """Train a next-item model with the published recipe and write a self-describing checkpoint."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.data import load
    from ckv_cli.models import REGISTRY
    from ckv_cli.report import print_table, progress, write_json
    from ckv_cli.train import TrainConfig, train_to_checkpoint

    if arch not in REGISTRY:
        raise CkvError(f"unknown --arch '{arch}' (choose from: {', '.join(REGISTRY)})")
    check_output(out, force)
    check_output(json_out)
    init_state = None
    if init is not None:
        from ckv_cli.checkpoint import load_checkpoint

        init_model, init_meta = load_checkpoint(init)
        if init_meta["arch"] != arch:
            raise CkvError(f"--init {init} is a {init_meta['arch']} checkpoint, not {arch}")
        init_state = init_model.state_dict()
        d, layers, max_len = (init_meta["config"][k] for k in ("d", "n_layers", "max_len"))
    ds = load(data, parse_columns(columns))
    _report_drops(ds)
    if init is not None and init_meta.get("data_fingerprint") != ds.fingerprint:
        raise CkvError(f"--init {init} was trained on other data (fingerprint {init_meta.get('data_fingerprint')}, "
                       f"this data {ds.fingerprint})")
    model_cfg = {"d": d, "n_layers": layers, "max_len": max_len, "dropout": dropout}
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, n_negatives=negatives, patience=patience,
                      seed=seed, model=model_cfg)
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


def _checkpoint_and_data(checkpoint: Path, data: str, columns: str | None):
    """A checkpoint and the data read through its item vocabulary (unknown items dropped and counted)."""
    from ckv_cli.checkpoint import load_checkpoint
    from ckv_cli.data import load

    model, meta = load_checkpoint(checkpoint)
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
    data: DataOpt,
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen", help="Remove the user's history items from the ranking (off in the published protocol).")] = False,
    columns: ColumnsOpt = None,
    json_out: JsonOpt = None,
):
    """Evaluate a checkpoint: rank each user's held-out item against all items."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.evaluate import evaluate_model
    from ckv_cli.report import print_table, progress, write_json

    if split not in ("test", "valid"):
        raise CkvError(f"unknown --split '{split}' (choose test or valid)")
    check_output(json_out)
    model, meta, ds = _checkpoint_and_data(checkpoint, data, columns)
    t = time.time()
    with progress("evaluate", total=ds.n_users) as advance:
        metrics = evaluate_model(model, ds, split, exclude_seen, progress=advance)
    print_table(f"{meta['arch']} on {ds.name}: {split} ({ds.n_users:,} users, all {ds.n_items:,} items ranked"
                f"{', history excluded' if exclude_seen else ''})", ["metric", "value"], [[k, v] for k, v in metrics.items()])
    write_json(json_out, {"checkpoint": str(checkpoint), "arch": meta["arch"], "dataset": ds.name, "split": split,
                          "exclude_seen": exclude_seen, "users": ds.n_users, "metrics": metrics,
                          "seconds": round(time.time() - t, 2)})


@app.command()
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `ckv train`.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact to write (.safetensors).")],
    codec: Annotated[str, typer.Option(help="Compression method (see the README for the list).")] = "collective",
    pool_size: Annotated[int, typer.Option(help="Global pool entries per stream (collective).")] = 4096,
    user_dim: Annotated[int, typer.Option(help="User-specific dims per token per stream (collective).")] = 0,
    layout: Annotated[str, typer.Option(help="residual (pool + low-rank basis) or concat (the paper's).")] = "residual",
    user_dtype: Annotated[str, typer.Option(help="Storage of the user dims: int8 (per-user scale) or fp16.")] = "int8",
    share: Annotated[str, typer.Option(help="Streams to pool: k, v or k,v (the others stay fp16).")] = "k,v",
    recompute_item_layers: Annotated[bool, typer.Option(help="Recompute first-layer K/V from item ids instead of storing them.")] = True,
    calib_users: Annotated[int, typer.Option(help="Users whose caches fit the pool (seeded sample).")] = 1000,
    batch_users: Annotated[int, typer.Option(help="Users encoded per batch (bounds memory).")] = 256,
    distill_steps: Annotated[int, typer.Option(help="Distillation steps after the gradient-free initialisation (0 = none).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    columns: ColumnsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing artifact.")] = False,
    json_out: JsonOpt = None,
):
    """Distil a checkpoint's per-user KV caches into a shared pool plus small per-user codes."""
    from ckv_cli.checkpoint import check_output
    from ckv_cli.compress import CompressOptions, compress_to_artifact
    from ckv_cli.report import print_compress, progress, write_json

    check_output(out, force)
    check_output(json_out)
    model, meta, ds = _checkpoint_and_data(checkpoint, data, columns)
    params = {"pool_size": pool_size, "user_dim": user_dim, "layout": layout, "user_dtype": user_dtype} if codec == "collective" else {}
    opts = CompressOptions(codec=codec, params=params, share=tuple(s.strip() for s in share.split(",") if s.strip()),
                           recompute_item_layers=recompute_item_layers, calib_users=calib_users,
                           batch_users=batch_users, distill_steps=distill_steps, seed=seed)
    t = time.time()
    with progress("compress", total=ds.n_users) as advance:
        report = compress_to_artifact(model, meta, checkpoint, ds, opts, out, force=force, advance=advance,
                                      command=" ".join(["ckv"] + sys.argv[1:]),
                                      on_stream=lambda name: advance(0, f"fitting {name}"))
    report["seconds"] = round(time.time() - t, 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print_compress(report)
    write_json(json_out, report)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    """Entry point: every CkvError and usage error becomes one line on stderr and a non-zero exit."""
    try:
        app(standalone_mode=False)
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
