#!/usr/bin/env python
"""End to end from disk: read a batch of users' caches and score 100 candidates each (issue 7 part 3).

Every side reads with the same memory-mapped reader (`ckv_cli.io.safetensors.SafetensorsMap`, one vectorised gather per
field) and scores with the same code: each user's last cached event is replayed over its cache (hidden states
are not cached) by `ckv_cli.serve.next_item.extend_compressed`, which attends over the cache in place (never copied or
concatenated), and the candidates are scored against the output (`score_candidates`).
- full: the teacher caches of the same users, every layer's K and V at fp16, in a safetensors file with the
  artifact's flat layout (`users/offsets`, `L{l}.k`, `L{l}.v` (N, d), `tokens/items`, `tokens/timestamps`):
  gathered, cast to fp32, padded (index_copy), attended densely;
- ckv decoded: `CacheStore.fetch` (the artifact read and decoded: pools gathered, the first layer recomputed
  from item ids), attended densely;
- ckv compressed: `CacheStore.score_items` (the artifact read and attended in the compressed domain: pooled
  layers through the pool, SASRec's first layer through the item and position tables; K/V never built; HSTU's
  first-layer K/V built from its item and position tables, `ckv_cli.serve.next_item.tabled_kv`);
- ckv compressed, no tables: the same with the first layer recomputed by the model from the item ids (what
  `score_items` did for HSTU before the tables).
"read" columns time the read alone: full = gather + cast + pad into the model's layout; ckv = gather + unpack
+ the padded index tensors (`CompressedCache`).

`--parts` (warm only) also times each part of one batch's attention, one query per user, the parts taking turns:
every layer's stored-form parts (a predictive stream's pool, item table and linear part; a first layer read
through the fold tables or as the real tokens' rows) against the fp16 side's dense K and V of the same layer, and
a first layer built from "kv" tables (HSTU's). JSON: each warm row's `parts_ms`.

`warm`: the files are in the page cache (one untimed call first). `cold`: before every timed call that side's
file is unmapped, its pages dropped with posix_fadvise(POSIX_FADV_DONTNEED) and mapped again, so its reads come
from the disk; the share of the file still resident after the drop (mincore) is printed, so a drop the kernel
ignored shows. The sides take turns within each of --repeats rounds (load from other processes falls on all
alike); times are medians, "paired" is the median of the per-round ratios. The artifact (`ckv compress
--codec collective --pool-size 4096`, other options default; or the one `--artifact` names) and the full-cache
file are built once and kept under --out-dir.

    python bench/end_to_end.py                 # ML-1M, sample_checkpoints/sasrec-ml1m.safetensors (builds ~3 min once)
    python bench/end_to_end.py --data ml-100k --checkpoint CKPT --pool-size 64 --out-dir /tmp/b   # quick mode
Runs from the repository root without installing ckv (it puts the root on sys.path).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from bench._machine import machine  # noqa: E402
from ckv_cli.models.checkpoint import load_checkpoint, write_safetensors  # noqa: E402
from ckv_cli.pipeline.compress import CompressOptions, compress_to_artifact  # noqa: E402
from ckv_cli.data import load  # noqa: E402
from ckv_cli.io.files import sha256_file  # noqa: E402
from ckv_cli.errors import CkvError  # noqa: E402
from ckv_cli.io.safetensors import SafetensorsMap  # noqa: E402
from ckv_cli.models.base import KVCache  # noqa: E402
from ckv_cli.serve.attention import CompressedStream  # noqa: E402
from ckv_cli.serve.next_item import (CacheStore, PredictedStream, _cached_scores, _cached_values,  # noqa: E402
                                     first_layer_streams, item_layer_sides, replay_hidden, score_candidates,
                                     tables_form)
from ckv_cli.spec import token_index  # noqa: E402
from ckv_cli.tasks.next_item import iter_test_caches  # noqa: E402

FULL_FORMAT = "ckv-bench-full-cache"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "sample_checkpoints" / "sasrec-ml1m.safetensors")
    p.add_argument("--data", default="ml-1m")
    p.add_argument("--pool-size", type=int, default=4096)
    p.add_argument("--artifact", type=Path, help="time this artifact of --checkpoint (e.g. one `ckv compress` wrote with "
                   "its defaults) instead of building `--codec collective --pool-size N`")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench", help="where the artifact and full file live")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeats", type=int, default=9, help="timed calls per case; the median is reported")
    p.add_argument("--modes", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every row and the machine here")
    p.add_argument("--parts", action="store_true", help="also time each part of one batch's attention (warm): every "
                   "layer's stored-form parts and fp16 K/V, one query per user, and a first layer built from tables")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- files


def build_artifact(args, model, meta, ds, path: Path) -> None:
    opts = CompressOptions(params={"pool_size": args.pool_size, "user_dim": 0, "layout": "residual", "user_dtype": "int8"})
    t = time.perf_counter()
    print(f"building {path} (ckv compress --codec collective --pool-size {args.pool_size}) ...", file=sys.stderr)
    compress_to_artifact(model, meta, args.checkpoint, ds, opts, path,
                         command=f"ckv compress {args.checkpoint} --data {args.data} -o {path} --codec collective --pool-size {args.pool_size}")
    print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)


@torch.no_grad()
def build_full(args, model, ds, path: Path) -> None:
    """Every user's teacher cache (the cache the artifact compresses) at fp16, flat, in dataset order."""
    t = time.perf_counter()
    print(f"building {path} (teacher caches at fp16) ...", file=sys.stderr)
    n_layers = len(model.layers)
    parts: dict[str, list[np.ndarray]] = {}
    lengths = []
    for b in iter_test_caches(model, ds, np.arange(ds.n_users), 256):
        flat = model.flatten(b.cache)
        lengths.append(np.diff(flat.offsets))
        for layer in range(n_layers):
            parts.setdefault(f"L{layer}.k", []).append(flat.stream(f"L{layer}.k").half().numpy())
            parts.setdefault(f"L{layer}.v", []).append(flat.stream(f"L{layer}.v").half().numpy())
        parts.setdefault("tokens/items", []).append(flat.items.astype(np.int32))
        parts.setdefault("tokens/timestamps", []).append(flat.timestamps.astype(np.int64))
    tensors = {k: np.concatenate(v) for k, v in parts.items()}
    tensors["users/offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    meta = {"format": FULL_FORMAT, "checkpoint_sha256": sha256_file(args.checkpoint), "dataset": ds.name,
            "data_fingerprint": ds.fingerprint, "n_layers": str(n_layers)}
    write_safetensors(path, save_file, tensors, meta)
    print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)


