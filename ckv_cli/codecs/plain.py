"""Uncompressed storage at a chosen float width: the honest denominator (`fp16`, `fp32`)."""
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
