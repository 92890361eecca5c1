"""Fuzzing the artifact reader: small real artifacts (`compress_to_artifact` with tiny untrained models on 40
ML-100K users; five codecs: collective residual/int8 and concat/fp16 with a plain fp16 stream, pq, int4,
lowrank) mutated at random -- byte flips in the header and in the data, truncations, appended bytes, a wrong
header length, and header edits (dtypes, shapes, same-size reshapes, offsets, swapped tensors, dropped
tensors, metadata values: plan, fields, format, checksums, accounting) -- then read as `ckv evaluate` and
`ckv inspect` read them: `Artifact.open`, `check_model`, `read_fields` and `decode` of every user, pool usage,
the tensor inventory and `verify` (3,000 cases), and through the commands themselves, reports included
(450 `ckv inspect --json`, 150 `ckv evaluate`). Every case must end in a one-line CkvError (exit 2, or 1 for a
failed checksum) or a valid read: never another exception, never a warning, never a hang (each case runs
under a 5 s timer). Seeded, in-process, about 20 s on 2 cores. A longer run: CKV_FUZZ_CASES=50000
CKV_FUZZ_CLI_CASES=3000 CKV_FUZZ_SEED=1 pytest tests/test_fuzz.py."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import random
import signal
import struct
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from ckv_cli.artifact import Artifact
from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
from ckv_cli.data.datasets import fetch
from ckv_cli.data.readers import read_log
from ckv_cli.data.sequences import build, load
from ckv_cli.errors import CkvError
from ckv_cli.evaluate.inspect import pool_usage, tensor_inventory

N_CASES = int(os.environ.get("CKV_FUZZ_CASES", 3000))  # a longer local run: CKV_FUZZ_CASES=50000 CKV_FUZZ_SEED=1
N_CLI_CASES = int(os.environ.get("CKV_FUZZ_CLI_CASES", 450))  # `ckv inspect` (and a third as many `ckv evaluate`)
SEED = int(os.environ.get("CKV_FUZZ_SEED", 20240509))
CASE_SECONDS = 5  # a case that takes longer is a hang
N_USERS = 40
MAX_LEN = 12
ARTIFACTS = {  # name -> (arch, compress options): every field kind the reader handles
    "collective-residual-int8": ("sasrec", dict(params={"pool_size": 12, "user_dim": 2, "layout": "residual"})),
    "collective-concat-fp16-share-k": ("hstu", dict(params={"pool_size": 10, "user_dim": 1, "layout": "concat",
                                                            "user_dtype": "fp16"}, share=("k",))),
    "pq": ("sasrec", dict(codec="pq", params={"subvectors": 2, "bits": 3})),
    "int4": ("sasrec", dict(codec="int4", params={"group_size": 4})),
    "lowrank": ("hstu", dict(codec="lowrank", params={"rank": 2})),
}
DTYPES = ["BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64", "F8_E4M3", "X"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


@dataclass
class Source:
    raw: bytes  # the artifact as `ckv compress` wrote it
    model: torch.nn.Module
    checkpoint: Path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def sources(workdir) -> dict[str, Source]:
    """Artifacts written by `compress_to_artifact` from tiny untrained checkpoints on 40 users of ML-100K (also
    saved as `events.csv`, for `ckv evaluate`)."""
    full = load("ml-100k")
    log = read_log(fetch("ml-100k"))
    keep = np.isin(log.users, full.user_ids[:N_USERS])
    log.users, log.items, log.timestamps = log.users[keep], log.items[keep], log.timestamps[keep]
    log.ratings = log.ratings[keep] if log.ratings is not None else None
    ds = build(log, "events.csv", item_vocab=list(full.item_ids))
    with open(workdir / "events.csv", "w") as f:
        f.write("user,item,timestamp\n")
        f.writelines(f"{u},{i},{t}\n" for u, i, t in zip(log.users, log.items, log.timestamps))
    out = {}
    for name, (arch, kw) in ARTIFACTS.items():
        ckpt = workdir / f"{name}.ckpt.safetensors"
        save_checkpoint(make_model(arch, n_items=full.n_items, max_len=MAX_LEN), ckpt, dataset=ds.name,
                        fingerprint=ds.fingerprint, item_vocab=list(full.item_ids), metrics={}, train={})
        model, meta = load_checkpoint(ckpt)
        path = workdir / f"{name}.safetensors"
        compress_to_artifact(model, meta, ckpt, ds, CompressOptions(calib_users=N_USERS, **kw), path, command="ckv fuzz")
        out[name] = Source(path.read_bytes(), model, ckpt)
    return out


# ---------------------------------------------------------------- mutations


def split(raw: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def random_value(rng: random.Random):
    return rng.choice([0, 1, -1, 2, 3, 7, 8, 13, 255, 256, 2**31, 2**40, 10**30, -(2**63), 1.5, float("nan"),
                       float("inf"), "", "x", "items", "int8", "float16", "residual", None, True, False, [], {}, [1, 2],
                       {"a": 1}])


def edit_json(obj, rng: random.Random, depth: int = 0):
    """A copy of a JSON value with one random leaf replaced, key deleted or key added."""
    if isinstance(obj, dict) and obj and depth < 6 and rng.random() < 0.85:
        key = rng.choice(sorted(obj))
        out = dict(obj)
        r = rng.random()
        if r < 0.12:
            del out[key]
        elif r < 0.18:
            out[f"extra{rng.randrange(9)}"] = random_value(rng)
        else:
            out[key] = edit_json(obj[key], rng, depth + 1)
        return out
    if isinstance(obj, list) and obj and depth < 6 and rng.random() < 0.85:
        out = list(obj)
        i = rng.randrange(len(out))
        if rng.random() < 0.15:
            del out[i]
        else:
            out[i] = edit_json(out[i], rng, depth + 1)
        return out
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and rng.random() < 0.6:
        return obj + rng.choice([-2, -1, 1, 2, 8, obj if obj else 1])  # a plausible neighbour
    return random_value(rng)


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    n, header, data = split(raw)
    kind = rng.choice(["flip-header", "flip-data", "flip-data", "truncate", "append", "length", "dtype", "shape",
                       "reshape", "offsets", "swap", "metadata", "metadata", "metadata", "drop-tensor"])
    names = sorted(k for k in header if k != "__metadata__")
    b = bytearray(raw)
    if kind == "flip-header":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "flip-data":
        if len(raw) > 8 + n:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(8 + n, len(b))] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, raw[: rng.randrange(len(raw))]
    if kind == "append":
        return kind, raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "length":
        new = rng.choice([0, 1, 7, n - 8, n - 1, n + 1, n + 8, len(raw), 2**40, 2**64 - 1, rng.randrange(2 * n)])
        return kind, struct.pack("<Q", max(0, min(new, 2**64 - 1))) + raw[8:]
    name = rng.choice(names)
    info = dict(header[name])
    if kind == "dtype":
        info["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        shape = list(info["shape"])
        r = rng.random()
        if r < 0.3 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2])
        elif r < 0.5:
            shape.append(rng.choice([0, 1, 2]))
        elif r < 0.7 and shape:
            shape.pop()
        else:
            shape = edit_json(shape, rng)
        info["shape"] = shape
    elif kind == "reshape":  # the same bytes at another shape: safetensors accepts it, ckv must not be fooled
        size = math.prod(info["shape"])
        shapes = [[size], [size, 1], [1, size]] + [[size // k, k] for k in (2, 3, 4, 8, 16) if size % k == 0]
        info["shape"] = rng.choice(shapes)
    elif kind == "offsets":
        a, z = info["data_offsets"]
        info["data_offsets"] = rng.choice([[a + 1, z + 1], [a, z - 1], [a, z + 1], [z, a], [a - 8, z - 8], [0, z - a],
                                           edit_json([a, z], rng)])
    elif kind == "swap":  # two tensors of the same byte size trade places
        sizes = {}
        for k in names:
            o = header[k]["data_offsets"]
            sizes.setdefault(o[1] - o[0], []).append(k)
        pairs = [v for v in sizes.values() if len(v) > 1]
        if pairs:
            x, y = rng.sample(rng.choice(pairs), 2)
            header[x]["data_offsets"], header[y]["data_offsets"] = header[y]["data_offsets"], header[x]["data_offsets"]
        return kind, join(header, data)
    elif kind == "metadata":
        meta = dict(header["__metadata__"])
        key = rng.choice(["plan", "plan", "plan", "fields", "fields", "fields", "format", "format_version",
                          "checksums", "accounting", "seed", rng.choice(sorted(meta))])
        value = meta.get(key, "")
        try:
            parsed = json.loads(value)
            meta[key] = json.dumps(edit_json(parsed, rng)) if rng.random() < 0.9 else value[: rng.randrange(len(value) + 1)]
        except ValueError:
            meta[key] = rng.choice(["", "x", "1", "{", "[]", "{}", value + "x", "ckv-checkpoint", "2"])
        if rng.random() < 0.05:
            del meta[key]
        header["__metadata__"] = meta
        return f"metadata:{key}", join(header, data)
    elif kind == "drop-tensor":
        del header[name]
        return f"{kind}:{name}", join(header, data)
    header[name] = info
    return f"{kind}:{name}", join(header, data)


# ---------------------------------------------------------------- the reader under test


def read_everything(path: Path, model) -> str:
    """What `ckv evaluate` and `ckv inspect` do with an artifact: 'ok' or 'error: ...'."""
    try:
        with Artifact.open(path) as art:  # the file stays mapped until closed
            art.check_model(model)
            users = np.arange(art.n_users)
            art.read_fields(users[::-1])
            art.decode(users, model)
            if art.n_users:
                art.decode([art.n_users - 1], model)
            pool_usage(art)
            tensor_inventory(path)
            art.verify()
        return "ok"
    except CkvError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return "error: " + msg


def fuzz(sources: dict[str, Source], n_cases: int, seed: int, path: Path, run) -> dict[str, int]:
    """Run `run(path, source) -> outcome` on `n_cases` mutated artifacts under a per-case timer; fails the test
    on any exception, warning or hang, naming the case. Returns outcome counts."""
    rng = random.Random(seed)
    names = sorted(sources)
    outcomes: dict[str, int] = {}
    failures, log = [], []
    gc.collect()  # what earlier tests left to the GC warns now, not inside a case
    old = signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    try:
        for i in range(n_cases):
            name = names[i % len(names)]
            kind, mutated = mutate(sources[name].raw, rng)
            path.write_bytes(mutated)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                with warnings.catch_warnings(record=True) as caught:  # a warning would be a second line on stderr
                    warnings.simplefilter("always")
                    result = run(path, sources[name])
                outcomes[result.split(":")[0]] = outcomes.get(result.split(":")[0], 0) + 1
                log.append(f"{name}\t{kind}\t{result}")
                if caught:
                    failures.append(f"case {i} ({name}, {kind}): warned {caught[0].category.__name__}: {caught[0].message}")
            except Hang:
                failures.append(f"case {i} ({name}, {kind}): no answer within {CASE_SECONDS} s")
            except Exception:  # noqa: BLE001 -- anything but a CkvError is what this test looks for
                failures.append(f"case {i} ({name}, {kind}): {traceback.format_exc(limit=-3)}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"{n_cases} mutated artifacts in {time.perf_counter() - start:.1f} s: {outcomes}")
    if os.environ.get("CKV_FUZZ_LOG"):
        Path(os.environ["CKV_FUZZ_LOG"]).write_text("\n".join(log))
    assert not failures, f"{len(failures)} of {n_cases} cases failed:\n" + "\n".join(failures[:10])
    return outcomes


def test_fuzz_artifact_reader(sources, tmp_path):
    outcomes = fuzz(sources, N_CASES, SEED, tmp_path / "fuzzed.safetensors", lambda p, s: read_everything(p, s.model))
    assert outcomes.get("ok", 0) > N_CASES // 40 and outcomes.get("error", 0) > N_CASES // 4  # both ends exercised


def run_cli(argv: list[str]) -> str:
    """`ckv ...` in-process through `main()`: 'exit N: <stderr>'; asserts the stderr contract (one line, prefixed)."""
    from ckv_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["ckv", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    lines = err.getvalue().splitlines()
    assert code in (0, 1, 2), (code, err.getvalue())
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("ckv: error: "), err.getvalue()
    if code == 1:  # integrity or gate failures: one line each, nothing else
        assert lines and all(line.startswith("ckv: ") for line in lines), err.getvalue()
    return f"exit {code}: {err.getvalue().strip()}"


def test_fuzz_inspect_and_evaluate_commands(sources, workdir, tmp_path, monkeypatch):
    """The same mutations through the whole commands, reports included: `ckv inspect ART --json` and
    `ckv evaluate CKPT ART` (exit 0, 1 for a failed integrity check, or 2 with one line)."""
    monkeypatch.setenv("CKV_NO_PROGRESS", "1")
    monkeypatch.chdir(tmp_path)

    def inspect(path, src):
        Path("r.json").unlink(missing_ok=True)
        return run_cli(["inspect", str(path), "--json", "r.json"])

    def evaluate(path, src):
        return run_cli(["evaluate", str(src.checkpoint), str(path), "--data", str(workdir / "events.csv"),
                        "--bootstrap", "20", "--repeats", "1", "--speed-batch", "8"])

    seen = fuzz(sources, N_CLI_CASES, SEED + 1, tmp_path / "a.safetensors", inspect)
    assert set(seen) == {"exit 0", "exit 1", "exit 2"}
    seen = fuzz(sources, N_CLI_CASES // 3, SEED + 2, tmp_path / "b.safetensors", evaluate)
    assert "exit 0" in seen and "exit 2" in seen


def test_unmutated_sources_read_cleanly(sources, tmp_path):
    for name, src in sources.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(src.raw)
        assert read_everything(path, src.model) == "ok", name
        with Artifact.open(path) as art:
            assert art.verify() == []
