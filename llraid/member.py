"""Finding and loading the md metadata of one member: superblock and bitmap header.

mdadm finds a v1.x superblock by trying the three places the minor versions use (1.0 near
the end, 1.1 at sector 0, 1.2 at sector 8); a candidate counts only if its stored
``super_offset`` equals the place it was found. If several match (a device re-created with
another minor version), the newest creation time wins, as in mdadm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llraid.device import SECTOR, Device
from llraid.errors import DeviceError, FormatError, NotMdMemberError
from llraid.format.bitmap import BITMAP_SB_BYTES, BitmapSuper
from llraid.format.superblock import MD_SB_MAGIC, SB_AREA_BYTES, Superblock1, super_offset_for

MIN_DEVICE_SECTORS = 24  # mdadm refuses anything smaller


@dataclass
class Member:
    """A device with its parsed superblock and, if it has one, its bitmap superblock."""

    device: Device
    sb: Superblock1
    bitmap_sb: BitmapSuper | None = None
    bitmap_error: str | None = None  # why the bitmap header could not be read, if it could not

    @property
    def path(self) -> str:
        return self.device.path

    @property
    def checksum_problem(self) -> str | None:
        """One line saying found and expected checksum, or ``None`` when it is correct."""
        if self.sb.checksum_ok:
            return None
        sb = self.sb
        return f"{self.path}: superblock checksum is {sb.sb_csum:08x}, expected {sb.computed_checksum:08x}"

    @property
    def bitmap_sector(self) -> int:
        """Absolute member sector where the bitmap area starts."""
        return self.sb.super_offset + self.sb.bitmap_offset

    def read_bitmap_area(self, length: int) -> bytes:
        return self.device.pread(self.bitmap_sector * SECTOR, length)


def _candidates(device: Device) -> list[tuple[int, int]]:
    sectors = device.sectors
    places = [(2, super_offset_for(2, sectors)), (1, super_offset_for(1, sectors))]
    if sectors >= MIN_DEVICE_SECTORS:
        places.append((0, super_offset_for(0, sectors)))
    return places


def _has_v090(device: Device) -> bool:
    # 0.90 keeps its superblock in the last 64 KiB-aligned 64 KiB of the device.
    pos = (device.size & ~0xFFFF) - 0x10000
    if pos < 0:
        return False
    head = device.pread(pos, 8)
    return int.from_bytes(head[:4], "little") == MD_SB_MAGIC and int.from_bytes(head[4:], "little") == 0


def find_superblock(device: Device, minor: int | None = None) -> Superblock1:
    """The device's v1.x superblock, or a clear error saying why there is none."""
    if device.sectors < MIN_DEVICE_SECTORS:
        raise DeviceError(f"{device.path}: device is truncated ({device.size} bytes), too small for md")
    found: list[Superblock1] = []
    errors: list[str] = []
    for m, offset in _candidates(device):
        if minor is not None and m != minor:
            continue
        if offset * SECTOR + SB_AREA_BYTES > device.size:
            continue
        raw = device.pread(offset * SECTOR, SB_AREA_BYTES)
        try:
            sb = Superblock1.parse(raw)
        except NotMdMemberError:
            continue
        except FormatError as e:
            errors.append(f"metadata 1.{m}: {e}")
            continue
        if sb.super_offset != offset:
            continue  # md data that happens to contain a superblock image, not ours
        found.append(sb)
    if found:
        return max(found, key=lambda s: s.ctime_seconds)
    if errors:
        raise FormatError(f"{device.path}: {errors[0]}")
    if _has_v090(device):
        raise FormatError(f"{device.path}: md metadata 0.90 is not supported (only 1.0, 1.1, 1.2)")
    raise NotMdMemberError(f"{device.path}: not an md member (no v1.x superblock found)")


def load_member(device: Device, minor: int | None = None) -> Member:
    """Superblock plus bitmap header; a bitmap problem is recorded, not raised."""
    sb = find_superblock(device, minor)
    member = Member(device, sb)
    if sb.has_bitmap:
        try:
            member.bitmap_sb = BitmapSuper.parse(member.read_bitmap_area(BITMAP_SB_BYTES))
        except (FormatError, DeviceError) as e:
            member.bitmap_error = str(e)
    return member


DeviceOpener = Callable[[str, bool], Device]  # (path, writable) -> device; tests put simulations here


def open_device(path: str, *, writable: bool, opener: DeviceOpener | None = None) -> Device:
    """The one place member devices are opened (``opener``: tests' simulated devices)."""
    return opener(path, writable) if opener else Device(path, writable=writable)


def open_member(
    path: str, minor: int | None = None, *, writable: bool = False, opener: DeviceOpener | None = None
) -> Member:
    device = open_device(path, writable=writable, opener=opener)
    try:
        return load_member(device, minor)
    except BaseException:
        device.close()
        raise
