"""Pool size chosen from the data (`ckv compress --pool-size auto`, issue 18 part 1): per stream, the size that minimises total bytes (per-user
index bits x tokens to encode + the stream's shared bytes) among the sizes whose relative reconstruction error on
held-out calibration users is at most `target`.

The calibration users are split (seeded, by user) into a fitting part and a held-out part (`val_fraction`). For
one codec the total bytes grow with the pool (wider indices, a larger pool), so the answer is the smallest
candidate that meets the target: candidates are tried in increasing order and the search stops at the first that
meets it. When none does (too few calibration tokens for the error the target asks), it keeps the smallest pool
whose held-out error is within `tolerance` of the least error seen, and says the target was not met.

Rule of thumb measured on branch fidelity (docs/fidelity.md): a held-out relative error of about 0.10 per pooled
stream is where the top-10 overlap with the uncompressed model reaches 0.9 on the ML-1M samples.

`auto_plan` is what `ckv compress` runs: sizes on the calibration caches, then an unfitted plan with the chosen
size per stream (its description records them; readers need nothing new).

`--pool-size balanced` (the default of `ckv compress` for next-item models' pools) needs no fitting: the largest
candidate pool whose stored entries take no more bytes than the indices that address it over the log's tokens
(`balanced_pool_size`), so the shared part never outweighs the per-user indices it serves; then halved while the
plan's per-user bytes exceed `BUDGET` (1%) of the fp16 cache and a smaller candidate brings them within it. On the
ML-1M samples (650,526 tokens, 64 wide, fp16) that is 8192 (SASRec; HSTU with 4-bit event times: 4096, 8192
taking 1.05%); on ML-100K (83,940 tokens) 512 (docs/fidelity.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ckv_cli.codecs.bits import bits_for, packed_nbytes
from ckv_cli.codecs.plan import CachePlan
from ckv_cli.errors import CkvError
from ckv_cli.spec import FlatCache

CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
TARGET = 0.10
AUTO = "auto"
BALANCED = "balanced"
BUDGET = 0.01  # `balanced` keeps the per-user bytes within 1% of the fp16 cache where a smaller pool can


@dataclass
class StreamChoice:
    stream: str
    pool_size: int
    met: bool
    reason: str
    trials: list[dict] = field(default_factory=list)  # pool_size, error, index_bytes, shared_bytes, total_bytes


def user_split(n_users: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting users, held-out users) of the calibration users, seeded; at least one user in each part."""
    if n_users < 2:
        raise CkvError(f"sizing the pool needs at least 2 calibration users, got {n_users}")
    if not 0 < val_fraction < 1:
        raise CkvError(f"val fraction must be in (0, 1), got {val_fraction}")
    n_val = min(n_users - 1, max(1, round(n_users * val_fraction)))
    perm = np.random.default_rng(seed + 7).permutation(n_users)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def stream_errors(plan: CachePlan, fit: FlatCache, val: FlatCache, seed: int, model) -> dict[str, float]:
    """Fit `plan` on `fit`, encode and decode `val` (`model` recomputes the recomputed streams), relative squared
    error per coded stream."""
    plan.fit(fit, seed)
    dec = plan.decode(plan.encode(val), val.offsets, model)
    out = {}
    for name, codec in plan.coded().items():
        x = val.stream(name).float()
        out[name] = float(((x - dec.stream(name)) ** 2).sum() / (x ** 2).sum().clamp(min=1e-12))
    return out


def shared_bytes(codec) -> int:
    return int(sum(t.numel() * t.element_size() for t in codec.shared().values()))


