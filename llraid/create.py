"""``llraid create``: new md arrays with mdadm 4.6's defaults (spec/ONDISK.md 6-7, LAYOUTS.md 1-2).

What is written, per member: the v1.x superblock (events 0, ``resync_offset`` 0 or MaxSector
with ``--assume-clean``) and, with a bitmap, mdadm's initial bitmap area (classic: superblock
plus all bits set; lockless: superblock with FIRST_USE, the kernel - or llraid - fills in the
chunk states on first start).

Where mdadm is unsafe llraid is not: with the lockless bitmap mdadm 4.6 puts the bad-block log
at +16 sectors, inside the 128 KiB llbitmap area (spec ONDISK 5.6); llraid puts it after that
area, or leaves it out when it does not fit before the data.

Everything is checked before anything is written: device sizes, existing md superblocks and
filesystem signatures (refused unless ``force``), geometry.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llraid.device import SECTOR, Device, path_identity
from llraid.errors import AssemblyError, LayoutError
from llraid.format.bitmap import BitmapKind
from llraid.format.superblock import (
    MAX_SECTOR,
    MD_SB_MAGIC,
    ROLE_SPARE,
    Feature,
    Superblock1,
    super_offset_for,
)
from llraid.metadata import CreateError as CreateError
from llraid.metadata import existing_signature
from llraid.raid.layout import (
    Raid10Geometry,
    parse_raid5_layout,
    parse_raid6_layout,
    parse_raid10_layout,
    raid10_layout_text,
)
from llraid.raid.registry import LEVELS, creatable_names, level_name

DEFAULT_CHUNK_KIB = 512
MAX_CHUNK_SECTORS = 0x7FFFFFFF  # mdadm refuses chunks above INT_MAX sectors
RAID1_ROUND_SECTORS = 128  # raid1 sizes are whole 64 KiB
MIN_DATA_SIZE = 10  # md refuses a member whose data area is smaller ("data_size too small")
LLBITMAP_SPACE = 256  # sectors mdadm reserves for llbitmap (sectors_reserved)
BBLOG_SECTORS = 8
GiB_SECTORS = 1 << 21


def choose_bm_space(dev_sectors: int) -> int:
    """Sectors mdadm reserves for a bitmap on a member of this size."""
    if dev_sectors < 128:
        return 0
    if dev_sectors - 128 >= 200 * GiB_SECTORS:
        return 256
    if dev_sectors - 8 > 8 * GiB_SECTORS:
        return 128
    return 8


def default_data_offset(dev_sectors: int, chunk_kib: int) -> int:
    """mdadm's 1.1/1.2 data offset: bitmap space, up to 128 MiB reshape headroom, 1 MiB aligned."""
    headroom = 128 * 1024 * 2
    while (headroom << 10) > dev_sectors and (chunk_kib == 0 or headroom // 2 >= chunk_kib * 2 * 2):
        headroom >>= 1
    raw = 12 * 2 + choose_bm_space(dev_sectors) + headroom
    return -(-raw // 2048) * 2048


@dataclass(frozen=True)
class CreateSpec:
    level: int
    raid_devices: int
    layout: int
    chunk_sectors: int
    bitmap: BitmapKind
    assume_clean: bool
    name: str
    minor: int  # metadata 1.<minor>
    size: int | None  # sectors per member, None = as large as possible
    homehost: str | None
    uuid: bytes | None = None


def parse_layout(level: int, layout: str | None) -> int:
    if level == 1:
        if layout not in (None, ""):
            raise CreateError("raid1 has no layout")
        return 0
    if level == 10:
        return parse_raid10_layout(layout or "n2")
    if level == 4:
        if layout not in (None, "", "parity-last"):
            raise CreateError("raid4 keeps parity on the last member: it has no other layout")
        return 0  # mdadm leaves raid4's layout 0; md ignores it (parity is always last)
    if level == 5:
        return parse_raid5_layout(layout or "left-symmetric")
    if level == 6:
        return parse_raid6_layout(layout or "left-symmetric")
    raise CreateError(f"creating {level_name(level)} is not supported ({creatable_names()} are)")


def array_name(name: str, homehost: str | None) -> bytes:
    """mdadm's set_name: "homehost:name" when it fits and name has no ':', else the name."""
    if homehost and ":" not in name and len(homehost) + 1 + len(name) < 32:
        full = f"{homehost}:{name}"
    else:
        full = name
    raw = full.encode()
    if len(raw) > 32:
        raise CreateError(f"array name {name!r} is too long (32 bytes at most)")
    return raw.ljust(32, b"\0")


def short_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that shows it well: ``512K``, ``2.5M``, ``100``."""
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift:
            tenths = n * 10 >> shift  # rounded down: a size just under a limit never shows as the limit
            return (str(tenths // 10) if n % (1 << shift) == 0 else f"{tenths // 10}.{tenths % 10}") + unit
    return str(n)


def show_bytes(n: int) -> str:
    """``n`` bytes for a message: exact, then short (``2621440 bytes (2.5M)``)."""
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({short_size(n)})"


def describe(spec: CreateSpec) -> str:
    """The array in a message: ``raid10 (near=2, 512K chunks)``, ``raid5 (512K chunks)``, ``raid1``."""
    chunks = f"{short_size(spec.chunk_sectors * SECTOR)} chunks"
    if spec.level == 10:
        return f"raid10 ({raid10_layout_text(spec.layout)}, {chunks})"
    return f"raid{spec.level}" if spec.level == 1 else f"raid{spec.level} ({chunks})"


def minimum_size(spec: CreateSpec) -> int:
    """The smallest component size (sectors per member) that makes a non-empty array."""
    if spec.level == 10:
        # calc_sectors: each far copy needs a whole chunk of its own on every member
        return spec.chunk_sectors * ((spec.layout >> 8) & 0xFF)
    if spec.level != 1:
        return spec.chunk_sectors  # raid4/5/6: one stripe row
    return RAID1_ROUND_SECTORS


def minimum_member_sectors(spec: CreateSpec) -> int:
    """The smallest member (sectors) that holds the superblock, bitmap and ``minimum_size``.

    The data offset grows with the member (mdadm's reshape headroom), so this is the fixed
    point of ``offset(n) + need``: every smaller member leaves less than ``need``."""
    need = max(minimum_size(spec), MIN_DATA_SIZE)
    n = need
    while True:
        offset = default_data_offset(n, spec.chunk_sectors // 2)
        if n - offset >= need:
            return n
        n = offset + need


def validate_spec(spec: CreateSpec) -> None:
    """Everything about a request that does not depend on the devices."""
    lv = LEVELS.get(spec.level)
    if lv is None or not lv.creatable:
        raise CreateError(f"creating {level_name(spec.level)} is not supported ({creatable_names()} are)")
    if spec.raid_devices < 1:
        raise CreateError(f"invalid number of raid devices: {spec.raid_devices}")
    # raid1 takes one device with --force; raid10 says how many its copies need (below)
    if spec.raid_devices < lv.min_disks and spec.level not in (1, 10):
        raise CreateError(f"{lv.name} needs at least {lv.min_disks} raid devices, not {spec.raid_devices}")
    if spec.level == 1 and spec.chunk_sectors:
        raise CreateError("specifying chunk size is forbidden for raid1")
    if spec.level != 1:
        c = spec.chunk_sectors
        if c < 8 or c & (c - 1) or c > MAX_CHUNK_SECTORS:
            raise CreateError(
                f"chunk size must be a power of two from 4K to 512G, not {show_bytes(c * SECTOR)}"
            )
        copies = (spec.layout & 0xFF) * ((spec.layout >> 8) & 0xFF) if spec.level == 10 else 0
        if copies >= 2 and spec.raid_devices < copies:
            raise CreateError(
                f"a raid10 with {copies} copies ({raid10_layout_text(spec.layout)}) needs at least "
                f"{copies} raid devices, not {spec.raid_devices}"
            )
        try:  # the geometry md would build, on a size of a few chunks
            lv.make(dataclasses.replace(_probe_superblock(spec), size=c * 4))
        except (LayoutError, AssemblyError) as e:
            raise CreateError(str(e)) from None
    if spec.minor == 0:
        raise CreateError("metadata 1.0 is not supported by llraid create yet (use 1.1 or 1.2)")
    if spec.bitmap is BitmapKind.LOCKLESS and spec.minor != 2:
        raise CreateError("the lockless bitmap needs metadata 1.2")
    if spec.size is not None and spec.size < minimum_size(spec):
        raise CreateError(
            f"--size {show_bytes(spec.size * SECTOR)} is below the minimum: a {describe(spec)} "
            f"needs at least {show_bytes(minimum_size(spec) * SECTOR)} per member"
        )


def plan_members(
    spec: CreateSpec, dev_sectors: Sequence[int], names: Sequence[str] | None = None
) -> tuple[int, int, int, int, int, int]:
    """``(data_offset, size, bitmap_offset, bblog_offset, bblog_size, sync_size)``."""
    chunk_kib = spec.chunk_sectors // 2
    first = dev_sectors[0]
    if spec.minor == 0:
        raise CreateError("metadata 1.0 is not supported by llraid create yet (use 1.1 or 1.2)")
    super_offset = super_offset_for(spec.minor, first)
    # mdadm takes the data offset from the first member, so it decides what the others need
    data_offset = default_data_offset(first, chunk_kib)
    need = minimum_size(spec)
    room = max(need, MIN_DATA_SIZE)
    for i, sectors in enumerate(dev_sectors):
        if sectors - data_offset < room:
            name = names[i] if names else f"member {i}"
            raise CreateError(
                f"{name} is too small: {show_bytes(sectors * SECTOR)}; a {describe(spec)} needs at least "
                f"{show_bytes((data_offset + room) * SECTOR)} per member here (data starts at "
                f"{show_bytes(data_offset * SECTOR)})"
            )
    free = min(s - data_offset for s in dev_sectors)
    free_kib = free // 2
    if spec.level != 1:
        free_kib -= free_kib % chunk_kib
    size_kib = free_kib
    if spec.size is not None:
        want = spec.size // 2
        if spec.level != 1:
            want -= want % chunk_kib
        if want > free_kib:
            raise CreateError(
                f"--size {show_bytes(spec.size * SECTOR)} is larger than the members allow "
                f"({show_bytes(free_kib * 1024)})"
            )
        size_kib = want
    if spec.level == 1:
        size_kib &= ~(RAID1_ROUND_SECTORS // 2 - 1)  # mdadm: a whole 64 KiB, so it can become raid5 later
    size = size_kib * 2
    if size < need:  # validate_spec and the loop above keep this from happening
        raise CreateError(f"{show_bytes(size * SECTOR)} per member is too small for a {describe(spec)}")
    if spec.level == 10:
        Raid10Geometry.from_superblock(spec.layout, spec.raid_devices, spec.chunk_sectors, size)  # validates
        copies = (spec.layout & 0xFF) * ((spec.layout >> 8) & 0xFF)
        sync_size = size // 2 * spec.raid_devices // copies * 2  # mdadm's bitmap size (KiB based)
    else:
        sync_size = size
    bitmap_offset = 0
    if spec.bitmap is BitmapKind.NONE:
        span = 8 + choose_bm_space(size)
    elif spec.bitmap is BitmapKind.LOCKLESS:
        bitmap_offset = 8
        span = bitmap_offset + LLBITMAP_SPACE + 8  # past the state bytes' 1 KiB overrun, 4 KiB aligned
    else:
        bitmap_offset = 8
        span = bitmap_offset + len(initial_bitmap_area(spec, bytes(16), sync_size, size)) // 512
    # mdadm: right after the bitmap (or its reserved room), else just below the data, else none.
    bblog_offset, bblog_size = span, BBLOG_SECTORS
    if super_offset + span + BBLOG_SECTORS > data_offset:
        bblog_offset = data_offset - BBLOG_SECTORS - super_offset
        if bblog_offset < (span if spec.bitmap is BitmapKind.LOCKLESS else 8):
            bblog_offset, bblog_size = 0, 0  # no room: no bad-block log rather than an overlap
    return data_offset, size, bitmap_offset, bblog_offset, bblog_size, sync_size


def build_superblock(
    spec: CreateSpec,
    *,
    set_uuid: bytes,
    dev_number: int,
    dev_sectors: int,
    data_offset: int,
    size: int,
    bitmap_offset: int,
    bblog_offset: int,
    bblog_size: int,
    now: int,
    max_dev: int,
    roles: tuple[int, ...],
    events: int = 0,
    resync_offset: int | None = None,
) -> Superblock1:
    super_offset = super_offset_for(spec.minor, dev_sectors)
    feature = Feature.BITMAP_OFFSET if spec.bitmap is not BitmapKind.NONE else 0
    if resync_offset is None:
        resync_offset = MAX_SECTOR if spec.assume_clean else 0
    return Superblock1(
        magic=MD_SB_MAGIC, major_version=1, feature_map=int(feature), pad0=0, set_uuid=set_uuid,
        set_name_raw=array_name(spec.name, spec.homehost), ctime=now, level=spec.level, layout=spec.layout,
        size=size, chunksize=spec.chunk_sectors, raid_disks=spec.raid_devices, bitmap_offset=bitmap_offset,
        new_level=0, reshape_position=0, delta_disks=0, new_layout=0, new_chunk=0, new_offset=0,
        data_offset=data_offset, data_size=dev_sectors - data_offset, super_offset=super_offset,
        recovery_offset=0, dev_number=dev_number, cnt_corrected_read=0, device_uuid=secrets.token_bytes(16),
        devflags=0, bblog_shift=0, bblog_size=bblog_size, bblog_offset=bblog_offset, utime=now, events=events,
        resync_offset=resync_offset, sb_csum=0, max_dev=max_dev, logical_block_size=0, pad3=bytes(28),
        dev_roles=roles,
    ).with_checksum()  # fmt: skip


def initial_bitmap_area(spec: CreateSpec, set_uuid: bytes, sync_size: int, size: int) -> bytes:
    from llraid.bitmap.classic import ClassicBitmap
    from llraid.bitmap.lockless import LocklessBitmap

    if spec.bitmap is BitmapKind.LOCKLESS:
        sb = LocklessBitmap.new_superblock(set_uuid, sync_size, assume_clean=spec.assume_clean)
        return LocklessBitmap.initial_area(sb)
    chunk = ClassicBitmap.choose_chunksize(sync_size, choose_bm_space(size))
    csb = ClassicBitmap.new_superblock(set_uuid, sync_size, chunk)
    return ClassicBitmap.initial_area(csb)


def create(paths: Sequence[str], spec: CreateSpec, *, force: bool = False) -> list[Superblock1]:
    """Write a new array's metadata to ``paths`` (in role order); returns the superblocks."""
    validate_spec(spec)
    if len(paths) != spec.raid_devices:
        raise CreateError(f"{len(paths)} devices given for {spec.raid_devices} raid devices")
    if len({path_identity(p) for p in paths}) != len(paths):
        raise CreateError("the same device is given twice")
    devices: list[Device] = []
    try:
        for p in paths:
            devices.append(Device(p, writable=True))
        # sizes before signatures: a member that can never fit is the more useful answer
        plan_members(spec, [d.sectors for d in devices], [d.path for d in devices])
        if not force:
            for d in devices:
                found = existing_signature(d)
                if found:
                    raise CreateError(f"{d.path} appears to contain {found}; use --force to overwrite it")
        sizes = [d.sectors for d in devices]
        data_offset, size, bitmap_offset, bblog_offset, bblog_size, sync_size = plan_members(
            spec, sizes, [d.path for d in devices]
        )
        set_uuid = spec.uuid or secrets.token_bytes(16)
        now = int(time.time())
        n = spec.raid_devices
        max_dev = (-(-(256 + 2 * n) // 512) * 512 - 256) // 2
        numbers, roles, resync = _initial_roles(spec, max_dev)
        sbs = [
            build_superblock(
                spec,
                set_uuid=set_uuid,
                dev_number=numbers[i],
                dev_sectors=sizes[i],
                data_offset=data_offset,
                size=size,
                bitmap_offset=bitmap_offset,
                bblog_offset=bblog_offset,
                bblog_size=bblog_size,
                now=now,
                max_dev=max_dev,
                roles=roles,
                resync_offset=resync,
            )
            for i in range(n)
        ]
        area = (
            initial_bitmap_area(spec, set_uuid, sync_size, size)
            if spec.bitmap is not BitmapKind.NONE
            else b""
        )
        for d, sb in zip(devices, sbs, strict=True):
            _write_member(d, sb, area)
        return sbs
    finally:
        for d in devices:
            d.close()


def _initial_roles(spec: CreateSpec, max_dev: int) -> tuple[list[int], tuple[int, ...], int | None]:
    """``(dev_number per device, dev_roles, resync_offset)`` as mdadm writes them.

    raid4/5 without ``--assume-clean``: mdadm leaves the last slot empty and adds the last
    device as a spare (device number ``raid_devices``), so md builds it by recovery, which is
    faster than a resync of parity; the array is recorded clean (resync_offset MaxSector)."""
    n = spec.raid_devices
    if spec.level in (4, 5) and not spec.assume_clean:
        numbers = [*range(n - 1), n]
        roles = [*range(n - 1)] + [ROLE_SPARE] * (max_dev - n + 1)
        return numbers, tuple(roles), MAX_SECTOR
    return list(range(n)), tuple(list(range(n)) + [ROLE_SPARE] * (max_dev - n)), None


def _probe_superblock(spec: CreateSpec) -> Superblock1:
    """A superblock of the spec's geometry, only to let the level's personality validate it."""
    return build_superblock(
        spec, set_uuid=bytes(16), dev_number=0, dev_sectors=0, data_offset=0, size=0, bitmap_offset=0,
        bblog_offset=0, bblog_size=0, now=0, max_dev=spec.raid_devices, roles=tuple(range(spec.raid_devices)),
    )  # fmt: skip


def _write_member(d: Device, sb: Superblock1, bitmap_area: bytes) -> None:
    raw = sb.build()
    raw += bytes(-len(raw) % 512)
    # The whole 4 KiB superblock area, so no stale bytes of an older superblock remain.
    d.pwrite(sb.super_offset * SECTOR, raw + bytes(4096 - len(raw)))
    if bitmap_area:
        d.pwrite((sb.super_offset + sb.bitmap_offset) * SECTOR, bitmap_area)
    for minor in (0, 1, 2):  # no other md superblock may survive next to ours
        other = super_offset_for(minor, d.sectors)
        if other != sb.super_offset and int.from_bytes(d.pread(other * SECTOR, 4), "little") == MD_SB_MAGIC:
            d.pwrite(other * SECTOR, bytes(4096))
    d.sync()


def default_homehost() -> str | None:
    return os.environ.get("LLRAID_HOMEHOST") or socket.gethostname() or None
