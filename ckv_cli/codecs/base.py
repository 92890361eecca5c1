"""The codec interface. A `StreamCodec` compresses one stream of cached vectors (one layer's K or V).

- `fit(x)` on calibration vectors (N, d); `encode(x, user_offsets)` returns the compact fields of a batch of
  users' tokens; `decode(fields)` gives the vectors back; `fields()` declares what is stored per token and per
  user, at which width, so bytes are counted from the declaration and checked against the artifact.
- `shared()` returns the tensors every user shares (pools, routers, bases); `load(params, shared)` rebuilds a
  codec from an artifact without running `fit`.
- A codec with `needs_items` also gets the tokens' item ids (N,) as `items=` in fit, encode and decode;
  `stream_defaults` maps a stream kind ('k', 'v') to parameter defaults the plan passes for that kind.
- A field may be 'ragged' (`Field.counts`): a variable number of rows per user (escaped indices of an item-coded
  index, `ckv_cli.codecs.itemindex`), its row counts in a per-user field; its bytes follow the rows encoded.
- A codec with `needs_keep` (token eviction) gets the plan's keep mask (N,) bool as `keep=` in encode and
  decode, and may declare `kept` fields: one row per kept token, not per token.
Codecs never see the model: the caller hands them vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ckv_cli.codecs.bits import packed_nbytes
from ckv_cli.errors import CkvError


@dataclass(frozen=True)
class Field:
    """One stored array: `per` is 'token', 'user', 'kept' or 'ragged'; `bits` > 0 means bit-packed unsigned ints,
    one per row; otherwise `dtype` and `width` (values per row). A 'ragged' field has a variable number of rows
    per user, in user order: `counts` names the per-user field (same stream) that holds each user's row count."""

    name: str
    per: str
    dtype: str = "uint8"
    width: int = 1
    bits: int = 0
    counts: str = ""

    def nbytes(self, count: int) -> int:
        if self.bits:
            return packed_nbytes(count, self.bits)
        return count * self.width * np.dtype(self.dtype).itemsize


class StreamCodec:
    """Base class; subclasses set `name`, validate their parameters in `__init__`, and implement the methods."""

    name = ""
    needs_items = False
    needs_keep = False
    needs_context = False
    stream_defaults: dict[str, dict] = {}

    def params(self) -> dict:
        raise NotImplementedError

    def fit(self, x: torch.Tensor, seed: int) -> None:
        raise NotImplementedError

    def fields(self) -> list[Field]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, user_offsets: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def shared(self) -> dict[str, torch.Tensor]:
        return {}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        pass

    def bytes_per_token(self) -> float:
        return sum(f.bits / 8 if f.bits else f.width * np.dtype(f.dtype).itemsize for f in self.fields() if f.per == "token")

    def bytes_per_user(self) -> int:
        return sum(f.nbytes(1) for f in self.fields() if f.per == "user")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CkvError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def user_index(user_offsets: np.ndarray) -> np.ndarray:
    """Token -> user (within the batch) from offsets (U + 1,)."""
    return np.repeat(np.arange(len(user_offsets) - 1), np.diff(user_offsets))


def quantize_per_user(u: torch.Tensor, user_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, r) float -> int8 values and one fp16 scale per user (max |value| of that user / 127)."""
    owner = torch.from_numpy(user_index(user_offsets))
    n_users = len(user_offsets) - 1
    amax = torch.zeros(n_users).scatter_reduce_(0, owner, u.abs().amax(1), "amax")  # (U,)
    scale = (amax / 127).clamp(min=1e-8).half()
    q = torch.round(u / scale.float()[owner][:, None]).clamp(-127, 127).to(torch.int8)
    return q.numpy(), scale.numpy()[:, None]


def dequantize_per_user(q: np.ndarray, scale: np.ndarray, user_offsets: np.ndarray) -> torch.Tensor:
    owner = user_index(user_offsets)
    return torch.from_numpy(q.astype(np.float32) * scale[owner].astype(np.float32))
