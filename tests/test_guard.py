"""`ckv_cli.io`: the guarded writer's claims and writes, transactions, file sets, deferred signals; and the CLI's
progress lines (`ckv_cli.cli.render.LogLines`), on real files (tmp_path)."""
from __future__ import annotations

import io
import os
import signal

import pytest

from ckv_cli.errors import CkvError
from ckv_cli.io.fileset import FileSet
from ckv_cli.io.guarded import OutputGuard, check_target, transaction, where, write
from ckv_cli.cli.render import LogLines
from ckv_cli.io.signals import Interrupted, deferred, handle_signals


def files(d):
    return sorted(p.name for p in d.iterdir())


def test_write_replaces_atomically_keeps_the_mode_and_cleans_up(tmp_path):
    out = tmp_path / "a.json"
    write(out, lambda tmp: open(tmp, "w").write("one"))
    os.chmod(out, 0o640)
    write(out, lambda tmp: open(tmp, "w").write("two"))
    assert out.read_text() == "two" and (os.stat(out).st_mode & 0o777) == 0o640

    def fails(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, os.strerror(28))

    with pytest.raises(CkvError, match=r"could not write .*a.json: No space left on device"):
        write(out, fails)
    assert out.read_text() == "two" and files(tmp_path) == ["a.json"]
    with pytest.raises(KeyboardInterrupt):
        write(out, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert files(tmp_path) == ["a.json"]


def test_safetensors_full_disk_error_is_one_line(tmp_path):
    from safetensors import SafetensorError

    def fails(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(CkvError, match="No space left on device"):
        write(tmp_path / "c.safetensors", fails)
    assert files(tmp_path) == []


def test_a_long_name_gets_a_temporary_name_that_fits(tmp_path):
    out = tmp_path / ("x" * 250)  # the temporary name is 14 bytes longer than the name: cut to fit
    write(out, lambda tmp: open(tmp, "w").write("ok"))
    assert out.read_text() == "ok"
    with pytest.raises(CkvError, match=r"output file name too long: x{24}\.\.\. \(256 bytes"):
        check_target(tmp_path / ("x" * 256))


def test_claims_refuse_inputs_by_path_inode_and_symlink_and_a_path_twice(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("user,item,timestamp\n")
    os.link(data, tmp_path / "hard.csv")
    os.symlink(data, tmp_path / "sym.csv")
    guard = OutputGuard(inputs=[("the --data file", data)])
    for name in ("d.csv", "hard.csv", "sym.csv"):
        with pytest.raises(CkvError, match="is the --data file this command reads"):
            guard.claim(tmp_path / name, force=True, option="--json")
    guard.claim(tmp_path / "o.json", False, "-o")
    guard.claim(tmp_path / "o.json", False, "-o")  # the same option again: fine
    with pytest.raises(CkvError, match="is also the -o output of this command"):
        guard.claim(tmp_path / "o.json", False, "--json")
    with pytest.raises(CkvError, match="d.csv is a file, not a directory"):
        guard.claim(data / "x.json", False, "--json")
    with pytest.raises(CkvError, match="exists; pass --force"):
        OutputGuard().claim(data, False)
    assert files(tmp_path) == ["d.csv", "hard.csv", "sym.csv"]  # the probes left nothing


def test_transaction_renames_all_or_none(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with transaction():
            write(a, lambda tmp: open(tmp, "w").write("new a"))
            assert a.read_text() == "old a" and where(a) != a and where(a).read_text() == "new a"
            write(b, lambda tmp: open(tmp, "w").write("new b"))
            raise RuntimeError("the second output failed")
    assert files(tmp_path) == ["a"] and a.read_text() == "old a"
    with transaction():
        write(a, lambda tmp: open(tmp, "w").write("new a"))
        write(b, lambda tmp: open(tmp, "w").write("new b"))
    assert a.read_text() == "new a" and b.read_text() == "new b" and files(tmp_path) == ["a", "b"]


def test_fileset_writes_beside_the_old_set_and_swaps_the_index_last(tmp_path):
    import json

    def names(g):
        stem = "s" if g == 0 else f"s.{g}"
        return [f"{stem}.shared", f"{stem}-0"]

    index = tmp_path / "s.index.json"

    def index_of(fs):
        return lambda: write(index, lambda tmp: open(tmp, "w").write(json.dumps(
            {"format": "ckv-artifact-index", "shared": {"file": fs.paths[0].name},
             "shards": [{"file": p.name} for p in fs.paths[1:]]})))

    fs = FileSet(index, False, names)
    with fs:
        for p in fs.paths:
            p.write_text("gen 0")
        fs.commit(index_of(fs))
    assert files(tmp_path) == ["s-0", "s.index.json", "s.shared"]
    with pytest.raises(CkvError, match="exists; pass --force"):
        FileSet(index, False, names)
    fs = FileSet(index, True, names)  # an interrupted --force run: the old set is untouched
    with pytest.raises(KeyboardInterrupt):
        with fs:
            fs.paths[0].write_text("gen 1")
            raise KeyboardInterrupt
    assert files(tmp_path) == ["s-0", "s.index.json", "s.shared"]
    fs = FileSet(index, True, names)
    with fs:
        for p in fs.paths:
            p.write_text("gen 1")
        fs.commit(index_of(fs))
    assert files(tmp_path) == ["s.1-0", "s.1.shared", "s.index.json"]


def test_deferred_holds_a_signal_until_the_block_ends():
    seen = []
    with handle_signals():
        with pytest.raises(Interrupted) as stop:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("the block ran to its end")
    assert seen and stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert stop.value.message() == "ckv: interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_interrupted_messages():
    assert Interrupted().message() == "ckv: interrupted" and Interrupted().exit_code == 130
    assert Interrupted(signal.SIGHUP, "nothing written").message() == "ckv: interrupted by SIGHUP; nothing written"
    assert Interrupted.of(KeyboardInterrupt(), "x").signum == signal.SIGINT


def test_log_lines_one_per_status_and_per_tenth():
    stream, t = io.StringIO(), [0.0]
    advance = LogLines("compress", 100, stream, clock=lambda: t[0])
    for _ in range(100):
        t[0] += 1
        advance(1)
    advance(0, "epoch 1 loss 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[0] == "compress: 10/100 (10%) 10 s" and lines[-1] == "compress: epoch 1 loss 0.5 (100 s)"


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    os.symlink(real, tmp_path / "link.json")
    write(tmp_path / "link.json", lambda tmp: open(tmp, "w").write("new"))
    assert os.path.islink(tmp_path / "link.json") and real.read_text() == "new"


def test_a_device_is_never_replaced(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CkvError, match="is a FIFO, not a regular file"):
        check_target(tmp_path / "fifo", force=True)
    import stat

    if stat.S_ISCHR(os.stat("/dev/null").st_mode):  # (on a shared machine someone may have replaced it already)
        with pytest.raises(CkvError, match="is a character device"):
            check_target("/dev/null", force=True)


def test_training_that_diverges_stops_with_one_line_and_writes_nothing(tmp_path):
    """A learning rate the CLI refuses (--lr is at most 10) makes the loss NaN: the library stops with one line
    and writes no checkpoint (before: a checkpoint of NaN weights, HR@10 = NDCG@10 = 1.0000)."""
    import numpy as np

    from ckv_cli.data import load
    from ckv_cli.train.next_item import TrainConfig, train_to_checkpoint

    rng = np.random.default_rng(0)
    rows = [f"u{u},i{rng.integers(1, 21)},{1000 + 10 * t}" for u in range(40) for t in range(int(rng.integers(4, 10)))]
    (tmp_path / "events.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    ds = load(str(tmp_path / "events.csv"))
    cfg = TrainConfig(epochs=2, lr=1e6, model={"d": 8, "max_len": 8})
    with pytest.raises(CkvError, match=r"training diverged: the loss is nan at epoch \d+, batch \d+; nothing written "
                                       r"\(try a smaller --lr than 1e\+06\)"):
        train_to_checkpoint(ds, "sasrec", cfg, tmp_path / "m.safetensors")
    assert files(tmp_path) == ["events.csv"]


def test_a_failed_allocation_is_one_line():
    """What the CLI prints for an allocation the machine cannot make (a real one: 2**62 bytes)."""
    import torch

    from ckv_cli.cli.app import _out_of_memory

    with pytest.raises(RuntimeError) as e:
        torch.empty(1 << 62, dtype=torch.uint8)
    assert _out_of_memory(e.value) == ("out of memory (an allocation of 4,611,686,018,427,387,904 bytes failed): use "
                                       "smaller sizes (--d, --max-len, --batch-size, --negatives, --batch-users)")
    assert _out_of_memory(RuntimeError("shape mismatch")) is None
