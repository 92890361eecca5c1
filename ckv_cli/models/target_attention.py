"""What the long-sequence CTR models (SIM, ETA, SDIM, TWIN, and the no-history baseline) share.

A sample is (user, target item, history of events). Every model embeds the target and the history tokens the
same way, reads the short window (the last `short_len` events) with multi-head target attention, reads the long
history with its own branch, and scores with an MLP over [user, target, short, long] and a sigmoid.

The cache: `prefill(batch)` returns, per history-reading branch ("short", "long"), the K/V of every history token
that branch may read (the long branch keeps all of them: which ones it reads depends on the candidate).
`score(cache, users, targets)` scores candidates from it and equals `forward` (tests/test_ctr_models.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import numpy as np

from ckv_cli.data.ctr import N_GAPS, N_RATINGS, CTRBatch
from ckv_cli.spec import CacheSpec, Side, Stream, TokenId, bits_for

EVENT_IDS = ("items", "ratings", "gaps")  # what a history token's K/V are a function of


@dataclass
class CTRConfig:
    n_items: int
    n_users: int
    n_genres: int
    d: int = 64  # embedding width
    d_attn: int = 256  # attention width (W_q, W_k, W_v: d -> d_attn; W_o: d_attn -> d)
    n_heads: int = 8
    short_len: int = 50  # the short window: the most recent events, read by target attention
    max_len: int = 1000  # the longest history a sample carries
    top_k: int = 50  # long-branch tokens read per candidate
    mlp: list = field(default_factory=lambda: [200, 80])
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_items", "n_users", "d", "d_attn", "n_heads", "max_len", "top_k"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_attn % self.n_heads:
            raise ValueError(f"attention width {self.d_attn} is not a multiple of the {self.n_heads} heads")
        if type(self.short_len) is not int or self.short_len < 0:
            raise ValueError(f"short_len must be >= 0, got {self.short_len!r}")


@dataclass
class BranchKV:
    """One branch's cached tokens, right-padded: user b's are [0, lengths[b])."""

    keys: torch.Tensor | None  # (B, L, d_k); None for a branch that reads values only (SDIM)
    values: torch.Tensor  # (B, L, d_v)
    lengths: torch.Tensor  # (B,)
    codes: torch.Tensor | None = None  # (B, L, n) hash signatures: bits (ETA) or one bucket per round (SDIM)
    positions: torch.Tensor | None = None  # (B, L) index of each token in the history (0 = oldest)


@dataclass
class CTRCache:
    branches: dict  # name -> BranchKV
    items: torch.Tensor  # (B, L) history item ids (what SIM's category search reads), 0 = padding
    lengths: torch.Tensor  # (B,)


class EventEmbedding(nn.Module):
    """Item id + mean of its genre embeddings (+ rating bucket + gap bucket for history events), all width d."""

    def __init__(self, cfg: CTRConfig):
        super().__init__()
        self.item = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.genre = nn.Linear(max(cfg.n_genres, 1), cfg.d, bias=False)
        self.rating = nn.Embedding(N_RATINGS, cfg.d, padding_idx=0)
        self.gap = nn.Embedding(N_GAPS, cfg.d, padding_idx=0)
        self.register_buffer("genres", torch.zeros(cfg.n_items + 1, max(cfg.n_genres, 1)))  # multi-hot / count
        for e in (self.item, self.rating, self.gap):
            nn.init.normal_(e.weight, std=0.02)
            e.weight.data[0] = 0

    def set_genres(self, multi_hot: torch.Tensor) -> None:
        """(n_items + 1, n_genres) multi-hot. A log without genres (n_genres 0, a user's own CSV) leaves the
        genre part at zero: the embedding is then the item id (+ the event's rating and gap buckets)."""
        g = multi_hot.float()
        if g.shape[1] == 0:
            return
        self.genres.copy_(g / g.sum(1, keepdim=True).clamp(min=1))

    def target(self, items: torch.Tensor) -> torch.Tensor:
        return self.item(items) + self.genre(self.genres[items])  # (B, d)

    def tokens(self, items, ratings, gaps) -> torch.Tensor:
        return self.target(items) + self.rating(ratings) + self.gap(gaps)  # (B, L, d)


class TargetAttention(nn.Module):
    """Multi-head target attention: the candidate queries the history tokens (W_q, W_k, W_v, W_o)."""

    def __init__(self, d: int, d_attn: int, n_heads: int):
        super().__init__()
        if d_attn % n_heads:
            raise ValueError(f"d_attn {d_attn} is not a multiple of n_heads {n_heads}")
        self.h, self.d_attn = n_heads, d_attn
        self.q, self.k, self.v = nn.Linear(d, d_attn), nn.Linear(d, d_attn), nn.Linear(d, d_attn)
        self.o = nn.Linear(d_attn, d)

    def kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k(tokens), self.v(tokens)  # 2 x (B, L, d_attn): what the cache holds

    def scores(self, q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """Per-head logits: q (B, d_attn), K (B, L, d_attn) -> (B, h, L)."""
        B, L, _ = K.shape
        dh = self.d_attn // self.h
        qh = q.view(B, self.h, 1, dh)  # (B, h, 1, d_h)
        kh = K.view(B, L, self.h, dh).transpose(1, 2)  # (B, h, L, d_h)
        return (qh @ kh.transpose(-1, -2)).squeeze(2) / math.sqrt(dh)  # (B, h, L)

    def attend(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """q (B, d_attn), K/V (B, L, d_attn), valid (B, L) -> (B, d); a history with no valid token reads zeros."""
        B, L, _ = V.shape
        s = self.scores(q, K).masked_fill(~valid[:, None, :], float("-inf"))  # (B, h, L)
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        vh = V.view(B, L, self.h, self.d_attn // self.h).transpose(1, 2)  # (B, h, L, d_h)
        out = (w[:, :, None, :] @ vh).squeeze(2).reshape(B, self.d_attn)  # (B, d_attn)
        return self.o(out)  # (B, d)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) rows idx (B, k) -> (B, k, ...)."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def last_window(lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, n) of each history's last n tokens, oldest first, and their validity (B, n)."""
    w = min(n, int(lengths.max())) if len(lengths) else 0
    start = (lengths - w).clamp(min=0)
    idx = start[:, None] + torch.arange(w, device=lengths.device)[None, :]  # (B, w)
    valid = idx < lengths[:, None]
    return idx.clamp(max=max(int(lengths.max()) - 1, 0) if len(lengths) else 0), valid


def top_k_tokens(key: torch.Tensor, valid: torch.Tensor, k: int, recency_ties: bool = True):
    """The k valid tokens of largest `key` (B, L): (indices (B, k'), valid (B, k')), k' = min(k, L). With
    `recency_ties` the key is an integer and equal keys go to the more recent token."""
    L = key.shape[1]
    key = key.to(torch.float64)
    if recency_ties:
        key = key + torch.arange(L, device=key.device, dtype=torch.float64)[None, :] / (2.0 * L)  # < 0.5
    top = key.masked_fill(~valid, float("-inf")).topk(min(k, L), dim=1)
    return top.indices, torch.isfinite(top.values)


class CTRModel(nn.Module):
    """Base class: subclasses implement `long_width`, `long_forward`, `long_prefill` and `long_score`, and declare
    what their long branch caches per token (`long_streams`, `long_token_streams`, `side_fields`, `token_side`,
    `derive_side`)."""

    task = "ctr"
    long_dim = 0
    reads_items = False  # the long branch's search reads the history's item ids (SIM): they are cached too
    config: CTRConfig

    def __init__(self, cfg: CTRConfig):
        super().__init__()
        self.config = cfg
        self.emb = EventEmbedding(cfg)
        self.user = nn.Embedding(cfg.n_users + 1, cfg.d)
        nn.init.normal_(self.user.weight, std=0.02)
        self.short = TargetAttention(cfg.d, cfg.d_attn, cfg.n_heads) if cfg.short_len else None
        width = 2 * cfg.d + (cfg.d if cfg.short_len else 0) + self.long_width()
        layers = []
        for h in cfg.mlp:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        self.head = nn.Sequential(*layers, nn.Linear(width, 1))

    def long_width(self) -> int:
        return 0

    # -- the cache this model declares (ckv_cli.spec) --------------------------------------------------------
    def cache_spec(self) -> CacheSpec:
        """Per history token (one per event of the user, in time order): the short window's K and V (every token:
        a candidate at any time reads the `short_len` events before it), what the long branch caches, and the
        event ids (item, rating bucket, gap bucket) every stream is an exact function of (NOTES §3)."""
        cfg = self.config
        ids = (TokenId("items", bits=bits_for(cfg.n_items + 1), required=self.reads_items),
               TokenId("ratings", bits=bits_for(N_RATINGS)), TokenId("gaps", bits=bits_for(N_GAPS)))
        streams = []
        if self.short is not None:
            streams += [Stream("short.k", cfg.d_attn, "k", EVENT_IDS), Stream("short.v", cfg.d_attn, "v", EVENT_IDS)]
        streams += [Stream(n, d, n[-1], EVENT_IDS) for n, d in self.long_streams().items()]
        return CacheSpec(ids, tuple(streams), self.side_fields())

    def long_streams(self) -> dict[str, int]:
        """The long branch's cached streams and widths."""
        return {}

    def long_token_streams(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def side_fields(self) -> tuple[Side, ...]:
        return ()

    def token_side(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Side fields (hash signatures) from the exact token embeddings (N, d)."""
        return {}

    def derive_side(self, streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Side fields recomputed from decoded streams (what a cache that does not store them reads)."""
        return {}

    def side_values(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Stored side values (N, count) int64 -> the form the model reads."""
        return values

    @torch.no_grad()
    def token_streams(self, ids: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every cached stream (N, d) and side field of tokens given by their event ids, as `prefill` computes
        them (a token's K/V are a function of its event alone)."""
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        tok = self.emb.tokens(t(ids["items"]), t(ids["ratings"]), t(ids["gaps"]))  # (N, d)
        out = {}
        if self.short is not None:
            out["short.k"], out["short.v"] = self.short.kv(tok)
        out.update(self.long_token_streams(tok))
        return out, self.token_side(tok)

    def recompute(self, names: list[str], ids: dict[str, np.ndarray], offsets: np.ndarray):
        """(streams among `names`, side fields) of tokens from their event ids: exact."""
        streams, side = self.token_streams(ids)
        return {n: streams[n] for n in names}, side

    # -- caches from per-token streams (decoded, or exact) ----------------------------------------------------
    def history_cache(self, streams: dict[str, torch.Tensor], side: dict[str, torch.Tensor], items: np.ndarray,
                      start: int, lengths: torch.Tensor) -> CTRCache:
        """The caches of B samples of one user whose histories all start at token `start` of that user's tokens
        (streams (N, d), side (N, n), items (N,)) and hold lengths[b] tokens each: the long branch reads a stride-0
        (B, L, d) view of the user's tokens, the short branch each history's last `short_len` rows."""
        B, L = len(lengths), int(lengths.max())
        window = lambda x: x[start : start + L].unsqueeze(0).expand(B, *x[start : start + L].shape)  # noqa: E731
        valid = torch.arange(L)[None, :] < lengths[:, None]
        it = torch.from_numpy(np.asarray(items[start : start + L], np.int64)).expand(B, L)
        codes = side.get("codes")
        branches = {}
        if "short.k" in streams:
            idx, v = last_window(lengths, self.config.short_len)  # (B, w) positions in the history
            rows = idx + start
            branches["short"] = BranchKV(streams["short.k"][rows], streams["short.v"][rows], v.sum(1), positions=idx)
        if "long.v" in streams:
            branches["long"] = BranchKV(window(streams["long.k"]) if "long.k" in streams else None,
                                        window(streams["long.v"]), lengths,
                                        codes=window(codes) if codes is not None else None)
        return CTRCache(branches, it * valid, lengths)

    def user_caches(self, streams: dict[str, torch.Tensor], side: dict[str, torch.Tensor], items: np.ndarray | None,
                    offsets: np.ndarray) -> CTRCache:
        """A batch of users' caches "now" from their per-token streams at `offsets`: each user's last `max_len`
        tokens right-padded, laid out as `prefill` lays out a history of those events. `items`: the tokens' item
        ids, or None (zeros: only a search that reads items needs them)."""
        from ckv_cli.spec import token_index

        offsets = np.asarray(offsets, np.int64)
        ends = offsets[1:]
        starts = np.maximum(offsets[:-1], ends - self.config.max_len)
        lengths_np = ends - starts
        B, L = len(lengths_np), max(int(lengths_np.max()) if len(lengths_np) else 0, 1)
        tok = torch.from_numpy(token_index(starts, lengths_np))
        lengths = torch.from_numpy(lengths_np)
        slots = (torch.arange(L)[None, :] < lengths[:, None]).view(-1).nonzero().squeeze(1)

        def pad(x: torch.Tensor) -> torch.Tensor:
            x = x[tok]
            return x.new_zeros(B * L, *x.shape[1:]).index_copy_(0, slots, x).view(B, L, *x.shape[1:])

        codes = side.get("codes")
        branches = {}
        if "short.k" in streams:
            idx, v = last_window(lengths, self.config.short_len)
            branches["short"] = BranchKV(gather_tokens(pad(streams["short.k"]), idx),
                                         gather_tokens(pad(streams["short.v"]), idx), v.sum(1), positions=idx)
        if "long.v" in streams:
            branches["long"] = BranchKV(pad(streams["long.k"]) if "long.k" in streams else None, pad(streams["long.v"]),
                                        lengths, codes=pad(codes) if codes is not None else None)
        it = (pad(torch.from_numpy(np.asarray(items, np.int64))) if items is not None
              else torch.zeros(B, L, dtype=torch.long))
        return CTRCache(branches, it, lengths)

    # -- the training path: no cache --------------------------------------------------------------------------
    def forward(self, b: CTRBatch) -> torch.Tensor:
        """Logits (B,) of the batch's targets."""
        target = self.emb.target(b.targets)  # (B, d)
        parts = [self.user(b.users), target]
        if self.short is None and not self.long_width():  # the no-history baseline
            return self.head(torch.cat(parts, dim=-1)).squeeze(-1)
        tokens = self.emb.tokens(b.items, b.ratings, b.gaps)  # (B, L, d)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < b.lengths[:, None]
        if self.short is not None:
            idx, v = last_window(b.lengths, self.config.short_len)
            K, V = self.short.kv(gather_tokens(tokens, idx))  # (B, w, d_attn)
            parts.append(self.short.attend(self.short.q(target), K, V, v))
        if self.long_width():
            parts.append(self.long_forward(b.targets, target, tokens, valid, b))
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)

    # -- the serving path: prefill once per user, score candidates from the cache -----------------------------
    @torch.no_grad()
    def prefill(self, b: CTRBatch) -> CTRCache:
        tokens = self.emb.tokens(b.items, b.ratings, b.gaps)  # (B, L, d)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < b.lengths[:, None]
        branches = {}
        if self.short is not None:
            idx, v = last_window(b.lengths, self.config.short_len)
            K, V = self.short.kv(gather_tokens(tokens, idx))
            branches["short"] = BranchKV(K, V, v.sum(1), positions=idx)
        if self.long_width():
            branches["long"] = self.long_prefill(tokens, valid, b)
        return CTRCache(branches, b.items * valid, b.lengths)

    @torch.no_grad()
    def score(self, cache: CTRCache, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of one candidate per cached user."""
        target = self.emb.target(targets)
        parts = [self.user(users), target]
        if self.short is not None:
            s = cache.branches["short"]
            valid = torch.arange(s.values.shape[1], device=targets.device)[None, :] < s.lengths[:, None]
            parts.append(self.short.attend(self.short.q(target), s.keys, s.values, valid))
        if self.long_width():
            parts.append(self.long_score(targets, target, cache))
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)

    def long_forward(self, targets, target, tokens, valid, b):  # -> (B, long_width)
        raise NotImplementedError

    def long_prefill(self, tokens, valid, b) -> BranchKV:
        raise NotImplementedError

    def long_score(self, targets, target, cache: CTRCache) -> torch.Tensor:
        raise NotImplementedError


class AttentionLongBranch(CTRModel):
    """A long branch that picks the top-k history tokens per candidate (`select`) and reads them with its own
    target attention (SIM, ETA, TWIN). The cache holds K/V of every history token, and the hash codes if any."""

    needs_keys = False  # select() reads the long branch's keys (TWIN)

    def __init__(self, cfg: CTRConfig):
        super().__init__(cfg)
        self.long = TargetAttention(cfg.d, cfg.d_attn, cfg.n_heads)

    def long_width(self) -> int:
        return self.config.d

    def long_streams(self) -> dict[str, int]:
        return {"long.k": self.config.d_attn, "long.v": self.config.d_attn}

    def long_token_streams(self, tokens):
        k, v = self.long.kv(tokens)  # (N, d_attn) each: any token may be selected by some candidate
        return {"long.k": k, "long.v": v}

    def token_side(self, tokens):
        codes = self.codes(tokens)
        return {} if codes is None else {"codes": codes}

    def select(self, targets, target, items, valid, keys, codes) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) candidate ids, (B, d) their embeddings, (B, L) history items and validity, the branch's keys
        (B, L, d_attn) and codes (B, L, n_bits) -> (indices (B, k), valid (B, k)) of the tokens to read."""
        raise NotImplementedError

    def codes(self, tokens):  # per-token hash signatures the branch caches (ETA); None if it has none
        return None

    def long_forward(self, targets, target, tokens, valid, b):
        with torch.no_grad():
            keys = self.long.k(tokens) if self.needs_keys else None  # (B, L, d_attn), no gradient through the search
        idx, v = self.select(targets, target, b.items, valid, keys, self.codes(tokens))  # (B, k)
        K, V = self.long.kv(gather_tokens(tokens, idx))  # only the selected tokens are projected: (B, k, d_attn)
        return self.long.attend(self.long.q(target), K, V, v)

    def long_prefill(self, tokens, valid, b) -> BranchKV:
        K, V = self.long.kv(tokens)  # (B, L, d_attn): any token may be selected by some candidate
        return BranchKV(K, V, b.lengths, codes=self.codes(tokens))

    def long_score(self, targets, target, cache):
        br = cache.branches["long"]
        valid = torch.arange(cache.items.shape[1], device=targets.device)[None, :] < cache.lengths[:, None]
        idx, v = self.select(targets, target, cache.items, valid, br.keys, br.codes)
        return self.long.attend(self.long.q(target), gather_tokens(br.keys, idx), gather_tokens(br.values, idx), v)
