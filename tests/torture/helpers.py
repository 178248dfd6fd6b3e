"""Small arrays on files for the torture tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llraid.array import Array
from llraid.create import CreateSpec, create, parse_layout
from llraid.device import SECTOR
from llraid.format.bitmap import BitmapKind
from llraid.member import open_member
from llraid.sync import run_sync

MiB = 1 << 20
BITMAP = {"none": BitmapKind.NONE, "classic": BitmapKind.CLASSIC, "lockless": BitmapKind.LOCKLESS}


def blank(path: Path, size: int = 8 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def new_array(
    where: Path,
    *,
    level: int = 1,
    disks: int = 2,
    layout: str | None = None,
    bitmap: str = "lockless",
    chunk: int = 1024,
    size: int = 8 * MiB,
) -> list[str]:
    """A new array (first start done, stopped cleanly) on ``disks`` files."""
    paths = [blank(where / f"m{i}.img", size) for i in range(disks)]
    kind = BITMAP[bitmap]
    spec = CreateSpec(
        level=level,
        raid_devices=disks,
        layout=parse_layout(level, layout),
        chunk_sectors=chunk if level in (4, 5, 10) else 0,
        bitmap=kind,
        assume_clean=kind is not BitmapKind.LOCKLESS,
        name="tt",
        minor=2,
        size=None,
        homehost="torture",
    )
    create(paths, spec)
    with Array.assemble(paths, bitmap_threads=False) as a:
        run_sync(a)
    return paths


def pattern(tag: int, sectors: int) -> bytes:
    return bytes([tag]) * (sectors * SECTOR)


def poke(path: str, msector: int, data: bytes) -> None:
    """Overwrite member data sectors behind the array's back."""
    m = open_member(path)
    off = m.sb.data_offset * SECTOR
    m.device.close()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, off + msector * SECTOR)
    finally:
        os.close(fd)


def rewrite_sb(path: str, **changes: Any) -> None:
    """Change fields of a member's superblock (checksum recomputed)."""
    m = open_member(path)
    sb = dataclasses.replace(m.sb, **changes).with_checksum()
    m.device.close()
    raw = sb.build()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, raw + bytes(-len(raw) % SECTOR), sb.super_offset * SECTOR)
    finally:
        os.close(fd)
