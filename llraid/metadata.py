"""Metadata made for new members: what both ``create`` and the running array (adding a spare or
a replacement) write, kept apart so the running array never imports the create command."""

from __future__ import annotations

import dataclasses
import secrets

from llraid.device import SECTOR, Device
from llraid.errors import LlraidError
from llraid.format.superblock import MD_SB_MAGIC, ROLE_SPARE, Feature, Superblock1, super_offset_for


class CreateError(LlraidError):
    """A create request that would produce an unusable or unsafe array."""


_SIGNATURES = (  # (byte offset, magic, what)
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (65600, b"_BHRfS_M", "a btrfs file system"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (4086, b"SWAPSPACE2", "swap space"),
    (512, b"EFI PART", "a GPT partition table"),
    (3, b"NTFS    ", "an NTFS file system"),
    (54, b"FAT1", "a FAT file system"),
    (82, b"FAT32   ", "a FAT32 file system"),
    (32769, b"CD001", "an ISO 9660 file system"),
)


def existing_signature(device: Device) -> str | None:
    """What the device already holds that creating would destroy (None: looks empty)."""
    sectors = device.sectors
    for minor in (0, 1, 2):
        if sectors < 24:
            break
        off = super_offset_for(minor, sectors) * SECTOR
        if off + 4 <= device.size and int.from_bytes(device.pread(off, 4), "little") == MD_SB_MAGIC:
            return f"an md superblock (metadata 1.{minor})"
    v090 = (device.size & ~0xFFFF) - 0x10000
    if v090 >= 0 and int.from_bytes(device.pread(v090, 4), "little") == MD_SB_MAGIC:
        return "an md superblock (metadata 0.90)"
    for off, magic, what in _SIGNATURES:
        if off + len(magic) <= device.size and device.pread(off, len(magic)) == magic:
            return what
    if device.size >= 512 and device.pread(510, 2) == b"\x55\xaa" and any(device.pread(446, 64)):
        return "a partition table"
    return None


def new_member_superblock(
    ref: Superblock1, device: Device, dev_number: int, *, force: bool = False
) -> Superblock1:
    """Superblock for a new member joining the array of ``ref`` (spare or replacement)."""
    if not force:
        found = existing_signature(device)
        if found:
            raise CreateError(f"{device.path} appears to contain {found}; use --force to overwrite it")
    minor = 2 if ref.super_offset == 8 else (1 if ref.super_offset == 0 else 0)
    super_offset = super_offset_for(minor, device.sectors)
    if device.sectors - ref.data_offset < ref.size:
        need = ref.data_offset + ref.size
        raise CreateError(f"{device.path} is too small: {device.sectors} sectors, the array needs {need}")
    return dataclasses.replace(
        ref,
        dev_number=dev_number,
        device_uuid=secrets.token_bytes(16),
        super_offset=super_offset,
        data_size=device.sectors - ref.data_offset,
        recovery_offset=0,
        cnt_corrected_read=0,
        devflags=0,
        feature_map=ref.feature_map & (Feature.BITMAP_OFFSET),
        max_dev=max(ref.max_dev, dev_number + 1),
        dev_roles=tuple(list(ref.dev_roles) + [ROLE_SPARE] * max(0, dev_number + 1 - ref.max_dev)),
    ).with_checksum()
