"""`ckv compress` for the target-attention CTR models (SIM, ETA, SDIM, TWIN): every candidate is scored by
attention over the compressed cache.

**What is cached.** Per user, one token per event of the user (in time order); a sample's history is a prefix of
it (the last `max_len` events before the sample). Per token the model caches, per branch: the short window's K and
V (`short.k`, `short.v`, width d_attn), the long branch's K and V (`long.k`, `long.v`; SDIM's long branch caches
no keys and the token embedding as values, width d), plus what the long branch's search reads: the item ids
(SIM's category search), the SimHash signatures (ETA: `n_bits` bits; SDIM: `n_rounds` x `round_bits` bits). The
short window is cached for every token (a candidate at any time reads the 50 events before it). Streams are the
cached (branch, K|V) pairs; each gets its own codec (`--codec`, default `collective`: a global pool, one index per
token), fitted on the tokens of a seeded sample of calibration users' **training-split** events only.

**Side data.** Item ids are stored (bit-packed) only for SIM, whose search reads them. Signatures (ETA, SDIM) are
`derived` by default: recomputed from the decoded cache (SDIM: the signature of the decoded embedding; ETA: of the
least-squares token embedding behind the decoded long K and V, `x = pinv([W_k; W_v]) [K - b_k; V - b_v]`), so
they cost nothing and carry the compression error into the search; `--param codes=stored` stores them exactly.

**The event-id baseline** (`--codec eventid`, NOTES §3): in these models a token's K/V and signature are a
function of the event alone (item, rating bucket, gap bucket), so storing those three ids (bit-packed, ~20 bits
per token on ML-1M) and recomputing everything with the model is lossless.

**Accuracy.** Each test-split sample is scored by `model.score` on a cache whose K/V (both branches) are the
decoded codes of the sample's history events (global event index = hist_start + position); the reference is the
same cache undecoded (equal to `model(batch)`). The samples of a user that share a history start read one view of
the user's decoded tokens (no copy per sample). AUC, gAUC, logloss before/after, and a paired bootstrap over test
users of each delta.

**Bytes** (NOTES §4): full cache = every cached stream of every token at fp16 / fp32 (`tokens x (2 x d_attn +
2 x d_attn)` for SIM/ETA/TWIN, `tokens x (2 x d_attn + d)` for SDIM; the short window counted as the separate cache
it is; signatures and item ids not counted in the denominator); per-user = every per-token and per-user field as
stored, plus each user's 8-byte offset; shared = pools, bases. `long_only` also gives the ratio when only the long
branch is cached and the short window is recomputed from the event ids of its last `short_len` tokens.

Speed: the streams are a function of the event, so a pointwise codec (collective without user dims, plain, bf16)
encodes each distinct (item, rating, gap) event once and every token takes its event's code: the same fields as
encoding token by token, at the cost of the distinct events (95k of 1M on ML-1M).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs import REGISTRY as CODECS
from ckv_cli.codecs import Field, make_codec
from ckv_cli.codecs.bits import bits_for
from ckv_cli.compress import ratios
from ckv_cli.data.ctr import N_GAPS, N_RATINGS, SPLITS, CTRData
from ckv_cli.errors import CkvError
from ckv_cli.metrics import auc, logloss
from ckv_cli.models.target_attention import AttentionLongBranch, BranchKV, CTRCache, CTRModel, last_window

EVENTID = "eventid"
DEFAULT_POOL = 4096  # entries per stream; `ckv compress --pool-size` on a CTR model defaults to it
CODE_MODES = ("derived", "stored")
POINTWISE = ("plain", "bf16")  # codecs whose code of a vector depends on that vector alone (and collective, r = 0)
PROTOCOL = ("CTR test split: each sample scored by model.score over its history's cache (short window + long "
            "branch), K/V replaced by the decoded codes of the history events; reference = the same cache undecoded")


@dataclass
class CTROptions:
    codec: str = "collective"
    params: dict = field(default_factory=lambda: {"pool_size": DEFAULT_POOL, "user_dim": 0, "layout": "residual"})
    share: tuple[str, ...] = ("k", "v")
    calib_users: int = 1000
    calib_tokens: int = 32768  # seeded sample of the calibration users' training tokens
    batch_users: int = 256
    codes: str = "derived"  # ETA / SDIM signatures: recomputed from the decoded cache, or stored exactly
    bootstrap: int = 200
    seed: int = 0


# ---------------------------------------------------------------- what the model caches per event


def stream_dims(model: CTRModel) -> dict[str, int]:
    """Cached streams of a CTR model and their widths, in a fixed order."""
    cfg = model.config
    out = {}
    if model.short is not None:
        out["short.k"] = out["short.v"] = cfg.d_attn
    if isinstance(model, AttentionLongBranch):
        out["long.k"] = out["long.v"] = cfg.d_attn
    elif model.long_width():
        if model.arch != "sdim":
            raise CkvError(f"{model.arch}: no rule for what its long branch caches")
        out["long.v"] = cfg.d
    if not out:
        raise CkvError(f"{model.arch} caches nothing per user (no history branch): there is nothing to compress")
    return out


def code_bits(model: CTRModel) -> int:
    """Bits of one token's search signature (0 when the long branch keeps none)."""
    if model.arch == "eta":
        return int(model.config.n_bits)
    if model.arch == "sdim":
        return int(model.config.n_rounds * model.config.round_bits)
    return 0


