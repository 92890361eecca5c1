"""The command line: the only part of ckv that imports typer and rich (`app`: commands; `render`: tables,
progress, JSON)."""
from ckv_cli.cli.app import app, main

__all__ = ["app", "main"]
