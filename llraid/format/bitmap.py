"""The bitmap superblock (``bitmap_super_t``) shared by the classic bitmap and llbitmap.

256 bytes, little-endian, at the start of the bitmap area (member sector
``super_offset + bitmap_offset``). The version tells the two kinds apart: 3/4 classic
(host/little-endian bit order), 5 clustered classic, 6 llbitmap. Fields whose meaning differs
between the kinds (``chunksize`` is bytes for classic and sectors for llbitmap) are kept raw;
the kind-specific modules interpret them.

Layout reference: spec/ONDISK.md section 3; upstream md-bitmap.h ``struct bitmap_super_s``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from llraid.errors import FormatError

BITMAP_MAGIC = 0x6D746962  # "bitm"
BITMAP_SB_BYTES = 256

VERSION_CLASSIC_HOSTENDIAN = 3
VERSION_CLASSIC = 4
VERSION_CLUSTERED = 5
VERSION_LLBITMAP = 6
KNOWN_VERSIONS = (VERSION_CLASSIC_HOSTENDIAN, VERSION_CLASSIC, VERSION_CLUSTERED, VERSION_LLBITMAP)


class BitmapKind(enum.Enum):
    NONE = "none"
    CLASSIC = "internal"  # mdadm's name for the classic in-superblock bitmap
    LOCKLESS = "lockless"  # mdadm's --bitmap name for llbitmap


class BitmapFlag(enum.IntFlag):
    """``state`` bits of the bitmap superblock (md-bitmap.h ``enum bitmap_state``)."""

    STALE = 1 << 1
    WRITE_ERROR = 1 << 2
    FIRST_USE = 1 << 3  # llbitmap: fresh from mdadm, the kernel initialises every chunk
    CLEAN = 1 << 4  # llbitmap: created with --assume-clean
    DAEMON_BUSY = 1 << 5
    SHUTDOWN = 1 << 6
    HOSTENDIAN = 1 << 15


def flag_names(state: int) -> list[str]:
    names = [f.name for f in BitmapFlag if state & f and f.name]
    unknown = state & ~sum(BitmapFlag)
    if unknown:
        names.append(f"{unknown:#x}")
    return [str(n) for n in names]


@dataclass(frozen=True)
class BitmapSuper:
    """``bitmap_super_t``; field names are the kernel's."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<II16sQQQIIIIII64s120s")

    magic: int
    version: int
    uuid: bytes
    events: int
    events_cleared: int
    sync_size: int  # sectors covered by the bitmap
    state: int
    chunksize: int  # classic: bytes; llbitmap: sectors (bytes from mdadm while FIRST_USE)
    daemon_sleep: int  # seconds
    write_behind: int
    sectors_reserved: int
    nodes: int
    cluster_name: bytes
    pad: bytes

    @classmethod
    def parse(cls, raw: bytes) -> BitmapSuper:
        """Parse the 256-byte header; raises :class:`FormatError` for a wrong magic or size.

        The version is not checked here so that tools can still name what they found.
        """
        if len(raw) < BITMAP_SB_BYTES:
            raise FormatError(f"bitmap superblock truncated: {len(raw)} bytes, need {BITMAP_SB_BYTES}")
        sb = cls(*cls.FMT.unpack_from(raw, 0))
        if sb.magic != BITMAP_MAGIC:
            raise FormatError(f"no bitmap superblock (magic {sb.magic:#010x}, expected {BITMAP_MAGIC:#010x})")
        return sb

    def build(self) -> bytes:
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return self.FMT.pack(*values)

    @property
    def kind(self) -> BitmapKind:
        if self.version == VERSION_LLBITMAP:
            return BitmapKind.LOCKLESS
        if self.version in (VERSION_CLASSIC_HOSTENDIAN, VERSION_CLASSIC, VERSION_CLUSTERED):
            return BitmapKind.CLASSIC
        raise FormatError(f"unknown bitmap version {self.version}")

    def check_version(self) -> None:
        """Refuse versions llraid cannot drive (unknown ones, and clustered md)."""
        if self.version not in KNOWN_VERSIONS:
            raise FormatError(f"unknown bitmap version {self.version} (known: 3, 4, 5, 6)")
        if self.version == VERSION_CLUSTERED:
            raise FormatError("clustered md bitmaps (version 5) are not supported")

    def flags(self) -> BitmapFlag:
        return BitmapFlag(self.state & sum(BitmapFlag))
