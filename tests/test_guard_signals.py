"""Issue 17 through real processes: `python -m ckv_cli.cli` paused at a chosen point of its writer or of training
(CKV_PAUSE_AT / CKV_PAUSE_FILE, `ckv_cli.io.signals.pause`) and sent a real signal. SIGTERM and SIGHUP behave as
Ctrl-C: temporary files removed, old outputs intact (a sharded set stays valid: `ckv verify`), exit 128 + the
signal, one line on stderr. Also: a `--force` sharded run replaces its set as a unit, SIGHUP under nohup is
ignored, training speaks on a non-terminal stderr and says when --max-minutes stopped it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from error_cases import SET, build_workspace

SHARDED = ("compress", "ckpt.safetensors", "--data", "events.csv", "--pool-size", "12", "--calib-users", "20",
           "--batch-users", "8", "--shard-size", "16")
COMPRESS = SHARDED[:-4]
TRAIN = ("train", "--arch", "sasrec", "--data", "events.csv", "--d", "8", "--max-len", "8", "--epochs", "3")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals") / "base"
    build_workspace(root)
    return root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    import shutil

    shutil.copytree(base, tmp_path / "ws")
    return tmp_path / "ws"


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1", **extra}
    return {k: v for k, v in e.items() if v is not None}


def ckv(*args, cwd, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=600)


def paused(args, cwd: Path, at: str, preexec=None) -> tuple[subprocess.Popen, Path]:
    """Start `ckv ARGS` and return once it is paused at label `at` (fnmatch pattern)."""
    marker = cwd.parent / "paused"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "ckv_cli.cli", *args], cwd=cwd, preexec_fn=preexec,
                            env=env(CKV_PAUSE_AT=at, CKV_PAUSE_FILE=str(marker)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > end:
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"never paused at {at!r} (exit {proc.returncode}): {err}")
        time.sleep(0.05)
    return proc, marker


def stop(proc, sig) -> tuple[int, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def snapshot(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ws.iterdir() if p.is_file()}


def no_temporaries(ws: Path) -> None:
    assert not [p.name for p in ws.rglob("*.tmp")], "a temporary file was left behind"


NAMES = {signal.SIGINT: "ckv: interrupted", signal.SIGTERM: "ckv: interrupted by SIGTERM",
         signal.SIGHUP: "ckv: interrupted by SIGHUP"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_while_the_artifact_is_written_keeps_the_old_one(ws, sig):
    before = snapshot(ws)
    proc, _ = paused((*COMPRESS, "-o", "out.safetensors", "--force"), ws, "written out.safetensors")
    assert list(ws.glob(".out.safetensors.*.tmp")), "the writer pauses with its temporary file complete"
    code, err = stop(proc, sig)
    assert code == 128 + sig and err.splitlines() == [NAMES[sig]], (code, err)
    assert snapshot(ws) == before
    no_temporaries(ws)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_sharded_force_run_interrupted_when_the_new_shared_file_appears(ws, sig):
    """The issue's case: before, the old index and shards then failed `ckv verify` with five problems."""
    assert ckv("verify", "set.index.json", cwd=ws).returncode == 0
    before = snapshot(ws)
    proc, _ = paused((*SHARDED, "-o", "set.index.json", "--force"), ws, "renamed set.1.shared.safetensors")
    assert (ws / "set.1.shared.safetensors").exists()  # the new set is written beside the old one
    code, err = stop(proc, sig)
    assert code == 128 + sig and err.splitlines() == [NAMES[sig]], (code, err)
    assert snapshot(ws) == before  # the old set byte for byte, nothing of the new one
    ok = ckv("verify", "set.index.json", cwd=ws)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
    no_temporaries(ws)


