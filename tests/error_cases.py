"""Every bad input tried on `ckv`, with the exact line it answers and its exit code.

One list, two readers: `tests/test_errors.py` runs every case and checks the line and the code;
`scripts/error_table.py` renders `docs/errors.md` from it (and the test checks the page is up to date), so the
table and the tests cannot drift apart.

Each case runs `ckv ARGS` in-process (`ckv_cli.cli.main`, as the console script does) inside a fresh copy of a
small workspace (see `build_workspace`), after its `setup` has planted the bad input. `message` is the exact
stderr: one line, where `<...>` stands for a part that changes from run to run (a checksum). `harness` names a
condition the command runs under (a full disk, an interrupt). `intact` lists files that must be byte-identical
afterwards (an old output), and no temporary file may be left in the workspace.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VOCAB = ["<pad>"] + [f"i{k}" for k in range(1, 21)]  # the workspace checkpoints' 20 items
COMPRESS = ("compress", "ckpt.safetensors", "--data", "events.csv", "--pool-size", "12", "--calib-users", "20")
NEW = ("compress", "ckpt.safetensors", "--data", "events.csv", "-o", "new.safetensors")  # refused before any work
EVALUATE = ("evaluate", "ckpt.safetensors", "--data", "events.csv")
EVALUATE_ART = ("evaluate", "ckpt.safetensors", "art.safetensors", "--data", "events.csv", "--bootstrap", "20",
                "--repeats", "1", "--speed-batch", "8")


@dataclass(frozen=True)
class Case:
    group: str  # the section of the table
    input: str  # what is wrong, in words
    args: tuple[str, ...]  # after `ckv`, run in the workspace
    message: str  # exact stderr, one line; <...> matches anything
    exit: int = 2
    setup: Callable[[Path], object] | None = None
    harness: str = ""  # a key of HARNESSES: the condition the command runs under
    intact: tuple[str, ...] = ()  # files byte-identical afterwards ('full/x' is compared with the workspace's 'x')
    needs_non_root: bool = False  # permissions do not stop root: skipped there
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the command ("" unsets one)
    absent: tuple[str, ...] = ()  # glob patterns no file may match afterwards (nothing left behind)

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.group} {self.input}".lower()).strip("-")[:80]

    def matches(self, stderr: str) -> bool:
        parts = re.split(r"<[^<>]*>", self.message)
        return re.fullmatch(".+?".join(map(re.escape, parts)), stderr.rstrip("\n")) is not None


# ---------------------------------------------------------------- the workspace


def build_workspace(root: Path) -> None:
    """ckpt.safetensors: a tiny untrained SASRec (2 layers, d 8, window 8) over items i1..i20; other.safetensors:
    the same model with other weights; events.csv: 40 users with 4-9 events each over those items;
    art.safetensors: `ckpt` compressed on `events` (collective, pool 12, 1 user dim); out.safetensors: a copy of
    it (an existing output); set.index.json: the same, sharded (16 users a shard: 3 shards and a shared file)."""
    import numpy as np
    import torch

    from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact
    from ckv_cli.data import load
    from ckv_cli.models import SASRec, SASRecConfig

    root.mkdir(parents=True, exist_ok=True)
    for name, seed in (("ckpt", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = SASRec(SASRecConfig(n_items=20, d=8, n_layers=2, max_len=8)).eval()
        save_checkpoint(model, root / f"{name}.safetensors", dataset="events.csv", fingerprint="0" * 16,
                        item_vocab=VOCAB, metrics={}, train={})
    rng = np.random.default_rng(0)
    with open(root / "events.csv", "w") as f:
        f.write("user,item,timestamp,rating\n")
        for u in range(40):
            for t in range(int(rng.integers(4, 10))):
                f.write(f"u{u},i{rng.integers(1, 21)},{1000 + 10 * t},{rng.integers(1, 6)}\n")
    with chdir(root):
        model, meta = load_checkpoint("ckpt.safetensors")
        ds = load("events.csv", item_vocab=meta["item_vocab"])
        opts = CompressOptions(params={"pool_size": 12, "user_dim": 1, "layout": "residual"}, calib_users=20)
        compress_to_artifact(model, meta, "ckpt.safetensors", ds, opts, "art.safetensors", command="ckv compress")
        from ckv_cli.pipeline.shard import compress_sharded

        opts = CompressOptions(params={"pool_size": 12, "user_dim": 1, "layout": "residual"}, calib_users=20,
                               batch_users=8)
        compress_sharded(model, meta, "ckpt.safetensors", ds, opts, "set.index.json", shard_size=16,
                         command="ckv compress")
    shutil.copy(root / "art.safetensors", root / "out.safetensors")


SET = ("set.index.json", "set.shared.safetensors", "set-00000-of-00003.safetensors", "set-00001-of-00003.safetensors",
       "set-00002-of-00003.safetensors")  # the workspace's sharded artifact
SHARDED = (*COMPRESS, "--batch-users", "8", "--shard-size", "16")
TRAIN = ("train", "--arch", "sasrec", "--data", "events.csv", "--d", "8", "--max-len", "8", "--epochs", "2")


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- ways to break files


def write(name: str, content: str | bytes):
    def setup(ws: Path):
        p = ws / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def csv_rows(rows: list[str], header: str = "user,item,timestamp,rating"):
    return write("bad.csv", header + "\n" + "".join(r + "\n" for r in rows))


def good_rows(n_users: int = 5, events: int = 4) -> list[str]:
    return [f"g{u},i{(u + t) % 20 + 1},{100 + t},4" for u in range(n_users) for t in range(events)]


def copy(src: str, dst: str, keep: int | None = None, cut: int = 0):
    """dst = src's first `keep` bytes (or all of it but the last `cut`)."""
    def setup(ws: Path):
        raw = (ws / src).read_bytes()
        (ws / dst).write_bytes(raw[:keep] if keep is not None else raw[: len(raw) - cut])
    return setup


def edit_header(src: str, dst: str, edit: Callable[[dict], None]):
    """dst = src with `edit(header)` applied to its JSON header (tensor data untouched)."""
    def setup(ws: Path):
        raw = (ws / src).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (ws / dst).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return setup


def edit_meta(src: str, dst: str, key: str, change: Callable):
    """dst = src with metadata entry `key` replaced by change(its JSON value)."""
    def edit(header):
        meta = header["__metadata__"]
        meta[key] = change(json.loads(meta[key]) if meta[key][:1] in "{[" else meta[key])
        meta[key] = meta[key] if isinstance(meta[key], str) else json.dumps(meta[key])
    return edit_header(src, dst, edit)


def flip(src: str, dst: str, at: Callable[[bytes, int], int], xor: int = 0x01):
    """dst = src with the byte at `at(raw, header length)` xor-ed."""
    def setup(ws: Path):
        raw = bytearray((ws / src).read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        raw[at(bytes(raw), n)] ^= xor
        (ws / dst).write_bytes(bytes(raw))
    return setup


def tensor_span(raw: bytes, n: int, name: str) -> tuple[int, int]:
    a, b = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def rewrite_tensors(src: str, dst: str, edit: Callable[[dict, dict], None], loader: str = "numpy"):
    """dst = src with edit(tensors, metadata) applied, through safetensors (so the file itself is well formed)."""
    def setup(ws: Path):
        from safetensors import safe_open

        if loader == "numpy":
            from safetensors.numpy import save_file
        else:
            from safetensors.torch import save_file
        with safe_open(str(ws / src), "np" if loader == "numpy" else "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata())
        tensors = {k: (v.copy() if loader == "numpy" else v.clone()) for k, v in tensors.items()}
        edit(tensors, meta)
        save_file(tensors, str(ws / dst), metadata=meta)
    return setup


def resealed(edit):
    """`edit`, then the checksums recomputed: a well-formed file whose values are wrong (a buggy or hostile
    writer), not one damaged on disk, which `ckv evaluate` refuses at its checksum check first."""
    def both(tensors, meta):
        from ckv_cli.artifact.format import _sha

        edit(tensors, meta)
        meta["checksums"] = json.dumps({k: _sha(v) for k, v in tensors.items()}, sort_keys=True)
    return both


def set_value(name: str, index, value):
    def edit(tensors, meta):
        tensors[name][index] = value
    return edit


def packed_first(name: str, value: int, bits: int):
    """Set the first value of a bit-packed field (big-endian bit order) to `value`."""
    def edit(tensors, meta):
        arr = tensors[name]
        head = (int(arr[0]) << 8 | int(arr[1])) if len(arr) > 1 else int(arr[0]) << 8
        head = (head & ((1 << (16 - bits)) - 1)) | (value << (16 - bits))
        arr[0], arr[1] = head >> 8, head & 0xFF
    return edit


def checkpoint_edit(dst: str, edit: Callable[[dict, dict], None]):
    return rewrite_tensors("ckpt.safetensors", dst, edit, loader="torch")


def retarget(dst: str, checkpoint: str):
    """dst = art.safetensors claiming to be made from `checkpoint` (its sha256 in the metadata)."""
    def setup(ws: Path):
        import hashlib

        sha = hashlib.sha256((ws / checkpoint).read_bytes()).hexdigest()
        edit_meta("art.safetensors", dst, "checkpoint_sha256", lambda _: sha)(ws)
    return setup


def wide_checkpoint(ws: Path):
    """wide.safetensors: a SASRec of width 16 over the same items."""
    import torch

    from ckv_cli.models.checkpoint import save_checkpoint
    from ckv_cli.models import SASRec, SASRecConfig

    torch.manual_seed(2)
    save_checkpoint(SASRec(SASRecConfig(n_items=20, d=16, n_layers=2, max_len=8)).eval(), ws / "wide.safetensors",
                    dataset="x", fingerprint="0" * 16, item_vocab=VOCAB, metrics={}, train={})


def link(src: str, dst: str, symbolic: bool = False):
    def setup(ws: Path):
        (os.symlink if symbolic else os.link)(src if symbolic else ws / src, ws / dst)
    return setup


def cached_dataset(ws: Path):
    """cache/ml-100k/...: a stand-in for the cached ML-100k (never verified: the command stops before reading)."""
    inter = ws / "cache/ml-100k/recbole/dataset_example/ml-100k/ml-100k.inter"
    inter.parent.mkdir(parents=True)
    shutil.copy(ws / "events.csv", inter)


def unterminated_quote(ws: Path):
    """bad.csv: good rows, then a row whose quote never closes (200,000 characters follow)."""
    rows = "".join(r + "\n" for r in good_rows())
    (ws / "bad.csv").write_text("user,item,timestamp,rating\n" + rows + 'g9,"i1,5,4\n' + ("x" * 99 + "\n") * 2000)


def chain(*setups):
    def setup(ws: Path):
        for s in setups:
            s(ws)
    return setup


def torch_save(name: str):
    def setup(ws: Path):
        import torch

        torch.save({"item_emb.weight": torch.zeros(21, 8)}, ws / name)
    return setup


def mkdir(name: str, mode: int | None = None):
    def setup(ws: Path):
        (ws / name).mkdir()
        if mode is not None:
            os.chmod(ws / name, mode)
    return setup


def chmod(name: str, mode: int):
    def setup(ws: Path):
        os.chmod(ws / name, mode)
    return setup


def config_edit(dst: str, **changes):
    def edit(tensors, meta):
        meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    return checkpoint_edit(dst, edit)


def nan_weight(value: float):
    def edit(tensors, meta):
        tensors["layers.1.k.weight"][0, 0] = value
    return edit


def half_weights(tensors, meta):
    tensors["item_emb.weight"] = tensors["item_emb.weight"][:, :4].contiguous()


def drop_weight(tensors, meta):
    del tensors["layers.1.k.bias"]


def vocab_edit(tensors, meta):
    meta["item_vocab"] = json.dumps(VOCAB[:-1])


# ---------------------------------------------------------------- foreign checkpoints (ckv import)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(src: str, dst: str):
    """dst = a committed fixture (tests/fixtures/...)."""
    def setup(ws: Path):
        shutil.copyfile(FIXTURES / src, ws / dst)
    return setup


def recbole_like(dst: str, edit_state=None, edit_cfg=None):
    """dst = the RecBole fixture re-saved with torch.save after `edit_state(state_dict)` / `edit_cfg(config dict)`:
    its config object pickled under RecBole's class name (`recbole.config.configurator.Config`), as RecBole saves it."""
    def setup(ws: Path):
        import types

        import torch

        from ckv_cli.importers.safe_pickle import load_torch_zip

        obj = load_torch_zip(FIXTURES / "recbole" / "sasrec.pth")
        cfg = {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v))
               for k, v in obj["config"].state["final_config_dict"].items()}
        state = dict(obj["state_dict"])
        if edit_state:
            edit_state(state)
        if edit_cfg:
            edit_cfg(cfg)
        module = types.ModuleType("recbole.config.configurator")

        class Config:
            pass

        Config.__module__, Config.__qualname__ = "recbole.config.configurator", "Config"
        module.Config = Config
        config = Config()
        config.final_config_dict = cfg
        saved = {m: sys.modules.get(m) for m in ("recbole", "recbole.config", "recbole.config.configurator")}
        for m in saved:
            sys.modules[m] = module
        try:
            torch.save({"config": config, "epoch": 1, "state_dict": state, "other_parameter": {}, "optimizer": {}},
                       ws / dst, pickle_protocol=4)
        finally:
            for m, old in saved.items():
                if old is None:
                    sys.modules.pop(m, None)
                else:
                    sys.modules[m] = old
    return setup


