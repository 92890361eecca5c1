"""`ckv inspect`: what an artifact holds (metadata, tensors, bytes, pool use, integrity, and against data the
decoded streams' error), and what a next-item checkpoint's caches look like (the CollectiveKV paper's analysis,
measured: arXiv 2601.19178 §3).

Checkpoint analysis, per cached stream (layer l's K or V) on a seeded sample of users' teacher caches:
- spectrum: share of variance held by the top principal components (how low-rank the cache is);
- same-item similarity: cosine between tokens of the same item in different users' caches, against random
  pairs (how much of a token is the item, how much the user);
- item function: share of variance left unexplained by the item (and by item + position); ~0 means the
  stream can be recomputed from item ids;
- a recommendation: the cheapest pool size and user dim whose estimated relative error stays under a target.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ckv_cli.artifact.reader import Artifact
from ckv_cli.errors import CkvError
from ckv_cli.codecs.bits import bits_for, unpack
from ckv_cli.codecs.kmeans import kmeans, nearest
from ckv_cli.data.sequences import SequenceData
from ckv_cli.io.safetensors import DTYPE_BYTES, read_header
from ckv_cli.spec import FlatCache
from ckv_cli.tasks.next_item import iter_test_caches

SPECTRUM_KS = (1, 2, 4, 8, 16, 32)
POOL_CANDIDATES = (256, 1024, 4096, 8192)
USER_DIMS = (0, 1, 2, 4, 8)


# -- artifacts ---------------------------------------------------------------------------------------------
def tensor_inventory(path) -> list[dict]:
    """Name, dtype, shape and bytes of every tensor, read from the header alone."""
    header, _ = read_header(path)
    return [{"name": name, "dtype": info["dtype"], "shape": list(info["shape"]),
             "bytes": DTYPE_BYTES.get(info["dtype"], 0) * math.prod(info["shape"])} for name, info in sorted(header.items())]


def artifact_inventory(art: Artifact) -> list[dict]:
    """`tensor_inventory` of an artifact; of a sharded one (`ckv_cli.artifact.sharded.ShardedArtifact`), the shared
    file's tensors and each per-user tensor over all shards (bytes and first dimension summed, `files` counted)."""
    shards = getattr(art, "shards", None)
    if shards is None:
        return tensor_inventory(art.path)
    out = {t["name"]: {**t, "files": 1} for t in tensor_inventory(art.path.parent / art.index["shared"]["file"])}
    for shard in shards:
        for t in tensor_inventory(shard.path):
            if t["name"] not in out:
                out[t["name"]] = {**t, "shape": list(t["shape"]), "files": 0}
            else:
                o = out[t["name"]]
                o["bytes"] += t["bytes"]
                o["shape"] = [o["shape"][0] + t["shape"][0], *o["shape"][1:]]
            out[t["name"]]["files"] += 1
    return [out[k] for k in sorted(out)]


def pool_usage(art: Artifact) -> dict[str, dict]:
    """Per pooled stream: entries used, entropy of the index distribution (bits, and as a share of the most a
    pool of that size can have), and the share of tokens that go to the 10 most used entries (over every shard
    of a sharded artifact)."""
    out = {}
    item_coded = _item_coded(art, {stream: codec for stream, codec in art.plan.coded().items()
                                   if getattr(codec, "index", None) is not None and hasattr(codec, "pool_size")})
    for stream, codec in art.plan.coded().items():
        name = f"{stream}/idx"
        extra = {}
        if stream in item_coded:  # item-coded: decoded
            idx, extra = item_coded[stream]
        elif name not in art.fields or not hasattr(codec, "pool_size"):
            continue
        else:
            idx = [unpack(part.mapped.tensors[name], part.fields[name]["bits"], part.fields[name]["count"])
                   for part in getattr(art, "shards", [art])]
        counts = np.bincount(np.concatenate(idx), minlength=codec.pool_size)
        p = counts[counts > 0] / max(counts.sum(), 1)
        entropy = float(-(p * np.log2(p)).sum())
        out[stream] = {"pool_size": codec.pool_size, "used": int((counts > 0).sum()),
                       "entropy_bits": entropy, "entropy_share": entropy / math.log2(codec.pool_size),
                       "top10_share": float(np.sort(counts)[::-1][:10].sum() / max(counts.sum(), 1)),
                       **extra, "counts": counts}
    return out


