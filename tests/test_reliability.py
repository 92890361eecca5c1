"""Issue 9 beyond the error table: the same `ckv compress` command and seed give byte-identical artifact files
(the real command, twice, in subprocesses); the in-process error table agrees with the console script; and
nothing in ckv unpickles (`.pt`/`.pth` files are refused unread: see docs/errors.md)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_model
from error_cases import CASES, build_workspace
from ckv_cli.models.checkpoint import save_checkpoint
from ckv_cli.data import load

ROOT = Path(__file__).resolve().parent.parent


def ckv(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def ml100k_checkpoint(tmp_path_factory):
    ds = load("ml-100k")
    path = tmp_path_factory.mktemp("det") / "sasrec.safetensors"
    save_checkpoint(make_model("sasrec", n_items=ds.n_items, max_len=16), path, dataset=ds.name,
                    fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={}, train={})
    return path


@pytest.mark.parametrize("options", [("--pool-size", "32", "--calib-users", "100", "--user-dim", "1"),
                                     ("--codec", "pq", "--param", "subvectors=4", "--param", "bits=5",
                                      "--calib-users", "100", "--seed", "7")], ids=["collective", "pq"])
def test_same_command_and_seed_give_identical_bytes(ml100k_checkpoint, tmp_path, subprocess_env, options):
    """Two runs of one command line (same relative output path, in two directories: the command is stored in
    the artifact) write the same file byte for byte."""
    files = []
    for run in ("first", "second"):
        cwd = tmp_path / run
        cwd.mkdir()
        proc = ckv("compress", ml100k_checkpoint, "--data", "ml-100k", "-o", "out.safetensors", *options,
                   cwd=cwd, env=subprocess_env)
        assert proc.returncode == 0, proc.stderr
        files.append((cwd / "out.safetensors").read_bytes())
    assert files[0] == files[1]


SUBPROCESS_ROWS = ["checkpoint header JSON corrupted (one byte)", "NaN in a checkpoint weight",
                   "artifact built from another checkpoint"]


def test_console_script_answers_as_the_table_says(tmp_path, subprocess_env):
    """A few rows of docs/errors.md through a real process (`python -m ckv_cli.cli`), not in-process."""
    ws = tmp_path / "ws"
    build_workspace(ws)
    for case in (c for c in CASES if c.input in SUBPROCESS_ROWS):
        if case.setup:
            case.setup(ws)
        proc = ckv(*case.args, cwd=ws, env=subprocess_env)
        assert proc.returncode == case.exit and case.matches(proc.stderr), (case.input, proc.returncode, proc.stderr)
    assert sum(c.input in SUBPROCESS_ROWS for c in CASES) == len(SUBPROCESS_ROWS)


def test_nothing_in_ckv_unpickles():
    """Nothing in the package can run code from a file: checkpoints and artifacts are safetensors, and a .pt/.pth
    path is refused before it is opened (docs/errors.md, 'PyTorch pickle' rows). The two importer exceptions are
    exact: `torch.load` is only ever called with `weights_only=True` (generative-recommenders files), and the
    `pickle` module is imported only by `ckv_cli/importers/safe_pickle.py`, whose unpickler's `find_class` never
    imports (RecBole files; tests/test_importers.py runs a crafted pickle through it)."""
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "cloudpickle"}
    hits = []
    for p in sorted((ROOT / "ckv_cli").rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        for node in ast.walk(ast.parse(p.read_text())):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in banned_modules for n in names) and rel != "ckv_cli/importers/safe_pickle.py":
                    hits.append(where)
            elif isinstance(node, ast.Call):
                f = node.func
                name = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if name == "torch.load" and not safe:
                    hits.append(where)
                if name in {"np.load", "numpy.load", "pd.read_pickle", "pandas.read_pickle"} or "allow_pickle" in kw:
                    hits.append(where)
    assert hits == []
    source = (ROOT / "ckv_cli/importers/safe_pickle.py").read_text()
    assert "def find_class" in source and "import_module" not in source and "__import__" not in source