def size_trials(make_plan_for, calib: FlatCache, n_tokens: int, model, *, target: float = TARGET,
                candidates: tuple[int, ...] = CANDIDATES, val_fraction: float = 0.2, seed: int = 0,
                progress=None) -> dict[str, list[dict]]:
    """Per pooled stream, the sizes tried in increasing order until one met `target` (or all were tried): pool_size,
    held-out error, index bytes for `n_tokens` tokens, shared bytes, total bytes."""
    fit_users, val_users = user_split(len(calib.offsets) - 1, val_fraction, seed)
    fit, val = calib.select(fit_users), calib.select(val_users)
    n_fit = int(fit.offsets[-1])
    trials: dict[str, list[dict]] = {}
    open_streams: set[str] | None = None
    for m in sorted(candidates):
        if m > n_fit:
            break
        plan = make_plan_for(m)
        pooled = [n for n, c in plan.coded().items() if hasattr(c, "pool_size")]
        if open_streams is None:
            open_streams = set(pooled)
        if not open_streams:
            break
        if progress:
            progress(f"pool {m}: {len(open_streams)} stream(s)")
        errors = stream_errors(plan, fit, val, seed, model)
        for name in pooled:
            if name not in open_streams:
                continue
            codec = plan.streams[name]
            idx = packed_nbytes(n_tokens, codec.bits)
            sh = shared_bytes(codec)
            trials.setdefault(name, []).append({"pool_size": m, "error": errors[name], "index_bytes": idx,
                                                "shared_bytes": sh, "total_bytes": idx + sh})
            if errors[name] <= target:
                open_streams.discard(name)
    if open_streams is None:
        raise CkvError(f"sizing the pool: the {n_fit} fitting tokens are fewer than the smallest candidate "
                       f"({min(candidates)})")
    return trials


def pick(trials: dict[str, list[dict]], target: float = TARGET, tolerance: float = 0.02) -> dict[str, StreamChoice]:
    """Per stream, from `size_trials`' rows: the least total bytes meeting `target`, else the smallest pool within
    `tolerance` of the least error seen (target not met)."""
    out = {}
    for name, rows in trials.items():
        ok = [r for r in rows if r["error"] <= target]
        if ok:
            best = min(ok, key=lambda r: r["total_bytes"])
            why = (f"smallest total bytes with held-out error <= {target:g}: {best['error']:.4f} at {best['pool_size']} "
                   f"({best['total_bytes']:,} B = {best['index_bytes']:,} index + {best['shared_bytes']:,} shared)")
            out[name] = StreamChoice(name, best["pool_size"], True, why, rows)
        else:
            least = min(r["error"] for r in rows)
            best = min((r for r in rows if r["error"] <= least * (1 + tolerance)), key=lambda r: r["total_bytes"])
            why = (f"no size tried reached held-out error {target:g} (least {least:.4f}); smallest pool within "
                   f"{tolerance:.0%} of it: {best['pool_size']} ({best['error']:.4f})")
            out[name] = StreamChoice(name, best["pool_size"], False, why, rows)
    return out


def choose_pool_sizes(make_plan_for, calib: FlatCache, n_tokens: int, model, *, target: float = TARGET,
                      candidates: tuple[int, ...] = CANDIDATES, val_fraction: float = 0.2, seed: int = 0,
                      tolerance: float = 0.02, progress=None) -> dict[str, StreamChoice]:
    """Per pooled stream, the pool size to use. `make_plan_for(pool_size)` returns an unfitted plan whose pooled
    streams all have that pool size; `calib` holds the calibration users' teacher caches; `n_tokens` is the number
    of tokens the artifact will encode (its index bytes). Candidates larger than the fitting tokens are skipped."""
    trials = size_trials(make_plan_for, calib, n_tokens, model, target=target, candidates=candidates,
                         val_fraction=val_fraction, seed=seed, progress=progress)
    return pick(trials, target, tolerance)


