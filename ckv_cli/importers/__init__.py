"""Bring your own checkpoint: converters from other frameworks' files to ordinary ckv checkpoints.

`import_checkpoint(framework, src, out, ...)` reads the framework's file without executing anything from it
(`safe_pickle`), maps its weights onto ckv's SASRec/HSTU with the configuration that reproduces the framework's
forward pass exactly, and writes a ckv checkpoint that records the source file's sha256, framework and version.

- `recbole`: RecBole 1.2.x SASRec (`ckv_cli.importers.recbole`).
- `gr`: generative-recommenders' research HSTU and SASRec (`ckv_cli.importers.gr`).
"""
from __future__ import annotations

from pathlib import Path

from ckv_cli.errors import CkvError
from ckv_cli.importers.common import Imported, write

FRAMEWORKS = ("recbole", "gr")


def import_checkpoint(framework: str, src: str | Path, out: str | Path | None = None, force: bool = True,
                      **options) -> Imported:
    """Convert `src` (the framework's checkpoint) and, when `out` is given, write it as a ckv checkpoint.
    Options: recbole: data (log path or dataset name), item_vocab (file); gr: gin (file) or arch options
    (`ckv_cli.importers.gr.GRArch` fields), data, item_vocab. Raises CkvError (one line, nothing written)."""
    if framework not in FRAMEWORKS:
        raise CkvError(f"unknown framework '{framework}' (known: {', '.join(FRAMEWORKS)})")
    if framework == "recbole":
        from ckv_cli.importers.recbole import import_recbole as run
    else:
        from ckv_cli.importers.gr import import_gr as run
    imported = run(Path(src), out=out, force=force, **options)
    if out is not None:
        write(imported, out, force=force)
    return imported


__all__ = ["FRAMEWORKS", "Imported", "import_checkpoint"]