class FullCache:
    """The fp16 full-cache file, read with the store's memory-mapped reader."""

    def __init__(self, path: Path, model):
        self.map = SafetensorsMap(path)
        self.model = model
        self.n_layers = int(self.map.metadata["n_layers"])
        self.offsets = np.array(self.map.tensors["users/offsets"])
        self._buffers: dict = {}

    def read(self, users: np.ndarray) -> KVCache:
        """The users' caches, fp32, right-padded: per stream a gather of their fp16 rows, a cast into a staging
        buffer and an index_copy into the padded buffer. Buffers are kept from call to call (as a server would:
        fresh 30 MB buffers cost page faults); padding slots hold stale finite values, which the mask hides."""
        starts, lengths = self.offsets[users], self.offsets[users + 1] - self.offsets[users]
        tok = token_index(starts, lengths)
        t = self.map.tensors
        B, L, N = len(users), int(lengths.max()), len(tok)
        valid = torch.arange(L)[None, :] < torch.from_numpy(lengths)[:, None]
        slots = valid.view(-1).nonzero().squeeze(1)  # flat (B * L) positions of the real tokens

        def buffer(key, shape, dtype):
            buf = self._buffers.get(key)
            if buf is None or buf.shape[0] < shape[0] or buf.dtype != dtype:
                buf = self._buffers[key] = torch.zeros(shape, dtype=dtype)
            return buf[: shape[0]]

        def pad(name: str) -> torch.Tensor:
            x = torch.from_numpy(t[name][tok])
            dtype = torch.float32 if x.is_floating_point() else torch.long
            stage = buffer(("stage", name), (N, *x.shape[1:]), dtype).copy_(x)  # the cast
            out = buffer(("pad", name), (B * L, *x.shape[1:]), dtype)
            return out.index_copy_(0, slots, stage).view(B, L, *x.shape[1:])

        keys = [pad(f"L{i}.k") for i in range(self.n_layers)]
        values = [pad(f"L{i}.v") for i in range(self.n_layers)]
        return KVCache(keys, values, torch.from_numpy(lengths), pad("tokens/items"), pad("tokens/timestamps"))

    @torch.no_grad()
    def score(self, users: np.ndarray, candidates: torch.Tensor) -> np.ndarray:
        return score_candidates(self.model, replay_hidden(self.model, self.read(users)), candidates).numpy()


