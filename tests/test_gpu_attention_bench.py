"""bench/gpu_attention.py's arguments, its one-line exit without a GPU, and its table (no triton needed). The
script's whole path on Triton's interpreter is in test_triton_attention.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/gpu_attention.py", "bench_gpu_attention")


def test_defaults_are_the_target_grid(bench):
    args = bench.parse_args([])
    assert (args.batch, args.history, args.d, args.pool) == ([512], [1000, 4000], [256], [1024, 10000])
    assert args.kind == ["softmax", "silu"] and args.dtype == "fp16" and args.device == "cuda"
    assert args.forms == bench.TRITON_FORMS and args.queries == 1 and not args.tune
    args = bench.parse_args(["--history", "200", "--pool", "64", "--forms", "scatter/scatter", "--tune", "--out", "x"])
    assert args.history == [200] and args.pool == [64] and args.forms == ["scatter/scatter"] and args.tune
    assert args.out == Path("x")


@pytest.mark.parametrize("argv", [["--heads", "3"], ["--batch", "0"], ["--forms", "rows"], ["--repeats", "0"]])
def test_bad_arguments_exit(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_no_gpu_one_line(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_cpu_needs_the_interpreter(bench, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert bench.main(["--device", "cpu"]) == 2
    assert capsys.readouterr().out.count("\n") == 1


def test_table_marks_failures(bench):
    base = {"batch": 512, "history": 1000, "d": 256, "pool": 1024, "kind": "softmax"}
    rows = [{**base, "variant": "sdpa", "ms": 0.2, "vs_sdpa": 1.0, "vs_full": 1.1, "max_rel_err": 1e-4, "ok": True},
            {**base, "variant": "triton gather/gather", "form": "gather/gather", "ms": 0.05, "vs_sdpa": 4.0,
             "vs_full": 4.4, "max_rel_err": 0.5, "ok": False, "config": {"block_l": 32, "num_warps": 8, "splits": 2}},
            {**base, "variant": "triton auto", "error": "OutOfResources: shared memory"}]
    text = bench.table_text(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and len(lines) == 5
    assert "4.00x" in lines[3] and "FAIL" in lines[3] and "block_l=32 num_warps=8 splits=2" in lines[3]
    assert "OutOfResources" in lines[4]


def test_dispatcher_without_triton():
    """With triton absent (its import blocked), the module imports, says why, and runs the torch path; importing
    ckv itself never imports triton."""
    import subprocess
    import sys

    code = """
import sys
sys.modules['triton'] = None  # import triton -> ImportError
import torch
import ckv_cli, ckv_cli.serve, ckv_cli.serve.attention
from ckv_cli.serve import triton_attention as ta
from ckv_cli.serve.attention import CompressedStream, compressed_attention
assert not ta.available() and not ta.interpreting()
g = torch.Generator().manual_seed(0)
k = CompressedStream(torch.randn(8, 16, generator=g), torch.randint(0, 8, (3, 5), generator=g))
q, valid = torch.randn(3, 1, 16, generator=g), torch.ones(3, 5, dtype=torch.bool)
assert 'not installed' in ta.why_not(q, k, k, valid)
assert torch.equal(ta.compressed_attention_triton(q, k, k, valid, form='scatter/gather'), compressed_attention(q, k, k, valid))
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([sys.executable, "-c", "import sys, ckv_cli.cli, ckv_cli.serve.attention; print('triton' in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "False", res.stderr
