"""The `ckv` command end to end, in a subprocess: one-line errors with a non-zero exit, and a happy path."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ckv_cli.data import load


@pytest.fixture
def ckv(subprocess_env, tmp_path):
    def run(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *map(str, args)], capture_output=True,
                              text=True, env=subprocess_env, cwd=cwd or tmp_path, timeout=600)
    return run


def assert_one_line_error(proc, *fragments):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckv: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def write_csv(path, header, rows):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- errors


def test_missing_checkpoint(ckv, tmp_path):
    assert_one_line_error(ckv("evaluate", tmp_path / "nope.safetensors", "--data", "ml-100k"), "not found", "nope")


def test_file_that_is_not_a_checkpoint(ckv, tmp_path):
    p = write_csv(tmp_path / "log.csv", "user,item,timestamp", [(1, 2, 3)])
    assert_one_line_error(ckv("evaluate", p, "--data", "ml-100k"), "log.csv")


def test_safetensors_that_is_not_a_ckv_checkpoint(ckv, tmp_path):
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(p))
    assert_one_line_error(ckv("evaluate", p, "--data", "ml-100k"), "not a ckv checkpoint")


def test_truncated_checkpoint(ckv, tmp_path, tiny_checkpoint):
    p = tmp_path / "cut.safetensors"
    p.write_bytes(tiny_checkpoint.read_bytes()[:-100])
    assert_one_line_error(ckv("evaluate", p, "--data", "ml-100k"), "cut.safetensors")


def test_csv_without_the_named_columns(ckv, tmp_path):
    p = write_csv(tmp_path / "log.csv", "who,what,when", [("u1", "m1", 1)])  # (uid, movie, ts are recognised)
    line = assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", p, "-o", tmp_path / "m.safetensors"),
                                 "missing column", "user", "timestamp", "--columns")
    assert not (tmp_path / "m.safetensors").exists(), line
    assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", p, "-o", tmp_path / "m.safetensors",
                              "--columns", "user=customer,item=what,timestamp=when"), "customer")


def test_bad_columns_option(ckv, tmp_path):
    p = write_csv(tmp_path / "log.csv", "uid,movie,ts", [("u1", "m1", 1)])
    assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", p, "-o", tmp_path / "m.safetensors",
                              "--columns", "person=uid"), "--columns", "person")


def test_empty_data_file(ckv, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert_one_line_error(ckv("train", "--arch", "hstu", "--data", tmp_path / "empty.csv", "-o",
                              tmp_path / "m.safetensors"), "empty")


def test_empty_data_file_for_evaluate(ckv, tmp_path, tiny_checkpoint):
    (tmp_path / "empty.csv").write_text("")
    assert_one_line_error(ckv("evaluate", tiny_checkpoint, "--data", tmp_path / "empty.csv"), "empty")


def test_unknown_arch(ckv, tmp_path):
    line = assert_one_line_error(ckv("train", "--arch", "bert4rec", "--data", "ml-100k", "-o",
                                     tmp_path / "m.safetensors"), "bert4rec")
    assert "sasrec" in line and "hstu" in line


def test_unknown_dataset_name(ckv, tmp_path):
    assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", "ml-20m", "-o", tmp_path / "m.safetensors"),
                          "unknown dataset", "ml-20m")


def test_output_directory_missing(ckv, tmp_path):
    assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", "ml-100k", "-o",
                              tmp_path / "nodir" / "m.safetensors"), "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_existing_output_needs_force(ckv, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    assert_one_line_error(ckv("train", "--arch", "sasrec", "--data", "ml-100k", "-o", tmp_path / "m.safetensors"),
                          "--force")
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"


def tiny_log(path, users=6, events=6, extra=""):
    """A CSV over the tiny checkpoint's items (i1..i20) with custom column names."""
    rows = [(f"u{u}", f"i{1 + (3 * u + k) % 20}", 1000 + 10 * k, 4 if k % 2 else 2)
            for u in range(users) for k in range(events)]
    path.write_text("uid,movie,ts,stars\n" + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows) + extra)
    return path


COLUMNS = "user=uid,item=movie,timestamp=ts,rating=stars"