def evil_pickle(dst: str):
    """dst = a torch.save-shaped zip whose pickle calls os.system when unpickled by anything that resolves globals."""
    def setup(ws: Path):
        import zipfile

        class Run:
            def __reduce__(self):
                return os.system, ("touch pwned",)

        with zipfile.ZipFile(ws / dst, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", __import__("pickle").dumps(Run(), protocol=4))
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
    return setup


def gin_with(dst: str, *extra: str, base: str = "gr/hstu.gin"):
    def setup(ws: Path):
        (ws / dst).write_text((FIXTURES / base).read_text() + "".join(line + "\n" for line in extra))
    return setup


IMPORTS = "ckv import: checkpoints from other frameworks"
RB = ("import", "recbole", "bad.pth", "--item-vocab", "vocab.json", "-o", "new.safetensors")
GR = ("import", "gr", "gr.pt", "--gin", "bad.gin", "-o", "new.safetensors")
RB_VOCAB = fixture("recbole/item_vocab.json", "vocab.json")

def later_events(ws: Path):
    """later.csv: two workspace users' new events, after everything in events.csv."""
    write("later.csv", "user,item,timestamp\nu0,i3,5000\nu1,i4,5000\nu1,i5,5010\n")(ws)


def hstu_workspace(ws: Path, time_bits: int = 0):
    """hstu.safetensors (an untrained HSTU over i1..i20: its artifacts keep event times), hart.safetensors
    compressed from it on events.csv (event times at `time_bits` bits when given), and early.csv: an event of u0
    older than its cached history."""
    import torch

    from ckv_cli.data import load
    from ckv_cli.models import HSTU, HSTUConfig
    from ckv_cli.models.checkpoint import load_checkpoint, save_checkpoint
    from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact

    torch.manual_seed(3)
    save_checkpoint(HSTU(HSTUConfig(n_items=20, d=8, n_layers=2, d_qk=8, d_v=8, max_len=8)).eval(),
                    ws / "hstu.safetensors", dataset="events.csv", fingerprint="0" * 16, item_vocab=VOCAB, metrics={},
                    train={})
    with chdir(ws):
        model, meta = load_checkpoint("hstu.safetensors")
        ds = load("events.csv", item_vocab=meta["item_vocab"])
        opts = CompressOptions(params={"pool_size": 12, "user_dim": 0, "layout": "residual",
                                       **({"time_bits": time_bits} if time_bits else {})}, calib_users=20)
        compress_to_artifact(model, meta, "hstu.safetensors", ds, opts, "hart.safetensors", command="ckv compress")
    write("early.csv", "user,item,timestamp\nu0,i3,1000\n")(ws)


def time_coded(edit):
    """hstu_workspace with 2-bit event times, then bad.safetensors = hart.safetensors with `edit` (checksums
    recomputed)."""
    def setup(ws: Path):
        hstu_workspace(ws, time_bits=2)
        rewrite_tensors("hart.safetensors", "bad.safetensors", resealed(edit))(ws)
    return setup


# ---------------------------------------------------------------- the cases

CHECKPOINTS = "input files: checkpoints"
DATA = "input files: interaction logs"
ARTIFACTS = "input files: artifacts"
MISMATCH = "an artifact and a checkpoint that do not belong together"
OUTPUTS = "outputs"
TRAINING = "training"
OPTIONS = "options"
UPDATES = "ckv compress --update"
UPDATE = ("compress", "ckpt.safetensors", "--update", "art.safetensors", "--data", "later.csv")

CASES: list[Case] = [
    # -- checkpoints
    Case(CHECKPOINTS, "checkpoint path does not exist", ("evaluate", "missing.safetensors", "--data", "events.csv"),
         "ckv: error: checkpoint not found: missing.safetensors"),
    Case(CHECKPOINTS, "checkpoint path is a directory", ("evaluate", "dir", "--data", "events.csv"),
         "ckv: error: expected a checkpoint file, got a directory: dir", setup=mkdir("dir")),
    Case(CHECKPOINTS, "empty checkpoint file (0 bytes)", ("evaluate", "empty.safetensors", "--data", "events.csv"),
         "ckv: error: empty.safetensors: not a readable safetensors file (the file is empty)",
         setup=write("empty.safetensors", b"")),
    Case(CHECKPOINTS, "unreadable checkpoint (chmod 000)", EVALUATE,
         "ckv: error: Invalid value for 'checkpoint': path 'ckpt.safetensors' is not readable.",
         setup=chmod("ckpt.safetensors", 0),
         needs_non_root=True),
    Case(CHECKPOINTS, "a CSV file given as the checkpoint", ("evaluate", "events.csv", "--data", "events.csv"),
         "ckv: error: events.csv: not a readable safetensors file (it starts with text, 'user,ite', where the 8-byte "
         "header length should be)"),
    Case(CHECKPOINTS, "a PyTorch pickle (.pt), never unpickled", ("evaluate", "model.pt", "--data", "events.csv"),
         "ckv: error: model.pt: a PyTorch pickle (torch.save) file; ckv never unpickles, it reads only safetensors "
         "files written by ckv", setup=torch_save("model.pt")),
    Case(CHECKPOINTS, "a torch.save zip renamed to .safetensors", ("evaluate", "model.safetensors", "--data", "events.csv"),
         "ckv: error: model.safetensors: a PyTorch pickle (torch.save) file; ckv never unpickles, it reads only "
         "safetensors files written by ckv", setup=torch_save("model.safetensors")),
    Case(CHECKPOINTS, "a safetensors file without ckv metadata", ("evaluate", "plain.safetensors", "--data", "events.csv"),
         "ckv: error: plain.safetensors: not a ckv checkpoint (metadata 'format' is None)",
         setup=rewrite_tensors("ckpt.safetensors", "plain.safetensors", lambda t, m: m.clear(), loader="torch")),
    Case(CHECKPOINTS, "an artifact given as the checkpoint", ("evaluate", "art.safetensors", "--data", "events.csv"),
         "ckv: error: art.safetensors: not a ckv checkpoint but a ckv artifact (written by ckv compress)"),
    Case(CHECKPOINTS, "checkpoint truncated inside its tensor data", ("evaluate", "cut.safetensors", "--data", "events.csv"),
         "ckv: error: cut.safetensors: not a readable safetensors file (the header declares <n> bytes of tensor data, "
         "the file holds <m>: truncated)", setup=copy("ckpt.safetensors", "cut.safetensors", cut=100)),
    Case(CHECKPOINTS, "checkpoint truncated inside its header", ("evaluate", "cut.safetensors", "--data", "events.csv"),
         "ckv: error: cut.safetensors: not a readable safetensors file (its first 8 bytes give a header of <n> bytes, "
         "the file has 92 after them: truncated)", setup=copy("ckpt.safetensors", "cut.safetensors", keep=100)),
    Case(CHECKPOINTS, "checkpoint header JSON corrupted (one byte)", ("evaluate", "bad.safetensors", "--data", "events.csv"),
         "ckv: error: bad.safetensors: not a readable safetensors file (the header is not valid JSON)",
         setup=flip("ckpt.safetensors", "bad.safetensors", lambda raw, n: 8, xor=0xFF)),
    Case(CHECKPOINTS, "NaN in a checkpoint weight", ("evaluate", "nan.safetensors", "--data", "events.csv"),
         "ckv: error: nan.safetensors: tensor 'layers.1.k.weight' contains NaN or Inf",
         setup=checkpoint_edit("nan.safetensors", nan_weight(float("nan")))),
    Case(CHECKPOINTS, "Inf in a checkpoint weight", ("evaluate", "inf.safetensors", "--data", "events.csv"),
         "ckv: error: inf.safetensors: tensor 'layers.1.k.weight' contains NaN or Inf",
         setup=checkpoint_edit("inf.safetensors", nan_weight(float("-inf")))),
    Case(CHECKPOINTS, "weights of another width than the config says", ("evaluate", "dim.safetensors", "--data", "events.csv"),
         "ckv: error: dim.safetensors: tensor 'item_emb.weight' has shape (21, 4), the config implies (21, 8) "
         "(weights do not match the config)", setup=checkpoint_edit("dim.safetensors", half_weights)),
    Case(CHECKPOINTS, "config with a wider model than the weights", ("evaluate", "dim.safetensors", "--data", "events.csv"),
         "ckv: error: dim.safetensors: tensor 'item_emb.weight' has shape (21, 8), the config implies (21, 16) "
         "(weights do not match the config)", setup=config_edit("dim.safetensors", d=16)),
    Case(CHECKPOINTS, "a weight tensor missing", ("evaluate", "less.safetensors", "--data", "events.csv"),
         "ckv: error: less.safetensors: tensor 'layers.1.k.bias' is missing (weights do not match the config)",
         setup=checkpoint_edit("less.safetensors", drop_weight)),
    Case(CHECKPOINTS, "item vocabulary shorter than the config's item count", ("evaluate", "vocab.safetensors", "--data", "events.csv"),
         "ckv: error: vocab.safetensors: the item vocabulary has 20 entries, the config says 20 items (+ 1 for padding)",
         setup=checkpoint_edit("vocab.safetensors", vocab_edit)),
    Case(CHECKPOINTS, "config with a zero width", ("evaluate", "zero.safetensors", "--data", "events.csv"),
         "ckv: error: zero.safetensors: invalid model config (d must be a positive integer, got 0)",
         setup=config_edit("zero.safetensors", d=0)),
    Case(CHECKPOINTS, "config metadata that is not JSON", ("evaluate", "meta.safetensors", "--data", "events.csv"),
         "ckv: error: meta.safetensors: corrupted checkpoint metadata: 'config' is not valid JSON",
         setup=checkpoint_edit("meta.safetensors", lambda t, m: m.update(config="{\"d\": 8,"))),
    Case(CHECKPOINTS, "unknown architecture in the metadata", ("evaluate", "arch.safetensors", "--data", "events.csv"),
         "ckv: error: arch.safetensors: unknown architecture 'gpt2' (known: sasrec, hstu, sim, eta, sdim, twin, nohistory)",
         setup=checkpoint_edit("arch.safetensors", lambda t, m: m.update(arch="gpt2"))),
    Case(CHECKPOINTS, "checkpoint format version from the future", ("evaluate", "v2.safetensors", "--data", "events.csv"),
         "ckv: error: v2.safetensors: checkpoint format version '2', this ckv reads '1'",
         setup=checkpoint_edit("v2.safetensors", lambda t, m: m.update(format_version="2"))),
    # -- data
    Case(DATA, "data file does not exist", ("evaluate", "ckpt.safetensors", "--data", "missing.csv"),
         "ckv: error: data file not found: missing.csv"),
    Case(DATA, "data path is a directory", ("evaluate", "ckpt.safetensors", "--data", "logs.csv"),
         "ckv: error: expected a file, got a directory: logs.csv", setup=mkdir("logs.csv")),
    Case(DATA, "a glob that matches no Parquet file", ("evaluate", "ckpt.safetensors", "--data", "logs/*.parquet"),
         "ckv: error: no Parquet files match logs/*.parquet", setup=mkdir("logs")),
    Case(DATA, "empty data file", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: data file is empty: bad.csv", setup=write("bad.csv", "")),
    Case(DATA, "unreadable data file (chmod 000)", EVALUATE, "ckv: error: data file is not readable: events.csv",
         setup=chmod("events.csv", 0), needs_non_root=True),
    Case(DATA, "a binary file given as the data", ("evaluate", "ckpt.safetensors", "--data", "art.safetensors"),
         "ckv: error: art.safetensors: not a text file"),
    Case(DATA, "header only, no events", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: no rows after the header", setup=csv_rows([])),
    Case(DATA, "required columns missing", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: missing column(s) item, timestamp (found: user, thing, when); map them with --columns",
         setup=csv_rows(["u1,i1,5"], header="user,thing,when")),
    Case(DATA, "a column named twice in the header", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: column 'item' appears twice in the header",
         setup=csv_rows(["u1,i1,5,i2"], header="user,item,timestamp,item")),
    Case(DATA, "a row with a missing field", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv:4: expected 4 fields, got 3", setup=csv_rows(good_rows(1, 2) + ["g9,i1,5"])),
    Case(DATA, "NaN timestamp", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: column 'timestamp' contains NaN or Inf", setup=csv_rows(good_rows() + ["g9,i1,nan,4"])),
    Case(DATA, "Inf rating", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: column 'rating' contains NaN or Inf", setup=csv_rows(good_rows() + ["g9,i1,5,inf"])),
    Case(DATA, "timestamp that is not a number", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: column 'timestamp' is not numeric (could not convert string to float: 'yesterday')",
         setup=csv_rows(good_rows() + ["g9,i1,yesterday,4"])),
    Case(DATA, "empty user id", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv:22: empty user id", setup=csv_rows(good_rows() + [",i1,5,4"])),
    Case(DATA, "every user has a single event", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: no user has at least 3 events; 5 users, each with fewer", setup=csv_rows(good_rows(5, 1))),
    Case(DATA, "some users have one or two events (dropped, with a note)", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "note: dropped 2 users with fewer than 3 events", exit=0,
         setup=csv_rows(good_rows(5, 4) + ["one,i1,5,4", "two,i1,5,4", "two,i2,6,4"])),
    Case(DATA, "items the checkpoint never saw (dropped, with a note)", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "note: dropped 0 users with fewer than 3 events and 2 events of items the checkpoint does not know", exit=0,
         setup=csv_rows(good_rows(5, 4) + ["g0,new1,200,4", "g1,new2,200,4"])),
    Case(DATA, "no item of the data is in the checkpoint's vocabulary", ("compress", "ckpt.safetensors", "--data", "bad.csv", "-o", "new.safetensors"),
         "ckv: error: bad.csv: none of its 2 items is in the checkpoint's vocabulary (20 items, e.g. 'i1'; this data "
         "has e.g. '101'): was the checkpoint trained on other data?",
         setup=csv_rows([f"u{u},{100 + t % 2 + 1},{t},4" for u in range(5) for t in range(4)])),
    Case(DATA, "known items, but too few per user once the unknown ones are dropped", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: no user has at least 3 events of items the checkpoint knows (10 events of other items "
         "dropped); 5 users, each with fewer", setup=csv_rows([f"u{u},{'i1' if t < 2 else 'x'},{t},4" for u in range(5) for t in range(4)])),
    Case(DATA, "unknown dataset name", ("evaluate", "ckpt.safetensors", "--data", "ml-2m"),
         "ckv: error: unknown dataset 'ml-2m'; named datasets: ml-100k, ml-1m (or give a file path)"),
    Case(DATA, "RecBole .inter file with the wrong header", ("evaluate", "ckpt.safetensors", "--data", "bad.inter"),
         "ckv: error: bad.inter: not a RecBole .inter file (header: uid, iid)", setup=write("bad.inter", "uid\tiid\n1\t2\n")),
    Case(DATA, "MovieLens ratings.dat with a malformed line", ("evaluate", "ckpt.safetensors", "--data", "ratings.dat"),
         "ckv: error: ratings.dat:2: expected UserID::MovieID::Rating::Timestamp",
         setup=write("ratings.dat", "1::i1::5::100\n1::i2::5\n")),
    Case(DATA, "bad --columns mapping", ("evaluate", "ckpt.safetensors", "--data", "events.csv", "--columns", "user=uid,movie=iid"),
         "ckv: error: bad --columns entry 'movie=iid': expected user=..., item=..., timestamp=..., rating=..."),
    Case(DATA, "CSV with an unterminated quote", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv:22: not valid CSV: a field runs past 131,072 characters (an unterminated quote?)",
         setup=unterminated_quote),
    Case(DATA, "common column names (user_id, movieId, ts) recognised without --columns (with a note)",
         ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "note: bad.csv: columns recognised by name: user=user_id, item=movieId, timestamp=ts (--columns overrides)",
         exit=0, setup=csv_rows(good_rows(), header="user_id,movieId,ts,rating")),
    Case(DATA, "two columns that could each be the item", ("evaluate", "ckpt.safetensors", "--data", "bad.csv"),
         "ckv: error: bad.csv: columns movieId, product_id could each be the item; name one with --columns item=NAME",
         setup=csv_rows([r + ",p" for r in good_rows()], header="user,movieId,timestamp,rating,product_id")),
    # -- artifacts
    Case(ARTIFACTS, "artifact path does not exist", ("inspect", "missing.safetensors"), "ckv: error: not found: missing.safetensors"),
    Case(ARTIFACTS, "unreadable artifact (chmod 000)", ("inspect", "art.safetensors"),
         "ckv: error: Invalid value for 'path': path 'art.safetensors' is not readable.",
         setup=chmod("art.safetensors", 0),
         needs_non_root=True),
    Case(ARTIFACTS, "empty artifact file", ("evaluate", *EVALUATE[1:], "empty.safetensors"),
         "ckv: error: empty.safetensors: not a readable safetensors file (the file is empty)",
         setup=write("empty.safetensors", b"")),
    Case(ARTIFACTS, "a checkpoint given as the artifact", ("evaluate", *EVALUATE[1:], "ckpt.safetensors"),
         "ckv: error: ckpt.safetensors: not a ckv artifact but a ckv checkpoint (written by ckv train)"),
    Case(ARTIFACTS, "artifact truncated by one byte", ("inspect", "cut.safetensors"),
         "ckv: error: cut.safetensors: not a readable safetensors file (the header declares <n> bytes of tensor data, "
         "the file holds <m>: truncated)", setup=copy("art.safetensors", "cut.safetensors", cut=1)),
    Case(ARTIFACTS, "artifact header length garbled", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: not a readable safetensors file (its first 8 bytes give a header of "
         "<n> bytes, more than a safetensors header may have)",
         setup=flip("art.safetensors", "bad.safetensors", lambda raw, n: 6, xor=0x40)),
    Case(ARTIFACTS, "artifact header JSON corrupted (one byte)", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: not a readable safetensors file (the header is not valid JSON)",
         setup=flip("art.safetensors", "bad.safetensors", lambda raw, n: 8, xor=0xFF)),
    Case(ARTIFACTS, "tensor data offsets shifted", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: not a readable safetensors file (tensor 'L1.k/idx' of shape [<n>] and dtype U8 "
         "needs <n> bytes, its offsets span <n + 1>)",
         setup=edit_header("art.safetensors", "bad.safetensors",
                           lambda h: h["L1.k/idx"].update(data_offsets=[h["L1.k/idx"]["data_offsets"][0],
                                                                        h["L1.k/idx"]["data_offsets"][1] + 1]))),
    Case(ARTIFACTS, "tensor dtype changed in the header", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (tensor 'L1.k/scale' is I16 [40, 1], its field needs F16 [40, 1])",
         setup=edit_header("art.safetensors", "bad.safetensors", lambda h: h["L1.k/scale"].update(dtype="I16"))),
    Case(ARTIFACTS, "tensor reshaped in the header (same bytes)", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (tensor 'L1.k/user' is I8 [1, <n>], its field needs I8 [<n>, 1])",
         setup=edit_header("art.safetensors", "bad.safetensors",
                           lambda h: h["L1.k/user"].update(shape=h["L1.k/user"]["shape"][::-1]))),
    Case(ARTIFACTS, "a tensor missing", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: not a readable safetensors file (tensor 'L1.v/idx' starts at byte <n> of the "
         "data, expected <m> (overlap or gap))",
         setup=edit_header("art.safetensors", "bad.safetensors", lambda h: h.pop("L1.k/idx"))),
    Case(ARTIFACTS, "plan metadata that is not JSON", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: corrupted metadata entry 'plan'",
         setup=edit_meta("art.safetensors", "bad.safetensors", "plan", lambda p: json.dumps(p)[:-1])),
    Case(ARTIFACTS, "pool size in the plan disagrees with the stored pool", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (stream L1.k: pool has 12 entries, the metadata says 16)",
         setup=edit_meta("art.safetensors", "bad.safetensors", "plan",
                         lambda p: {**p, "streams": {**p["streams"], "L1.k": {**p["streams"]["L1.k"],
                                    "params": {**p["streams"]["L1.k"]["params"], "pool_size": 16}}}})),
    Case(ARTIFACTS, "unknown codec in the plan", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (its plan: unknown codec 'zip' (known: <the registered codecs>))",
         setup=edit_meta("art.safetensors", "bad.safetensors", "plan",
                         lambda p: {**p, "streams": {**p["streams"], "L1.k": {**p["streams"]["L1.k"], "codec": "zip"}}})),
    Case(ARTIFACTS, "token count in the field table disagrees with the offsets", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (field 'L1.k/idx' has count <n> in metadata 'fields', "
         "expected <m>)",
         setup=edit_meta("art.safetensors", "bad.safetensors", "fields",
                         lambda f: {**f, "L1.k/idx": {**f["L1.k/idx"], "count": f["L1.k/idx"]["count"] + 1}})),
    Case(ARTIFACTS, "artifact format version from the future", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: artifact format version '2', this ckv reads '1'",
         setup=edit_meta("art.safetensors", "bad.safetensors", "format_version", lambda v: "2")),
    Case(ARTIFACTS, "user offsets not increasing", ("inspect", "bad.safetensors"),
         "ckv: error: bad.safetensors: inconsistent artifact (user offsets are not increasing from 0 to the <n> tokens)",
         setup=rewrite_tensors("art.safetensors", "bad.safetensors", set_value("users/offsets", 3, 0))),
    Case(ARTIFACTS, "pool index out of range", EVALUATE_ART[:2] + ("bad.safetensors",) + EVALUATE_ART[3:],
         "ckv: error: bad.safetensors: L1.k pool index 15 out of range (pool 12)",
         setup=rewrite_tensors("art.safetensors", "bad.safetensors", resealed(packed_first("L1.k/idx", 15, 4)))),
    Case(ARTIFACTS, "event-time intervals that do not rise (times coded at a few bits)",
         ("evaluate", "hstu.safetensors", "bad.safetensors", "--data", "events.csv"),
         "ckv: error: bad.safetensors: inconsistent artifact (event times: time codec: bounds do not rise from 0 to 129)",
         setup=time_coded(set_value("shared/time/bounds", -1, 0))),
    Case(ARTIFACTS, "item id out of range", EVALUATE_ART[:2] + ("bad.safetensors",) + EVALUATE_ART[3:],
         "ckv: error: bad.safetensors: item id 31 out of range (20 items)",
         setup=rewrite_tensors("art.safetensors", "bad.safetensors", resealed(packed_first("tokens/items", 31, 5)))),
    Case(ARTIFACTS, "corrupted tensor data (checksum mismatch; the report is still printed)", ("inspect", "bad.safetensors"),
         "ckv: integrity check failed: tensor 'shared/L1.v/pool' does not match its checksum (bad.safetensors)", exit=1,
         setup=flip("art.safetensors", "bad.safetensors", lambda raw, n: sum(tensor_span(raw, n, "shared/L1.v/pool")) // 2)),
    Case(ARTIFACTS, "corrupted tensor data given to evaluate", EVALUATE_ART[:2] + ("bad.safetensors",) + EVALUATE_ART[3:],
         "ckv: error: bad.safetensors: tensor 'L1.k/idx' does not match its checksum (damaged on disk?)",
         setup=rewrite_tensors("art.safetensors", "bad.safetensors", packed_first("L1.k/idx", 15, 4))),
    # -- artifact against checkpoint
    Case(MISMATCH, "artifact built from another checkpoint", ("evaluate", "other.safetensors", *EVALUATE_ART[2:]),
         "ckv: error: art.safetensors was made from another checkpoint (sha256 <sha>..., this checkpoint <sha>...)"),
    Case(MISMATCH, "artifact whose streams are narrower than the checkpoint's (dimension mismatch)",
         ("evaluate", "wide.safetensors", "wide-art.safetensors", *EVALUATE_ART[3:]),
         "ckv: error: wide-art.safetensors: stream L1.k is 8 wide, the checkpoint's is 16",
         setup=chain(wide_checkpoint, retarget("wide-art.safetensors", "wide.safetensors"))),
    Case(MISMATCH, "artifact of other users than --data holds", ("evaluate", "ckpt.safetensors", "art.safetensors", "--data", "bad.csv"),
         "ckv: error: art.safetensors holds none of the 5 users of bad.csv", setup=csv_rows(good_rows(5, 4))),
    # -- outputs
    Case(OUTPUTS, "output in a directory that does not exist", (*COMPRESS, "-o", "nodir/out.safetensors"),
         "ckv: error: output directory does not exist: nodir"),
    Case(OUTPUTS, "output in a read-only directory", (*COMPRESS, "-o", "ro/out.safetensors"),
         "ckv: error: output directory is not writable: ro", setup=mkdir("ro", 0o555), needs_non_root=True),
    Case(OUTPUTS, "existing output without --force", (*COMPRESS, "-o", "out.safetensors"),
         "ckv: error: out.safetensors exists; pass --force to overwrite it", intact=("out.safetensors",)),
    Case(OUTPUTS, "output path is a directory", (*COMPRESS, "-o", "dir", "--force"),
         "ckv: error: output is a directory: dir", setup=mkdir("dir")),
    Case(OUTPUTS, "--json into a directory that does not exist", (*EVALUATE, "--json", "nodir/r.json"),
         "ckv: error: output directory does not exist: nodir"),
    Case(OUTPUTS, "disk full while the artifact is written (old output kept, no temporary left)",
         (*COMPRESS, "-o", "out.safetensors", "--force"),
         "ckv: error: could not write out.safetensors: No space left on device", harness="enospc",
         intact=("out.safetensors",)),
    Case(OUTPUTS, "interrupt (Ctrl-C) in the middle of compress (old output kept, nothing written)",
         (*COMPRESS, "-o", "out.safetensors", "--force", "--batch-users", "8"),
         "ckv: interrupted", exit=130, harness="interrupt", intact=("out.safetensors",)),
    Case(OUTPUTS, "interrupt while the artifact is being written (old output kept, no temporary left)",
         (*COMPRESS, "-o", "out.safetensors", "--force"),
         "ckv: interrupted", exit=130, harness="interrupt-write", intact=("out.safetensors",)),
    Case(OUTPUTS, "--json is the checkpoint the command reads (even with --force)",
         (*EVALUATE, "--json", "ckpt.safetensors", "--force"),
         "ckv: error: --json ckpt.safetensors is the checkpoint this command reads; write the output elsewhere (--force "
         "never overwrites an input)", intact=("ckpt.safetensors",)),
    Case(OUTPUTS, "--json is the data file the command reads (even with --force)",
         ("inspect", "ckpt.safetensors", "--data", "events.csv", "--json", "events.csv", "--force"),
         "ckv: error: --json events.csv is the --data file this command reads; write the output elsewhere (--force "
         "never overwrites an input)", intact=("events.csv",)),
    Case(OUTPUTS, "inspect --json onto the checkpoint the artifact's metadata names (read with --data)",
         ("inspect", "art.safetensors", "--data", "events.csv", "--json", "ckpt.safetensors", "--force"),
         "ckv: error: --json ckpt.safetensors is the artifact's checkpoint this command reads; write the output elsewhere "
         "(--force never overwrites an input)", intact=("ckpt.safetensors",)),
    Case(OUTPUTS, "--json onto the cached file of the named dataset --data reads",
         ("evaluate", "ckpt.safetensors", "--data", "ml-100k", "--json", "cache/ml-100k/recbole/dataset_example/ml-100k/"
          "ml-100k.inter", "--force"),
         "ckv: error: --json cache/ml-100k/recbole/dataset_example/ml-100k/ml-100k.inter is the --data file this command "
         "reads; write the output elsewhere (--force never overwrites an input)", env=(("CKV_CACHE", "cache"),),
         setup=cached_dataset),
    Case(OUTPUTS, "--json onto the genres file read beside a ratings.dat",
         ("evaluate", "ckpt.safetensors", "--data", "ratings.dat", "--json", "movies.dat", "--force"),
         "ckv: error: --json movies.dat is the --data file this command reads; write the output elsewhere (--force never "
         "overwrites an input)", setup=chain(write("ratings.dat", "1::i1::5::100\n"), write("movies.dat", "1::x::Drama\n"))),
    Case(OUTPUTS, "--json over an existing file without --force", ("inspect", "art.safetensors", "--json", "events.csv"),
         "ckv: error: events.csv exists; pass --force to overwrite it", intact=("events.csv",)),
    Case(OUTPUTS, "--json and -o the same path", (*NEW, "--json", "new.safetensors"),
         "ckv: error: --json new.safetensors is also the -o output of this command; give each output its own path"),
    Case(OUTPUTS, "-o a hard link to the checkpoint (same inode), with --force",
         (*COMPRESS, "-o", "hard.safetensors", "--force"),
         "ckv: error: -o hard.safetensors is the checkpoint this command reads; write the output elsewhere (--force "
         "never overwrites an input)", setup=link("ckpt.safetensors", "hard.safetensors"), intact=("ckpt.safetensors",)),
    Case(OUTPUTS, "-o a symlink to the data file, with --force", ("train", "--arch", "sasrec", "--data", "events.csv",
                                                                   "-o", "sym.safetensors", "--force"),
         "ckv: error: -o sym.safetensors is the --data file this command reads; write the output elsewhere (--force "
         "never overwrites an input)", setup=link("events.csv", "sym.safetensors", symbolic=True), intact=("events.csv",)),
    Case(OUTPUTS, "verify --json onto the artifact it verifies", ("verify", "set.index.json", "--json",
                                                                   "set-00001-of-00003.safetensors", "--force"),
         "ckv: error: --json set-00001-of-00003.safetensors is a file of the verified artifact this command reads; write "
         "the output elsewhere (--force never overwrites an input)", intact=SET),
    Case(OUTPUTS, "--json onto a FIFO (a device such as /dev/null would have been replaced by a file)",
         (*EVALUATE, "--json", "pipe", "--force"),
         "ckv: error: --json pipe is a FIFO, not a regular file: ckv writes a file and renames it into place, which "
         "would replace it (use '-' for stdout where the option takes it)", setup=lambda ws: os.mkfifo(ws / "pipe")),
    Case(OUTPUTS, "a file where the output directory should be", (*EVALUATE, "--json", "events.csv/r.json"),
         "ckv: error: --json events.csv/r.json: events.csv is a file, not a directory"),
    Case(OUTPUTS, "output file name too long (300 bytes)", (*NEW[:-1], "a" * 284 + ".safetensors"),
         "ckv: error: output file name too long: aaaaaaaaaaaaaaaaaaaaaaaa... (296 bytes, the file system takes 255)"),
    Case(OUTPUTS, "--plot names a file, not a directory", (*EVALUATE, "--sweep", "int8", "--plot", "events.csv"),
         "ckv: error: --plot events.csv exists and is not a directory"),
    Case(OUTPUTS, "output on a read-only file system", (*COMPRESS, "-o", "ro/out.safetensors"),
         "ckv: error: output directory is on a read-only file system: ro", harness="rofs"),
    Case(OUTPUTS, "disk really full while the artifact is written (a full tmpfs; old output kept)",
         (*COMPRESS, "-o", "full/out.safetensors", "--force"),
         "ckv: error: could not write full/out.safetensors: No space left on device", harness="full",
         intact=("full/out.safetensors",)),
    Case(OUTPUTS, "disk really full while a sharded artifact is written (nothing left behind)",
         (*SHARDED, "-o", "full/s.index.json"),
         "ckv: error: could not write full/s.shared.safetensors: No space left on device", harness="full",
         absent=("full/s*", "full/.s*")),
    Case(OUTPUTS, "disk really full while train writes the checkpoint",
         (*TRAIN, "-o", "full/new.safetensors"),
         "ckv: error: could not write full/new.safetensors: No space left on device", harness="full",
         absent=("full/new*", "full/.new*")),
    Case(OUTPUTS, "SIGTERM while the artifact is being written (old output kept, no temporary left)",
         (*COMPRESS, "-o", "out.safetensors", "--force"),
         "ckv: interrupted by SIGTERM", exit=143, harness="sigterm-write", intact=("out.safetensors",)),
    Case(OUTPUTS, "SIGHUP while the artifact is being written (old output kept, no temporary left)",
         (*COMPRESS, "-o", "out.safetensors", "--force"),
         "ckv: interrupted by SIGHUP", exit=129, harness="sighup-write", intact=("out.safetensors",)),
    Case(OUTPUTS, "sharded --force run interrupted when the new shared file appears (the old set stays valid)",
         (*SHARDED, "-o", "set.index.json", "--force"),
         "ckv: interrupted by SIGTERM", exit=143, harness="sigterm-shared", intact=SET, absent=("set.1*",)),
    Case(OUTPUTS, "fresh sharded run interrupted when its shared file appears (nothing left behind)",
         (*SHARDED, "-o", "fresh.index.json"),
         "ckv: interrupted by SIGTERM", exit=143, harness="sigterm-shared", absent=("fresh*", ".fresh*")),
    Case(OUTPUTS, "dataset cache path is a file (CKV_CACHE)", ("evaluate", "ckpt.safetensors", "--data", "ml-100k"),
         "ckv: error: cannot write the dataset cache events.csv/ml-100k: events.csv is a file, not a directory (set "
         "CKV_CACHE to a writable directory)", env=(("CKV_CACHE", "events.csv"),)),
    Case(OUTPUTS, "dataset cache under a read-only HOME", ("evaluate", "ckpt.safetensors", "--data", "ml-100k"),
         "ckv: error: cannot write the dataset cache ro/.cache/ckv/ml-100k: Read-only file system (set CKV_CACHE to a "
         "writable directory)", harness="rofs", env=(("CKV_CACHE", ""), ("XDG_CACHE_HOME", ""), ("HOME", "ro"))),
    # -- training
    Case(TRAINING, "learning rate so large the loss becomes NaN (refused: before, NaN weights were written; a loss "
                   "that turns NaN within the range stops training, writing nothing: tests/test_guard.py)",
         (*TRAIN, "-o", "new.safetensors", "--lr", "1e6"),
         "ckv: error: Invalid value for '--lr': Input should be less than or equal to 10"),
    Case(TRAINING, "interrupt (Ctrl-C) after the first epoch (the best epoch is saved, marked partial; exit 130)",
         (*TRAIN, "-o", "run.safetensors"),
         "ckv: interrupted; saved the best epoch so far (epoch 1 of 1 run, valid_NDCG@10 <v>) to run.safetensors, "
         "marked partial", exit=130, harness="sigint-epoch"),
    Case(TRAINING, "SIGTERM during train --force over an existing checkpoint (kept; the best epoch goes beside it)",
         (*TRAIN, "-o", "other.safetensors", "--force"),
         "ckv: interrupted by SIGTERM; saved the best epoch so far (epoch 1 of 1 run, valid_NDCG@10 <v>) to "
         "other.partial.safetensors, marked partial", exit=143, harness="sigterm-epoch", intact=("other.safetensors",)),
    Case(TRAINING, "interrupt (Ctrl-C) before the first epoch ends (nothing written)",
         (*TRAIN, "-o", "new.safetensors", "--batch-size", "4"),
         "ckv: interrupted; no epoch had finished: nothing written", exit=130, harness="interrupt"),
    Case(TRAINING, "a CTR model on a log without ratings (no labels)",
         ("train", "--arch", "sim", "--data", "bad.csv", "-o", "new.safetensors"),
         "ckv: error: bad.csv: the CTR task needs a rating column (label = rating >= 4) and this log has none; provide "
         "one (map it with --columns rating=NAME)",
         setup=csv_rows([r.rsplit(",", 1)[0] for r in good_rows()], header="user,item,timestamp")),
    # -- options
    Case(OPTIONS, "unknown codec", (*NEW, "--codec", "zip"),
         "ckv: error: unknown codec 'zip' (known: <the registered codecs>)"),
    Case(OPTIONS, "unknown codec parameter", (*NEW, "--param", "colour=red"),
         "ckv: error: bad parameters for codec 'predictive': PredictiveCodec.__init__() got an unexpected keyword "
         "argument 'colour'"),
    Case(OPTIONS, "codec parameter of the wrong type", (*NEW, "--param", "pool_size=big"),
         "ckv: error: pool size must be an integer >= 2, got 'big'"),
    Case(OPTIONS, "--param without '='", (*NEW, "--param", "pool_size"),
         "ckv: error: bad --param 'pool_size': expected KEY=VALUE"),
    Case(OPTIONS, "codec parameter out of range", (*NEW, "--codec", "pq", "--param", "bits=0"),
         "ckv: error: bits must be an integer >= 1, got 0"),
    Case(OPTIONS, "pool of one entry", (*NEW, "--pool-size", "1"),
         "ckv: error: --pool-size must be between 2 and 16777216, got 1"),
    Case(OPTIONS, "--pool-size neither a number, auto nor balanced", (*NEW, "--pool-size", "big"),
         "ckv: error: --pool-size takes an integer, auto or balanced, got 'big'"),
    Case(OPTIONS, "time_bits on a model that reads no event times", (*NEW, "--param", "time_bits=4"),
         "ckv: error: time_bits: this model's attention reads no event times (nothing to store)"),
    Case(OPTIONS, "unknown pool metric", (*NEW, "--param", "metric=cosine"),
         "ckv: error: metric must be one of l2, fisher, got 'cosine'"),
    Case(OPTIONS, "the Fisher metric with --pool-size auto (sized by squared error)",
         (*NEW, "--pool-size", "auto", "--param", "metric=fisher"),
         "ckv: error: --pool-size auto sizes pools by their squared error; it does not take metric=fisher (use "
         "--pool-size N or balanced)"),
    Case(OPTIONS, "a negative cap on the predictive codec's item table", (*NEW, "--param", "max_rows=-1"),
         "ckv: error: max_rows must be an integer >= 0 (0: no cap) or 'pool', got -1"),
    Case(OPTIONS, "a moving-average rate of 1 for the predictive codec's context", (*NEW, "--param", "ema=1"),
         "ckv: error: ema must be a number in [0, 1) (0: no moving average), got 1"),
    Case(OPTIONS, "a moving average with the per-item predictor (no linear map to extend)",
         (*NEW, "--param", "ema=0.1", "--param", "predictor=item"),
         "ckv: error: ema extends the linear predictors' context: use predictor linear or linear+item, not 'item'"),
    Case(OPTIONS, "--target on an unknown metric", (*NEW, "--target", "foo=1"),
         "ckv: error: bad --target 'foo=1': unknown metric 'foo' (known: overlap, kl, HR@10, NDCG@10, HR@50, NDCG@50, "
         "MRR)"),
    Case(OPTIONS, "--target overlap above 1", (*NEW, "--target", "overlap=1.5"),
         "ckv: error: bad --target 'overlap=1.5': overlap must be in (0, 1]"),
    Case(OPTIONS, "--target with sharded output", (*NEW[:-1], "new.index.json", "--shard-size", "256", "--target",
                                                   "overlap=0.9"),
         "ckv: error: --target writes one artifact: it does not go with --engine ray, --shard-size or --shards yet"),
    Case(OPTIONS, "--calib-holdout with sharded output", (*NEW[:-1], "new.index.json", "--shard-size", "256",
                                                          "--calib-holdout"),
         "ckv: error: --calib-holdout writes one artifact: sharded output (--engine ray, --shard-size, --shards) draws "
         "its own calibration sample"),
    Case(OPTIONS, "user dims as wide as the vectors", (*NEW, "--user-dim", "8"),
         "ckv: error: user dim (8) must be smaller than the vector width (8)"),
    Case(OPTIONS, "pool larger than the calibration set (1,024 entries, 40 users)", (*NEW, "--pool-size", "1024"),
         "ckv: error: L1.k: a pool of 1024 entries needs at least as many calibration vectors, got <n> (use more "
         "calibration users or a smaller pool)"),
    Case(OPTIONS, "unknown --layout", (*NEW, "--layout", "stacked"),
         "ckv: error: layout must be 'residual' or 'concat', got 'stacked'"),
    Case(OPTIONS, "unknown --share", (*NEW, "--share", "q"),
         "ckv: error: --share takes k, v or k,v (got q)"),
    Case(OPTIONS, "--batch-users 0", (*NEW, "--batch-users", "0"),
         "ckv: error: Invalid value for '--batch-users': Input should be greater than or equal to 1"),
    Case(OPTIONS, "--calib-users 0", (*NEW, "--calib-users", "0"),
         "ckv: error: Invalid value for '--calib-users': Input should be greater than or equal to 1"),
    Case(OPTIONS, "--max-delta without '='", (*EVALUATE_ART, "--max-delta", "NDCG@10"),
         "ckv: error: bad --max-delta 'NDCG@10': expected METRIC=VALUE with METRIC one of HR@10, NDCG@10, HR@50, "
         "NDCG@50, MRR"),
    Case(OPTIONS, "--max-delta on an unknown metric", (*EVALUATE_ART, "--max-delta", "AUC=0.01"),
         "ckv: error: bad --max-delta 'AUC=0.01': expected METRIC=VALUE with METRIC one of HR@10, NDCG@10, HR@50, "
         "NDCG@50, MRR"),
    Case(OPTIONS, "--max-delta that is not a number", (*EVALUATE_ART, "--max-delta", "NDCG@10=lots"),
         "ckv: error: bad --max-delta 'NDCG@10=lots': 'lots' is not a number"),
    Case(OPTIONS, "negative --max-delta", (*EVALUATE_ART, "--max-delta", "NDCG@10=-1%"),
         "ckv: error: bad --max-delta 'NDCG@10=-1%': the allowed drop must be >= 0"),
    Case(OPTIONS, "--max-delta without an artifact to gate", (*EVALUATE, "--max-delta", "NDCG@10=1%"),
         "ckv: error: --max-delta, --max-delta-ci, --max-ratio, --min-overlap and --max-kl gate artifacts: name at least one artifact"),
    Case(OPTIONS, "negative --max-ratio", (*EVALUATE_ART, "--max-ratio", "-0.5"),
         "ckv: error: Invalid value for '--max-ratio': Input should be greater than or equal to 0"),
    Case(OPTIONS, "--speed-batch 0", (*EVALUATE_ART[:-2], "--speed-batch", "0"),
         "ckv: error: Invalid value for '--speed-batch': Input should be greater than or equal to 1"),
    Case(OPTIONS, "compress --threads 0", (*NEW, "--threads", "0"),
         "ckv: error: Invalid value for '--threads': Input should be greater than or equal to 1"),
    Case(OPTIONS, "evaluate --threads -1", (*EVALUATE, "--threads", "-1"),
         "ckv: error: Invalid value for '--threads': Input should be greater than or equal to 1"),
    Case(OPTIONS, "train --threads 0", ("train", "--arch", "sasrec", "--data", "events.csv", "-o", "new.safetensors",
                                        "--threads", "0"),
         "ckv: error: Invalid value for '--threads': Input should be greater than or equal to 1"),
    Case(OPTIONS, "unknown --split", (*EVALUATE, "--split", "train"),
         "ckv: error: unknown --split 'train' (choose test or valid)"),
    Case(OPTIONS, "unknown --arch", ("train", "--arch", "gpt2", "--data", "events.csv", "-o", "new.safetensors"),
         "ckv: error: unknown --arch 'gpt2' (choose from: sasrec, hstu, sim, eta, sdim, twin, nohistory)"),
    Case(OPTIONS, "train --batch-size 0", ("train", "--arch", "sasrec", "--data", "events.csv", "-o", "new.safetensors",
                                           "--batch-size", "0"),
         "ckv: error: Invalid value for '--batch-size': Input should be greater than or equal to 1"),
    Case(OPTIONS, "train --dropout 1.5", ("train", "--arch", "sasrec", "--data", "events.csv", "-o", "new.safetensors",
                                          "--dropout", "1.5"),
         "ckv: error: Invalid value for '--dropout': Input should be less than or equal to 0.99"),
    Case(OPTIONS, "missing --data", ("compress", "ckpt.safetensors", "-o", "new.safetensors"),
         "ckv: error: Missing option '--data' / '-d'."),
    Case(OPTIONS, "unknown option", (*NEW, "--pool", "8"),
         "ckv: error: No such option: --pool (Possible options: --pool-size)"),
    Case(OPTIONS, "--finetune without distillation", (*NEW, "--finetune"),
         "ckv: error: --finetune needs --distill-steps > 0 (the model trains during distillation)"),
    Case(OPTIONS, "--finetune with sharded output", (*NEW, "--finetune", "--distill-steps", "2", "--shard-size", "8"),
         "ckv: error: --finetune writes one artifact: it does not go with --engine ray, --shard-size or --shards yet"),
    Case(OPTIONS, "compress --codec evict (sweep only)", (*NEW, "--codec", "evict"),
         "ckv: error: codec evict keeps a different number of tokens per user, which the artifact format (fixed-width "
         "per-token fields) does not hold: it is available in `ckv evaluate CHECKPOINT --sweep "
         "'evict:keep=0.5,policy=recent'` only"),
    Case(OPTIONS, "--sweep-users on a next-item model", (*EVALUATE, "--sweep-users", "10"),
         "ckv: error: --sweep-users goes with --sweep on a CTR model (a next-item sweep scores every user)"),
    # -- ckv import
    Case(IMPORTS, "unknown framework key", ("import", "tensorflow", "model.pt", "-o", "new.safetensors"),
         "ckv: error: unknown framework 'tensorflow' (known: recbole, gr)"),
    Case(IMPORTS, "crafted pickle that would run a command (nothing runs)", RB,
         "ckv: error: bad.pth: not a RecBole checkpoint (expected a dict with 'config' and 'state_dict', got posix.system)",
         setup=chain(evil_pickle("bad.pth"), RB_VOCAB)),
    Case(IMPORTS, "crafted pickle given as a generative-recommenders checkpoint", ("import", "gr", "bad.pth", "--gin", "gr.gin", "-o", "new.safetensors"),
         "ckv: error: bad.pth: refused by torch.load(weights_only=True), nothing executed (its pickle: Unsupported operand 149)",
         setup=chain(evil_pickle("bad.pth"), fixture("gr/hstu.gin", "gr.gin"))),
    Case(IMPORTS, "not a torch.save file", RB, "ckv: error: bad.pth: not a torch.save zip file",
         setup=chain(write("bad.pth", "user,item\n"), RB_VOCAB)),
    Case(IMPORTS, "RecBole checkpoint missing a tensor", RB,
         "ckv: error: bad.pth: tensor 'trm_encoder.layer.1.feed_forward.LayerNorm.bias' is missing (RecBole SASRec with this config)",
         setup=chain(recbole_like("bad.pth", edit_state=lambda s: s.pop("trm_encoder.layer.1.feed_forward.LayerNorm.bias")), RB_VOCAB)),
    Case(IMPORTS, "RecBole checkpoint with an extra tensor", RB,
         "ckv: error: bad.pth: unexpected tensor 'extra.weight': not part of the RecBole SASRec with this config",
         setup=chain(recbole_like("bad.pth", edit_state=lambda s: s.update({"extra.weight": s["LayerNorm.bias"]})), RB_VOCAB)),
    Case(IMPORTS, "RecBole tensor shape does not match its config", RB,
         "ckv: error: bad.pth: tensor 'trm_encoder.layer.0.feed_forward.dense_1.weight' has shape (16, 8), the architecture implies (32, 8)",
         setup=chain(recbole_like("bad.pth", edit_cfg=lambda c: c.update(inner_size=32)), RB_VOCAB)),
    Case(IMPORTS, "RecBole hyperparameter ckv cannot represent (hidden_act)", RB,
         "ckv: error: bad.pth: RecBole hidden_act='leaky_relu' cannot be represented (ckv has: gelu, relu, swish, tanh, sigmoid)",
         setup=chain(recbole_like("bad.pth", edit_cfg=lambda c: c.update(hidden_act="leaky_relu")), RB_VOCAB)),
    Case(IMPORTS, "RecBole model other than SASRec", RB,
         "ckv: error: bad.pth: RecBole model 'BERT4Rec' is not supported (ckv imports RecBole's SASRec)",
         setup=chain(recbole_like("bad.pth", edit_cfg=lambda c: c.update(model="BERT4Rec")), RB_VOCAB)),
    Case(IMPORTS, "item vocabulary of the wrong size", RB,
         "ckv: error: bad.pth: the item vocabulary (file vocab.json) has 3 items, the embedding table 1,682 (+ 1 padding row): not the data this model was trained on",
         setup=chain(fixture("recbole/sasrec.pth", "bad.pth"), write("vocab.json", '["[PAD]", "a", "b", "c"]'))),
    Case(IMPORTS, "RecBole item numbering that cannot be rebuilt (rm_dup_inter)", ("import", "recbole", "bad.pth", "--data", "events.csv", "-o", "new.safetensors"),
         "ckv: error: bad.pth: cannot rebuild RecBole's item vocabulary: its config sets rm_dup_inter='first'; pass --item-vocab (RecBole's dataset.field2id_token['item_id'])",
         setup=recbole_like("bad.pth", edit_cfg=lambda c: c.update(rm_dup_inter="first"))),
    Case(IMPORTS, "an unknown dataset name as --data", ("import", "recbole", "bad.pth", "--data", "ml-1mm", "-o", "new.safetensors"),
         "ckv: error: unknown dataset 'ml-1mm'; named datasets: ml-100k, ml-1m (or give a file path)",
         setup=fixture("recbole/sasrec.pth", "bad.pth")),
    Case(IMPORTS, "RecBole import with neither --data nor --item-vocab", ("import", "recbole", "bad.pth", "-o", "new.safetensors"),
         "ckv: error: recbole import needs --data LOG (to rebuild RecBole's item numbering) or --item-vocab FILE",
         setup=fixture("recbole/sasrec.pth", "bad.pth")),
    Case(IMPORTS, "gin file that does not match the weights", GR,
         "ckv: error: gr.pt: the gin file does not match the weights: hstu_encoder.num_blocks says 3, the weights have 2 layers",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), gin_with("bad.gin", "hstu_encoder.num_blocks = 3"))),
    Case(IMPORTS, "gin binding ckv cannot represent", GR,
         "ckv: error: generative-recommenders train_fn.interaction_module_type = 'MoL' cannot be represented in ckv (supported: 'DotProduct')",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), gin_with("bad.gin", 'train_fn.interaction_module_type = "MoL"'))),
    Case(IMPORTS, "gr import without a gin file or bindings", ("import", "gr", "gr.pt", "-o", "new.safetensors"),
         "ckv: error: gr import needs the run's --gin FILE or --bind NAME=VALUE flags (the checkpoint holds no config)",
         setup=fixture("gr/hstu.pt", "gr.pt")),
    Case(IMPORTS, "gr item vocabulary of the wrong size", (*GR, "--item-vocab", "vocab.json"),
         "ckv: error: gr.pt: the item vocabulary has 3 items, the embedding table 1,682 (+ 1 padding row)",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "bad.gin"), write("vocab.json", '["a", "b", "c"]'))),
    Case(IMPORTS, "--gin given to a RecBole import", ("import", "recbole", "bad.pth", "--gin", "x.gin", "-o", "new.safetensors"),
         "ckv: error: --gin and --bind are options of 'ckv import gr' (a RecBole checkpoint carries its config)"),
    Case(IMPORTS, "an existing output without --force", ("import", "gr", "gr.pt", "--gin", "gr.gin", "-o", "out.safetensors"),
         "ckv: error: out.safetensors exists; pass --force to overwrite it",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "gr.gin")), intact=("out.safetensors",)),
    Case(IMPORTS, "-o is the framework checkpoint being imported (even with --force)",
         ("import", "gr", "gr.pt", "--gin", "gr.gin", "-o", "gr.pt", "--force"),
         "ckv: error: -o gr.pt is the checkpoint this command reads; write the output elsewhere (--force never overwrites an input)",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "gr.gin"))),
    Case(IMPORTS, "--json onto the gin file (even with --force)",
         ("import", "gr", "gr.pt", "--gin", "gr.gin", "-o", "new.safetensors", "--json", "gr.gin", "--force"),
         "ckv: error: --json gr.gin is the --gin file this command reads; write the output elsewhere (--force never overwrites an input)",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "gr.gin"))),
    Case(IMPORTS, "--json and -o the same path",
         ("import", "gr", "gr.pt", "--gin", "gr.gin", "-o", "new.safetensors", "--json", "new.safetensors"),
         "ckv: error: --json new.safetensors is also the -o output of this command; give each output its own path",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "gr.gin"))),
    Case(IMPORTS, "an existing --json file without --force",
         ("import", "gr", "gr.pt", "--gin", "gr.gin", "-o", "new.safetensors", "--json", "events.csv"),
         "ckv: error: events.csv exists; pass --force to overwrite it",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "gr.gin")), intact=("events.csv",)),
    Case(IMPORTS, "a gin temperature ckv cannot use", (*GR, "--bind", "train_fn.temperature=0"),
         "ckv: error: generative-recommenders train_fn.temperature = 0 is not a positive number",
         setup=chain(fixture("gr/hstu.pt", "gr.pt"), fixture("gr/hstu.gin", "bad.gin"))),
    Case(OPTIONS, "compress without -o", ("compress", "ckpt.safetensors", "--data", "events.csv"),
         "ckv: error: Missing option '--out' / '-o'."),
    Case(OPTIONS, "--shards with --shard-size", (*NEW[:-2], "-o", "new.index.json", "--shards", "2", "--shard-size", "8"),
         "ckv: error: --shards (users by hash) and --shard-size (users by range) both choose the shard assignment: "
         "give one"),
    Case(OPTIONS, "--shards with --distill-steps", (*NEW[:-2], "-o", "new.index.json", "--shards", "2",
                                                   "--distill-steps", "2"),
         "ckv: error: --distill-steps does not go with --shards yet (distillation samples users from the whole log)"),
    # -- updates
    Case(UPDATES, "another checkpoint than the artifact's", ("compress", "other.safetensors", *UPDATE[2:]),
         "ckv: error: art.safetensors was made from another checkpoint (sha256 <...>..., this checkpoint <...>...)",
         setup=later_events, intact=("art.safetensors",)),
    Case(UPDATES, "a plan option that is not the artifact's", (*UPDATE, "--pool-size", "16"),
         "ckv: error: art.safetensors was compressed with pool_size 12; --update encodes with the artifact's plan and "
         "cannot change it: --pool-size 16 differs (drop it, or compress anew)",
         setup=later_events, intact=("art.safetensors",)),
    Case(UPDATES, "new events older than the user's cached history",
         ("compress", "hstu.safetensors", "--update", "hart.safetensors", "--data", "early.csv"),
         "ckv: error: user 'u0': a new event at 1000 is older than its cached history (last cached event at <t>); "
         "--update appends newer events only", setup=hstu_workspace),
    Case(UPDATES, "--json onto the artifact being updated", (*UPDATE, "--json", "art.safetensors"),
         "ckv: error: --json art.safetensors is also the --update output of this command; give each output its own "
         "path", setup=later_events, intact=("art.safetensors",)),
    Case(UPDATES, "--update with -o", (*UPDATE, "-o", "new.safetensors"),
         "ckv: error: --update rewrites the artifact in place, in this process, with its own plan: drop -o",
         setup=later_events),
    Case(UPDATES, "--update of an artifact that does not exist",
         ("compress", "ckpt.safetensors", "--update", "nope.safetensors", "--data", "later.csv"),
         "ckv: error: artifact not found: nope.safetensors", setup=later_events),
    Case(UPDATES, "--update of an index that does not exist",
         ("compress", "ckpt.safetensors", "--update", "nope.index.json", "--data", "later.csv"),
         "ckv: error: index not found: nope.index.json", setup=later_events),
    Case(OPTIONS, "negative --seed", (*NEW, "--seed", "-1"),
         "ckv: error: Invalid value for '--seed': Input should be greater than or equal to 0"),
    Case(OPTIONS, "--seed past 2**32 - 1", (*EVALUATE, "--seed", "18446744073709551616"),
         "ckv: error: Invalid value for '--seed': Input should be less than or equal to 4294967295"),
    Case(OPTIONS, "--lr nan", (*TRAIN, "-o", "new.safetensors", "--lr", "nan"),
         "ckv: error: Invalid value for '--lr': Input should be less than or equal to 10"),
    Case(OPTIONS, "--lr 0", (*TRAIN, "-o", "new.safetensors", "--lr", "0"),
         "ckv: error: Invalid value for '--lr': Input should be greater than 0, got 0"),
    Case(OPTIONS, "--dropout nan", (*TRAIN, "-o", "new.safetensors", "--dropout", "nan"),
         "ckv: error: Invalid value for '--dropout': Input should be less than or equal to 0.99"),
    Case(OPTIONS, "--max-minutes inf", (*TRAIN, "-o", "new.safetensors", "--max-minutes", "inf"),
         "ckv: error: Invalid value for '--max-minutes': inf is not a finite number"),
    Case(OPTIONS, "--max-ratio nan", (*EVALUATE_ART, "--max-ratio", "nan"),
         "ckv: error: Invalid value for '--max-ratio': Input should be greater than or equal to 0"),
    Case(OPTIONS, "--target-error 0", ("inspect", "ckpt.safetensors", "--target-error", "0"),
         "ckv: error: Invalid value for '--target-error': Input should be greater than 0, got 0"),
    Case(OPTIONS, "--d far too large for memory (before: a traceback; an allocation that fails within the ranges is "
                  "one line too: tests/test_guard.py)", (*TRAIN, "-o", "new.safetensors", "--d", "1000000000"),
         "ckv: error: Invalid value for '--d': Input should be less than or equal to 65536"),
    Case(OPTIONS, "--heads that does not divide --d (SASRec)", (*TRAIN, "-o", "new.safetensors", "--heads", "3"),
         "ckv: error: invalid sasrec config: width 8 is not a multiple of the 3 heads (SASRec splits its width across "
         "the heads)"),
    Case(OPTIONS, "--threads 100000 (torch crashed)", (*TRAIN, "-o", "new.safetensors", "--threads", "100000"),
         "ckv: error: Invalid value for '--threads': Input should be less than or equal to 4096"),
    Case(OPTIONS, "--min-overlap above 1", (*EVALUATE_ART, "--min-overlap", "1.5"),
         "ckv: error: Invalid value for '--min-overlap': Input should be less than or equal to 1"),
    Case(OPTIONS, "--max-kl nan", (*EVALUATE_ART, "--max-kl", "nan"),
         "ckv: error: Invalid value for '--max-kl': Input should be greater than or equal to 0"),
    Case(OPTIONS, "--param that is not a finite number", (*NEW, "--param", "pool_size=nan"),
         "ckv: error: bad --param 'pool_size=nan': nan is not a finite number"),
    Case(OPTIONS, "evaluate --sweep --calib-users 0", (*EVALUATE, "--sweep", "int8", "--calib-users", "0"),
         "ckv: error: Invalid value for '--calib-users': Input should be greater than or equal to 1"),
    Case(OPTIONS, "negative --sweep-users", (*EVALUATE, "--sweep", "int8", "--sweep-users", "-1"),
         "ckv: error: Invalid value for '--sweep-users': Input should be greater than or equal to 0"),
    Case(OPTIONS, "--lr above 10", (*TRAIN, "-o", "new.safetensors", "--lr", "11"),
         "ckv: error: Invalid value for '--lr': Input should be less than or equal to 10"),
    Case(OPTIONS, "--bootstrap 10**20", (*EVALUATE_ART[:-6], "--bootstrap", "100000000000000000000"),
         "ckv: error: Invalid value for '--bootstrap': Input should be less than or equal to 1000000"),
    Case(OPTIONS, "negative --negatives", (*TRAIN, "-o", "new.safetensors", "--negatives", "-1"),
         "ckv: error: Invalid value for '--negatives': Input should be greater than or equal to 0"),
    Case(OPTIONS, "negative --bootstrap", (*EVALUATE_ART[:-6], "--bootstrap", "-1"),
         "ckv: error: Invalid value for '--bootstrap': Input should be greater than or equal to 0"),
    Case(OPTIONS, "cell search probes not a count", (*NEW, "--param", "probes=-1"),
         "ckv: error: probes must be an integer >= 0, got -1"),
]


