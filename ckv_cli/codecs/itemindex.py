"""Item-conditioned index coding (issue 21): a pool index costs ceil(log2 m) bits per token, but once the token's
item is known (every next-item artifact stores it) it carries far less: the tokens of one item use a few pool
entries. `ItemIndex` keeps, per item, a short list of global pool entries (those the item's calibration tokens
use most, most used first) and stores each token as its position in its item's list at a fixed width `w`, with
an escape for the rest:

- `pos` (per token, `w` bits): 0 = escape, k >= 1 = entry k - 1 of the token's item's list (at most 2^w - 1);
- `esc` (ragged: one row per escaped token, in token order, at the pool's full width): the escaped tokens' pool
  indices; `esc_n` (per user, uint16): how many of the user's tokens escaped. The i-th escape code of a user is
  its i-th escape row, so a token's pool index is found without decoding the others (per-token random access:
  list lookup, or rank among the user's escape codes).

Items without a list (not seen in calibration) always escape. The width `w` is fixed per stream, so a token's
code sits at a known bit offset. `bits="auto"` picks it on the calibration tokens, held out: lists fitted on the
first half of the calibration tokens (they come user by user, so the halves are two sets of users), the escape
rate measured on the second half, `w` minimising `w + escape_rate(w) x full_bits`; the lists themselves are then
fitted on every calibration token. With `tol` > 0 and an error function (`error(tokens, entries)` -> squared
error of those tokens' vectors against those pool entries), a token whose best entry is not in its item's list
takes the best listed entry instead when that entry's squared error is at most (1 + tol) x the best one's: fewer
escapes for a little more error (tol 0: exactly the pool's own choice, no added error).

How the lists are fitted (`lists`): `count` ranks each item's entries by how many of its calibration tokens chose
them; `cover` (with `tol` > 0) ranks them greedily by coverage, an entry covering a token when its squared error is
within (1 + tol) of the token's own entry's (what `encode` accepts instead of an escape): each next entry is the one
covering most of the item's tokens not covered yet (ties: more own tokens, then the smaller entry), and entries that
cover nothing new follow by use. Candidates are the entries the item's tokens chose. With `fill` k > 0, the
entries among each calibration token's k nearest that its item's tokens did not choose follow (most often among
them first, ties: the smaller entry): a list shorter than the width allows takes them into slots that cost
nothing (a held-out token of the item may choose them). Decoding does not depend on how the lists were fitted.

Shared tensors: `list_offsets` (items + 2,) int32 (item i's list is entries [offsets[i], offsets[i + 1]); the last
row is the fallback for ids past the table) and `list_entries` (the entries bit-packed at the pool's width,
uint8). Both are counted in shared bytes. `IndexCoding` is the mixin a pool codec with one `idx` per token uses
to take `index="item"` as a parameter (`collective`, `predictive`): a few lines in the codec.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ckv_cli.codecs.base import Field, user_index
from ckv_cli.codecs.bits import bits_for, pack, unpack
from ckv_cli.errors import CkvError

AUTO = "auto"
INDEXES = ("flat", "item", "auto")
LISTS = ("count", "cover")
COUNT_DTYPE = "uint16"  # escapes per user: a user caches at most 65,535 tokens here (max_len is 200)
PAIR_CHUNK = 1 << 16  # (token, entry) pairs per call of the error function: memory stays bounded
ErrorFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (tokens (P,), entries (P,)) -> squared errors (P,)


def _ranked_lists(idx: np.ndarray, items: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (item, entry) pair used by the tokens: (item, entry, rank within the item's list), items ascending,
    each item's entries by decreasing use (ties: the smaller entry first)."""
    key = np.asarray(items, np.int64) * m + np.asarray(idx, np.int64)
    uniq, counts = np.unique(key, return_counts=True)
    item, entry = uniq // m, uniq % m
    order = np.lexsort((entry, -counts, item))
    item, entry = item[order], entry[order]
    rank = np.arange(len(item)) - np.searchsorted(item, item, "left")
    return item, entry, rank