# ---------------------------------------------------------------------------------------------- timing


def resident(m: SafetensorsMap) -> float:
    """Share of the file's pages in the page cache (mincore over its map), NaN where mincore is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        view = np.frombuffer(m._mm, np.uint8)
        size = len(view)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
        return float("nan") if rc else sum(v & 1 for v in vec) / pages
    except (OSError, AttributeError):
        return float("nan")


def interleaved(fns: dict, repeats: int, before: dict | None = None) -> dict[str, list[float]]:
    """Milliseconds of each function over `repeats` rounds, the functions taking turns within a round (so that
    load from other processes falls on all of them alike); one untimed call of each first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before:
                before[name]()
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def _label(part, own: set) -> str:
    if isinstance(part, CompressedStream):
        m, d = part.pool.shape
        return f"the real tokens' rows ({m}x{d})" if id(part.pool) in own else f"pool {m}x{d}"
    return type(part).__name__


@torch.no_grad()
def part_times(store: CacheStore, full: FullCache, users: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms of each part of one batch's attention, one query per user, the parts taking turns: every layer's
    stored-form K parts (scores) and V parts (values) as `score_items` reads them (`_cached_scores`,
    `_cached_values`; an item-id layer the cache left out as `extend_compressed` reads it, `item_layer_sides`),
    the fp16 side's dense K and V of the same layer, and the first layer's K/V built from a model's "kv" tables
    (`first_layer_streams`, into the store's kept buffers). Queries and weights are random: the times do not
    depend on their values."""
    cc = store._compressed(*store._read(users), recompute_items=False, kept_buffers=True)
    dense = full.read(users)
    tables = store._tables()
    B, L = cc.items.shape
    valid = cc.valid
    g = torch.Generator().manual_seed(0)
    fns = {}
    if tables_form(tables) == "kv":  # its rows are the first layer's pools (`CacheStore._first_kv`)
        tokens = cc.items[valid], torch.arange(L)[None].expand(B, L)[valid]
        fns["first layer K/V from the tables"] = lambda: first_layer_streams(tables, cc.items, valid,
                                                                            store._kv_buffers(len(tokens[0])), tokens)
    own = {id(s.pool) for s in (cc.keys[0], cc.values[0]) if isinstance(s, CompressedStream) and tables_form(tables) == "kv"}
    for i, layer in enumerate(store.model.layers):
        spec = layer.attention_spec()
        H, sides = spec.heads, (cc.keys[i], cc.values[i])
        if sides[0] is None or sides[1] is None:
            made = item_layer_sides(store.model, cc.items, valid, tables if i == 0 else None, spec.kind)
            sides = tuple(m if s is None else s for s, m in zip(sides, made))
        for kind, side, fp16 in (("k", sides[0], dense.keys[i]), ("v", sides[1], dense.values[i])):
            qh = torch.randn(H, B, 1, fp16.shape[-1] // H, generator=g)
            w = torch.rand(H, B, 1, L, generator=g) * valid[None, :, None, :]
            read = (lambda x, q=qh: _cached_scores(x, q, H)) if kind == "k" else (lambda x, a=w: _cached_values(x, a, H))
            parts = side.parts if isinstance(side, PredictedStream) else [side]
            for j, part in enumerate(parts):
                fns[f"L{i}.{kind} ckv {j}: {_label(part, own)}"] = lambda x=part, f=read: f(x)
            fns[f"L{i}.{kind} fp16 dense"] = lambda x=fp16, f=read: f(x)
    return {name: statistics.median(ts) for name, ts in interleaved(fns, repeats).items()}


# ---------------------------------------------------------------------------------------------- main


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, meta = load_checkpoint(args.checkpoint)
    ds = load(args.data, item_vocab=meta["item_vocab"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.checkpoint.stem}-{ds.name}"
    art_path = args.artifact or args.out_dir / f"{stem}-pool{args.pool_size}.ckv.safetensors"
    full_path = args.out_dir / f"{stem}.full-fp16.safetensors"
    digest = sha256_file(args.checkpoint)
    if args.artifact is not None:  # given: used as it is
        CacheStore.open(art_path, model, checkpoint=args.checkpoint).close()
    elif art_path.exists():
        try:
            CacheStore.open(art_path, model, checkpoint=args.checkpoint).close()
        except CkvError as e:
            print(f"rebuilding {art_path}: {e}", file=sys.stderr)
            art_path.unlink()
    if not art_path.exists():
        build_artifact(args, model, meta, ds, art_path)
    if full_path.exists() and SafetensorsMap(full_path).metadata.get("checkpoint_sha256") != digest:
        full_path.unlink()
    if not full_path.exists():
        build_full(args, model, ds, full_path)
    store = CacheStore.open(art_path, model, checkpoint=args.checkpoint)
    full = FullCache(full_path, model)
    if not np.array_equal(full.offsets, store.artifact.offsets):
        raise CkvError(f"{full_path} and {art_path} hold different caches: delete them to rebuild")
    acct = store.artifact.meta["accounting"]
    rng = np.random.default_rng(args.seed)
    rows = []
    for B in args.batch:
        users = np.sort(rng.choice(store.artifact.n_users, size=min(B, store.artifact.n_users), replace=False))
        uid = [store.user_ids[u] for u in users]
        cand_np = rng.integers(1, ds.n_items + 1, size=(len(users), args.candidates))
        cand = torch.from_numpy(cand_np)
        n_tok = int((store.artifact.offsets[users + 1] - store.artifact.offsets[users]).sum())
        s_full = full.score(users, cand)
        s_dec = store.score_items(uid, cand_np, attention="decoded")  # the model's own extend: the reference
        s_comp = store.score_items(uid, cand_np)

        def decoded():
            return score_candidates(model, replay_hidden(model, store.fetch(uid)), cand).numpy()

        def compressed_no_tables():  # the first layer recomputed by the model itself (no item/position tables)
            store._tables = lambda: None
            try:
                return store.score_items(uid, cand_np)
            finally:
                del store._tables

        fns = {"full": lambda: full.score(users, cand), "full_read": lambda: full.read(users),
               "ckv_decoded": decoded, "ckv_compressed": lambda: store.score_items(uid, cand_np),
               "ckv_compressed_no_tables": compressed_no_tables,
               "ckv_read": lambda: store._compressed(*store._read(users), recompute_items=False, kept_buffers=True)}
        maps = {"full": full.map, "full_read": full.map}
        for mode in args.modes:
            row = {"batch": len(users), "mode": mode, "tokens": n_tok,
                   "full_bytes": n_tok * int(acct["full_fp16_bytes_per_token"]),
                   "ckv_bytes": int(round(n_tok * acct["bytes_per_token"])),
                   "max_abs_compressed_vs_decoded": float(np.abs(s_comp - s_dec).max()),
                   "mean_abs_ckv_vs_full": float(np.abs(s_dec - s_full).mean())}
            drop = {name: maps.get(name, store.artifact.mapped).evict for name in fns} if mode == "cold" else None
            times = interleaved(fns, args.repeats, drop)
            for name, ts in times.items():
                row[f"{name}_ms"] = statistics.median(ts)
            row["paired_ratio_compressed"] = statistics.median(f / c for f, c in zip(times["full"], times["ckv_compressed"]))
            if mode == "cold":
                for name, m in (("full", full.map), ("ckv", store.artifact.mapped)):
                    m.evict()
                    row[f"{name}_resident_after_drop"] = resident(m)
            row["ratio_compressed"] = row["full_ms"] / row["ckv_compressed_ms"]
            row["ratio_decoded"] = row["full_ms"] / row["ckv_decoded_ms"]
            row["ratio_compressed_no_tables"] = row["full_ms"] / row["ckv_compressed_no_tables_ms"]
            if args.parts and mode == "warm":
                row["parts_ms"] = part_times(store, full, users, args.repeats)
            rows.append(row)
            print(f"  B={len(users)} {mode}: full {row['full_ms']:.2f} ms, ckv {row['ckv_compressed_ms']:.2f} ms "
                  f"({row['ratio_compressed']:.1f}x, paired {row['paired_ratio_compressed']:.1f}x)", file=sys.stderr)
    return {"machine": machine(), "checkpoint": str(args.checkpoint), "data": ds.name, "artifact": str(art_path),
            "full_file": str(full_path), "artifact_bytes": art_path.stat().st_size, "full_file_bytes": full_path.stat().st_size,
            "bytes_per_token": acct["bytes_per_token"], "full_bytes_per_token": acct["full_fp16_bytes_per_token"],
            "candidates": args.candidates, "repeats": args.repeats, "rows": rows}


COLUMNS = [("batch", "B"), ("mode", "page cache"), ("tokens", "tokens"), ("full_ms", "full ms"),
           ("full_read_ms", "full read ms"), ("ckv_decoded_ms", "ckv decoded ms"),
           ("ckv_compressed_ms", "ckv compressed ms"), ("ckv_compressed_no_tables_ms", "no tables ms"),
           ("ckv_read_ms", "ckv read ms"),
           ("ratio_decoded", "full / decoded"), ("ratio_compressed", "full / compressed"),
           ("paired_ratio_compressed", "paired"), ("ratio_compressed_no_tables", "full / no tables"),
           ("full_bytes", "full MB"), ("ckv_bytes", "ckv MB")]


def cell(key: str, row: dict) -> str:
    v = row[key]
    if key.endswith("_ms"):
        return f"{v:.2f}"
    if "ratio" in key:
        return f"{v:.1f}x"
    if key.endswith("_bytes"):
        return f"{v / 1e6:.3f}"
    return str(v)


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"end to end from disk, {result['candidates']} candidates per user, median of {result['repeats']}: "
          f"{Path(result['checkpoint']).name} on {result['data']}, {m['cpu']}, {m['cores']} cores, "
          f"{m['torch_threads']} torch threads, torch {m['torch']}")
    print(f"files: artifact {result['artifact_bytes'] / 1e6:.1f} MB ({result['bytes_per_token']:.2f} B/token), "
          f"full fp16 {result['full_file_bytes'] / 1e6:.1f} MB ({result['full_bytes_per_token']} B/token)")
    print("\t".join(h for _, h in COLUMNS))
    for r in result["rows"]:
        print("\t".join(cell(k, r) for k, _ in COLUMNS))
    for r in result["rows"]:
        if r["mode"] == "cold":
            print(f"B={r['batch']} cold: resident after the drop: full {r['full_resident_after_drop']:.1%}, "
                  f"artifact {r['ckv_resident_after_drop']:.1%}")
    for r in result["rows"]:
        for name, ms in r.get("parts_ms", {}).items():
            print(f"B={r['batch']} part: {name}\t{ms:.2f} ms")
    worst = max(r["max_abs_compressed_vs_decoded"] for r in result["rows"])
    print(f"compressed-domain vs decoded scores: max |diff| {worst:.2e}; ckv vs full scores: mean |diff| "
          f"{statistics.mean(r['mean_abs_ckv_vs_full'] for r in result['rows']):.4f} (compression error)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except CkvError as e:
        print(f"bench/end_to_end.py: error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