def test_evaluate_json_into_missing_directory(ckv, tmp_path, tiny_checkpoint):
    log = tiny_log(tmp_path / "log.csv")
    assert_one_line_error(ckv("evaluate", tiny_checkpoint, "--data", log, "--columns", COLUMNS, "--json",
                              tmp_path / "nodir" / "e.json"), "does not exist")


def test_usage_error_is_one_line(ckv, tmp_path):
    assert_one_line_error(ckv("train", "--data", "ml-100k", "-o", tmp_path / "m.safetensors"), "--arch")


def test_version(ckv):
    import ckv_cli

    proc = ckv("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ckv {ckv_cli.__version__}"


# ---------------------------------------------------------------- happy paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`ckv train` on ML-100K for one small epoch, through the installed console script's module."""
    import os

    d = tmp_path_factory.mktemp("train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKV_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ckv_cli.cli", "train", "--arch", "sasrec", "--data", "ml-100k",
                           "-o", str(d / "x.safetensors"), "--epochs", "1", "--d", "16", "--json", str(d / "t.json")],
                          capture_output=True, text=True, env=env, cwd=d, timeout=600)
    return d, proc


def test_train_then_evaluate_ml_100k(trained, ckv):
    d, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    assert "wrote" in proc.stdout and (d / "x.safetensors").exists()
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]  # no temporaries left behind
    train_json = json.loads((d / "t.json").read_text())
    assert train_json["epochs"] == 1 and len(train_json["history"]) == 1

    ev = ckv("evaluate", d / "x.safetensors", "--data", "ml-100k", "--json", d / "e.json", cwd=d)
    assert ev.returncode == 0, ev.stderr
    assert "Traceback" not in ev.stderr and ev.stderr == ""
    result = json.loads((d / "e.json").read_text())
    assert 0.0 <= result["metrics"]["HR@10"] <= 1.0
    assert 0.0 <= result["metrics"]["NDCG@10"] <= result["metrics"]["HR@10"]
    assert result["metrics"]["HR@10"] <= result["metrics"]["HR@50"]
    assert result["users"] == 943 and result["arch"] == "sasrec" and result["split"] == "test"
    # the checkpoint reproduces, in a fresh process, the test metrics computed at the end of training
    for k, v in train_json["test"].items():
        assert result["metrics"][k] == pytest.approx(v, abs=1e-9)
    assert "HR@10" in ev.stdout  # the table


def test_checkpoint_from_train_is_self_describing(trained):
    from ckv_cli.models.checkpoint import load_checkpoint

    d, proc = trained
    assert proc.returncode == 0, proc.stderr
    model, meta = load_checkpoint(d / "x.safetensors")
    assert meta["arch"] == "sasrec" and meta["dataset"] == "ml-100k"
    assert meta["config"]["d"] == 16 and model.config.d == 16
    assert len(meta["item_vocab"]) == 1683 and meta["item_vocab"][0] == "<pad>"
    assert meta["data_fingerprint"] == load("ml-100k").fingerprint
    assert meta["train"]["epochs"] == 1 and "ckv train" in meta["train"]["command"]


def test_short_users_are_dropped_with_a_note(ckv, tmp_path):
    extra = "lonely,i1,5,3\nlonely,i2,6,4\nsingle,i3,7,5\n"  # 2 and 1 events: fewer than 3
    log = tiny_log(tmp_path / "log.csv", extra=extra)
    proc = ckv("train", "--arch", "hstu", "--data", log, "--columns", COLUMNS, "-o", tmp_path / "m.safetensors",
               "--epochs", "1", "--d", "8", "--layers", "1", "--max-len", "8", "--negatives", "4", "--json",
               tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["note: dropped 2 users with fewer than 3 events"]
    assert json.loads((tmp_path / "t.json").read_text())["dataset"] == "log.csv"


def test_evaluate_notes_unknown_items_and_short_users(ckv, tmp_path, tiny_checkpoint):
    extra = "u0,not-an-item,2000,4\nu1,unknown,2001,4\nshort,i1,5,3\nshort,i2,6,3\n"
    log = tiny_log(tmp_path / "log.csv", extra=extra)
    proc = ckv("evaluate", tiny_checkpoint, "--data", log, "--columns", COLUMNS, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "note: dropped 1 users with fewer than 3 events and 2 events of items the checkpoint does not know"]
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert payload["users"] == 6 and 0.0 <= payload["metrics"]["HR@10"] <= 1.0
