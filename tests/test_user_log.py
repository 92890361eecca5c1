"""Issue 17: a user's own log works for every architecture. A CSV with only userId, movieId, timestamp, rating
(written here from the fetched ML-100k, its first 150 users; no genres, common column names) trains, compresses
and evaluates with every CTR model; the column mapping it recognised is said in one note; without ratings a CTR
model is refused with one line naming the column to provide."""
from __future__ import annotations

import subprocess
import sys

import pytest

SMALL = ("--d", "16", "--attn-dim", "32", "--heads", "2", "--max-len", "50", "--threads", "1")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    from ckv_cli.data import fetch
    from ckv_cli.data.readers import read_log

    log = read_log(fetch("ml-100k"))
    keep = set(sorted(set(log.users), key=int)[:150])
    d = tmp_path_factory.mktemp("userlog")
    with open(d / "log.csv", "w") as f, open(d / "norating.csv", "w") as g:
        f.write("userId,movieId,timestamp,rating\n")
        g.write("user_id,item_id,ts\n")
        for u, i, t, r in zip(log.users, log.items, log.timestamps, log.ratings):
            if u in keep:
                f.write(f"{u},{i},{t},{r:g}\n")
                g.write(f"{u},{i},{t}\n")
    return d


def ckv(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "ckv_cli.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


NOTE = "note: log.csv: columns recognised by name: user=userId, item=movieId (--columns overrides)"


SLOW = pytest.mark.slow  # 21-38 s each here (three processes: train, compress, evaluate); sim stays in the fast tier


@pytest.mark.parametrize("arch", ["sim", pytest.param("eta", marks=SLOW), pytest.param("sdim", marks=SLOW),
                                  pytest.param("twin", marks=SLOW), "nohistory"])
def test_ctr_models_train_compress_evaluate_on_a_log_without_genres(arch, log_dir, tmp_path, subprocess_env):
    train = ckv("train", "--arch", arch, "--data", log_dir / "log.csv", "-o", "m.safetensors", *SMALL,
                cwd=tmp_path, env=subprocess_env)
    assert train.returncode == 0, train.stderr
    assert train.stderr.splitlines() == [NOTE]
    comp = ckv("compress", "m.safetensors", "--data", log_dir / "log.csv", "-o", "a.safetensors", "--pool-size", "32",
               "--calib-users", "100", cwd=tmp_path, env=subprocess_env)
    if arch == "nohistory":  # caches nothing: refused with one line
        assert comp.returncode == 2 and comp.stderr.splitlines()[-1] == (
            "ckv: error: the model caches nothing per user (no history is read): there is nothing to compress")
        ev = ckv("evaluate", "m.safetensors", "--data", log_dir / "log.csv", cwd=tmp_path, env=subprocess_env)
        assert ev.returncode == 0 and "AUC" in ev.stdout, ev.stderr
        return
    assert comp.returncode == 0, comp.stderr
    ev = ckv("evaluate", "m.safetensors", "a.safetensors", "--data", log_dir / "log.csv", "--bootstrap", "0",
             cwd=tmp_path, env=subprocess_env)
    assert ev.returncode == 0, ev.stderr
    auc = next(line for line in ev.stdout.splitlines() if line.startswith("AUC\t")).split("\t")
    assert 0.5 < float(auc[1]) < 1 and abs(float(auc[3])) < 0.05, auc  # uncompressed AUC, delta


def test_sim_without_genres_reads_the_most_recent_behaviours():
    """The documented rule: no categories, every behaviour matches, the most recent top_k are read."""
    import torch

    from ckv_cli.models.sim import SIM, SIMConfig

    model = SIM(SIMConfig(n_items=5, n_users=2, n_genres=0, d=8, d_attn=8, n_heads=1, top_k=2, max_len=4))
    items = torch.tensor([[1, 2, 3, 0]])
    valid = torch.tensor([[True, True, True, False]])
    idx, v = model.select(torch.tensor([4]), None, items, valid, None, None)
    assert sorted(idx[0].tolist()) == [1, 2] and v.all()


def test_a_log_without_ratings_is_refused_for_ctr(log_dir, tmp_path, subprocess_env):
    proc = ckv("train", "--arch", "sim", "--data", log_dir / "norating.csv", "-o", "m.safetensors", *SMALL,
               cwd=tmp_path, env=subprocess_env)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        "ckv: error: norating.csv: the CTR task needs a rating column (label = rating >= 4) and this log has none; "
        "provide one (map it with --columns rating=NAME)"), proc.stderr
    assert not (tmp_path / "m.safetensors").exists()
