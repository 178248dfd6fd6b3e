"""raid1: every member holds the whole array at the same data sector."""

from __future__ import annotations

from dataclasses import dataclass

from llraid.errors import AssemblyError
from llraid.raid.base import MemberIO, MirrorPersonality, Piece

# Pieces are cut at this many sectors (the llbitmap minimum chunk), so that reads and writes
# meet the sync thread's windows one chunk at a time.
PIECE = 128


@dataclass(frozen=True)
class Raid1(MirrorPersonality):
    raid_disks: int
    array_sectors: int
    level: int = 1

    @property
    def sync_sectors(self) -> int:
        return self.array_sectors

    def check_roles(self, roles: set[int]) -> None:
        if not roles & set(range(self.raid_disks)):
            raise AssemblyError("too few members to read: raid1 needs at least one in-sync member")

    def pieces(self, sector: int, count: int) -> list[Piece]:
        out = []
        end = sector + count
        roles = range(self.raid_disks)
        while sector < end:
            n = min(end - sector, PIECE - sector % PIECE)
            out.append(Piece(sector, n, tuple((r, sector) for r in roles)))
            sector += n
        return out

    def member_to_sync(self, role: int, msector: int) -> int | None:
        return msector if msector < self.array_sectors else None

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        # One request per member when a single copy covers the whole range: far fewer calls.
        for role in range(self.raid_disks):
            if io.available(role, sector, count):
                return io.read(role, sector, count)
        return super().read(io, sector, count)
