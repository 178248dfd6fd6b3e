"""raid1: every member holds the whole array at the same data sector."""

from __future__ import annotations

from dataclasses import dataclass

from llraid.errors import AssemblyError
from llraid.raid.base import MemberIO, NoCopyError

# When no single member covers a whole read (a member part-way through recovery), retry in
# pieces of this many sectors, the llbitmap minimum chunk.
PIECE = 128


@dataclass(frozen=True)
class Raid1:
    raid_disks: int
    array_sectors: int
    level: int = 1

    def check_roles(self, roles: set[int]) -> None:
        if not roles & set(range(self.raid_disks)):
            raise AssemblyError("too few members to read: raid1 needs at least one in-sync member")

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        # Always the first usable copy in slot order: inside a region that still needs
        # resync the copies may differ, and reading one fixed copy keeps reads consistent.
        for role in range(self.raid_disks):
            if io.available(role, sector, count):
                return io.read(role, sector, count)
        if count <= PIECE:
            raise NoCopyError(f"no in-sync copy of array sectors {sector}..{sector + count - 1}")
        out = bytearray()
        for s in range(sector, sector + count, PIECE):
            out += self.read(io, s, min(PIECE, sector + count - s))
        return bytes(out)