@torch.no_grad()
def event_streams(model: CTRModel, items, ratings, gaps) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Per-event cached vectors (N, d) of every stream, and signatures (N, n) or None, computed as `prefill` does
    (a token's K/V are a function of its event alone)."""
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    tok = model.emb.tokens(t(items), t(ratings), t(gaps))  # (N, d)
    out = {}
    if model.short is not None:
        out["short.k"], out["short.v"] = model.short.kv(tok)
    codes = None
    if isinstance(model, AttentionLongBranch):
        out["long.k"], out["long.v"] = model.long.kv(tok)
        codes = model.codes(tok)
    elif model.arch == "sdim":
        out["long.v"] = tok
        codes = model.signatures(tok)
    return out, codes


def pack_codes(model: CTRModel, codes: torch.Tensor) -> np.ndarray:
    """Signatures (N, n) -> one unsigned integer of `code_bits` bits per token."""
    if model.arch == "eta":
        bits = codes.to(torch.int64).numpy().astype(np.uint64)  # (N, n_bits) of 0/1
    else:  # sdim: rounds of round_bits each
        rb = model.config.round_bits
        c = codes.to(torch.int64).numpy().astype(np.uint64)  # (N, rounds)
        bits = ((c[:, :, None] >> np.arange(rb, dtype=np.uint64)) & np.uint64(1)).reshape(len(c), -1)
    weights = np.uint64(1) << np.arange(bits.shape[1], dtype=np.uint64)
    return (bits * weights).sum(1, dtype=np.uint64)


def unpack_codes(model: CTRModel, packed: np.ndarray) -> torch.Tensor:
    v = np.asarray(packed, dtype=np.uint64)
    n = code_bits(model)
    bits = ((v[:, None] >> np.arange(n, dtype=np.uint64)) & np.uint64(1)).astype(np.int64)  # (N, n)
    if model.arch == "eta":
        return torch.from_numpy(bits.astype(bool))
    rb = model.config.round_bits
    return torch.from_numpy((bits.reshape(len(v), -1, rb) << np.arange(rb)).sum(-1))  # (N, rounds)


# ---------------------------------------------------------------- the plan: streams, fields, encode, decode


class CTRPlan:
    """Which codec stores each stream and which side fields are kept. Duck-types what `ArtifactWriter` reads of a
    `CachePlan` (`fields()`, `streams`, `describe()`)."""

    def __init__(self, model: CTRModel, opts: CTROptions):
        self.model, self.arch = model, model.arch
        self.dims = stream_dims(model)
        if opts.codes not in CODE_MODES:
            raise CkvError(f"codes must be one of {', '.join(CODE_MODES)}, got {opts.codes!r}")
        bad = set(opts.share) - {"k", "v"}
        if bad or not opts.share:
            raise CkvError(f"--share takes k, v or k,v (got {','.join(opts.share) or 'nothing'})")
        self.eventid = opts.codec == EVENTID
        if not self.eventid and opts.codec not in CODECS:
            raise CkvError(f"unknown codec '{opts.codec}' (known: {', '.join(sorted([*CODECS, EVENTID]))})")
        if self.eventid and opts.params:
            raise CkvError(f"codec eventid takes no parameters (got {', '.join(sorted(opts.params))})")
        if opts.codec == "evict":
            raise CkvError("codec evict is for next-item models only (CTR caches do not take its keep mask yet)")
        if opts.codec == "itemid":
            raise CkvError("codec itemid: a CTR token's K/V are a function of its event (item, rating, gap), not of "
                           "the item alone: use eventid")
        self.code_bits = code_bits(model)
        self.codes = "recomputed" if self.eventid else (opts.codes if self.code_bits else "none")
        self.n_items = model.config.n_items
        self.streams: dict[str, object] = {}
        if not self.eventid:
            for name, d in self.dims.items():
                kind = name[-1]
                self.streams[name] = (make_codec(opts.codec, d, opts.params, kind) if kind in opts.share
                                      else make_codec("plain", d, {"dtype": "float16"}))
        self.store_items = self.eventid or self.arch == "sim"
        self._pinv = None

    def fields(self) -> dict[str, Field]:
        out = {"users/offsets": Field("offsets", "user", dtype="int64")}
        if self.store_items:
            out["tokens/items"] = Field("items", "token", bits=bits_for(self.n_items + 1))
        if self.eventid:
            out["tokens/ratings"] = Field("ratings", "token", bits=bits_for(N_RATINGS))
            out["tokens/gaps"] = Field("gaps", "token", bits=bits_for(N_GAPS))
        if self.codes == "stored":
            out["tokens/codes"] = Field("codes", "token", bits=self.code_bits)
        for name, codec in self.streams.items():
            for f in codec.fields():
                out[f"{name}/{f.name}"] = f
        return out

    def pointwise(self, codec) -> bool:
        return codec.name in POINTWISE or (codec.name == "collective" and codec.user_dim == 0)

    def describe(self) -> dict:
        return {"task": "ctr", "arch": self.arch, "n_items": self.n_items, "codes": self.codes,
                "items_stored": self.store_items, "stream_dims": self.dims,
                "streams": ({n: EVENTID for n in self.dims} if self.eventid else
                            {n: {"codec": c.name, "params": c.params()} for n, c in self.streams.items()})}

    def fit(self, x: dict[str, torch.Tensor], seed: int, on_stream: Callable[[str], None] | None = None) -> None:
        for i, (name, codec) in enumerate(self.streams.items()):
            if on_stream:
                on_stream(name)
            try:
                codec.fit(x[name], seed + i)
            except CkvError as e:
                raise CkvError(f"{name}: {e}", e.exit_code) from None

    def encode(self, ev: dict[str, np.ndarray], streams: dict[str, torch.Tensor], codes, offsets: np.ndarray,
               memo: dict[str, dict[str, np.ndarray]] | None = None, inverse: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Fields of a batch of users' tokens. With `memo` (stream -> fields of every distinct event) and `inverse`
        (each token's distinct event), pointwise streams take their event's code instead of being encoded."""
        out = {}
        if self.store_items:
            out["tokens/items"] = ev["items"].astype(np.uint32)
        if self.eventid:
            out["tokens/ratings"] = ev["ratings"].astype(np.uint32)
            out["tokens/gaps"] = ev["gaps"].astype(np.uint32)
        if self.codes == "stored":
            out["tokens/codes"] = pack_codes(self.model, codes)
        for name, codec in self.streams.items():
            if memo is not None and name in memo:
                enc = {k: v[inverse] for k, v in memo[name].items()}
            else:
                enc = codec.encode(streams[name], offsets)
            for k, v in enc.items():
                out[f"{name}/{k}"] = v
        return out

    @torch.no_grad()
    def decode(self, fields: dict[str, np.ndarray], offsets: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Decoded streams (N, d) and signatures (N, n) or None of a batch's tokens."""
        if self.eventid:
            return event_streams(self.model, fields["tokens/items"], fields["tokens/ratings"], fields["tokens/gaps"])
        out = {}
        for name, codec in self.streams.items():
            sub = {f.name: fields[f"{name}/{f.name}"] for f in codec.fields()}
            out[name] = codec.decode(sub, offsets).float()
        codes = None
        if self.codes == "stored":
            codes = unpack_codes(self.model, fields["tokens/codes"])
        elif self.codes == "derived":
            codes = self.derive_codes(out)
        return out, codes

    def derive_codes(self, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        if self.arch == "sdim":
            return m.signatures(dec["long.v"])
        if self._pinv is None:  # least squares token embedding behind K and V: x = pinv([W_k; W_v]) [K - b_k; V - b_v]
            W = torch.cat([m.long.k.weight, m.long.v.weight]).double()  # (2 d_attn, d)
            self._pinv = torch.linalg.pinv(W).float()  # (d, 2 d_attn)
        y = torch.cat([dec["long.k"] - m.long.k.bias, dec["long.v"] - m.long.v.bias], dim=1)  # (N, 2 d_attn)
        return m.codes(y @ self._pinv.T)


# ---------------------------------------------------------------- data: users, events, samples


def _events_of(data: CTRData, lo: int, hi: int) -> dict[str, np.ndarray]:
    return {"items": data.seq.items[lo:hi], "ratings": data.rating_bucket[lo:hi], "gaps": data.gap_bucket[lo:hi]}


def event_keys(data: CTRData) -> np.ndarray:
    """One integer per event identifying (item, rating bucket, gap bucket): what a token's cache is a function of."""
    return (data.seq.items.astype(np.int64) * N_RATINGS + data.rating_bucket) * N_GAPS + data.gap_bucket


def calibration_events(data: CTRData, opts: CTROptions) -> tuple[np.ndarray, int]:
    """Training-split events of a seeded sample of users that have any (no test leakage), at most
    `calib_tokens` of them (a seeded sample). Returns (events, number of calibration users)."""
    rng = np.random.default_rng(opts.seed)
    train = data.split_of == 0
    users = np.unique(data.users[train])
    if not len(users):
        raise CkvError(f"{data.name}: no training-split events to calibrate on")
    chosen = np.sort(rng.choice(users, size=min(opts.calib_users, len(users)), replace=False))
    events = np.flatnonzero(train & np.isin(data.users, chosen))
    if len(events) > opts.calib_tokens:
        events = np.sort(rng.choice(events, size=opts.calib_tokens, replace=False))
    return events, len(chosen)


# ---------------------------------------------------------------- scoring the test samples of a batch of users


def _groups(samples: np.ndarray, data: CTRData, budget: int) -> list[np.ndarray]:
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
def score_group(model: CTRModel, data: CTRData, g: np.ndarray, lo: int, streams: dict[str, torch.Tensor],
                codes: torch.Tensor | None) -> torch.Tensor:
    """Logits of samples `g` (one user, one history start) from per-event streams of the tokens starting at
    global event `lo`: the long branch reads a (B, L, d) view of the user's tokens (stride 0 over rows)."""
    start = int(data.hist_start[g[0]]) - lo
    lengths = torch.from_numpy((data.hist_end[g] - data.hist_start[g]).astype(np.int64))
    B, L = len(g), int(lengths.max())
    window = lambda x: x[start : start + L].unsqueeze(0).expand(B, *x[start : start + L].shape)  # noqa: E731
    valid = torch.arange(L)[None, :] < lengths[:, None]
    items = torch.from_numpy(data.seq.items[lo + start : lo + start + L].astype(np.int64)).expand(B, L)
    branches = {}
    if "short.k" in streams:
        idx, v = last_window(lengths, model.config.short_len)  # (B, w) positions in the history
        rows = idx + start
        branches["short"] = BranchKV(streams["short.k"][rows], streams["short.v"][rows], v.sum(1), positions=idx)
    if "long.v" in streams:
        branches["long"] = BranchKV(window(streams["long.k"]) if "long.k" in streams else None, window(streams["long.v"]),
                                    lengths, codes=window(codes) if codes is not None else None)
    cache = CTRCache(branches, items * valid, lengths)
    users = torch.from_numpy(data.user_rows[data.users[g]])
    targets = torch.from_numpy(data.seq.items[g].astype(np.int64))
    return model.score(cache, users, targets)


# ---------------------------------------------------------------- metrics


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


def _per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, weight) per distinct user (sorted ids); weight = sample count, 0 for single-class users (gAUC skips)."""
    order = np.argsort(users, kind="mergesort")
    u, lab, sc = users[order], labels[order], scores[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(u)) + 1, len(u)]
    vals, weights = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        v = auc(lab[a:b], sc[a:b])
        vals.append(0.0 if np.isnan(v) else v)
        weights.append(0 if np.isnan(v) else b - a)
    return np.array(vals), np.array(weights, dtype=np.float64)


def ctr_report(data: CTRData, samples: np.ndarray, ref: np.ndarray, new: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUC, gAUC, logloss uncompressed and compressed, deltas, and a paired bootstrap over users of each delta."""
    labels = data.labels[samples].astype(np.float64)
    users = data.users[samples]
    out = {}
    ua_r, w = _per_user_auc(users, labels, ref)
    ua_n, _ = _per_user_auc(users, labels, new)
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


# ---------------------------------------------------------------- bytes


def accounting(plan: CTRPlan, n_users: int, n_tokens: int, short_tokens: int) -> dict:
    """Bytes per NOTES §4 (see the module docstring). `short_tokens` = sum over users of min(events, short_len)."""
    fields = plan.fields()
    breakdown = {name: f.nbytes(n_tokens if f.per == "token" else n_users + (name == "users/offsets"))
                 for name, f in fields.items()}
    per_user = sum(breakdown.values())
    per_token_full = sum(plan.dims.values())  # values per token over every cached stream
    shared = {f"shared/{s}/{n}": int(t.numel() * t.element_size()) for s, c in plan.streams.items()
              for n, t in c.shared().items()}
    shared_total = sum(shared.values())
    # long branch only: the short window recomputed from the event ids of each user's last short_len tokens
    long_dims = sum(d for n, d in plan.dims.items() if n.startswith("long."))
    long_fields = {n: b for n, b in breakdown.items() if not n.startswith("short.")}
    event_bits = bits_for(plan.n_items + 1) + bits_for(N_RATINGS) + bits_for(N_GAPS)
    has_short = any(n.startswith("short.") for n in plan.dims)
    short_ids = ((short_tokens * event_bits + 7) // 8) if has_short and not plan.eventid else 0
    long_per_user = sum(long_fields.values()) + short_ids
    long16 = n_tokens * long_dims * 2
    return {
        **ratios(n_users, n_tokens, per_token_full, per_user, shared_total),
        "per_user_breakdown": breakdown, "shared_breakdown": shared,
        "denominator": ("every cached stream of every token (" + ", ".join(f"{n} {d}" for n, d in plan.dims.items())
                        + " values); the short window is a separate cache with its own K/V and is counted; "
                        "signatures and item ids are not in the denominator"),
        "long_only": {"per_user_bytes": long_per_user, "full_fp16_bytes": long16,
                      "per_user_ratio_fp16": long_per_user / max(long16, 1),
                      "short_window_event_id_bytes": short_ids,
                      "note": "only the long branch cached; the short window recomputed from the event ids "
                              f"({event_bits} bits) of each user's last {plan.model.config.short_len} tokens"},
    }


# ---------------------------------------------------------------- the run


def compress_ctr(model: CTRModel, data: CTRData, opts: CTROptions, sink=None,
                 advance: Callable[[int], None] | None = None, on_stream=None, users: np.ndarray | None = None,
                 reference: dict | None = None) -> dict:
    """Fit, encode every user's tokens batch by batch (each batch's fields to `sink.add` when given), decode them
    and score the batch's test samples. Returns {'plan', 'accounting', 'metrics', 'timing', 'scope'}.

    `ckv evaluate --sweep` (ckv_cli/sweep_ctr.py) passes `users` (user indices: only their tokens are encoded and
    only their test samples scored; calibration and the byte accounting still cover every user; no sink) and
    `reference` (a dict: filled with the uncompressed scores on the first call, {'samples', 'ref', 'seconds'},
    and read instead of scoring them again on the next ones)."""
    torch.manual_seed(opts.seed)
    model.eval()
    t0 = time.time()
    plan = CTRPlan(model, opts)
    # calibration: training-split tokens of sampled users
    calib, n_calib_users = calibration_events(data, opts)
    if plan.streams:
        x, _ = event_streams(model, data.seq.items[calib], data.rating_bucket[calib], data.gap_bucket[calib])
        plan.fit(x, opts.seed, on_stream)
        del x
    t_fit = time.time() - t0
    # distinct events: pointwise streams are encoded once per distinct (item, rating, gap)
    memo, inverse_all = None, None
    pointwise = [n for n, c in plan.streams.items() if plan.pointwise(c)]
    if pointwise:
        keys, first, inverse_all = np.unique(event_keys(data), return_index=True, return_inverse=True)
        memo = {n: {} for n in pointwise}
        for a in range(0, len(first), 65536):
            ev = first[a : a + 65536]
            x, _ = event_streams(model, data.seq.items[ev], data.rating_bucket[ev], data.gap_bucket[ev])
            for n in pointwise:
                for k, v in plan.streams[n].encode(x[n], np.array([0, len(ev)])).items():
                    memo[n].setdefault(k, []).append(v)
        memo = {n: {k: np.concatenate(v) for k, v in f.items()} for n, f in memo.items()}
        n_distinct = len(first)
    else:
        n_distinct = None
    if sink is not None:
        sink.start(plan)
    # encode, decode, score, batch by batch of users
    offsets = data.seq.offsets.astype(np.int64)
    test = data.split_of == SPLITS.index("test")
    err = {n: [0.0, 0.0] for n in plan.dims}
    code_flips = [0, 0]
    refs, news, done = [], [], []
    budget = 1 << 19  # rows x history tokens per scoring call
    rows = np.arange(data.seq.n_users) if users is None else np.unique(np.asarray(users, dtype=np.int64))
    if users is not None and sink is not None:
        raise CkvError("internal: an artifact holds every user: compress_ctr takes users= without a sink only")
    given = reference is not None and "ref" in reference
    t_ref, cursor = 0.0, 0
    for a in range(0, len(rows), opts.batch_users):
        ub = rows[a : a + opts.batch_users]  # consecutive users unless `users` was given
        starts, lens = offsets[ub], offsets[ub + 1] - offsets[ub]
        boff = np.r_[0, np.cumsum(lens)].astype(np.int64)
        shift = starts - boff[:-1]  # global event index - batch position, per user
        idx = np.repeat(shift, lens) + np.arange(boff[-1])  # global event index of each batch token
        ev = {"items": data.seq.items[idx], "ratings": data.rating_bucket[idx], "gaps": data.gap_bucket[idx]}
        streams, codes = event_streams(model, ev["items"], ev["ratings"], ev["gaps"])
        enc = plan.encode(ev, streams, codes, boff, memo, inverse_all[idx] if inverse_all is not None else None)
        if sink is not None:
            sink.add(enc, boff)
        dec, dcodes = plan.decode(enc, boff)
        for n in plan.dims:
            err[n][0] += float(((streams[n] - dec[n]) ** 2).sum())
            err[n][1] += float((streams[n] ** 2).sum())
        if codes is not None:
            code_flips[0] += int((codes != dcodes).sum())
            code_flips[1] += codes.numel()
        samples = idx[test[idx]]
        for g in _groups(samples, data, budget):
            lo = int(shift[np.searchsorted(ub, data.users[g[0]])])  # a group is one user's samples
            if given:
                refs.append(reference["ref"][cursor : cursor + len(g)])
                cursor += len(g)
            else:
                t_r = time.perf_counter()
                refs.append(torch.sigmoid(score_group(model, data, g, lo, streams, codes)).double().numpy())
                t_ref += time.perf_counter() - t_r
            news.append(torch.sigmoid(score_group(model, data, g, lo, dec, dcodes)).double().numpy())
            done.append(g)
        if advance:
            advance(len(ub))
    t_all = time.time() - t0
    samples = np.concatenate(done) if done else np.zeros(0, np.int64)
    ref = np.concatenate(refs) if refs else np.zeros(0)
    new = np.concatenate(news) if news else np.zeros(0)
    if given and not np.array_equal(reference["samples"], samples):
        raise CkvError("internal: the scored samples differ from those of the precomputed reference")
    if reference is not None and not given:
        reference.update(samples=samples, ref=ref, seconds=round(t_ref, 2))
    metrics = ctr_report(data, samples, ref, new, opts.bootstrap, opts.seed)
    metrics["protocol"] = PROTOCOL
    metrics["reconstruction_rel_mse"] = {n: e[0] / max(e[1], 1e-12) for n, e in err.items()}
    if code_flips[1]:
        metrics["signature_mismatch_rate"] = code_flips[0] / code_flips[1]
    n_tokens = int(offsets[-1])
    short_tokens = int(np.minimum(np.diff(offsets), model.config.short_len).sum())
    acct = accounting(plan, data.seq.n_users, n_tokens, short_tokens)
    return {"plan": plan, "accounting": acct, "metrics": metrics, "calibration": {
                "users": n_calib_users, "tokens": int(len(calib)), "split": "train",
                "distinct_events_encoded": n_distinct},
            "timing": {"fit_seconds": round(t_fit, 1), "total_seconds": round(t_all, 1)},
            "scope": {"users": int(len(rows)), "tokens": int((offsets[rows + 1] - offsets[rows]).sum())}}


def compress_ctr_to_artifact(model: CTRModel, meta: dict, checkpoint_path, data: CTRData, opts: CTROptions, out,
                             force: bool = False, advance=None, command: str = "", on_stream=None) -> dict:
    """`compress_ctr` streamed into an artifact (`ArtifactWriter`); checks the per-user bytes laid out against the
    accounting; returns the report."""
    from ckv_cli.artifact import ArtifactWriter
    from ckv_cli.data.datasets import sha256_file

    writer = ArtifactWriter(out, np.diff(data.seq.offsets).astype(np.int64), data.seq.user_ids, force=force)
    try:
        sha = sha256_file(Path(checkpoint_path))
        res = compress_ctr(model, data, opts, sink=writer, advance=advance, on_stream=on_stream)
        plan, acct = res["plan"], res["accounting"]
        report = {"artifact": str(out), "task": "ctr", "checkpoint": str(checkpoint_path), "checkpoint_sha256": sha,
                  "arch": meta["arch"], "dataset": data.name, "data_fingerprint": data.fingerprint, "seed": opts.seed,
                  "codec": opts.codec, "params": opts.params, "share": list(opts.share), "codes": plan.codes,
                  "branches": sorted({n.split(".")[0] for n in plan.dims}), "streams": plan.dims,
                  "calib_users": opts.calib_users, "calib_tokens": opts.calib_tokens, "calibration": res["calibration"],
                  "plan": plan.describe(), "accounting": acct, "metrics": res["metrics"]}
        laid_out = writer.tensor_bytes
        on_disk = sum(v for k, v in laid_out.items() if k in acct["per_user_breakdown"])
        if on_disk != acct["per_user_bytes"]:
            raise CkvError(f"internal: per-user bytes on disk ({on_disk}) differ from the accounting ({acct['per_user_bytes']})")
        shared_disk = sum(v for k, v in laid_out.items() if k.startswith("shared/"))
        if shared_disk != acct["shared_bytes"]:
            raise CkvError(f"internal: shared bytes on disk ({shared_disk}) differ from the accounting ({acct['shared_bytes']})")
        metadata = {k: v for k, v in report.items() if k not in ("artifact", "plan")}
        metadata["command"] = command
        stored = writer.finish(metadata)
    finally:
        writer.discard()
    report["timing"] = res["timing"]
    report["stored_tensor_bytes"] = int(sum(stored.values()))
    report["per_user_bytes_on_disk"] = int(sum(v for k, v in stored.items() if k in acct["per_user_breakdown"]))
    report["file_bytes"] = Path(out).stat().st_size
    return report


def parse_ctr_options(codec: str, params: dict, share: str | tuple, calib_users: int, batch_users: int,
                      seed: int) -> CTROptions:
    """CLI options -> CTROptions (`codes` and `calib_tokens`, `bootstrap` come in as --param)."""
    params = dict(params)
    extra = {k: params.pop(k) for k in ("codes", "calib_tokens", "bootstrap") if k in params}
    for k in ("calib_tokens", "bootstrap"):
        if k in extra and (type(extra[k]) is not int or extra[k] < (1 if k == "calib_tokens" else 0)):
            raise CkvError(f"--param {k} must be an integer >= {1 if k == 'calib_tokens' else 0}, got {extra[k]!r}")
    share = tuple(s.strip() for s in share.split(",") if s.strip()) if isinstance(share, str) else tuple(share)
    return CTROptions(codec=codec, params=params, share=share, calib_users=calib_users, batch_users=batch_users,
                      seed=seed, **extra)


def print_ctr_compress(report: dict) -> None:
    """The table `ckv compress` ends with for a CTR model (the shape of `print_compress`)."""
    from ckv_cli.report import _human, print_table

    a, m = report["accounting"], report["metrics"]
    rows = [
        ["users / cached tokens", f"{a['users']:,} / {a['tokens']:,}"],
        ["streams", ", ".join(f"{n} ({d})" for n, d in report["streams"].items()) + f"; signatures {report['codes']}"],
        ["full cache, fp16 (all streams)", _human(a["full_fp16_bytes"])],
        ["full cache, fp32", _human(a["full_fp32_bytes"])],
        ["compressed per-user (all users)", _human(a["per_user_bytes"])],
        ["  bytes per token (all streams)", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
        ["shared (pools, bases)", _human(a["shared_bytes"])],
        ["per-user ratio vs fp16 / fp32", f"{a['per_user_ratio_fp16']:.3%} / {a['per_user_ratio_fp32']:.3%}"],
        ["total ratio vs fp16 / fp32", f"{a['total_ratio_fp16']:.3%} / {a['total_ratio_fp32']:.3%}"],
        ["long branch only (short window from event ids)", f"{a['long_only']['per_user_ratio_fp16']:.3%} of its fp16"],
    ]
    ci = m.get("delta_ci95", {})
    for k in ("AUC", "gAUC", "logloss"):
        c = f" [{ci[k][0]:+.4f}, {ci[k][1]:+.4f}]" if k in ci else ""
        rows.append([f"{k}: uncompressed -> compressed",
                     f"{m['uncompressed'][k]:.4f} -> {m['compressed'][k]:.4f} ({m['delta'][k]:+.5f}{c})"])
    rows.append(["test samples / users", f"{m['samples']:,} / {m['users']:,}"])
    if "signature_mismatch_rate" in m:
        rows.append(["signature bits changed", f"{m['signature_mismatch_rate']:.3%}"])
    if "seconds" in report:
        rows.append(["time / peak memory", f"{report['seconds']:.0f} s / {report.get('peak_rss_mb', 0):,.0f} MB"])
    print_table(f"ckv compress: {report['arch']} on {report['dataset']} -> {report['artifact']}", ["", "value"], rows)


def describe_ctr_artifact(path) -> dict:
    """What `ckv inspect` shows of a CTR artifact, from its header alone: metadata and tensor inventory."""
    from ckv_cli.artifact import decode_metadata
    from ckv_cli.checkpoint import read_header

    header, raw = read_header(Path(path))
    meta = decode_metadata(raw, path)
    tensors = []
    for name, info in sorted(header.items()):
        a, b = info["data_offsets"]
        tensors.append({"name": name, "dtype": info["dtype"], "shape": info["shape"], "bytes": b - a})
    return {"metadata": {k: v for k, v in meta.items() if k not in ("checksums", "fields")}, "tensors": tensors}


def is_ctr_artifact(path) -> bool:
    from ckv_cli.checkpoint import read_header

    try:
        return read_header(Path(path))[1].get("task") == "ctr"
    except CkvError:
        return False


def compress_ctr_command(checkpoint: Path, data: str, out: Path, *, codec: str, pool_size: int | None, user_dim: int,
                         layout: str, user_dtype: str, share: str, calib_users: int, batch_users: int,
                         param: list[str] | None, seed: int, columns: str | None, force: bool, json_out,
                         refused: dict, command: str) -> dict:
    """`ckv compress CTR_CHECKPOINT ...` (cli.py dispatches here): options, data, run, table, JSON. `refused` maps
    option names to whether they were given (options of the next-item path only)."""
    import resource

    from ckv_cli.checkpoint import check_output, load_checkpoint
    from ckv_cli.cli import _report_drops, parse_columns
    from ckv_cli.compress import parse_params
    from ckv_cli.data.ctr import load_ctr
    from ckv_cli.report import progress, write_json

    given = [k for k, v in refused.items() if v]
    if given:
        raise CkvError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to next-item models; "
                       f"{checkpoint} is a CTR model")
    check_output(out, force)
    check_output(json_out)
    params = ({"pool_size": DEFAULT_POOL if pool_size is None else pool_size, "user_dim": user_dim, "layout": layout,
               "user_dtype": user_dtype} if codec == "collective" else {})
    params.update(parse_params(param or []))
    opts = parse_ctr_options(codec, params, share, calib_users, batch_users, seed)
    model, meta = load_checkpoint(checkpoint)
    CTRPlan(model, opts)  # refuse bad options before the data is read
    ds = load_ctr(data, parse_columns(columns), max_history=model.config.max_len, item_vocab=meta["item_vocab"])
    _report_drops(ds.seq)
    ds = ds.with_user_vocab(meta.get("user_vocab") or [])
    t = time.time()
    with progress("compress", total=ds.seq.n_users) as advance:
        report = compress_ctr_to_artifact(model, meta, checkpoint, ds, opts, out, force=force, advance=advance,
                                          command=command, on_stream=lambda name: advance(0, f"fitting {name}"))
    report["seconds"] = round(time.time() - t, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print_ctr_compress(report)
    write_json(json_out, report)
    return report


def inspect_ctr_artifact(path, data, json_out) -> bool:
    """`ckv inspect` on a CTR artifact: metadata, tensor inventory, byte accounting, integrity (tensor checksums).
    With `--data` the CLI adds pool usage and the reconstruction error (`ckv_cli.store_ctr.inspect_ctr_data`)."""
    import json
    import sys

    from safetensors import SafetensorError, safe_open

    from ckv_cli.artifact import _sha
    from ckv_cli.checkpoint import read_header
    from ckv_cli.report import _human, print_table, write_json

    if data:
        raise CkvError("--data on a CTR artifact is not supported (its reconstruction error is in the compress report)")
    d = describe_ctr_artifact(path)
    meta = d["metadata"]
    try:
        sums = json.loads(read_header(Path(path))[1].get("checksums", "{}"))
        bad = []
        with safe_open(str(path), "np") as f:
            for name in sorted(f.keys()):
                if sums.get(name) != _sha(f.get_tensor(name)):
                    bad.append(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CkvError(f"{path}: cannot read ({str(e).splitlines()[0][:120]})") from None
    a = meta.get("accounting", {})
    rows = [[t["name"], t["dtype"], "x".join(map(str, t["shape"])), _human(t["bytes"])] for t in d["tensors"]]
    print_table(f"{path}: CTR artifact of {meta.get('arch')} on {meta.get('dataset')} (codec {meta.get('codec')}, "
                f"signatures {meta.get('codes')})", ["tensor", "dtype", "shape", "bytes"], rows)
    if isinstance(a, dict) and "per_user_bytes" in a:
        m = meta.get("metrics", {})
        summary = [["users / tokens", f"{a['users']:,} / {a['tokens']:,}"],
                   ["bytes per token", f"{a['bytes_per_token']:.2f} vs {a['full_fp16_bytes_per_token']} fp16"],
                   ["per-user ratio vs fp16", f"{a['per_user_ratio_fp16']:.3%}"],
                   ["shared", _human(a["shared_bytes"])]]
        for k in ("AUC", "gAUC", "logloss"):
            if k in m.get("delta", {}):
                summary.append([f"{k} delta", f"{m['delta'][k]:+.5f}"])
        summary.append(["integrity", "ok" if not bad else f"{len(bad)} tensor(s) do not match their checksum"])
        print_table("accounting and metrics (from the metadata)", ["", "value"], summary)
    write_json(json_out, {"path": str(path), "kind": "artifact", "task": "ctr", **d, "corrupted_tensors": bad})

    for name in bad:
        print(f"ckv: integrity check failed: tensor '{name}' does not match its checksum ({path})", file=sys.stderr)
    return not bad
