"""The package's layering: the library never loads the CLI or its dependencies (typer, rich), no module imports a
layer below it in the flow (data -> models -> codecs -> tasks -> artifact -> pipeline -> serve -> evaluate -> cli),
and nothing outside `ckv_cli/models/` knows an architecture by name."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "ckv_cli"
UI = ("typer", "rich", "click")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_library_never_imports_the_cli_or_its_dependencies():
    for name, tree in _modules().items():
        if name == "ckv_cli.cli" or name.startswith("ckv_cli.cli."):
            continue
        bad = sorted(i for i in _imports(tree) if i.split(".")[0] in UI or i == "ckv_cli.cli" or i.startswith("ckv_cli.cli."))
        assert not bad, f"{name} imports {bad}"


FLOW = ["errors", "spec", "io", "data", "models", "importers", "codecs", "metrics", "tasks", "train", "artifact",
        "pipeline", "serve", "evaluate", "cli"]  # each part imports only parts before it (and itself)


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ckv_cli" and parts[1] in FLOW else None


def test_imports_follow_the_flow():
    for name, tree in _modules().items():
        mine = _part(name)
        if mine is None:
            continue
        for imported in _imports(tree):
            theirs = _part(imported)
            if theirs is not None:
                assert FLOW.index(theirs) <= FLOW.index(mine), f"{name} ({mine}) imports {imported} ({theirs})"


def test_no_architecture_is_known_by_name_outside_models():
    from ckv_cli.models import REGISTRY

    names = set(REGISTRY)
    classes = {cls.__name__ for pair in REGISTRY.values() for cls in pair} | {
        "SASRecLayer", "HSTULayer", "AttentionLongBranch", "CTRModel", "SequentialRecommender"}
    for name, tree in _modules().items():
        if name.startswith("ckv_cli.models"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(consts) & names, f"{name}:{node.lineno} compares with an architecture name"
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
                used = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
                assert not used & classes, f"{name}:{node.lineno} tests a model's class"


@pytest.mark.parametrize("code", [
    "import ckv_cli",
    "from ckv_cli import CacheStore, CTRStore",
])
def test_importing_the_library_loads_no_cli(code):
    check = f"{code}; import sys; bad = [m for m in {UI!r} if m in sys.modules]; assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_full_compress_through_the_library_loads_no_cli(tmp_path):
    """Train nothing, read a real log, compress every user into an artifact, read it back and serve from it."""
    script = f"""
import sys
import numpy as np
import torch
from ckv_cli import CacheStore
from ckv_cli.data import load
from ckv_cli.models import SASRec, SASRecConfig
from ckv_cli.models.checkpoint import save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
torch.manual_seed(0)
ds = load("ml-100k")
model = SASRec(SASRecConfig(n_items=ds.n_items, d=8, n_layers=2, max_len=16)).eval()
ckpt = {str(tmp_path / "m.safetensors")!r}
save_checkpoint(model, ckpt, dataset=ds.name, fingerprint=ds.fingerprint, item_vocab=list(ds.item_ids), metrics={{}}, train={{}})
out = {str(tmp_path / "a.safetensors")!r}
opts = CompressOptions(params={{"pool_size": 32, "user_dim": 0, "layout": "residual"}}, calib_users=100)
rep = compress_to_artifact(model, {{"arch": "sasrec", "item_vocab": list(ds.item_ids)}}, ckpt, ds, opts, out)
with CacheStore.open(out, ckpt) as store:
    assert store.rank_next([str(ds.user_ids[0])], k=5).items.shape == (1, 5)
bad = [m for m in {UI!r} if m in sys.modules]
assert not bad, bad
print(rep["accounting"]["per_user_ratio_fp16"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    assert 0 < float(proc.stdout.strip().splitlines()[-1]) < 0.1
