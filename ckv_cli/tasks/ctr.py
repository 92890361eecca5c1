"""The CTR task: every rated event a sample (label rating >= 4, `ckv_cli.data.ctr`), for the target-attention models
(SIM, ETA, SDIM, TWIN, the no-history baseline): AUC, gAUC (per-user AUC weighted by the user's sample count,
single-class users skipped) and logloss.

**What is cached.** Per user, one token per event of the user (in time order); a sample's history is a prefix of
it (the last `max_len` events before the sample). What each token holds per stream is the model's declaration
(`model.cache_spec()`); every stream is a function of the event (item, rating bucket, gap bucket).

**With a compressed cache.** Each test-split sample is scored by `model.score` on a cache whose streams are the
decoded codes of the sample's history events (global event index = hist_start + position); the reference is the
same cache undecoded (equal to `model(batch)`). The samples of a user that share a history start read one view of
the user's decoded tokens (no copy per sample). Calibration: the tokens of a seeded sample of calibration users'
**training-split** events only (no test leakage), at most `calib_tokens` of them. A paired bootstrap over test
users gives each delta's 95% CI.

Speed: the streams are a function of the event, so a pointwise codec (collective without user dims, plain, bf16)
encodes each distinct (item, rating, gap) event once and every token takes its event's code (`memo`): the same
fields as encoding token by token, at the cost of the distinct events (95k of 1M on ML-1M).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ckv_cli.codecs.bits import bits_for
from ckv_cli.data.ctr import N_GAPS, N_RATINGS, SPLITS, CTRData
from ckv_cli.errors import CkvError
from ckv_cli.metrics import auc, logloss, per_user_auc
from ckv_cli.spec import FlatCache, token_index

NAME = "ctr"
PROTOCOL = ("CTR: every rated event a sample, label = rating >= 4; global time split at the 80th/90th timestamp "
            "percentiles; history = the user's strictly earlier events, up to the model's max_len")
COMPRESS_PROTOCOL = ("CTR test split: each sample scored by model.score over its history's cache (short window + long "
                     "branch), K/V replaced by the decoded codes of the history events; reference = the same cache "
                     "undecoded")
METRICS = ("AUC", "gAUC", "logloss")
LOWER_IS_BETTER = ("logloss",)
PARETO_METRIC = "AUC"
DEFAULT_POOL = 4096  # entries per stream; `ckv compress --pool-size` on a CTR model defaults to it
DEFAULT_SWEEP_USERS = 1500
POINTWISE = ("plain", "bf16")  # codecs whose code of a vector depends on that vector alone (and collective, r = 0)
BUDGET = 1 << 19  # rows x history tokens per scoring call


# ---------------------------------------------------------------------------------------------- the model alone


@torch.no_grad()
def predict(model, data: CTRData, events: np.ndarray, batch_size: int = 512,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Click probabilities (E,) of the given events, batched by history length (output in input order)."""
    model.eval()
    device = next(model.parameters()).device
    lengths = data.hist_end[events] - data.hist_start[events]
    order = np.argsort(lengths, kind="stable")
    out = np.empty(len(events), dtype=np.float64)
    for a in range(0, len(order), batch_size):
        sel = order[a : a + batch_size]
        out[sel] = torch.sigmoid(model(data.batch(events[sel]).to(device))).double().cpu().numpy()
        if progress:
            progress(len(sel))
    return out


