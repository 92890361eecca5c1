"""Uncompressed storage at a chosen float width: the honest denominator (`plain` at fp16 or fp32, `bf16`)."""
from __future__ import annotations

import numpy as np
import torch

from ckv_cli.codecs.base import Field, StreamCodec, check_positive_int
from ckv_cli.errors import CkvError


class PlainCodec(StreamCodec):
    """Stores every value as-is at `dtype` (float16 or float32); decode is exact up to that rounding."""

    name = "plain"

    def __init__(self, d: int, dtype: str = "float16"):
        self.d = check_positive_int("d", d)
        if dtype not in ("float16", "float32"):
            raise CkvError(f"plain dtype must be float16 or float32, got {dtype!r}")
        self.dtype = dtype

    def params(self) -> dict:
        return {"d": self.d, "dtype": self.dtype}

    def fit(self, x, seed):
        pass

    def fields(self):
        return [Field("x", "token", dtype=self.dtype, width=self.d)]

    def encode(self, x, user_offsets):
        return {"x": x.detach().to(getattr(torch, self.dtype)).numpy()}

    def decode(self, fields, user_offsets):
        return torch.from_numpy(np.asarray(fields["x"], dtype=np.float32))


class Bf16Codec(StreamCodec):
    """bfloat16 cast (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training"): fp32's 8-bit
    exponent with a 7-bit mantissa, so no value overflows where fp16 would. numpy has no bfloat16: the raw 16
    bits are stored as uint16."""

    name = "bf16"

    def __init__(self, d: int):
        self.d = check_positive_int("d", d)

    def params(self) -> dict:
        return {"d": self.d}

    def fit(self, x, seed):
        pass

    def fields(self):
        return [Field("x", "token", dtype="uint16", width=self.d)]

    def encode(self, x, user_offsets):
        return {"x": x.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)}  # (N, d)

    def decode(self, fields, user_offsets):
        bits = np.asarray(fields["x"], dtype=np.uint16).view(np.int16)  # (N, d)
        return torch.from_numpy(bits).view(torch.bfloat16).float()
