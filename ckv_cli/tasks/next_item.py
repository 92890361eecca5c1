"""The next-item task: rank the held-out item against every item (leave-one-out), for SASRec, HSTU and any model of
`ckv_cli.models.base.SequentialRecommender`'s interface.

Protocol (that of the generative-recommenders ML-1M numbers, NOTES §5): the history is the user's events before
the target, truncated to the model's window; every item is ranked except the items of that window, which are
removed from the ranking (their `eval_metrics_v2_from_tensors` filters the input ids by default).
`exclude_seen=False` ranks the seen items too.

With a compressed cache (`ckv compress`, `ckv evaluate CHECKPOINT ARTIFACT`): each user's history up to the last
known event (the most recent `max_len` events) is prefilled by the full model (the teacher cache) and compressed;
the last known event is appended with `extend` through the decoded cache and its output ranks the items. The
reference appends through the exact cache, so the delta isolates the compression. Per user: the target's rank
under each, the top-10 overlap, KL of the two next-item distributions (`score_fidelity`).

A model with next-event query time (`model.provisional_tokens`, `ckv_cli.models.base`) is asked at the held-out
event's time: `rank_targets` and `scores_after_last_event` pass it as the request time (`query_ts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ckv_cli.data.batching import history_batch
from ckv_cli.data.sequences import SequenceData
from ckv_cli.errors import CkvError
from ckv_cli.metrics import RANKING_METRICS, paired_bootstrap, per_user_ranking, ranking_metrics
from ckv_cli.models.base import KVCache, last_hidden
from ckv_cli.spec import FlatCache

NAME = "next-item"
PROTOCOL = "leave-one-out, all items ranked, the items of the history window removed from the ranking"
SEEN_PROTOCOL = "leave-one-out, all items ranked, the items of the history window ranked too"
COMPRESS_PROTOCOL = f"test split, history prefilled and compressed, last event appended via extend; {PROTOCOL}"
TEMPERATURE = 0.05  # the default training temperature (a model's own: `temperature_of`)
METRICS = RANKING_METRICS
LOWER_IS_BETTER: tuple[str, ...] = ()
PARETO_METRIC = "NDCG@10"


# ---------------------------------------------------------------------------------------------- ranking


def temperature_of(model) -> float:
    """softmax(score / T) is the model's next-item distribution: its `temperature` (0.05 for cosine scores, 1 for
    RecBole's raw dot products), `TEMPERATURE` for a model that does not say."""
    return float(getattr(model, "temperature", TEMPERATURE))


def provisional(model) -> bool:
    """The model's newest cached token waits for the next event's time (next-event query time)."""
    return bool(getattr(model, "provisional_tokens", 0))


def mask_seen(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, n_items + 1) scores with the columns of each user's window items (B, L), 0 = padding, set to -inf."""
    return scores.scatter(1, items.to(scores.device), float("-inf"))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """0-based rank of each target: the number of items scored strictly higher."""
    return (scores > scores.gather(1, targets[:, None])).sum(1).cpu().numpy()