# ---------------------------------------------------------------- running a case


@contextlib.contextmanager
def harness(name: str):
    """The condition a case runs under, patched in-process."""
    if not name:
        yield
        return
    import ckv_cli.artifact.writer
    import ckv_cli.cli.render

    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if name == "enospc":  # the writer gets half the file out, then the disk is full
        real = ckv_cli.artifact.writer._assemble

        def assemble(path, *args):
            real(path, *args)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        patch(ckv_cli.artifact.writer, "_assemble", assemble)
    elif name == "interrupt":  # Ctrl-C after the first batch of users is encoded
        real_progress = ckv_cli.cli.render.progress

        @contextlib.contextmanager
        def progress(description, total):
            with real_progress(description, total) as advance:
                calls = []

                def interrupting(n=1, info=None):
                    advance(n, info)
                    if n:
                        calls.append(n)
                        if len(calls) == 2:
                            raise KeyboardInterrupt
                yield interrupting

        patch(ckv_cli.cli.render, "progress", progress)
    elif name == "interrupt-write":  # Ctrl-C once the temporary file is written, before it is renamed
        real_assemble = ckv_cli.artifact.writer._assemble

        def interrupted(path, *args):
            real_assemble(path, *args)
            raise KeyboardInterrupt

        patch(ckv_cli.artifact.writer, "_assemble", interrupted)
    elif name in SIGNAL_AT:  # a real signal to this process at a pause point of the writer or of training
        import fnmatch

        import ckv_cli.io.guarded
        import ckv_cli.train.common

        signum, pattern = SIGNAL_AT[name]
        sent = []

        def pause(label):
            if not sent and fnmatch.fnmatchcase(label, pattern):
                sent.append(label)
                os.kill(os.getpid(), signum)

        for module in (ckv_cli.io.guarded, ckv_cli.train.common):
            patch(module, "pause", pause)
    elif name in ("full", "rofs"):
        with mounted_tmpfs({"full": "full", "rofs": "ro"}[name]):
            yield
        return
    else:
        raise ValueError(name)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