def _item_coded(art: Artifact, codecs: dict, chunk: int = 4096) -> dict[str, tuple[list[np.ndarray], dict]]:
    """Per item-coded stream of `codecs`: the pool index of every token (decoded through the lists; one pass over
    the artifact, a chunk of users at a time, for all of them) and the index coding's numbers: width, share of
    tokens escaped, entries listed."""
    if not codecs:
        return {}
    idx = {s: [] for s in codecs}
    escaped, tokens = dict.fromkeys(codecs, 0), dict.fromkeys(codecs, 0)
    for a in range(0, art.n_users, chunk):
        fields, offsets = art.read_fields(np.arange(a, min(a + chunk, art.n_users)))
        for stream, codec in codecs.items():
            sub = {f.name: fields[f"{stream}/{f.name}"] for f in codec.index_fields()}
            idx[stream].append(codec.indices(sub, offsets, fields["tokens/items"]))
            escaped[stream] += int((np.asarray(sub["pos"]) == codec.index.escape).sum())
            tokens[stream] += len(sub["pos"])
    return {s: (idx[s] or [np.zeros(0, np.int64)],
                {"index_bits": c.index.bits, "escape_rate": escaped[s] / max(tokens[s], 1),
                 "list_entries": int(len(c.index.entries))}) for s, c in codecs.items()}


@torch.no_grad()
def reconstruction_error(model, ds, art: Artifact, n_users: int, seed: int, batch_users: int = 256) -> dict:
    """Relative squared error of each decoded stream against the model's exact tokens (and the share of side-field
    values changed), over a seeded sample of the users both hold."""
    from ckv_cli.evaluate.compare import artifact_users
    from ckv_cli.pipeline.compress import Errors
    from ckv_cli.tasks import task_of

    task = task_of(model)
    data_users, art_users = artifact_users(art, ds, task)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(data_users), size=min(n_users, len(data_users)), replace=False))
    data_users, art_users = data_users[keep], art_users[keep]
    errors, start = Errors(), 0
    for tb in task.batches(model, ds, data_users, batch_users):
        decoded = art.decode(art_users[start : start + len(tb.users)], model)
        start += len(tb.users)
        if not np.array_equal(decoded.offsets, tb.tokens.offsets):
            raise CkvError(f"{art.path}: its users' cached token counts differ from those of --data {ds.name}")
        errors.add(tb.tokens, decoded)
    out = {"reconstruction_rel_error": errors.recon(), "reconstruction_users": int(len(data_users))}
    if errors.side[1]:
        out["signature_mismatch_rate"] = errors.side[0] / errors.side[1]
    return out


# -- checkpoints -------------------------------------------------------------------------------------------
def sample_caches(model, ds: SequenceData, n_users: int, seed: int) -> FlatCache:
    users = np.sort(np.random.default_rng(seed).choice(ds.n_users, size=min(n_users, ds.n_users), replace=False))
    return FlatCache.concat([model.flatten(b.cache) for b in iter_test_caches(model, ds, users)])


def spectrum(x: torch.Tensor) -> np.ndarray:
    """(N, d) -> cumulative share of variance held by the top 1..d principal components."""
    s = torch.linalg.svdvals(x - x.mean(0)) ** 2  # (d,)
    return (s.cumsum(0) / s.sum().clamp(min=1e-12)).numpy()


def unexplained_by(x: torch.Tensor, groups: np.ndarray) -> float:
    """Share of the variance of x (N, d) left around the mean of each group, over groups of 2+ tokens."""
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    keep = torch.from_numpy(counts[inv] >= 2)
    if int(keep.sum()) < 2:
        return float("nan")
    xs, g = x[keep], torch.from_numpy(inv[keep.numpy()])
    sums = torch.zeros(len(counts), x.shape[1]).index_add_(0, g, xs)
    means = sums / torch.from_numpy(counts).float()[:, None]
    resid = ((xs - means[g]) ** 2).sum()
    total = ((xs - xs.mean(0)) ** 2).sum().clamp(min=1e-12)
    return float(resid / total)


def same_item_similarity(x: torch.Tensor, items: np.ndarray, owner: np.ndarray, seed: int, pairs: int = 20000) -> dict:
    """Mean cosine of token pairs with the same item from different users, and of random pairs."""
    rng = np.random.default_rng(seed)
    order = np.argsort(items, kind="stable")
    bounds = np.flatnonzero(np.diff(items[order])) + 1
    a_idx, b_idx = [], []
    for grp in np.split(order, bounds):
        if len(grp) >= 2:
            a, b = rng.choice(grp, size=(2, min(len(grp), 8)), replace=True)
            other = owner[a] != owner[b]
            a_idx.append(a[other])
            b_idx.append(b[other])
    xn = torch.nn.functional.normalize(x, dim=1)
    same = float("nan")
    if a_idx and sum(len(a) for a in a_idx):
        a, b = np.concatenate(a_idx)[:pairs], np.concatenate(b_idx)[:pairs]
        same = float((xn[a] * xn[b]).sum(1).mean())
    r = rng.integers(0, len(x), size=(2, pairs))
    return {"same_item_cosine": same, "random_pair_cosine": float((xn[r[0]] * xn[r[1]]).sum(1).mean())}


