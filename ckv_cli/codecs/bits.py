"""Packing unsigned integers at a given bit width (indices at the narrowest width that holds the pool)."""
from __future__ import annotations

import math

import numpy as np


def bits_for(n_values: int) -> int:
    """Narrowest width holding 0..n_values-1."""
    return max(1, math.ceil(math.log2(max(n_values, 2))))


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(N,) unsigned ints < 2**bits -> uint8 bytes, big-endian bit order, value i at bits [i*bits, (i+1)*bits)."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bitarr = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (N, bits)
    return np.packbits(bitarr.reshape(-1))


def unpack(data: np.ndarray, bits: int, count: int, bit_offset: int = 0) -> np.ndarray:
    """`count` values starting `bit_offset` bits into `data` (uint8) -> (count,) int64."""
    bitarr = np.unpackbits(np.asarray(data, dtype=np.uint8))
    bitarr = bitarr[bit_offset : bit_offset + count * bits].reshape(count, bits).astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return bitarr @ weights


def byte_range(start: int, count: int, bits: int) -> tuple[int, int, int]:
    """Bytes [lo, hi) holding values [start, start + count) of a packed stream, and the bit offset of the
    first value inside byte lo: `unpack(stream[lo:hi], bits, count, offset)` reads just those values."""
    lo = (start * bits) // 8
    hi = ((start + count) * bits + 7) // 8
    return lo, hi, start * bits - lo * 8