@torch.no_grad()
def rank_targets(model, data: SequenceData, split: str = "test", exclude_seen: bool = True, batch_size: int = 256,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """0-based rank of each user's held-out item among all items (one number per user)."""
    model.eval()
    hist_items, hist_times, targets = data.split(split)
    query = data.target_times(split) if provisional(model) else None  # next-event query time: the target's
    ranks = np.empty(len(targets), dtype=np.int64)
    device = model.item_emb.weight.device
    for a in range(0, len(targets), batch_size):
        b = min(a + batch_size, len(targets))
        items, times, lengths = history_batch(hist_items[a:b], hist_times[a:b], model.config.max_len)
        args = items.to(device), times.to(device), lengths.to(device)
        _, h = (model.prefill(*args) if query is None
                else model.prefill(*args, query_ts=torch.from_numpy(query[a:b]).to(device)))
        scores = model.score_all(last_hidden(h, lengths.to(device))).cpu()  # (B, n_items + 1)
        if exclude_seen:
            scores = mask_seen(scores, items)
        ranks[a:b] = target_ranks(scores, torch.from_numpy(targets[a:b]))
        if progress:
            progress(b - a)
    return ranks


def evaluate_model(model, data, split="test", exclude_seen=True, progress=None) -> dict[str, float]:
    return ranking_metrics(rank_targets(model, data, split, exclude_seen, progress=progress))


@torch.no_grad()
def scores_after_last_event(model, cache, batch, exclude_seen: bool = True) -> torch.Tensor:
    """Append each user's last event (a `CacheBatch`) through `cache` and score every item: (B, n_items + 1),
    the window's items (cached ones and the last event) masked unless `exclude_seen=False`. A model with
    next-event query time is asked at the held-out event's time (`batch.target_ts`)."""
    return scores_with_grad(model, cache, batch, exclude_seen)


def scores_with_grad(model, cache, batch, exclude_seen: bool = True) -> torch.Tensor:
    """`scores_after_last_event` where autograd is on (gradients reach the cache: `ckv_cli.tasks.fisher`)."""
    query = getattr(batch, "target_ts", None)
    _, h = (model.extend(cache, batch.last_items, batch.last_ts, query_ts=query) if provisional(model)
            else model.extend(cache, batch.last_items, batch.last_ts))
    scores = model.score_all(last_hidden(h, torch.ones(len(batch.users), dtype=torch.long)))
    if exclude_seen:
        scores = mask_seen(mask_seen(scores, batch.cache.items), batch.last_items)
    return scores


def score_fidelity(s_ref: torch.Tensor, s_new: torch.Tensor, targets: torch.Tensor,
                   temperature: float = TEMPERATURE) -> dict[str, np.ndarray]:
    """Per-user comparison of two score matrices (B, n_items + 1; -inf = not ranked): the target's rank under
    each, overlap of the top-10 lists, and KL(reference || new) of the softmax distributions at the training
    temperature (the model's: `temperature_of`; 0.05 for cosine scores, 1 for RecBole's raw dot products) over
    the ranked items."""
    top_r, top_n = s_ref.topk(10).indices, s_new.topk(10).indices  # (B, 10)
    logp_r = torch.log_softmax(s_ref / temperature, dim=1)  # -inf columns get probability 0
    logp_n = torch.log_softmax(s_new / temperature, dim=1)
    ranked = torch.isfinite(s_ref)
    kl = torch.where(ranked, logp_r.exp() * (logp_r - logp_n), torch.zeros_like(logp_r)).sum(1).clamp(min=0)
    return {"rank_ref": target_ranks(s_ref, targets), "rank_new": target_ranks(s_new, targets),
            "top10_overlap": (top_r[:, :, None] == top_n[:, None, :]).any(2).float().mean(1).numpy(),
            "kl": kl.numpy()}


def fidelity_summary(per_user: dict[str, np.ndarray]) -> dict:
    rr, rn = per_user["rank_ref"], per_user["rank_new"]
    return {"top10_overlap": float(per_user["top10_overlap"].mean()), "kl_mean": float(per_user["kl"].mean()),
            "hit10_flips": int(((rr < 10) != (rn < 10)).sum()),
            "hit10_gained": int(((rr >= 10) & (rn < 10)).sum()), "hit10_lost": int(((rr < 10) & (rn >= 10)).sum())}


# ---------------------------------------------------------------------------------------------- teacher caches


@dataclass
class CacheBatch:
    users: np.ndarray  # (B,) user indices into the dataset
    cache: KVCache  # teacher cache of each user's history prefix
    last_items: torch.Tensor  # (B, 1) the last known event, appended with `extend`
    last_ts: torch.Tensor  # (B, 1)
    targets: torch.Tensor  # (B,) held-out item
    target_ts: torch.Tensor | None = None  # (B,) its time: the request time of a next-event-time model


def last_event_batch(hist_items: list[np.ndarray], hist_times: list[np.ndarray], users: np.ndarray, max_len: int):
    """The users' histories cut to the window, split into the cached prefix and the last event:
    (items (B, L), timestamps (B, L), lengths (B,), last items (B, 1), last timestamps (B, 1))."""
    hi = [hist_items[u][-max_len:] for u in users]
    ht = [hist_times[u][-max_len:] for u in users]
    items, times, lengths = history_batch([h[:-1] for h in hi], [t[:-1] for t in ht], max_len)
    last_items = torch.tensor([[h[-1]] for h in hi], dtype=torch.long)
    last_ts = torch.tensor([[t[-1]] for t in ht], dtype=torch.long)
    return items, times, lengths, last_items, last_ts


class _TestHistories:
    """`data.split("test")`'s histories (everything before the held-out item), sliced one user at a time when
    indexed, so that nothing per user is built for users not yet reached (memory flat in the number of users)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __getitem__(self, u) -> np.ndarray:
        return self.values[self.offsets[u] : self.offsets[u + 1] - 1]


def teacher_cache_lengths(data: SequenceData, max_len: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens in the teacher cache of users [start, stop) as `iter_test_caches` builds it, without building it:
    the test history (all events but the held-out one) cut to its last `max_len` events, minus the last event."""
    stop = data.n_users if stop is None else stop
    lengths = np.diff(data.offsets[start : stop + 1]).astype(np.int64, copy=False)  # one array, worked on in place
    lengths -= 1
    np.minimum(lengths, max_len, out=lengths)
    lengths -= 1
    return np.maximum(lengths, 0, out=lengths)


@torch.no_grad()
def iter_test_caches(model, data: SequenceData, users: np.ndarray | range, batch_size: int = 256) -> Iterator[CacheBatch]:
    model.eval()
    hist_items, hist_times = _TestHistories(data.items, data.offsets), _TestHistories(data.timestamps, data.offsets)
    for a in range(0, len(users), batch_size):
        batch = np.asarray(users[a : a + batch_size])  # users may be a range: one batch's indices at a time
        items, times, lengths, last_items, last_ts = last_event_batch(hist_items, hist_times, batch, model.config.max_len)
        cache, _ = model.prefill(items, times, lengths)
        held = data.offsets[batch.astype(np.int64) + 1] - 1  # the held-out (last) events
        yield CacheBatch(users=batch, cache=cache, last_items=last_items, last_ts=last_ts,
                         targets=torch.from_numpy(np.asarray(data.items[held], dtype=np.int64)),
                         target_ts=torch.from_numpy(np.asarray(data.timestamps[held], dtype=np.int64)))


@dataclass
class TeacherBatch:
    """One batch of users' teacher caches (flat) and what scoring needs: the last known event, the held-out
    target, and the scores of the uncompressed model after appending that event (`ref_scores`, (B, n_items + 1);
    the window's items masked when `exclude_seen`, the published protocol)."""

    users: np.ndarray
    tokens: FlatCache
    last_items: torch.Tensor
    last_ts: torch.Tensor
    targets: torch.Tensor
    ref_scores: torch.Tensor
    exclude_seen: bool = True
    target_ts: torch.Tensor | None = None  # (B,) the held-out event's time (next-event query time)

    @property
    def flat(self) -> FlatCache:
        return self.tokens

    def cache_batch(self, cache) -> CacheBatch:
        """A `CacheBatch` over `cache` (the decoded cache: its item ids are the teacher's, so the same window
        items are masked)."""
        return CacheBatch(self.users, cache, self.last_items, self.last_ts, self.targets, self.target_ts)


def teacher_batches(model, ds: SequenceData, users: np.ndarray | range, batch_users: int,
                    exclude_seen: bool = True) -> Iterator[TeacherBatch]:
    """Streamed: each batch's teacher cache is prefilled, flattened and scored, then left to the caller. `users`
    may be a `range` (nothing per user is built for users not yet reached)."""
    for b in iter_test_caches(model, ds, users, batch_users):
        yield TeacherBatch(b.users, model.flatten(b.cache), b.last_items, b.last_ts, b.targets,
                           scores_after_last_event(model, b.cache, b, exclude_seen), exclude_seen, b.target_ts)


def targets_in_window(data: SequenceData, max_len: int) -> float:
    """Share of users whose held-out (test) item is among the items of its history window: targets the published
    protocol (`exclude_seen`) cannot rank at all. Large on re-consumption logs (re-purchases, re-plays)."""
    if not data.n_users:
        return 0.0
    hits = 0
    for u in range(data.n_users):
        a, b = data.offsets[u], data.offsets[u + 1]
        hits += bool(np.isin(data.items[b - 1], data.items[max(a, b - 1 - max_len) : b - 1]))
    return hits / data.n_users


@dataclass
class Teacher:
    """Every user's teacher cache (flat, concatenated in dataset order) and reference scores, built once and
    shared by every plan of a sweep. `batches` are views into `flat`."""

    flat: FlatCache
    batches: list[TeacherBatch]

    @classmethod
    def build(cls, model, ds: SequenceData, batch_users: int = 256, advance: Callable[[int], None] | None = None,
              exclude_seen: bool = True) -> "Teacher":
        batches = []
        for tb in teacher_batches(model, ds, np.arange(ds.n_users), batch_users, exclude_seen):
            batches.append(tb)
            if advance:
                advance(len(tb.users))
        flat = FlatCache.concat([tb.tokens for tb in batches], consume=True)
        start = 0
        for tb in batches:  # replace each batch's copy by a view into the concatenated cache
            tb.tokens = flat.users(start, start + len(tb.users))
            start += len(tb.users)
        return cls(flat, batches)

    def reference(self) -> dict:
        ranks = np.concatenate([target_ranks(tb.ref_scores, tb.targets) for tb in self.batches])
        return {"ranks": ranks, "metrics": ranking_metrics(ranks)}

    @property
    def n_users(self) -> int:
        return self.flat.n_users


# ---------------------------------------------------------------------------------------------- scoring


class Scored:
    """What scoring every user leaves: the users' token offsets and, per user, the target's rank under the
    reference and the compressed cache, the top-10 overlap and the KL divergence (`score_fidelity`).

    The offsets and per-user values are kept (`keep_per_user`: a sweep resamples them) or only counted and
    summed (a streamed artifact, whose file holds the offsets: nothing per user is held, so memory stays flat
    in the number of users; `offsets` is None and `n_tokens` counts the tokens). Kept values go into arrays
    allocated once when the number of users is known: lists of small per-batch arrays, each allocated after
    the batch's large temporaries, kept glibc's heap from reusing or trimming them, and the resident set grew
    by ~20 kB per user (`bench/compress_memory.py`). Summed, the metrics have the definitions of
    `ranking_metrics` and `fidelity_summary` (means of the same per-user values) and differ from them only by
    float rounding: sums per batch in float64 where numpy sums all users pairwise."""

    def __init__(self, n_users: int | None, keep_per_user: bool = True, exclude_seen: bool = True):
        self.n, self.keep, self.done, self.n_tokens = n_users, keep_per_user, 0, 0
        self.exclude_seen = exclude_seen
        self.offsets = np.zeros((n_users or 0) + 1, dtype=np.int64) if keep_per_user else None
        self._lengths: list[np.ndarray] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._parts: dict[str, list[np.ndarray]] = {}
        self._sums: dict[str, float] = {}
        self._counts = {"hit10_flips": 0, "hit10_gained": 0, "hit10_lost": 0}
        self.held: Scored | None = None  # sums over the users not used for calibration (`hold_out`)
        self._held_mask: np.ndarray | None = None

    def hold_out(self, mask: np.ndarray) -> None:
        """Also keep sums over the users with `mask[user]` True (dataset user index -> not a calibration user):
        `report` then adds their metrics under 'held_out'."""
        self._held_mask = np.asarray(mask, dtype=bool)
        self.held = Scored(None, keep_per_user=False, exclude_seen=self.exclude_seen)

    def add_batch(self, tb: TeacherBatch, decoded: FlatCache, reader) -> None:
        """One teacher batch scored through its decoded cache by `reader` (the model that reads the artifact)."""
        cache = reader.unflatten(decoded)
        s_c = scores_after_last_event(reader, cache, tb.cache_batch(cache), tb.exclude_seen)
        values = score_fidelity(tb.ref_scores, s_c, tb.targets, temperature_of(reader))
        self.add(tb.tokens.offsets, values)
        if self.held is not None:
            rows = np.nonzero(self._held_mask[np.asarray(tb.users)])[0]
            if len(rows):
                lengths = np.diff(tb.tokens.offsets)[rows]
                self.held.add(np.concatenate([[0], np.cumsum(lengths)]), {k: v[rows] for k, v in values.items()})

    def summary(self) -> dict:
        """The running sums (plain numbers: JSON-able), for `merged` (shards scored apart; not kept per user)."""
        return {"done": self.done, "n_tokens": self.n_tokens, "sums": dict(self._sums), "counts": dict(self._counts)}

    @classmethod
    def merged(cls, summaries: list[dict]) -> "Scored":
        """One `Scored` (sums only) over the users of several: their `summary()`s added."""
        out = cls(None, keep_per_user=False)
        for s in summaries:
            out.done += s["done"]
            out.n_tokens += s["n_tokens"]
            for k, v in s["sums"].items():
                out._sums[k] = out._sums.get(k, 0.0) + v
            for k, v in s["counts"].items():
                out._counts[k] += v
        return out

    def add(self, offsets: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """One batch (consecutive users): its offsets and `score_fidelity`'s per-user values."""
        b = len(offsets) - 1
        if self.n is not None and self.done + b > self.n:
            raise CkvError(f"internal: more than the {self.n:,} users announced")
        self.n_tokens += int(offsets[-1] - offsets[0])
        if self.keep and self.n is None:  # lists, joined by `finish`
            self._lengths.append(np.diff(offsets))
            for k, v in values.items():
                self._parts.setdefault(k, []).append(v)
        elif self.keep:  # arrays allocated once
            self.offsets[self.done + 1 : self.done + b + 1] = self.offsets[self.done] + (offsets[1:] - offsets[0])
            for k, v in values.items():
                if k not in self._arrays:
                    self._arrays[k] = np.empty(self.n, dtype=v.dtype)
                self._arrays[k][self.done : self.done + b] = v
        else:  # sums and counts
            for side in ("rank_ref", "rank_new"):
                for k, v in per_user_ranking(values[side]).items():
                    self._sums[f"{side}/{k}"] = self._sums.get(f"{side}/{k}", 0.0) + float(v.sum())
            for k in ("top10_overlap", "kl"):
                self._sums[k] = self._sums.get(k, 0.0) + float(values[k].sum(dtype=np.float64))
            rr, rn = values["rank_ref"], values["rank_new"]
            self._counts["hit10_flips"] += int(((rr < 10) != (rn < 10)).sum())
            self._counts["hit10_gained"] += int(((rr >= 10) & (rn < 10)).sum())
            self._counts["hit10_lost"] += int(((rr < 10) & (rn >= 10)).sum())
        self.done += b

    def finish(self) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(offsets, per-user values), both only if kept (else None and empty)."""
        if self.n is None and self.keep:
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._arrays = {k: np.concatenate(v) for k, v in self._parts.items()}
            self._lengths, self._parts = [], {}
        elif self.n is not None and self.done != self.n:
            raise CkvError(f"internal: {self.done:,} of the {self.n:,} users announced were scored")
        return self.offsets, self._arrays

    @property
    def per_user(self) -> dict[str, np.ndarray]:
        return self._arrays

    def metrics(self) -> tuple[dict, dict, dict]:
        """(ranking metrics uncompressed, compressed, fidelity summary), from the kept values or the sums."""
        if self.keep:
            per_user = self._arrays
            return ranking_metrics(per_user["rank_ref"]), ranking_metrics(per_user["rank_new"]), fidelity_summary(per_user)
        n = self.done
        mean = (lambda key: self._sums[key] / n) if n else (lambda key: float("nan"))  # noqa: E731
        ref, new = ({k: mean(f"{side}/{k}") for k in RANKING_METRICS} for side in ("rank_ref", "rank_new"))
        return ref, new, {"top10_overlap": mean("top10_overlap"), "kl_mean": mean("kl"), **self._counts}

    def row(self, report: dict) -> dict:
        """What a sweep row shows beside the deltas."""
        f = report["fidelity"]
        return {k: f[k] for k in ("top10_overlap", "kl_mean", "hit10_flips", "hit10_gained", "hit10_lost")}

    def report(self, recon: dict[str, float]) -> dict:
        """The metrics entry of a report: ranking metrics without and with compression, deltas, fidelity, error."""
        teacher_m, student, fidelity = self.metrics()
        return {
            "protocol": COMPRESS_PROTOCOL if self.exclude_seen else COMPRESS_PROTOCOL.replace(PROTOCOL, SEEN_PROTOCOL),
            "uncompressed": teacher_m, "compressed": student,
            "delta": {k: student[k] - teacher_m[k] for k in teacher_m},
            "relative_delta": {k: (student[k] - teacher_m[k]) / teacher_m[k] if teacher_m[k] else 0.0 for k in teacher_m},
            "fidelity": fidelity,
            "reconstruction_rel_mse": recon,
        }

    def held_report(self, recon: dict[str, float]) -> dict | None:
        """The metrics of the held-out users (`hold_out`; None when not asked or none was scored), with `recon`
        (their reconstruction error)."""
        if self.held is None or not self.held.done:
            return None
        return {"users": self.held.done, **self.held.report(recon)}

    def deltas(self, report: dict, bootstrap: int, seed: int) -> dict[str, dict[str, float]]:
        """Per metric: the delta, relative delta and its paired-bootstrap 95% CI over users (kept values only)."""
        ref, new = self._arrays["rank_ref"], self._arrays["rank_new"]
        reference, compressed = ranking_metrics(ref), ranking_metrics(new)
        out = {}
        for k, (low, high) in paired_bootstrap(per_user_ranking(ref), per_user_ranking(new), n=bootstrap, seed=seed).items():
            d = compressed[k] - reference[k]
            out[k] = {"value": compressed[k], "delta": d, "relative": d / reference[k] if reference[k] else 0.0,
                      "ci_low": low, "ci_high": high}
        return out
