"""The classic md bitmap's on-disk bit area (version 3/4).

One bit per chunk, right after the 256-byte bitmap superblock, least significant bit first
(version 4; version 3 is host order, the same on the little-endian machines md runs on).
A set bit means "this chunk may differ between copies". ``chunksize`` is in **bytes**.

Layout reference: spec/ONDISK.md section 4 and spec/CLASSIC_BITMAP.md.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from llraid.errors import FormatError
from llraid.format.bitmap import BITMAP_SB_BYTES, BitmapSuper

BoolArray = npt.NDArray[np.bool_]


def check_chunksize(chunksize_bytes: int) -> None:
    if chunksize_bytes < 512 or chunksize_bytes & (chunksize_bytes - 1):
        raise FormatError(f"classic bitmap chunksize {chunksize_bytes} is not a power of two >= 512")


def classic_chunks(sb: BitmapSuper) -> int:
    """Number of chunks (bits) covering ``sync_size`` sectors."""
    check_chunksize(sb.chunksize)
    chunk_sectors = sb.chunksize // 512
    return -(-sb.sync_size // chunk_sectors)


def classic_area_bytes(chunks: int) -> int:
    """Bytes of the bitmap area in use: the superblock plus one bit per chunk."""
    return BITMAP_SB_BYTES + -(-chunks // 8)


def parse_bits(area: bytes, chunks: int) -> BoolArray:
    """The per-chunk bits from a bitmap area that starts with the superblock."""
    need = classic_area_bytes(chunks)
    if len(area) < need:
        raise FormatError(f"classic bitmap area truncated: {len(area)} bytes, need {need}")
    raw = np.frombuffer(area, dtype=np.uint8, count=need - BITMAP_SB_BYTES, offset=BITMAP_SB_BYTES)
    return np.unpackbits(raw, bitorder="little")[:chunks].astype(np.bool_)


def build_bits(bits: BoolArray) -> bytes:
    """Bytes that follow the superblock for ``bits`` (padding bits zero)."""
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()