def pair_errors(tokens: np.ndarray, entries: np.ndarray, error: ErrorFn) -> np.ndarray:
    """(P,) float64 squared errors of token/entry pairs, PAIR_CHUNK pairs per call of `error`."""
    out = np.empty(len(tokens), np.float64)
    for a in range(0, len(tokens), PAIR_CHUNK):
        out[a : a + PAIR_CHUNK] = error(tokens[a : a + PAIR_CHUNK], entries[a : a + PAIR_CHUNK]).detach().double().numpy()
    return out


def _covering_lists(idx: np.ndarray, items: np.ndarray, m: int, tol: float,
                    error: ErrorFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As `_ranked_lists`, each item's entries ranked greedily by coverage (module docstring): token t of item i is
    covered by entry e when error(t, e) <= (1 + tol) x error(t, idx[t]). Tokens are positions 0..N-1 of `idx`."""
    item, entry, rank = _ranked_lists(idx, items, m)  # the candidates, by use: the tie-break
    tok = np.argsort(np.asarray(items, np.int64), kind="stable")  # tokens grouped by item
    tok_items = np.asarray(items, np.int64)[tok]
    bounds = np.searchsorted(item, np.unique(item), "left").tolist() + [len(item)]
    out = entry.copy()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < 2:
            continue
        lo, hi = np.searchsorted(tok_items, item[a], "left"), np.searchsorted(tok_items, item[a], "right")
        out[a:b] = entry[a:b][_greedy_cover(tok[lo:hi], entry[a:b], idx, tol, error)]
    return item, out, rank


def _greedy_cover(tokens: np.ndarray, cands: np.ndarray, idx: np.ndarray, tol: float, error: ErrorFn) -> np.ndarray:
    """The order of `cands` (c,) (given by use) by greedy coverage of `tokens` (n,): positions into `cands`."""
    n, c = len(tokens), len(cands)
    own = pair_errors(tokens, np.asarray(idx, np.int64)[tokens], error)  # (n,)
    err = pair_errors(np.repeat(tokens, c), np.tile(cands, n), error).reshape(n, c)  # (n, c)
    covers = err <= (1.0 + tol) * own[:, None]  # (n, c)
    gains = covers.sum(0).astype(np.int64)  # (c,) tokens each candidate covers that are not covered yet
    covered, taken = np.zeros(n, bool), []
    while True:
        j = int(np.argmax(gains))  # the first of the largest: by use among equal gains
        if gains[j] <= 0:
            break
        taken.append(j)
        new = covers[:, j] & ~covered
        covered |= new
        gains -= covers[new].sum(0)
        gains[taken] = -1
    rest = np.setdiff1d(np.arange(c), taken)  # ascending: by use
    return np.concatenate([np.asarray(taken, np.int64), rest])


def _with_neighbours(item: np.ndarray, entry: np.ndarray, rank: np.ndarray, items: np.ndarray, near: np.ndarray,
                     m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item, entry, rank) lists followed, per item, by the entries in its tokens' `near` (N, k) rows that are not in
    them yet, most often first (ties: the smaller entry)."""
    near = np.asarray(near, np.int64)
    pair_item = np.repeat(np.asarray(items, np.int64), near.shape[1])  # (N k,)
    key = pair_item * m + near.reshape(-1)
    uniq, counts = np.unique(key, return_counts=True)
    fresh = ~np.isin(uniq, item * m + entry)
    x_item, x_entry, counts = uniq[fresh] // m, uniq[fresh] % m, counts[fresh]
    order = np.lexsort((x_entry, -counts, x_item))
    x_item, x_entry = x_item[order], x_entry[order]
    listed = np.bincount(item, minlength=int(x_item.max(initial=-1)) + 1)  # (items,) entries each item lists
    x_rank = listed[x_item] + np.arange(len(x_item)) - np.searchsorted(x_item, x_item, "left")  # after its list
    all_item, all_entry, all_rank = (np.concatenate(a) for a in ((item, x_item), (entry, x_entry), (rank, x_rank)))
    order = np.lexsort((all_rank, all_item))
    return all_item[order], all_entry[order], all_rank[order]


class ItemIndex:
    """Pool indices coded given the token's item (module docstring). `pool_size` m; `bits` the list width w (an
    int in 1..ceil(log2 m) - 1, or "auto"); `tol` the escape tolerance (>= 0); `lists` how the lists are fitted
    ("count" or "cover", which needs `tol` > 0); `fill` how many nearest entries of each calibration token may
    fill its item's spare list slots (0: none)."""

    def __init__(self, pool_size: int, bits=AUTO, tol: float = 0.0, lists: str = "count", fill: int = 0):
        self.pool_size = int(pool_size)
        self.full_bits = bits_for(self.pool_size)
        if bits != AUTO and (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
                             or not 1 <= bits < self.full_bits):
            raise CkvError(f"index_bits must be 'auto' or an integer in 1..{self.full_bits - 1} (a pool of "
                           f"{self.pool_size} entries takes {self.full_bits} bits), got {bits!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol == float("inf"):
            raise CkvError(f"escape_tol must be a finite number >= 0, got {tol!r}")
        if lists not in LISTS:
            raise CkvError(f"index_lists must be one of {', '.join(LISTS)}, got {lists!r}")
        if lists == "cover" and not tol:
            raise CkvError("index_lists=cover needs escape_tol > 0 (with no tolerance a token is covered by its own "
                           "entry alone: the lists by use, index_lists=count)")
        if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or not 0 <= fill <= self.pool_size:
            raise CkvError(f"index_fill must be an integer in 0..{self.pool_size} (nearest entries per calibration "
                           f"token), got {fill!r}")
        self.bits = bits if bits == AUTO else int(bits)
        self.tol = float(tol)
        self.lists, self.fill = lists, int(fill)
        self.offsets = self.entries = None  # (R + 1,) int64, (E,) int64
        self._keys = self._codes = None  # sorted item * m + entry -> code (position + 1), for encoding
        self.selection: dict = {}  # how `auto` chose the width (calibration), for reports

    # -- what it is
    def params(self) -> dict:
        return {"index": "item", "index_bits": self.bits, "escape_tol": self.tol,
                **({"index_lists": self.lists} if self.lists != "count" else {}),  # absent before the options
                **({"index_fill": self.fill} if self.fill else {})}

    @property
    def escape(self) -> int:
        return 0

    @property
    def capacity(self) -> int:
        """Entries a list can hold at width w (one code is the escape)."""
        return (1 << self.bits) - 1

    def fields(self) -> list[Field]:
        if self.bits == AUTO:
            raise CkvError("internal: the item index's width is chosen by fit (index_bits=auto)")
        return [Field("pos", "token", bits=self.bits), Field("esc", "ragged", bits=self.full_bits, counts="esc_n"),
                Field("esc_n", "user", dtype=COUNT_DTYPE, width=1)]

    # -- fitting
    def fit(self, idx: np.ndarray, items: np.ndarray, error: ErrorFn | None = None,
            near: np.ndarray | None = None) -> None:
        """Lists from calibration tokens' pool indices (N,) and items (N,) (and with `fill`, their nearest entries
        `near` (N, >= fill)); `auto` picks the width first."""
        idx, items = np.asarray(idx, np.int64), np.asarray(items, np.int64)
        if self.fill and (near is None or len(near) != len(idx)):
            raise CkvError("internal: index_fill needs each calibration token's nearest entries")
        if self.bits == AUTO:
            self.bits = self._choose_width(idx, items, error, near)
        self._set_lists(*self._ranking(idx, items, error, near), n_rows=int(items.max()) + 1 if len(items) else 1)

    def _ranking(self, idx: np.ndarray, items: np.ndarray, error: ErrorFn | None, near: np.ndarray | None = None):
        """(item, entry, rank) of the lists fitted on these tokens (positions 0..N-1 for `error`)."""
        if self.lists == "cover" and error is not None:
            ranked = _covering_lists(idx, items, self.pool_size, self.tol, error)
        else:
            ranked = _ranked_lists(idx, items, self.pool_size)
        if self.fill:
            ranked = _with_neighbours(*ranked, items, np.asarray(near, np.int64)[:, : self.fill], self.pool_size)
        return ranked

    def _choose_width(self, idx: np.ndarray, items: np.ndarray, error: ErrorFn | None,
                      near: np.ndarray | None = None) -> int:
        """The width minimising expected bits per token (w + escape rate x full bits) with lists fitted on the
        first half of the calibration tokens and escapes counted on the second half."""
        half = len(idx) // 2
        if half < 1:
            self.selection = {"rule": "too few calibration tokens: the narrowest width"}
            return 1
        item, entry, rank = self._ranking(idx[:half], items[:half], error, None if near is None else near[:half])
        rows = np.arange(half, len(idx))
        own_rank = self._rank_of(item, entry, rank, items[half:], idx[half:])  # (H,) the own entry's rank in the list
        out = []
        for w in range(1, self.full_bits):
            cap = (1 << w) - 1
            esc = own_rank >= cap
            if self.tol and error is not None and esc.any():
                esc = esc.copy()
                esc[esc] = ~self._within_tol(rows[esc], items[half:][esc], idx[half:][esc], item, entry, rank, cap, error)
            rate = float(esc.mean())
            out.append({"bits": w, "escape_rate": rate, "bits_per_token": w + rate * self.full_bits})
        best = min(out, key=lambda r: (r["bits_per_token"], r["bits"]))
        self.selection = {"rule": "lists on the first half of the calibration tokens, escapes on the second half",
                          "tokens": [half, len(idx) - half], "widths": out, "chosen": best["bits"]}
        return best["bits"]

    def _set_lists(self, item: np.ndarray, entry: np.ndarray, rank: np.ndarray, n_rows: int) -> None:
        keep = rank < self.capacity
        item, entry = item[keep], entry[keep]
        counts = np.bincount(item, minlength=n_rows)
        self.offsets = np.concatenate([[0], np.cumsum(counts), [len(entry)]]).astype(np.int64)  # + fallback row
        self.entries = entry.astype(np.int64)
        self._index()

    def _index(self) -> None:
        """The encoder's lookup: item * m + entry -> code, sorted."""
        lengths = np.diff(self.offsets)
        item = np.repeat(np.arange(len(lengths)), lengths)
        code = np.arange(len(self.entries)) - np.repeat(self.offsets[:-1], lengths) + 1
        keys = item * self.pool_size + self.entries
        order = np.argsort(keys, kind="stable")
        self._keys, self._codes = keys[order], code[order]

    def _rank_of(self, item: np.ndarray, entry: np.ndarray, rank: np.ndarray, items: np.ndarray,
                 idx: np.ndarray) -> np.ndarray:
        """Rank of each token's own entry in its item's list of (item, entry, rank) (2^62 where not listed)."""
        keys = item * self.pool_size + entry
        order = np.argsort(keys, kind="stable")
        keys, ranks = keys[order], rank[order]
        want = np.asarray(items, np.int64) * self.pool_size + np.asarray(idx, np.int64)
        if not len(keys):
            return np.full(len(want), 1 << 62, np.int64)
        at = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
        return np.where(keys[at] == want, ranks[at], 1 << 62)

    # -- coding
    def _lookup(self, items: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Code of each token's own entry in its item's list (0 where the entry is not listed)."""
        if self._keys is None or not len(self._keys):
            return np.zeros(len(idx), np.int64)
        want = np.asarray(items, np.int64) * self.pool_size + np.asarray(idx, np.int64)
        at = np.clip(np.searchsorted(self._keys, want), 0, len(self._keys) - 1)
        return np.where(self._keys[at] == want, self._codes[at], 0)

    def _rows(self, items: np.ndarray) -> np.ndarray:
        """Each item's row in the list table (items past it use the fallback row, which is empty)."""
        return np.minimum(np.asarray(items, np.int64), len(self.offsets) - 2)

    def _within_tol(self, tokens, items, idx, item, entry, rank, cap, error: ErrorFn) -> np.ndarray:
        """For tokens whose own entry is not listed: does the best entry of their item's list (of the given lists,
        truncated to `cap`) come within (1 + tol) of their own entry's squared error? (T,) bool."""
        starts = np.searchsorted(item, items, "left")
        ends = np.searchsorted(item, items, "right")
        lengths = np.minimum(ends - starts, cap)
        ok = np.zeros(len(tokens), bool)
        if not lengths.any():
            return ok
        best_listed = self._best_listed(tokens, starts, lengths, entry, error)
        own = pair_errors(tokens, idx, error)
        has = lengths > 0
        ok[has] = best_listed[has][:, 0] <= (1.0 + self.tol) * own[has]
        return ok

    def _best_listed(self, tokens, starts, lengths, entries: np.ndarray, error: ErrorFn) -> np.ndarray:
        """(T, 2): the smallest squared error over each token's list entries [starts, starts + lengths) of
        `entries`, and the position of that entry (+inf / -1 for an empty list). Lists are walked a chunk of
        (token, entry) pairs at a time."""
        out = np.full((len(tokens), 2), [np.inf, -1.0])
        pair_tok = np.repeat(np.arange(len(tokens)), lengths)  # (P,) which token
        pair_pos = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (P,) position
        for a in range(0, len(pair_tok), PAIR_CHUNK):
            t, p = pair_tok[a : a + PAIR_CHUNK], pair_pos[a : a + PAIR_CHUNK]
            e = error(tokens[t], entries[starts[t] + p]).detach().double().numpy()
            # the smallest error per token in this chunk (ties: the earlier position), merged into `out`
            order = np.lexsort((p, e, t))
            t, p, e = t[order], p[order], e[order]
            first = np.r_[True, t[1:] != t[:-1]]
            t, p, e = t[first], p[first], e[first]
            better = e < out[t, 0]
            out[t[better], 0], out[t[better], 1] = e[better], p[better]
        return out

    def encode(self, idx: np.ndarray, items: np.ndarray, user_offsets: np.ndarray,
               error: ErrorFn | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Pool indices (N,) of a batch of users' tokens -> (fields, the pool indices the fields decode to): the
        same as `idx` except where the tolerance took a listed entry instead of escaping."""
        if self.offsets is None:
            raise CkvError("item index used before fit or load")
        idx = np.asarray(idx, np.int64).copy()
        items = np.asarray(items, np.int64)
        code = self._lookup(items, idx)
        if self.tol and error is not None:
            tokens = np.flatnonzero(code == 0)
            rows = self._rows(items[tokens])
            starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]
            has = lengths > 0
            tokens, starts, lengths = tokens[has], starts[has], lengths[has]
            if len(tokens):
                best = self._best_listed(tokens, starts, lengths, self.entries, error)
                take = best[:, 0] <= (1.0 + self.tol) * pair_errors(tokens, idx[tokens], error)
                pos = best[take, 1].astype(np.int64)
                code[tokens[take]] = pos + 1
                idx[tokens[take]] = self.entries[starts[take] + pos]
        esc = code == 0
        owner = user_index(np.asarray(user_offsets) - user_offsets[0])
        n_users = len(user_offsets) - 1
        counts = np.bincount(owner[esc], minlength=n_users)
        if len(counts) and int(counts.max()) > np.iinfo(COUNT_DTYPE).max:
            raise CkvError(f"a user has {int(counts.max()):,} escaped tokens; the item index holds at most "
                           f"{np.iinfo(COUNT_DTYPE).max:,} per user")
        fields = {"pos": code.astype(np.uint32), "esc": idx[esc].astype(np.uint32),
                  "esc_n": counts.astype(COUNT_DTYPE).reshape(n_users, 1)}
        return fields, idx

    def check(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> str | None:
        """What is inconsistent in a batch's fields (escape rows vs escape codes per user, ranges), or None."""
        code = np.asarray(fields["pos"], np.int64)
        esc = np.asarray(fields["esc"], np.int64)
        counts = np.asarray(fields["esc_n"], np.int64).reshape(-1)
        if len(counts) != len(user_offsets) - 1:
            return f"{len(counts)} escape counts for {len(user_offsets) - 1} users"
        if int(counts.sum()) != len(esc):
            return f"escape counts sum to {int(counts.sum()):,}, {len(esc):,} escape rows were read"
        owner = user_index(np.asarray(user_offsets) - user_offsets[0])
        codes = np.bincount(owner[code == self.escape], minlength=len(counts))
        bad = np.flatnonzero(codes != counts)
        if len(bad):
            u = int(bad[0])
            return f"a user has {int(codes[u])} escape codes and {int(counts[u])} escape rows"
        if len(esc) and int(esc.max()) >= self.pool_size:
            return f"escaped pool index {int(esc.max())} out of range (pool {self.pool_size})"
        return None

    def decode(self, fields: dict[str, np.ndarray], items: np.ndarray, user_offsets: np.ndarray) -> np.ndarray:
        """Pool index (N,) int64 of each token from its code, its item's list and the escape rows."""
        if self.offsets is None:
            raise CkvError("item index used before fit or load")
        why = self.check(fields, user_offsets)
        if why:
            raise CkvError(f"inconsistent item index ({why})")
        code = np.asarray(fields["pos"], np.int64)
        rows = self._rows(items)
        lengths = np.diff(self.offsets)[rows]
        listed = code != self.escape
        if (code[listed] > lengths[listed]).any():
            raise CkvError("inconsistent item index (a code points past its item's list)")
        out = np.empty(len(code), np.int64)
        out[listed] = self.entries[self.offsets[rows[listed]] + code[listed] - 1]
        out[~listed] = np.asarray(fields["esc"], np.int64)  # escape rows are in token order
        return out

    # -- shared tensors
    def shared(self) -> dict[str, torch.Tensor]:
        return {"list_offsets": torch.from_numpy(self.offsets.astype(np.int32)),
                "list_entries": torch.from_numpy(pack(self.entries, self.full_bits))}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        if self.bits == AUTO:
            raise CkvError("the item index's width is missing (index_bits=auto in an artifact)")
        off = shared["list_offsets"].numpy().astype(np.int64)
        packed = shared["list_entries"].numpy()
        if off.ndim != 1 or len(off) < 2 or off[0] != 0 or (np.diff(off) < 0).any():
            raise CkvError("the item index's list offsets are not increasing from 0")
        if (np.diff(off)[:-1] > self.capacity).any() or off[-1] != off[-2]:
            raise CkvError(f"an item's list is longer than {self.capacity} entries (index_bits {self.bits})")
        n = int(off[-1])
        if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) != (n * self.full_bits + 7) // 8:
            raise CkvError(f"the item index's entries are not {n:,} values packed at {self.full_bits} bits")
        entries = unpack(packed, self.full_bits, n) if n else np.zeros(0, np.int64)
        if n and int(entries.max()) >= self.pool_size:
            raise CkvError(f"the item index lists entry {int(entries.max())}, the pool has {self.pool_size}")
        self.offsets, self.entries = off, entries
        self._index()


def squared_error(vectors: torch.Tensor, pool: torch.Tensor) -> ErrorFn:
    """The error function of vectors (N, d) against pool entries (m, d): for the escape tolerance."""
    def error(tokens: np.ndarray, entries: np.ndarray) -> torch.Tensor:
        t, e = torch.from_numpy(np.asarray(tokens, np.int64)), torch.from_numpy(np.asarray(entries, np.int64))
        return ((vectors[t] - pool[e]) ** 2).sum(1)
    return error


class IndexCoding:
    """Mixin: a pool codec that emits one pool index per token (`idx`) takes `index="flat"|"item"`, `index_bits`
    and `escape_tol` through `_init_index`, and routes its fields, fit, encode, decode and shared tensors through
    the `index_*` methods below. `flat` stores `idx` at ceil(log2 m) bits as before (and its params are those of
    artifacts written before the option existed); `item` codes it given the token's item (`ItemIndex`), which
    makes the codec read item ids (`needs_items`); `auto` is `item` with the width chosen by fit, or `flat` where
    no width beats the full index on the held-out half of the calibration tokens (a pool on residuals whose
    entries the item does not predict). The choice is in the artifact's plan (the params after fit)."""

    index: ItemIndex | None = None
    index_auto = False
    index_selection: dict | None = None  # index=auto that chose flat: the width table it compared

    def _init_index(self, pool_size: int, index: str, index_bits, escape_tol, index_lists: str = "count",
                    index_fill: int = 0) -> None:
        if index not in INDEXES:
            raise CkvError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
        if index == "flat" and (index_bits != AUTO or escape_tol or index_lists != "count" or index_fill):
            raise CkvError("index_bits, escape_tol, index_lists and index_fill go with index=item")
        if index == "auto" and index_bits != AUTO:
            raise CkvError("index=auto chooses the width too: leave index_bits out (or use index=item)")
        self.index_auto = index == "auto"  # item-coded where that is cheaper on held-out calibration, else flat
        self.index = ItemIndex(pool_size, index_bits, escape_tol, index_lists, index_fill) if index != "flat" else None
        self.needs_items = self.index is not None or type(self).needs_items

    def set_index(self, index: str = "item", index_bits=AUTO, escape_tol: float = 0.0,
                  index_lists: str = "count", index_fill: int = 0) -> None:
        """Another index coding over the same fitted pool (then `fit_index` on calibration tokens): how a sweep
        of index parameters reuses one pool."""
        self._init_index(self.pool_size, index, index_bits, escape_tol, index_lists, index_fill)

    def fit_index(self, x: torch.Tensor, items: np.ndarray, user_offsets: np.ndarray | None = None,
                  context: torch.Tensor | None = None) -> None:
        """Fit the index coding alone on calibration vectors (N, d) and their items, over the fitted pool: the
        codec's `index_inputs` gives each vector's pool entry and the error function of the tolerance. `context`:
        what the codec's `fit` got as `context=` (the predictive codec's first-layer K/V), None for the others."""
        if self.index is not None:
            idx, error, near = self.index_inputs(x, items, user_offsets, context, self.index.fill)
            self.index_fit(idx, items, error, near)

    def index_inputs(self, x: torch.Tensor, items: np.ndarray, user_offsets: np.ndarray | None,
                     context: torch.Tensor | None = None, neighbours: int = 0):
        """(pool index (N,) of each vector, error function over (tokens, entries), and with `neighbours` k > 0 the k
        nearest entries of each vector (N, k), else None): what the codec routes."""
        raise NotImplementedError

    def index_params(self) -> dict:
        if self.index is not None and self.index_auto and self.index.bits == AUTO:
            fitted = self.index.params()  # not fitted yet: the width is still to choose
            return {"index": "auto", **{k: v for k, v in fitted.items() if k not in ("index", "index_bits")}}
        return self.index.params() if self.index is not None else {}

    def index_fields(self) -> list[Field]:
        return self.index.fields() if self.index is not None else [Field("idx", "token", bits=self.bits)]

    def index_fit(self, idx, items, error: ErrorFn | None = None, near=None) -> None:
        if self.index is None:
            return
        self.index.fit(np.asarray(idx), items, error, None if near is None else np.asarray(near))
        if self.index_auto:  # flat where the lists do not pay on the held-out half (positions + escapes >= full)
            best = min((r["bits_per_token"] for r in self.index.selection.get("widths", [])), default=float("inf"))
            if best >= self.index.full_bits:
                self.index_selection = dict(self.index.selection, chosen="flat")
                self.index = None
                self.needs_items = type(self).needs_items

    def index_encode(self, idx, items, user_offsets, error: ErrorFn | None = None) -> tuple[dict, np.ndarray]:
        """(fields, pool indices they decode to) of pool indices (N,) (a tensor or an array)."""
        idx = idx.numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        if self.index is None:
            return {"idx": idx.astype(np.uint32)}, idx.astype(np.int64)
        return self.index.encode(idx, items, user_offsets, error)

    def index_decode(self, fields, items, user_offsets) -> np.ndarray:
        """Pool index (N,) int64 of each token from the stored fields."""
        if self.index is None:
            return np.asarray(fields["idx"], dtype=np.int64)
        if items is None:
            raise CkvError("internal: item-coded indices need the tokens' item ids")
        return self.index.decode(fields, np.asarray(items, np.int64), user_offsets)

    def indices(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray,
                items: np.ndarray | None = None) -> np.ndarray:
        """Pool index (N,) of each stored token (item-coded ones decoded through their item's list)."""
        return self.index_decode(fields, items, user_offsets)

    def index_check(self, fields, user_offsets) -> str | None:
        """What is wrong with a batch's stored index fields (ranges, escape counts), or None."""
        if self.index is None:
            idx = np.asarray(fields["idx"])
            if len(idx) and int(idx.max()) >= self.pool_size:
                return f"pool index {int(idx.max())} out of range (pool {self.pool_size})"
            return None
        return self.index.check(fields, user_offsets)

    def index_shared(self) -> dict[str, torch.Tensor]:
        return self.index.shared() if self.index is not None else {}

    def index_load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        if self.index is not None:
            self.index.load_shared(shared)
