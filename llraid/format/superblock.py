"""The md v1.x superblock (``struct mdp_superblock_1``), byte-exact.

One 256-byte fixed part followed by ``max_dev`` little-endian u16 role entries. All three
minor versions (1.0, 1.1, 1.2) share the structure; they differ only in where it lives on the
member (see :func:`super_offset_for`). Parsing and building are pure functions on bytes:
``Superblock1.parse(raw).build() == raw[:sb.size_bytes]`` for every superblock md writes,
including fields we do not interpret (pads, reshape fields, the PPL union), so rewriting a
superblock never loses anything another tool stored there.

Layout reference: spec/ONDISK.md section 2; upstream md_p.h ``struct mdp_superblock_1``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from llraid.errors import FormatError, NotMdMemberError

MD_SB_MAGIC = 0xA92B4EFC
MAX_SECTOR = 0xFFFF_FFFF_FFFF_FFFF  # "nothing to do": resync_offset of a clean array
SB_AREA_BYTES = 4096  # md reserves (and the kernel reads) 4 KiB at super_offset
MAX_DEV_LIMIT = (SB_AREA_BYTES - 256) // 2  # 1920 role entries fit in the area

ROLE_MAX = 0xFF00  # roles below this are slots
ROLE_JOURNAL = 0xFFFD
ROLE_FAULTY = 0xFFFE
ROLE_SPARE = 0xFFFF


class Feature(enum.IntFlag):
    """``feature_map`` bits (md_p.h MD_FEATURE_*)."""

    BITMAP_OFFSET = 1
    RECOVERY_OFFSET = 2
    RESHAPE_ACTIVE = 4
    BAD_BLOCKS = 8
    REPLACEMENT = 16
    RESHAPE_BACKWARDS = 32
    NEW_OFFSET = 64
    RECOVERY_BITMAP = 128
    CLUSTERED = 256
    JOURNAL = 512
    PPL = 1024
    MULTIPLE_PPLS = 2048
    RAID0_LAYOUT = 4096


FEATURE_ALL = 0x1FFF


class DevFlag(enum.IntFlag):
    WRITE_MOSTLY = 1
    FAILFAST = 2


def super_offset_for(minor: int, dev_sectors: int) -> int:
    """Sector where a 1.<minor> superblock lives on a member of ``dev_sectors`` sectors."""
    if minor == 0:
        # 8..12 KiB from the end, 4 KiB aligned, so it survives a partition-table rewrite.
        return (dev_sectors - 16) & ~7
    if minor == 1:
        return 0
    if minor == 2:
        return 8
    raise FormatError(f"unknown md metadata version 1.{minor}")


def minor_from_super_offset(super_offset: int) -> int:
    """The minor version mdadm reports for a stored ``super_offset``."""
    if super_offset <= 4:
        return 1
    if super_offset <= 8:
        return 2
    return 0


def sb1_checksum(raw: bytes) -> int:
    """md's superblock checksum: 32-bit word sum over 256 + 2*max_dev bytes, carry folded once.

    The ``sb_csum`` field itself counts as zero. An odd number of roles leaves one u16 that is
    added on its own, as md does.
    """
    max_dev = struct.unpack_from("<I", raw, 220)[0]
    length = 256 + 2 * max_dev
    if len(raw) < length:
        raise FormatError(f"superblock needs {length} bytes, have {len(raw)}")
    buf = bytearray(raw[:length])
    buf[216:220] = b"\0\0\0\0"
    words = length // 4
    total: int = sum(struct.unpack_from(f"<{words}I", buf, 0))
    if length % 4:
        total += struct.unpack_from("<H", buf, words * 4)[0]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def _time_seconds(t: int) -> int:
    # md stores microseconds in the top 24 bits (the kernel and mdadm write seconds only).
    return t & 0xFF_FFFF_FFFF


@dataclass(frozen=True)
class Superblock1:
    """``struct mdp_superblock_1``; field names are the kernel's."""

    FIXED: ClassVar[struct.Struct] = struct.Struct("<4I16s32sQiIQIIiIQiIIiQQQQII16sBBHiQQQII I28s")

    magic: int
    major_version: int
    feature_map: int
    pad0: int
    set_uuid: bytes
    set_name_raw: bytes
    ctime: int
    level: int
    layout: int
    size: int
    chunksize: int
    raid_disks: int
    bitmap_offset: int  # signed; a PPL array stores ppl.offset/ppl.size in the same 4 bytes
    new_level: int
    reshape_position: int
    delta_disks: int
    new_layout: int
    new_chunk: int
    new_offset: int
    data_offset: int
    data_size: int
    super_offset: int
    recovery_offset: int
    dev_number: int
    cnt_corrected_read: int
    device_uuid: bytes
    devflags: int
    bblog_shift: int
    bblog_size: int
    bblog_offset: int
    utime: int
    events: int
    resync_offset: int
    sb_csum: int
    max_dev: int
    logical_block_size: int  # newer kernels; was the first 4 bytes of pad3
    pad3: bytes
    dev_roles: tuple[int, ...]

    # ---- bytes <-> record -------------------------------------------------------------

    @classmethod
    def parse(cls, raw: bytes) -> Superblock1:
        """Parse a superblock; raises :class:`NotMdMemberError` or :class:`FormatError`.

        The checksum is not enforced here (see :attr:`checksum_ok`) so that tools can still
        show a damaged superblock; assembly refuses it.
        """
        if len(raw) < 256:
            raise FormatError(f"superblock truncated: {len(raw)} bytes, need 256")
        fields = cls.FIXED.unpack_from(raw, 0)
        if fields[0] != MD_SB_MAGIC:
            raise NotMdMemberError(
                f"no md superblock (magic {fields[0]:#010x}, expected {MD_SB_MAGIC:#010x})"
            )
        if fields[1] != 1:
            raise FormatError(f"unknown md superblock major version {fields[1]} (only 1.x is supported)")
        max_dev = fields[34]
        if max_dev > MAX_DEV_LIMIT:
            raise FormatError(f"superblock max_dev {max_dev} exceeds {MAX_DEV_LIMIT}")
        need = 256 + 2 * max_dev
        if len(raw) < need:
            raise FormatError(f"superblock truncated: {len(raw)} bytes, need {need}")
        roles = struct.unpack_from(f"<{max_dev}H", raw, 256)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**dict(zip(names, (*fields, roles), strict=True)))

    def build(self) -> bytes:
        """The superblock bytes (``256 + 2*max_dev``), with ``sb_csum`` exactly as stored."""
        if len(self.dev_roles) != self.max_dev:
            raise FormatError(f"dev_roles has {len(self.dev_roles)} entries, max_dev is {self.max_dev}")
        values = [getattr(self, f.name) for f in dataclasses.fields(self)][:-1]
        return self.FIXED.pack(*values) + struct.pack(f"<{self.max_dev}H", *self.dev_roles)

    def with_checksum(self) -> Superblock1:
        """A copy whose ``sb_csum`` is correct for its contents."""
        return dataclasses.replace(self, sb_csum=sb1_checksum(self.build()))

    # ---- derived facts ----------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return 256 + 2 * self.max_dev

    @property
    def computed_checksum(self) -> int:
        return sb1_checksum(self.build())

    @property
    def checksum_ok(self) -> bool:
        return self.computed_checksum == self.sb_csum

    @property
    def features(self) -> Feature:
        return Feature(self.feature_map & FEATURE_ALL)

    @property
    def unknown_features(self) -> int:
        return self.feature_map & ~FEATURE_ALL

    @property
    def has_bitmap(self) -> bool:
        return bool(self.feature_map & Feature.BITMAP_OFFSET) and not (self.feature_map & Feature.PPL)

    @property
    def minor_version(self) -> int:
        return minor_from_super_offset(self.super_offset)

    @property
    def set_name(self) -> str:
        return self.set_name_raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def ctime_seconds(self) -> int:
        return _time_seconds(self.ctime)

    @property
    def utime_seconds(self) -> int:
        return _time_seconds(self.utime)

    @property
    def is_clean(self) -> bool:
        """mdadm's "State : clean": no resync pending."""
        return self.resync_offset == MAX_SECTOR

    def role_of(self, dev_number: int) -> int:
        """Role this superblock records for ``dev_number`` (spare past ``max_dev``)."""
        if 0 <= dev_number < self.max_dev:
            return self.dev_roles[dev_number]
        return ROLE_SPARE

    @property
    def role(self) -> int:
        """This member's own role as recorded in its own superblock."""
        return self.role_of(self.dev_number)

    def structural_problems(self, dev_sectors: int | None = None) -> list[str]:
        """What the kernel's ``super_1_load`` would reject, besides magic/version/checksum."""
        problems: list[str] = []
        if self.unknown_features:
            problems.append(f"unknown feature bits {self.unknown_features:#x}")
        if self.pad0:
            problems.append("pad0 is not zero")
        if any(self.pad3):
            problems.append("pad3 is not zero")
        if self.data_size < 10:
            problems.append(f"data_size {self.data_size} is too small")
        if self.size > self.data_size:
            # md: "rdev size smaller than array dev_sectors": the array would run off the member
            problems.append(f"component size {self.size} exceeds the member's data size {self.data_size}")
        if not 0 < self.raid_disks <= MAX_DEV_LIMIT:
            problems.append(f"raid_disks {self.raid_disks} is out of range")
        if self.dev_number >= MAX_DEV_LIMIT:
            # no superblock could hold this member's role (dev_roles[dev_number])
            problems.append(f"dev_number {self.dev_number} is out of range (at most {MAX_DEV_LIMIT - 1})")
        if self.minor_version != 0 and self.data_offset < self.super_offset + (self.size_bytes + 511) // 512:
            problems.append(f"data_offset {self.data_offset} overlaps the superblock")
        if self.feature_map & Feature.RAID0_LAYOUT and self.level != 0:
            problems.append("RAID0_LAYOUT feature on a non-raid0 array")
        if dev_sectors is not None:
            if self.minor_version == 0:
                expected = super_offset_for(0, dev_sectors)
                if self.super_offset != expected:
                    problems.append(
                        f"super_offset {self.super_offset} is not {expected} for this device size"
                    )
                if self.super_offset < self.data_offset + self.data_size:
                    problems.append("data area runs into the superblock")
            elif dev_sectors - self.data_offset < self.data_size:
                problems.append(
                    f"device has {dev_sectors} sectors, data needs {self.data_offset + self.data_size}"
                )
        return problems


def format_uuid(raw: bytes) -> str:
    """mdadm's UUID text: four 32-bit groups of hex separated by ':'."""
    h = raw.hex()
    return ":".join(h[i : i + 8] for i in range(0, 32, 8))


def parse_uuid(text: str) -> bytes:
    """Inverse of :func:`format_uuid`; accepts ':', '-' or no separators."""
    h = "".join(c for c in text if c not in ":-. ")
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise FormatError(f"not a 128-bit UUID: {text!r}")
    return raw