SIGNAL_AT = {"sigterm-write": (signal.SIGTERM, "written *"), "sighup-write": (signal.SIGHUP, "written *"),
             "sigterm-shared": (signal.SIGTERM, "renamed *.shared.safetensors"),
             "sigint-epoch": (signal.SIGINT, "epoch 1"), "sigterm-epoch": (signal.SIGTERM, "epoch 1")}


@contextlib.contextmanager
def mounted_tmpfs(name: str):
    """A small tmpfs at ./full (out.safetensors copied in, the rest filled: every write that needs a block fails
    with ENOSPC) or ./ro (mounted read-only). Needs root; the test is skipped where the mount fails. Afterwards
    what the file system held is copied into a plain directory of the same name, for the checks."""
    import subprocess

    import pytest

    where = Path(name).resolve()
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        where.rmdir()
        pytest.skip("a tmpfs is mounted only when the test runs as root (and may mount)")
    try:
        if name == "full":
            shutil.copy("out.safetensors", where / "out.safetensors")
            fd = os.open(where / ".filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield
    finally:
        kept = Path(f"{where}.kept")
        shutil.copytree(where, kept, ignore=shutil.ignore_patterns(".filler"))
        subprocess.run(["umount", str(where)], check=True, capture_output=True)
        where.rmdir()
        kept.rename(where)


def run(case: Case, ws: Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ckv ARGS` in workspace `ws`, after the case's setup."""
    from ckv_cli.cli import main

    if case.setup:
        case.setup(ws)
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    env = os.environ.get("CKV_NO_PROGRESS")
    os.environ["CKV_NO_PROGRESS"] = "1"
    saved_env = {k: os.environ.get(k) for k, _ in case.env}
    for k, v in case.env:
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    sys.argv = ["ckv", *case.args]
    try:
        with chdir(ws), harness(case.harness), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        if env is None:
            os.environ.pop("CKV_NO_PROGRESS", None)
        else:
            os.environ["CKV_NO_PROGRESS"] = env
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


NOBODY = 65534


def run_unprivileged(case: Case, base: Path, scratch: Path) -> tuple[int, str, str] | None:
    """As root, whom permissions do not stop: run the case as user `nobody` in a forked child (in a copy of the
    workspace `base` under a new directory in `scratch`, which nobody can reach). The command runs once as root
    first, so that every module it needs is imported before the child loses access to root's files. None when
    this process cannot change its user."""
    import tempfile

    warm = _fresh(base, Path(tempfile.mkdtemp(dir=scratch)))
    try:
        run(case, warm)  # warm-up: imports
    finally:
        shutil.rmtree(warm)
    ws = _fresh(base, Path(tempfile.mkdtemp(dir=scratch)))
    try:
        return _run_as_nobody(case, ws)
    finally:
        shutil.rmtree(ws)


def _run_as_nobody(case: Case, ws: Path) -> tuple[int, str, str] | None:
    for q in [ws, *ws.rglob("*")]:
        os.chown(q, NOBODY, NOBODY)
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, send back the result, exit without cleanup
        os.close(read)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except PermissionError:
            result = None
        else:
            try:
                result = list(run(case, ws))
            except BaseException:  # noqa: BLE001 -- reported by the parent
                import traceback

                result = [-1, "", traceback.format_exc()]
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    result = json.loads(data) if data else [-1, "", "the child died without a result"]
    return None if result is None else tuple(result)


def _fresh(base: Path, ws: Path) -> Path:
    shutil.copytree(base, ws, dirs_exist_ok=True)
    return ws


# ---------------------------------------------------------------- the table


def render() -> str:
    """docs/errors.md."""
    lines = ["# Bad input: what ckv answers", "",
             "Every bad input tried, with the exact line `ckv` prints on stderr and its exit code (2 for bad input, 1 "
             "for a failed integrity check, 128 + the signal for an interrupt: 130 for Ctrl-C, 143 for SIGTERM, 129 for "
             "SIGHUP; 0 when the input is used after a note). Each row is "
             "a test: `tests/test_errors.py` runs it in a small workspace (a tiny checkpoint `ckpt.safetensors` over "
             "items i1..i20, `other.safetensors` with other weights, a 40-user log `events.csv`, and "
             "`art.safetensors` compressed from them) and checks the line and the code, that no temporary file is "
             "left behind, and that an old output is untouched where the row says so. `<...>` marks a part that "
             "varies (a checksum, a byte count).", "",
             "Generated from `tests/error_cases.py` by `python scripts/error_table.py` (the test suite fails when this "
             "page is out of date). Rows marked (non-root) need a user whom permissions stop: run as root, the test "
             "runs them as user `nobody` in a forked child (and skips them where it cannot change user). Rows on `full/` "
             "and `ro/` mount a small tmpfs there (filled up, or read-only): they need root and are skipped elsewhere. "
             "Signal rows send the signal to the process itself at a named point of the writer or of training "
             "(`ckv_cli.io.signals.pause`); tests/test_guard_signals.py does the same to real `ckv` processes.", ""]
    groups: dict[str, list[Case]] = {}
    for case in CASES:
        groups.setdefault(case.group, []).append(case)
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    n = 0
    for group, cases in groups.items():
        lines += [f"## {group[0].upper() + group[1:]}", "", "| # | input | command | message | exit |",
                  "|---|---|---|---|---|"]
        for case in cases:
            n += 1
            how = {"enospc": " (the write fails: ENOSPC)", "interrupt": " (Ctrl-C mid-way)",
                   "interrupt-write": " (Ctrl-C while writing)", "sigterm-write": " (SIGTERM while writing)",
                   "sighup-write": " (SIGHUP while writing)",
                   "sigterm-shared": " (SIGTERM when the shared file is renamed into place)",
                   "sigint-epoch": " (Ctrl-C after epoch 1)", "sigterm-epoch": " (SIGTERM after epoch 1)",
                   "full": " (full/ is a full tmpfs)", "rofs": " (ro/ is a read-only tmpfs)"}.get(case.harness, "")
            env = "".join(f"{k}={v} " for k, v in case.env)
            note = " (non-root)" if case.needs_non_root else ""
            lines.append(f"| {n} | {cell(case.input)}{note} | `{cell(env + 'ckv ' + ' '.join(case.args))}`{how} | "
                         f"`{cell(case.message)}` | {case.exit} |")
        lines.append("")
    return "\n".join(lines)