def pool_errors(x: torch.Tensor, seed: int, sample: int = 25000, iters: int = 8) -> dict[int, dict]:
    """For each candidate pool size: relative error of k-means fitted on one half of a token sample and measured
    on the other (a pool fitted and scored on the same tokens flatters itself), and what remains of it after the
    top r principal components of the fit half's residuals (r in USER_DIMS)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)[: 2 * sample]
    fit_x, test_x = x[perm[: len(perm) // 2]].float(), x[perm[len(perm) // 2 :]].float()
    total = (test_x ** 2).sum().clamp(min=1e-12)
    out = {}
    for m in POOL_CANDIDATES:
        if m > len(fit_x) // 2:
            continue
        pool = kmeans(fit_x, m, seed=seed, iters=iters)
        basis = torch.linalg.svd(fit_x - pool[nearest(fit_x, pool)], full_matrices=False).Vh  # (d, d) residual PCs
        res = test_x - pool[nearest(test_x, pool)]  # (n, d)
        err = float((res ** 2).sum() / total)
        after = {r: float(((res - (res @ basis[:r].T) @ basis[:r]) ** 2).sum() / total) for r in USER_DIMS}
        out[m] = {"rel_error": err, "after_user_dims": after}
    return out


def recommend(errors: dict[str, dict], item_streams: list[str], n_items: int, target: float) -> dict:
    """Cheapest (pool size, user dim) shared by all pooled streams whose estimated relative error is under
    `target` on every stream; bytes per token as the artifact would store them (index bits, int8 user dims,
    item id), per-user scale bytes ignored."""
    pooled = [s for s in errors if s not in item_streams]
    best = None
    for m in POOL_CANDIDATES:
        for r in USER_DIMS:
            if not pooled or not all(m in errors[s] for s in pooled):
                continue
            worst = max(errors[s][m]["after_user_dims"][r] for s in pooled)
            cost = len(pooled) * (bits_for(m) / 8 + r) + bits_for(n_items + 1) / 8
            if worst <= target and (best is None or cost < best["bytes_per_token"]):
                best = {"pool_size": m, "user_dim": r, "estimated_rel_error": worst, "bytes_per_token": cost}
    return best or {"note": f"no candidate reaches a relative error of {target} on every stream"}


def analyse_checkpoint(model, ds: SequenceData, n_users: int = 500, seed: int = 0, target: float = 0.25) -> dict:
    flat = sample_caches(model, ds, n_users, seed)
    owner = np.repeat(np.arange(len(flat.offsets) - 1), np.diff(flat.offsets))
    position = np.concatenate([np.arange(n) for n in np.diff(flat.offsets)]) if len(owner) else owner
    item_pos = flat.items * (model.config.max_len + 1) + position
    streams, errors, item_streams = {}, {}, []
    cache = model.cache_spec()
    for stream in cache.streams:
        name = stream.name
        x = flat.stream(name).float()
        spec = spectrum(x)
        info = {"d": x.shape[1],
                "energy_top": {k: float(spec[min(k, len(spec)) - 1]) for k in SPECTRUM_KS if k <= len(spec)},
                "components_for_90": int(np.searchsorted(spec, 0.90) + 1),
                "components_for_99": int(np.searchsorted(spec, 0.99) + 1),
                "spectrum": spec.tolist(),
                "unexplained_by_item": unexplained_by(x, flat.items),
                "unexplained_by_item_position": unexplained_by(x, item_pos),
                **same_item_similarity(x, flat.items, owner, seed)}
        info["item_function"] = bool(info["unexplained_by_item_position"] < 1e-4)
        if info["item_function"]:
            item_streams.append(name)
        else:
            errors[name] = pool_errors(x, seed)
            info["pool_errors"] = errors[name]
        streams[name] = info
    rec = recommend(errors, item_streams, model.config.n_items, target)
    if "bytes_per_token" in rec:  # + the other ids the model reads (HSTU's int32 timestamps)
        rec["bytes_per_token"] += sum(np.dtype(t.dtype).itemsize for t in cache.ids if t.required and not t.bits)
        rec["per_user_ratio_fp16"] = rec["bytes_per_token"] / (sum(s.width for s in cache.streams) * 2)
    return {"users": len(flat.offsets) - 1, "tokens": int(flat.offsets[-1]), "seed": seed, "streams": streams,
            "recompute_from_items": item_streams, "recommendation": rec, "target_rel_error": target}