def ctr_metrics(data: CTRData, events: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    labels = data.labels[events]
    ua, w = per_user_auc(data.users[events], labels, probs)
    return {"AUC": auc(labels, probs), "gAUC": float((ua * w).sum() / w.sum()) if w.sum() else float("nan"),
            "logloss": logloss(labels, probs), "samples": int(len(events)),
            "users": int(len(np.unique(data.users[events])))}


def evaluate_ctr(model, data: CTRData, split: str = "test", progress=None) -> dict[str, float]:
    events = data.samples(split)
    return ctr_metrics(data, events, predict(model, data, events, progress=progress))


# ---------------------------------------------------------------------------------------------- tokens


def event_ids(data: CTRData, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The event ids of the events at global indices `idx`: what a token's cache is a function of."""
    return {"items": data.seq.items[idx], "ratings": data.rating_bucket[idx], "gaps": data.gap_bucket[idx]}


def event_keys(data: CTRData) -> np.ndarray:
    """One integer per event identifying (item, rating bucket, gap bucket)."""
    return (data.seq.items.astype(np.int64) * N_RATINGS + data.rating_bucket) * N_GAPS + data.gap_bucket


def tokens_of(model, data: CTRData, idx: np.ndarray, offsets: np.ndarray) -> FlatCache:
    ids = event_ids(data, idx)
    streams, side = model.token_streams(ids)
    return FlatCache(offsets, streams, {k: np.asarray(v, np.int64) for k, v in ids.items()}, side)


def calibration_events(data: CTRData, calib_users: int, calib_tokens: int, seed: int) -> tuple[np.ndarray, int]:
    """Training-split events of a seeded sample of users that have any (no test leakage), at most `calib_tokens`
    of them (a seeded sample). Returns (events, number of calibration users)."""
    rng = np.random.default_rng(seed)
    train = data.split_of == 0
    users = np.unique(data.users[train])
    if not len(users):
        raise CkvError(f"{data.name}: no training-split events to calibrate on")
    chosen = np.sort(rng.choice(users, size=min(calib_users, len(users)), replace=False))
    events = np.flatnonzero(train & np.isin(data.users, chosen))
    if len(events) > calib_tokens:
        events = np.sort(rng.choice(events, size=calib_tokens, replace=False))
    return events, len(chosen)


def calibration(model, data: CTRData, opts) -> tuple[FlatCache, dict]:
    events, n_users = calibration_events(data, opts.calib_users, opts.calib_tokens, opts.seed)
    flat = tokens_of(model, data, events, np.array([0, len(events)]))
    return flat, {"users": n_users, "tokens": int(len(events)), "split": "train"}


def memo(model, data: CTRData, plan, chunk: int = 65536):
    """(fields of every distinct event for each pointwise stream, each event's distinct row), or None when no stream
    is pointwise (module docstring)."""
    pointwise = [n for n, c in plan.coded().items()
                 if c.name in POINTWISE or (c.name == "collective" and c.user_dim == 0)]
    if not pointwise:
        return None
    _, first, inverse = np.unique(event_keys(data), return_index=True, return_inverse=True)
    out = {n: {} for n in pointwise}
    for a in range(0, len(first), chunk):
        ev = first[a : a + chunk]
        x, _ = model.token_streams(event_ids(data, ev))
        for n in pointwise:
            for k, v in plan.streams[n].encode(x[n], np.array([0, len(ev)])).items():
                out[n].setdefault(k, []).append(v)
    return {n: {k: np.concatenate(v) for k, v in f.items()} for n, f in out.items()}, inverse.reshape(-1), len(first)


# ---------------------------------------------------------------------------------------------- batches


def groups(samples: np.ndarray, data: CTRData, budget: int = BUDGET) -> list[np.ndarray]:
    """Test samples split into groups sharing (user, history start), each cut so that rows x longest history
    stays under `budget`."""
    start = data.hist_start[samples]
    out = []
    bounds = np.flatnonzero(np.diff(start)) + 1  # samples are in log order: a user's history start never decreases
    for g in np.split(samples, bounds):
        L = int((data.hist_end[g] - data.hist_start[g]).max())
        step = max(1, budget // max(L, 1))
        out += [g[a : a + step] for a in range(0, len(g), step)]
    return out


@torch.no_grad()
def score_group(model, data: CTRData, g: np.ndarray, lo: int, tokens: FlatCache) -> torch.Tensor:
    """Logits of samples `g` (one user, one history start) from per-token streams of the tokens starting at global
    event `lo` (`model.history_cache`: the long branch reads a stride-0 view of the user's tokens)."""
    start = int(data.hist_start[g[0]]) - lo
    lengths = torch.from_numpy((data.hist_end[g] - data.hist_start[g]).astype(np.int64))
    items = data.seq.items[lo : lo + start + int(lengths.max())]
    cache = model.history_cache(tokens.streams, tokens.side, items, start, lengths)
    users = torch.from_numpy(data.user_rows[data.users[g]])
    targets = torch.from_numpy(data.seq.items[g].astype(np.int64))
    return model.score(cache, users, targets)


@dataclass
class TeacherBatch:
    """A batch of users' tokens (every event of theirs, exact streams), the global event index of each token, and
    their test samples in groups sharing a history start (`(samples, lo)`: lo = global index of the batch token 0
    of that user's tokens... shifted so that `hist_start - lo` is the position in the batch)."""

    users: np.ndarray
    tokens: FlatCache
    events: np.ndarray
    groups: list[tuple[np.ndarray, int]]
    ref: list[np.ndarray] | None = None  # reference probabilities per group, when precomputed (`Teacher`)

    @property
    def flat(self) -> FlatCache:
        return self.tokens


def batches(model, data: CTRData, users: np.ndarray | range | None, batch_users: int) -> Iterator[TeacherBatch]:
    """`users`: user indices (sorted; None = every user, in consecutive batches)."""
    offsets = data.seq.offsets.astype(np.int64)
    test = data.split_of == SPLITS.index("test")
    rows = np.arange(data.seq.n_users) if users is None else np.asarray(users, dtype=np.int64)
    for a in range(0, len(rows), batch_users):
        ub = rows[a : a + batch_users]
        starts, lens = offsets[ub], offsets[ub + 1] - offsets[ub]
        boff = np.r_[0, np.cumsum(lens)].astype(np.int64)
        shift = starts - boff[:-1]  # global event index - batch position, per user
        idx = token_index(starts, lens)  # global event index of each batch token
        samples = idx[test[idx]]
        gs = [(g, int(shift[np.searchsorted(ub, data.users[g[0]])])) for g in groups(samples, data)]
        yield TeacherBatch(ub, tokens_of(model, data, idx, boff), idx, gs)


class Teacher:
    """The reference probabilities of the scored users' test samples, computed once and reused by every plan of a
    sweep (the exact tokens are cheap to recompute: a linear map of the event embedding; holding them is not)."""

    def __init__(self, model, data: CTRData, users, batch_users: int, advance=None):
        self.model, self.data, self.users, self.batch_users = model, data, users, batch_users
        t = time.perf_counter()
        self.refs: list[list[np.ndarray]] = []
        for tb in batches(model, data, users, batch_users):
            self.refs.append([torch.sigmoid(score_group(model, data, g, lo, tb.tokens)).double().numpy()
                              for g, lo in tb.groups])
            if advance:
                advance(len(tb.users))
        self.seconds = time.perf_counter() - t

    @property
    def batches(self) -> Iterator[TeacherBatch]:
        for tb, ref in zip(batches(self.model, self.data, self.users, self.batch_users), self.refs):
            tb.ref = ref
            yield tb

    @property
    def n_users(self) -> int:
        return len(self.users) if self.users is not None else self.data.seq.n_users


def sweep_users(data: CTRData, n: int, seed: int) -> np.ndarray:
    """A seeded sample of `n` of the users that have test samples (all of them when n is 0 or more than there
    are), sorted."""
    if n < 0:
        raise CkvError(f"--sweep-users must be >= 0 (0 = every test user), got {n}")
    test_users = np.unique(data.users[data.split_of == SPLITS.index("test")])
    if n == 0 or n >= len(test_users):
        return test_users
    return np.sort(np.random.default_rng(seed).choice(test_users, size=n, replace=False))


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Reference and compressed click probabilities of every scored test sample, in order."""

    model: object
    data: CTRData
    bootstrap: int = 200
    seed: int = 0
    refs: list = field(default_factory=list)
    news: list = field(default_factory=list)
    done: list = field(default_factory=list)
    ref_seconds: float = 0.0

    def add_batch(self, tb: TeacherBatch, decoded: FlatCache, reader=None) -> None:
        for i, (g, lo) in enumerate(tb.groups):
            if tb.ref is not None:
                self.refs.append(tb.ref[i])
            else:
                t = time.perf_counter()
                self.refs.append(torch.sigmoid(score_group(self.model, self.data, g, lo, tb.tokens)).double().numpy())
                self.ref_seconds += time.perf_counter() - t
            self.news.append(torch.sigmoid(score_group(self.model, self.data, g, lo, decoded)).double().numpy())
            self.done.append(g)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        samples = np.concatenate(self.done) if self.done else np.zeros(0, np.int64)
        ref = np.concatenate(self.refs) if self.refs else np.zeros(0)
        new = np.concatenate(self.news) if self.news else np.zeros(0)
        return samples, ref, new

    def report(self, recon: dict[str, float]) -> dict:
        samples, ref, new = self.arrays()
        out = ctr_report(self.data, samples, ref, new, self.bootstrap, self.seed)
        out["protocol"] = COMPRESS_PROTOCOL
        out["reconstruction_rel_mse"] = recon
        return out

    def row(self, report: dict) -> dict:
        """What a sweep row shows beside the deltas."""
        return {"max_abs_prob_change": report["max_abs_prob_change"],
                "signature_mismatch_rate": report.get("signature_mismatch_rate")}

    def deltas(self, report: dict, bootstrap: int, seed: int) -> dict[str, dict[str, float]]:
        """Per metric: the delta, relative delta and the report's paired-bootstrap 95% CI over test users."""
        m = report
        ci = m.get("delta_ci95", {})
        out = {}
        for k in METRICS:
            r, d = m["uncompressed"][k], m["delta"][k]
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            out[k] = {"value": m["compressed"][k], "delta": d, "relative": d / r if r else 0.0, "ci_low": lo, "ci_high": hi}
        return out


def _weighted_auc(order_groups, labels: np.ndarray, w: np.ndarray) -> float:
    """AUC with per-sample weights (ties count one half): `order_groups` = (sorted order, tie group of each
    sorted position, number of groups), computed once per score vector."""
    order, grp, n_groups = order_groups
    y, ww = labels[order], w[order]
    pos = np.bincount(grp, weights=ww * y, minlength=n_groups)
    neg = np.bincount(grp, weights=ww * (1 - y), minlength=n_groups)
    below = np.cumsum(neg) - neg  # negatives strictly below each tie group
    num = (pos * (below + 0.5 * neg)).sum()
    den = pos.sum() * neg.sum()
    return float(num / den) if den > 0 else float("nan")


def _tie_groups(scores: np.ndarray):
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    grp = np.r_[0, np.cumsum(s[1:] != s[:-1])]
    return order, grp, int(grp[-1]) + 1 if len(grp) else 0


def ctr_report(data: CTRData, samples: np.ndarray, ref: np.ndarray, new: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUC, gAUC, logloss uncompressed and compressed, deltas, and a paired bootstrap over users of each delta."""
    labels = data.labels[samples].astype(np.float64)
    users = data.users[samples]
    out = {}
    ua_r, w = per_user_auc(users, labels, ref)
    ua_n, _ = per_user_auc(users, labels, new)
    for side, p, ua in (("uncompressed", ref, ua_r), ("compressed", new, ua_n)):
        out[side] = {"AUC": auc(labels, p), "gAUC": float((ua * w).sum() / w.sum()) if w.sum() else float("nan"),
                     "logloss": logloss(labels, p)}
    out["delta"] = {k: out["compressed"][k] - out["uncompressed"][k] for k in out["compressed"]}
    out["samples"], out["users"] = int(len(samples)), int(len(np.unique(users)))
    out["max_abs_prob_change"] = float(np.abs(new - ref).max()) if len(ref) else 0.0
    if n_boot > 0 and len(samples):
        uniq, inv = np.unique(users, return_inverse=True)
        rng = np.random.default_rng(seed)
        tg_r, tg_n = _tie_groups(ref), _tie_groups(new)
        eps = 1e-7
        ll_r = -(labels * np.log(np.clip(ref, eps, 1 - eps)) + (1 - labels) * np.log(np.clip(1 - ref, eps, 1 - eps)))
        ll_n = -(labels * np.log(np.clip(new, eps, 1 - eps)) + (1 - labels) * np.log(np.clip(1 - new, eps, 1 - eps)))
        d = {"AUC": [], "gAUC": [], "logloss": []}
        for _ in range(n_boot):
            cu = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)).astype(np.float64)  # (U,)
            ws = cu[inv]  # per-sample weight
            d["AUC"].append(_weighted_auc(tg_n, labels, ws) - _weighted_auc(tg_r, labels, ws))
            gw = cu * w
            d["gAUC"].append(float(((ua_n - ua_r) * gw).sum() / gw.sum()) if gw.sum() else float("nan"))
            d["logloss"].append(float(((ll_n - ll_r) * ws).sum() / ws.sum()))
        out["delta_ci95"] = {k: [float(np.nanquantile(v, 0.025)), float(np.nanquantile(v, 0.975))] for k, v in d.items()}
        out["bootstrap"] = {"resamples": n_boot, "seed": seed, "over": "test users (paired)"}
    return out


# ---------------------------------------------------------------------------------------------- bytes


def long_only(plan, acct: dict, n_tokens: int, short_tokens: int, short_len: int) -> dict:
    """The ratio when only the long branch is cached and the short window is recomputed from the event ids of each
    user's last `short_len` tokens (the `long_only` entry of a CTR model's accounting)."""
    dims = plan.dims
    long_dims = sum(d for n, d in dims.items() if n.startswith("long."))
    long_fields = {n: b for n, b in acct["per_user_breakdown"].items() if not n.startswith("short.")}
    event_bits = bits_for(plan.n_items + 1) + bits_for(N_RATINGS) + bits_for(N_GAPS)
    has_short = any(n.startswith("short.") for n in dims)
    short_ids = ((short_tokens * event_bits + 7) // 8) if has_short and not plan.all_recomputed else 0
    long_per_user = sum(long_fields.values()) + short_ids
    long16 = n_tokens * long_dims * 2
    return {"per_user_bytes": long_per_user, "full_fp16_bytes": long16,
            "per_user_ratio_fp16": long_per_user / max(long16, 1), "short_window_event_id_bytes": short_ids,
            "note": "only the long branch cached; the short window recomputed from the event ids "
                    f"({event_bits} bits) of each user's last {short_len} tokens"}


def denominator(plan) -> str:
    return ("every cached stream of every token (" + ", ".join(f"{n} {d}" for n, d in plan.dims.items())
            + " values); the short window is a separate cache with its own K/V and is counted; "
            "signatures and item ids are not in the denominator")
