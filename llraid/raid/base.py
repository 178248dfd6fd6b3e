"""What a personality (raid1, raid10, raid5) needs from the array, and what it offers.

A personality maps array sectors to member sectors and does the reads; the array (see
:mod:`llraid.assemble`) owns the members. Member sectors here are relative to each member's
data area (``data_offset`` is added by the array), and members are named by role.
"""

from __future__ import annotations

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
