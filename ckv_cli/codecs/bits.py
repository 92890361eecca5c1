"""Packing unsigned integers at a given bit width (indices at the narrowest width that holds the pool)."""
from __future__ import annotations

import numpy as np

from ckv_cli.spec import bits_for  # noqa: F401  (the narrowest width holding 0..n-1; re-exported)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _bit_array(values: np.ndarray, bits: int) -> np.ndarray:
    """(N,) unsigned ints < 2**bits -> (N * bits,) uint8 of 0/1, most significant bit first."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)  # (N, bits) flattened


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(N,) unsigned ints < 2**bits -> uint8 bytes, big-endian bit order, value i at bits [i*bits, (i+1)*bits)."""
    return np.packbits(_bit_array(values, bits))


class BitPacker:
    """`pack` over a stream of batches: `feed` each batch's values in order, then `close`; the bytes returned,
    concatenated, are exactly `pack` of all the values at once. A batch's values start mid-byte in general:
    the bits past the last whole byte (fewer than 8) are carried into the next batch."""

    def __init__(self, bits: int):
        self.bits = bits
        self._carry = np.zeros(8, np.uint8)  # bits not yet in a whole byte: the first `_n` (one buffer, reused)
        self._n = 0

    def feed(self, values: np.ndarray) -> np.ndarray:
        bitarr = _bit_array(values, self.bits)
        if self._n:
            bitarr = np.concatenate([self._carry[: self._n], bitarr])
        whole = len(bitarr) // 8 * 8
        self._n = len(bitarr) - whole
        self._carry[: self._n] = bitarr[whole:]
        return np.packbits(bitarr[:whole])

    def close(self) -> np.ndarray:
        """The last partial byte (zero-padded, as `pack` pads), or nothing."""
        out = np.packbits(self._carry[: self._n])
        self._n = 0
        return out


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