def within_budget(trials: dict[str, list[dict]], max_bits: int) -> dict[str, StreamChoice]:
    """Per stream, the pool sizes (among those tried) whose index bits add up to at most `max_bits` per token and
    minimise the summed held-out error (ties: fewer bits): a per-user budget (e.g. 1% of fp16) spent where the
    error falls most. Trials must hold the same sizes for every stream (`size_trials` with `target=0`)."""
    import itertools

    from ckv_cli.codecs.bits import bits_for

    names = sorted(trials)
    best, best_key = None, None
    for combo in itertools.product(*(trials[n] for n in names)):
        bits = sum(bits_for(r["pool_size"]) for r in combo)
        if bits > max_bits:
            continue
        key = (sum(r["error"] for r in combo), bits)
        if best_key is None or key < best_key:
            best, best_key = combo, key
    if best is None:
        raise CkvError(f"no pool sizes tried fit {max_bits} index bits per token over {len(names)} streams")
    return {n: StreamChoice(n, r["pool_size"], True, f"least summed held-out error ({best_key[0]:.4f}) within "
                            f"{max_bits} index bits per token: {r['pool_size']} ({r['error']:.4f})", trials[n])
            for n, r in zip(names, best)}


def sized_plan(make_plan_for, choices: dict[str, StreamChoice]) -> CachePlan:
    """An unfitted plan whose pooled streams have their chosen pool sizes (`make_plan_for(m)` as in
    `choose_pool_sizes`; streams without a choice keep those of the smallest chosen size's plan)."""
    sizes = sorted({c.pool_size for c in choices.values()})
    plans = {m: make_plan_for(m) for m in sizes}
    base = plans[sizes[0]]
    streams = {name: (plans[choices[name].pool_size].streams[name] if name in choices else codec)
               for name, codec in base.streams.items()}
    return replace(base, streams=streams)


def describe_choices(choices: dict[str, StreamChoice]) -> dict:
    """JSON-able: per stream the size chosen, whether the target was met, why, and every size tried."""
    return {name: {"pool_size": c.pool_size, "met": c.met, "reason": c.reason, "trials": c.trials}
            for name, c in choices.items()}


def shared_warning(acct: dict) -> str | None:
    """A one-line warning when the shared bytes (pools, tables) exceed the per-user bytes of every user together
    (`ckv_cli.pipeline.compress.accounting`'s dict): the pool is then oversized for this log. None otherwise."""
    shared, per_user = acct["shared_bytes"], acct["per_user_bytes"]
    if shared <= per_user:
        return None
    return (f"shared bytes ({shared:,}) exceed the per-user bytes of all {acct['users']:,} users ({per_user:,}): total "
            f"{acct['total_ratio_fp16']:.2%} of fp16 against {acct['per_user_ratio_fp16']:.2%} per user; a smaller "
            "pool (--pool-size auto) or fp16 pools would shrink it")


