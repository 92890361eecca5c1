"""Token eviction: keep a fraction of each user's cached tokens at fp16 and drop the rest (issue 6).

The LLM-serving baseline that shortens the cache instead of narrowing its vectors. Two selection rules:

- `recent`: the most recent tokens, the sliding window of StreamingLLM (Xiao et al. 2023, "Efficient Streaming
  Language Models with Attention Sinks") without its sink tokens;
- `keynorm`: the tokens with the LOWEST key L2 norm, the rule of Devoto et al. 2024 ("A Simple and Effective L2
  Norm-Based Strategy for KV Cache Compression": a low key norm predicts high attention). `keynorm_high` keeps
  the highest instead, the opposite rule, for comparison.

Each user keeps ceil(keep x n) of its n tokens (at least one when n > 0). Dropped tokens are masked out of
attention, not compacted (`KVCache.keep`): kept tokens keep their positions and time gaps, and the decoded
K/V of a dropped token is zeros. The decision is one per token, shared by every layer and by K and V: the plan
makes it once (`CachePlan.keep_mask`, from the keys of the first layer whose K or V this codec stores, Devoto's
per-head norms taken over the whole key vector) and hands it to every stream, item-recomputed layers included.

Bytes (NOTES §4): per stream, the kept tokens' vectors at fp16 (a `kept` field: one row per kept token); per
token of the plan, a 1-bit keep flag for the key-norm rules (`recent` is known from the per-user counts, which
the offsets already hold); item ids, timestamps and offsets as for every codec. Dropped tokens cost nothing.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int, user_index
from ckv_cli.errors import CkvError
from ckv_cli.spec import token_positions

POLICIES = ("recent", "keynorm", "keynorm_high")


def kept_counts(lengths: np.ndarray, keep: float) -> np.ndarray:
    """Tokens kept per user: ceil(keep x n), a hair of tolerance so 0.7 x 10 keeps 7, not 8."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.minimum(lengths, np.ceil(keep * lengths - 1e-9).astype(np.int64))


class EvictCodec(StreamCodec):
    """Keeps the `keep` fraction of each user's tokens chosen by `policy` (recent, keynorm: lowest key norm,
    keynorm_high: highest) at fp16; the rest are dropped and masked. Reads the plan's keep mask (`needs_keep`)."""

    name = "evict"
    needs_keep = True

    def __init__(self, d: int, keep: float = 0.5, policy: str = "recent"):
        self.d = check_positive_int("d", d)
        if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)) \
                or not math.isfinite(keep) or not 0 < keep <= 1:
            raise CkvError(f"evict keep must be a fraction in (0, 1], got {keep!r}")
        if policy not in POLICIES:
            raise CkvError(f"evict policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.keep, self.policy = float(keep), policy

    def params(self) -> dict:
        return {"d": self.d, "keep": self.keep, "policy": self.policy}

    @property
    def stores_flags(self) -> bool:
        """Whether the keep mask must be stored (1 bit per token): not for `recent`, known from the counts."""
        return self.policy != "recent"

    def fit(self, x, seed):
        pass

    def fields(self):
        return [Field("x", "kept", dtype="float16", width=self.d)]

    def bytes_per_token(self) -> float:
        """Nominal: keep x d x 2 (the per-user ceil makes the measured bytes slightly higher)."""
        return self.keep * self.d * 2

    def select(self, keys: torch.Tensor | None, offsets: np.ndarray) -> np.ndarray:
        """The keep mask (N,) bool of a batch of users' tokens. `keys` (N, d_k) are read by the key-norm rules
        only; ties go to the more recent token."""
        lengths = np.diff(offsets)
        owner = user_index(offsets)
        pos = token_positions(offsets)  # position in its user
        k = kept_counts(lengths, self.keep)[owner]
        if self.policy == "recent":
            return pos >= lengths[owner] - k
        if keys is None:
            raise CkvError("internal: the key-norm eviction rules need the keys")
        norm = keys.detach().float().norm(dim=1).numpy().astype(np.float64)
        score = norm if self.policy == "keynorm" else -norm  # ascending: the first k of each user are kept
        order = np.lexsort((-pos, score, owner))  # by user, then score, then the more recent first
        rank = np.empty_like(pos)
        rank[order] = np.arange(len(order)) - offsets[owner[order]]
        return rank < k

    def encode(self, x, user_offsets, keep: np.ndarray | None = None):
        if keep is None:
            raise CkvError("internal: an evict stream needs the plan's keep mask")
        return {"x": x.detach()[torch.from_numpy(np.asarray(keep, dtype=bool))].to(torch.float16).numpy()}

    def decode(self, fields, user_offsets, keep: np.ndarray | None = None):
        if keep is None:
            raise CkvError("internal: an evict stream needs the plan's keep mask")
        keep = torch.from_numpy(np.asarray(keep, dtype=bool))
        out = torch.zeros(len(keep), self.d)
        out[keep] = torch.from_numpy(np.asarray(fields["x"], dtype=np.float32))
        return out


NO_ARTIFACT = ("codec evict keeps a different number of tokens per user, which the artifact format (fixed-width "
               "per-token fields) does not hold: it is available in `ckv evaluate CHECKPOINT --sweep "
               "'evict:keep=0.5,policy=recent'` only")


def refuse_artifact(codec: str) -> None:
    """Stop `ckv compress --codec evict` (single file or sharded) before any work: `NO_ARTIFACT`."""
    if codec == EvictCodec.name:
        raise CkvError(NO_ARTIFACT)
