"""Packed vector encodings: float32 rows -> little-endian bytes per row. Pure numpy.

The byte layouts are the API contract documented on `Encoding` in embed.proto; clients decode them with
numpy.frombuffer (and numpy.unpackbits for ubinary).
"""

from __future__ import annotations

import enum

import numpy as np

# Every component of an L2-normalized vector lies in [-1, 1], so one fixed scale needs no calibration.
INT8_SCALE = 127.0


class Encoding(enum.Enum):
    VALUES = "values"  # repeated float, not packed
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    UBINARY = "ubinary"


def encode(vectors: np.ndarray, encoding: Encoding) -> np.ndarray:
    """(rows, dims) float vectors -> a C-contiguous (rows, bytes per row) array in the packed encoding."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a (rows, dims) matrix, got shape {vectors.shape}")
    if encoding is Encoding.FLOAT32:
        return np.ascontiguousarray(vectors, dtype="<f4")
    if encoding is Encoding.FLOAT16:
        return np.ascontiguousarray(vectors, dtype="<f2")
    if encoding is Encoding.INT8:
        return np.clip(np.rint(vectors * INT8_SCALE), -127, 127).astype(np.int8)
    if encoding is Encoding.UBINARY:
        return np.packbits(vectors > 0, axis=1, bitorder="big")
    raise ValueError(f"{encoding} is not a packed encoding")


def pack_rows(vectors: np.ndarray, encoding: Encoding) -> list[bytes]:
    """One bytes object per row, all encoded in one numpy pass."""
    packed = encode(vectors, encoding)
    if not len(packed):
        return []
    data = packed.tobytes()
    width = len(data) // len(packed)
    return [data[i : i + width] for i in range(0, len(data), width)]