def balanced_pool_size(n_tokens: int, width: int, value_bytes: int, candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The largest candidate m whose pool (m x `width` values of `value_bytes`) takes at most the bytes of its
    indices over `n_tokens` tokens (ceil(log2 m) bits each); the smallest candidate when none does."""
    fits = [m for m in candidates if m * width * value_bytes <= packed_nbytes(n_tokens, bits_for(m))]
    return max(fits, default=min(candidates))


def declared_bytes(plan: CachePlan, n_users: int, n_tokens: int) -> int:
    """Per-user bytes of a log of `n_users` users and `n_tokens` tokens from `plan`'s declared fields, no fitting
    needed (as `ckv_cli.pipeline.compress.accounting` counts them; a field per kept token counts every token, a
    ragged one a row per user)."""
    return sum(f.nbytes(n_tokens if f.per in ("token", "kept") else n_users + (name == "users/offsets"))
               for name, f in plan.fields().items())


def within_per_user_budget(plan: CachePlan, n_users: int, n_tokens: int, full_width: int, budget: float) -> bool | None:
    """Whether `plan`'s per-user bytes over `n_users` users and `n_tokens` tokens are at most `budget` of the fp16
    cache (`full_width` values per token); None where they depend on the fit (escaped indices, kept tokens)."""
    if any(f.per in ("ragged", "kept") for f in plan.fields().values()):
        return None
    return declared_bytes(plan, n_users, n_tokens) <= budget * n_tokens * full_width * 2


def balanced_plan(make_plan_for, n_tokens: int, n_users: int | None = None, full_width: int | None = None,
                  budget: float = BUDGET) -> tuple[CachePlan, dict]:
    """(unfitted plan whose pools all have `balanced_pool_size` entries for the widest pooled stream, what was chosen
    and why); `make_plan_for(pool_size)` as in `choose_pool_sizes`. With `n_users` and `full_width` (values per
    token of the full cache) the pool is then halved while the per-user bytes exceed `budget` of the fp16 cache
    and a smaller candidate brings them within it (HSTU's 4-bit event times: 8192 -> 4096); where no candidate
    does, the balanced size stays and the reason says so."""
    probe = make_plan_for(max(CANDIDATES))
    pooled = {n: getattr(c, "inner", c) for n, c in probe.coded().items() if hasattr(getattr(c, "inner", c), "pool_size")}
    if not pooled:
        raise CkvError("--pool-size balanced: no stream of this plan has a pool to size")
    width = max(getattr(probe.streams[n], "width", None) or probe.streams[n].d for n in pooled)
    fp16 = all(getattr(c, "pool_dtype", None) == "fp16" or getattr(c, "dtype", None) == "fp16" for c in pooled.values())
    value_bytes = 2 if fp16 else 4
    m = balanced_pool_size(n_tokens, width, value_bytes)
    pool_bytes, index_bytes = m * width * value_bytes, packed_nbytes(n_tokens, bits_for(m))
    reason = (f"the largest pool whose entries ({m:,} x {width} x {value_bytes} B = {pool_bytes:,} B) take no more "
              f"than its {bits_for(m)}-bit indices over {n_tokens:,} tokens ({index_bytes:,} B)"
              if pool_bytes <= index_bytes else
              f"the smallest candidate ({m}): even it outweighs its indices over {n_tokens:,} tokens")
    info = {"rule": BALANCED, "pool_size": m, "tokens": n_tokens, "width": width, "value_bytes": value_bytes,
            "candidates": list(CANDIDATES)}
    if n_users is not None and full_width is not None:
        info["per_user_budget_fp16"] = budget

        def fits(c: int) -> bool | None:
            try:
                plan = make_plan_for(c)
            except CkvError:  # a size the other options refuse (index_bits wider than its indices)
                return False
            return within_per_user_budget(plan, n_users, n_tokens, full_width, budget)

        if fits(m) is False:
            smaller = next((c for c in sorted(CANDIDATES, reverse=True) if c < m and fits(c)), None)
            if smaller:
                reason += (f"; halved to {smaller:,}, the largest whose per-user bytes stay within "
                           f"{budget:.0%} of the fp16 cache (with {m:,} they do not)")
                m = smaller
            else:
                reason += f"; no candidate pool brings the per-user bytes within {budget:.0%} of the fp16 cache"
    info.update(pool_size=m, reason=reason)
    return make_plan_for(m), info


def auto_plan(model, make_plan_for, calib: FlatCache, n_tokens: int, seed: int, target: float = TARGET,
              progress=None) -> tuple[CachePlan, dict]:
    """(unfitted plan with a pool size per coded stream chosen by `choose_pool_sizes` on `calib`, what was chosen
    and why: `describe_choices`' dict under 'streams' and the rule)."""
    choices = choose_pool_sizes(make_plan_for, calib, n_tokens, model, target=target, seed=seed, progress=progress)
    if not choices:
        raise CkvError("--pool-size auto: no stream of this plan has a pool to size")
    return sized_plan(make_plan_for, choices), {
        "target_error": target, "candidates": list(CANDIDATES),
        "rule": (f"per stream, the pool size with the least total bytes (index bits x {n_tokens:,} tokens + shared) "
                 f"whose relative reconstruction error on a held-out fifth of the calibration users is <= {target:g}"),
        "streams": describe_choices(choices)}
