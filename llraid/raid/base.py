"""What a personality (raid1, raid10, raid5) needs from the array, and what it offers.

A personality maps array sectors to member sectors; the array (:mod:`llraid.array`, or the
read-only :mod:`llraid.assemble`) owns the members and does the IO. Member sectors here are
relative to each member's data area (``data_offset`` is added by the array), and members are
named by role.

Mirrored personalities (raid1, raid10) describe every request as :class:`Piece` s: a run of
array sectors and, for each copy, the member role and member sector holding it. Reads use one
copy, writes go to every copy, resync compares or copies between them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from llraid.errors import AssemblyError


class MemberIO(Protocol):
    def available(self, role: int, sector: int, count: int) -> bool:
        """True if the member in ``role`` is present and in sync for the whole range."""
        ...

    def read(self, role: int, sector: int, count: int) -> bytes:
        """``count`` sectors from the member in ``role`` at data sector ``sector``."""
        ...


class Personality(Protocol):
    @property
    def level(self) -> int: ...

    @property
    def raid_disks(self) -> int: ...

    @property
    def array_sectors(self) -> int: ...

    def check_roles(self, roles: set[int]) -> None:
        """Raise :class:`AssemblyError` unless the array can serve all data with these roles."""
        ...

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        """``count`` array sectors from array sector ``sector``."""
        ...


class NoCopyError(AssemblyError):
    """No member holding a copy of the requested data is available."""


@dataclass(frozen=True)
class Piece:
    sector: int  # array sector
    count: int  # sectors; every copy is contiguous on its member
    copies: tuple[tuple[int, int], ...]  # (role, member sector), in the kernel's slot order


class MirrorPersonality(ABC):
    """raid1 and raid10: every array sector has several identical copies."""

    @property
    @abstractmethod
    def sync_sectors(self) -> int:
        """Size of the resync / bitmap address space (raid1: member sectors; raid10: array)."""

    @abstractmethod
    def pieces(self, sector: int, count: int) -> list[Piece]:
        """The request cut into pieces whose copies are each contiguous."""

    @abstractmethod
    def member_to_sync(self, role: int, msector: int) -> int | None:
        """The sync-space sector that member sector ``msector`` of ``role`` holds (None: none)."""

    def bitmap_range(self, sector: int, count: int) -> tuple[int, int]:
        """Bitmap range of an array request: the same sectors for mirrored levels."""
        return sector, count

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        # The first usable copy in slot order: inside a region that still needs resync the
        # copies may differ, and reading one fixed copy keeps reads consistent.
        out = bytearray()
        for p in self.pieces(sector, count):
            for role, msector in p.copies:
                if io.available(role, msector, p.count):
                    out += io.read(role, msector, p.count)
                    break
            else:
                raise NoCopyError(f"no in-sync copy of array sectors {p.sector}..{p.sector + p.count - 1}")
        return bytes(out)
