"""KIVI-style integer quantisation (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache"): keys per channel, values per token, asymmetric: each group has an fp16 scale and zero point (its
minimum), x ~ q * scale + zero with q in 0..2^b - 1.

- `axis='token'` (values): each token's channels in groups of g = min(group_size, d) channels; per token
  w = 2 * ceil(d / g) fp16 stats (the groups' scales, then their zeros).
- `axis='channel'` (keys): each user's tokens in groups of `group_size` consecutive tokens, one scale and zero
  per channel over the group. A group's 2d stats (d scales, then d zeros, zero-padded) are spread over its own
  tokens, w per token (w * group_size >= 2d), so they travel with the user's tokens and the per-token field
  counts them exactly. A user's last `L mod group_size` tokens (KIVI's residual, which KIVI keeps in fp16)
  are quantised per token as with `axis='token'`, in the same w slots.
Stats are rounded outward to fp16 (zero down, scale up), so every decoded element is within scale / 2 of the
original. int4 codes are packed two per byte, the first in the high nibble.
"""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int, user_index
from ckv_cli.errors import CkvError

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16


def _round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> the nearest fp16 at or above (`up`) or at or below it."""
    h = x.half()
    off = h.float() < x if up else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else -float("inf"))), h)


class KiviCodec(StreamCodec):
    """Shared by `int8` and `int4`, which set `name` and `bits`."""

    bits = 8
    stream_defaults = {"k": {"axis": "channel"}, "v": {"axis": "token"}}

    def __init__(self, d: int, group_size: int = 32, axis: str = "token"):
        self.d = check_positive_int("d", d)
        self.group_size = check_positive_int("group size", group_size)
        if axis not in ("channel", "token"):
            raise CkvError(f"axis must be 'channel' (keys) or 'token' (values), got {axis!r}")
        self.axis = axis
        self.levels = (1 << self.bits) - 1
        self.g = min(self.group_size, self.d)  # channels per group when quantising per token
        self.n_groups = -(-self.d // self.g)
        self.width = 2 * self.n_groups  # fp16 stats per token

    def params(self) -> dict:
        return {"d": self.d, "group_size": self.group_size, "axis": self.axis}

    def fit(self, x, seed):
        pass

    def fields(self) -> list[Field]:
        return [Field("q", "token", dtype="uint8", width=-(-self.d * self.bits // 8)),
                Field("stats", "token", dtype="float16", width=self.width)]

    # -- layout --------------------------------------------------------------------------------------------
    def _grouped(self, user_offsets: np.ndarray) -> torch.Tensor:
        """(N,) True for tokens quantised per channel: each user's first `L - L mod group_size` tokens."""
        n = int(user_offsets[-1])
        if self.axis == "token":
            return torch.zeros(n, dtype=torch.bool)
        owner = user_index(user_offsets)
        pos = np.arange(n) - user_offsets[:-1][owner]
        full = np.diff(user_offsets) // self.group_size * self.group_size  # (U,)
        return torch.from_numpy(pos < full[owner])

    def _stats(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group minima and maxima -> fp16 (scale, zero) with zero <= lo and zero + levels * scale >= hi."""
        zero = _round_fp16(lo, up=False)
        scale = _round_fp16(((hi - zero.float()) / self.levels).clamp(min=FP16_TINY), up=True)
        return scale, zero

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.round((x - zero.float()) / scale.float()).clamp(0, self.levels).to(torch.uint8)

    def _channel_groups(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, n_groups, g), the last group padded with copies of the last channel."""
        pad = self.n_groups * self.g - self.d
        return torch.cat([x, x[:, -1:].expand(-1, pad)], 1).view(len(x), self.n_groups, self.g)

    # -- storage -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, user_offsets: np.ndarray) -> dict[str, np.ndarray]:
        x = x.detach().float()
        if len(x) and float(x.abs().max()) >= FP16_MAX:
            raise CkvError(f"{self.name}: values up to {float(x.abs().max()):.3g} exceed the fp16 range of the scales")
        grouped = self._grouped(user_offsets)
        q = torch.empty(x.shape, dtype=torch.uint8)  # (N, d)
        stats = torch.empty(len(x), self.width, dtype=torch.float16)  # (N, w)
        q[~grouped], stats[~grouped] = self._encode_per_token(x[~grouped])
        q[grouped], stats[grouped] = self._encode_per_channel(x[grouped])
        return {"q": self._pack(q), "stats": stats.numpy()}

    def _encode_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xg = self._channel_groups(x)  # (n, G, g)
        scale, zero = self._stats(xg.amin(2), xg.amax(2))  # (n, G) each
        q = self._quantize(xg, scale[..., None], zero[..., None]).view(len(x), self.n_groups * self.g)[:, : self.d]
        return q, torch.cat([scale, zero], 1)

    def _encode_per_channel(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x.view(-1, self.group_size, self.d)  # (groups, T, d): whole groups, consecutive in token order
        scale, zero = self._stats(xg.amin(1), xg.amax(1))  # (groups, d) each
        q = self._quantize(xg, scale[:, None], zero[:, None]).view(-1, self.d)
        spread = torch.zeros(len(xg), self.group_size * self.width, dtype=torch.float16)
        spread[:, : 2 * self.d] = torch.cat([scale, zero], 1)
        return q, spread.view(-1, self.width)

    def decode(self, fields: dict[str, np.ndarray], user_offsets: np.ndarray) -> torch.Tensor:
        q = self._unpack(np.asarray(fields["q"], dtype=np.uint8)).float()  # (N, d)
        stats = torch.from_numpy(np.asarray(fields["stats"], dtype=np.float32).reshape(len(q), self.width))
        grouped = self._grouped(user_offsets)
        scale, zero = torch.empty_like(q), torch.empty_like(q)
        st = stats[~grouped]  # (n, w): per-token groups of channels
        scale[~grouped] = st[:, : self.n_groups].repeat_interleave(self.g, 1)[:, : self.d]
        zero[~grouped] = st[:, self.n_groups :].repeat_interleave(self.g, 1)[:, : self.d]
        sp = stats[grouped].reshape(-1, self.group_size * self.width)[:, : 2 * self.d]  # (groups, 2d)
        scale[grouped] = sp[:, : self.d].repeat_interleave(self.group_size, 0)
        zero[grouped] = sp[:, self.d :].repeat_interleave(self.group_size, 0)
        return q * scale + zero

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        return q.numpy()

    def _unpack(self, packed: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(packed.reshape(len(packed), self.d))


class Int8Codec(KiviCodec):
    """8-bit KIVI-style quantisation (Liu et al. 2024, KIVI); one uint8 code per element."""

    name, bits = "int8", 8


class Int4Codec(KiviCodec):
    """4-bit KIVI-style quantisation (Liu et al. 2024, KIVI); codes packed two per byte."""

    name, bits = "int4", 4

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        q = q.numpy()
        if self.d % 2:
            q = np.concatenate([q, np.zeros((len(q), 1), dtype=np.uint8)], 1)
        return (q[:, 0::2] << 4) | q[:, 1::2]  # (N, ceil(d / 2))

    def _unpack(self, packed: np.ndarray) -> torch.Tensor:
        packed = packed.reshape(len(packed), -(-self.d // 2))
        q = np.stack([packed >> 4, packed & 15], 2).reshape(len(packed), 2 * packed.shape[1])[:, : self.d]  # (N, d)
        return torch.from_numpy(np.ascontiguousarray(q))
