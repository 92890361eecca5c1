"""Every row of docs/errors.md (tests/error_cases.py): the exact one-line message and exit code, no temporary
file left behind, old outputs untouched; and the page is what scripts/error_table.py generates."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from error_cases import CASES, build_workspace, render, run, run_unprivileged

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors") / "base"
    build_workspace(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case, base, tmp_path):
    ws = None
    if case.needs_non_root and os.geteuid() == 0:
        result = run_unprivileged(case, base, Path(tempfile.gettempdir()))
        if result is None:
            pytest.skip("running as root, and this process cannot switch to user nobody")
        code, out, err = result
    else:
        ws = tmp_path / "ws"
        shutil.copytree(base, ws)
        code, out, err = run(case, ws)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"stderr is not one line:\n{err}"
    assert case.matches(err), f"\ngot:  {err.strip()!r}\nwant: {case.message!r}"
    assert code == case.exit, (code, err)
    if ws is not None:
        assert not [p.name for p in ws.rglob("*.tmp")], "a temporary file was left behind"
        for name in case.intact:
            ref = base / name if (base / name).exists() else base / Path(name).name  # full/x: the workspace's x
            assert (ws / name).read_bytes() == ref.read_bytes(), f"{name} changed"
        for pattern in case.absent:
            assert not list(ws.glob(pattern)), f"left behind: {[p.name for p in ws.glob(pattern)]}"
        if code:
            assert not (ws / "new.safetensors").exists()


def test_the_table_covers_the_issue():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    text = " ".join(c.input.lower() for c in CASES)
    for words in ("does not exist", "empty", "unreadable", "truncated", "header", "offsets", "another checkpoint",
                  "nan", "inf", "single event", "never saw", "width", "pool index out of range", "read-only",
                  "disk full", "interrupt", "without --force", "unknown codec", "--max-delta", "pickle", "sigterm",
                  "sighup", "sharded", "the checkpoint the command reads", "hard link", "symlink", "read-only file",
                  "unterminated quote", "column names", "nan", "seed", "without ratings", "cache"):
        assert words in text, words


def test_docs_page_is_generated_from_the_cases():
    page = (ROOT / "docs" / "errors.md").read_text()
    assert page == render() + "\n", "docs/errors.md is stale: run python scripts/error_table.py"
