"""The llbitmap (lockless bitmap, version 6) on-disk state area.

One byte per chunk starting 1024 bytes into the bitmap area; the first 256 bytes are the
ordinary bitmap superblock with ``version`` 6 and ``chunksize`` in **sectors**. Bytes
256..1023 are not interpreted (md writes back whatever it read).

Geometry: the chunk starts at 64 KiB (128 sectors) and doubles until the number of chunks fits
in the reserved space (one byte each). While the superblock still carries mdadm's FIRST_USE
flag its ``chunksize`` is mdadm's classic value in bytes and means nothing: the kernel derives
the geometry itself (fixture i1 shows exactly that), so :func:`geometry_of` does too.

Layout reference: spec/ONDISK.md section 5, spec/LLBITMAP.md sections 1-2.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from llraid.errors import FormatError
from llraid.format.bitmap import BitmapFlag, BitmapSuper

DATA_OFFSET = 1024  # BITMAP_DATA_OFFSET: first state byte within the bitmap area
MIN_CHUNK_SECTORS = 128  # 64 KiB, the largest raid1/raid10 sync IO
DEFAULT_SPACE_SECTORS = 256  # what mdadm reserves (sectors_reserved)
MD_DEFAULT_SPACE_SECTORS = 6  # md's default bitmap space for 1.x when sectors_reserved is 0

StateArray = npt.NDArray[np.uint8]


class LLState(enum.IntEnum):
    """Chunk states; the values are the on-disk bytes."""

    UNWRITTEN = 0
    CLEAN = 1
    DIRTY = 2
    NEED_SYNC = 3
    SYNCING = 4
    NEED_SYNC_UNWRITTEN = 5  # raid456 only
    SYNCING_UNWRITTEN = 6  # raid456 only
    CLEAN_UNWRITTEN = 7  # raid456 only

    @property
    def label(self) -> str:
        """The kernel's wording in sysfs ``llbitmap/bits``."""
        return _LABELS[self]

    @property
    def title(self) -> str:
        """CamelCase name as the spec and the fixtures' dumps write it."""
        return "".join(w.capitalize() for w in self.name.split("_"))


_LABELS = {
    LLState.UNWRITTEN: "unwritten",
    LLState.CLEAN: "clean",
    LLState.DIRTY: "dirty",
    LLState.NEED_SYNC: "need sync",
    LLState.SYNCING: "syncing",
    LLState.NEED_SYNC_UNWRITTEN: "need sync unwritten",
    LLState.SYNCING_UNWRITTEN: "syncing unwritten",
    LLState.CLEAN_UNWRITTEN: "clean unwritten",
}
STATE_COUNT = len(LLState)


@dataclass(frozen=True)
class Geometry:
    chunksize: int  # sectors
    chunkshift: int
    chunks: int
    sync_size: int  # sectors covered

    @property
    def used_bytes(self) -> int:
        """Bytes of the bitmap area holding the header and the state bytes."""
        return DATA_OFFSET + self.chunks


def calculate_geometry(sync_size: int, space_sectors: int) -> Geometry:
    """The kernel's chunk choice: 64 KiB doubled until ``chunks <= space bytes``.

    The comparison is with the whole space, not the space minus the 1 KiB header, exactly as
    upstream does (so the states may overrun ``sectors_reserved`` by up to 1 KiB).
    """
    if space_sectors <= 0:
        raise FormatError("llbitmap has no space reserved")
    space_bytes = space_sectors * 512
    chunksize = MIN_CHUNK_SECTORS
    chunks = -(-sync_size // chunksize)
    while chunks > space_bytes:
        chunksize *= 2
        chunks = -(-sync_size // chunksize)
    return Geometry(chunksize, chunksize.bit_length() - 1, chunks, sync_size)


def space_of(sb: BitmapSuper) -> int:
    return sb.sectors_reserved or MD_DEFAULT_SPACE_SECTORS


def geometry_of(sb: BitmapSuper) -> Geometry:
    """The geometry md uses for this superblock (re-derived while FIRST_USE is set)."""
    if sb.state & BitmapFlag.FIRST_USE:
        return calculate_geometry(sb.sync_size, space_of(sb))
    cs = sb.chunksize
    if cs <= 0 or cs & (cs - 1):
        raise FormatError(f"llbitmap chunksize {cs} is not a power of two")
    space_bytes = space_of(sb) * 512
    if cs < -(-sb.sync_size // space_bytes):
        raise FormatError(
            f"llbitmap chunksize {cs} too small for {sb.sync_size} sectors in {space_bytes} bytes"
        )
    if sb.daemon_sleep < 1:
        raise FormatError(f"llbitmap daemon_sleep {sb.daemon_sleep} is invalid")
    return Geometry(cs, cs.bit_length() - 1, -(-sb.sync_size // cs), sb.sync_size)


def parse_states(area: bytes, chunks: int) -> StateArray:
    """The raw state bytes of ``chunks`` chunks from a bitmap area starting at its header."""
    need = DATA_OFFSET + chunks
    if len(area) < need:
        raise FormatError(f"llbitmap area truncated: {len(area)} bytes, need {need}")
    return np.frombuffer(area, dtype=np.uint8, count=chunks, offset=DATA_OFFSET).copy()


def build_area(sb: BitmapSuper, states: StateArray, gap: bytes = b"\0" * 768) -> bytes:
    """Header, the 768 uninterpreted bytes, then one state byte per chunk."""
    if len(gap) != DATA_OFFSET - 256:
        raise FormatError("the llbitmap gap must be 768 bytes")
    return sb.build() + gap + states.astype(np.uint8).tobytes()


def count_states(states: StateArray) -> tuple[dict[LLState, int], int]:
    """Chunks per state, and the number of bytes that are no valid state at all."""
    hist = np.bincount(states, minlength=256)
    counts = {s: int(hist[s]) for s in LLState}
    return counts, int(hist[STATE_COUNT:].sum())


def bits_text(counts: dict[LLState, int]) -> str:
    """The kernel's sysfs ``llbitmap/bits`` text."""
    return "".join(f"{s.label} {counts.get(s, 0)}\n" for s in LLState)


def runs(states: StateArray) -> list[tuple[int, int, int]]:
    """Runs ``(first, end, value)`` of equal state bytes, for compact display."""
    if len(states) == 0:
        return []
    edges = np.flatnonzero(np.diff(states)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(states)]))
    return [(int(a), int(b), int(states[a])) for a, b in zip(starts, ends, strict=True)]