def test_fresh_sharded_run_interrupted_between_shards_leaves_nothing(ws):
    before = snapshot(ws)
    proc, _ = paused((*SHARDED, "-o", "fresh.index.json"), ws, "renamed fresh-00001-of-00003.safetensors")
    assert (ws / "fresh.shared.safetensors").exists() and (ws / "fresh-00000-of-00003.safetensors").exists()
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143 and err.splitlines() == ["ckv: interrupted by SIGTERM"], err
    assert snapshot(ws) == before
    no_temporaries(ws)


@pytest.mark.slow  # three sharded runs and three verifies: 27-54 s here
def test_sharded_force_run_replaces_the_set_as_a_unit(ws):
    """--force over a set writes the next free generation of names beside it, swaps the index, then removes the
    old files; the run after that is back on the canonical names, and the one after that on generation 1 again,
    byte for byte the first run's shards (same command, same seed)."""
    gen1 = sorted(["set.1-00000-of-00003.safetensors", "set.1-00001-of-00003.safetensors",
                   "set.1-00002-of-00003.safetensors", "set.1.shared.safetensors", "set.index.json"])
    shards = {}
    for expect in (gen1, sorted(SET), gen1):
        run = ckv(*SHARDED, "-o", "set.index.json", "--force", cwd=ws)
        assert run.returncode == 0, run.stderr
        assert sorted(p.name for p in ws.glob("set*")) == expect
        assert ckv("verify", "set.index.json", cwd=ws).returncode == 0
        if expect is gen1:
            shards.setdefault("runs", []).append({n: (ws / n).read_bytes() for n in gen1 if n.endswith("safetensors")})
    assert shards["runs"][0] == shards["runs"][1]
    no_temporaries(ws)


def test_sigterm_during_training_saves_the_best_epoch_and_exits_143(ws):
    from ckv_cli.models.checkpoint import load_checkpoint

    proc, _ = paused((*TRAIN, "-o", "run.safetensors"), ws, "epoch 1")
    code, err = stop(proc, signal.SIGTERM)
    lines = err.splitlines()
    assert code == 143 and len(lines) == 1, err
    assert lines[0].startswith("ckv: interrupted by SIGTERM; saved the best epoch so far (epoch 1 of 1 run"), lines
    _, meta = load_checkpoint(ws / "run.safetensors")
    assert meta["metrics"]["partial"] is True and meta["metrics"]["interrupted"] is True
    no_temporaries(ws)


def test_ctrl_c_during_train_force_keeps_the_old_checkpoint(ws):
    """Before: Ctrl-C exited 0 (so `ckv train ... && ckv compress ...` went on) and SIGTERM during --force
    replaced the old checkpoint."""
    old = (ws / "other.safetensors").read_bytes()
    proc, _ = paused((*TRAIN, "-o", "other.safetensors", "--force"), ws, "epoch 2")
    code, err = stop(proc, signal.SIGINT)
    assert code == 130, err
    assert err.splitlines()[0].endswith("to other.partial.safetensors, marked partial"), err
    assert (ws / "other.safetensors").read_bytes() == old
    assert (ws / "other.partial.safetensors").exists()
    no_temporaries(ws)


def test_sighup_ignored_under_nohup(ws):
    """A parent that ignores SIGHUP (nohup) keeps it ignored: the run finishes and writes its output."""
    proc, marker = paused((*COMPRESS, "-o", "out.safetensors", "--force"), ws, "written out.safetensors",
                          preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    marker.unlink()  # let it go on
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    no_temporaries(ws)


def test_training_speaks_on_a_log_and_says_max_minutes_stopped_it(ws):
    """stderr not a terminal (a CI log): one line per epoch; a --max-minutes stop is in the summary line."""
    run = ckv(*TRAIN, "-o", "run.safetensors", "--max-minutes", "0.00001", cwd=ws, CKV_NO_PROGRESS=None)
    assert run.returncode == 0, run.stderr
    assert [ln for ln in run.stderr.splitlines() if "epoch 1 loss" in ln], run.stderr
    assert "stopped by --max-minutes 1e-05" in run.stdout.splitlines()[-1], run.stdout
    assert "epoch 2" not in run.stderr  # the budget stopped it after the first epoch
