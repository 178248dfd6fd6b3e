"""raid10 (near, far and offset copies) on top of :class:`Raid10Geometry`."""

from __future__ import annotations

from dataclasses import dataclass

from llraid.errors import AssemblyError
from llraid.raid.base import MirrorPersonality, Piece
from llraid.raid.layout import Raid10Geometry


@dataclass(frozen=True)
class Raid10(MirrorPersonality):
    geo: Raid10Geometry
    level: int = 10

    @property
    def raid_disks(self) -> int:
        return self.geo.raid_disks

    @property
    def array_sectors(self) -> int:
        return self.geo.array_sectors

    @property
    def sync_sectors(self) -> int:
        return self.geo.array_sectors  # raid10 resyncs (and its bitmap covers) array sectors

    @property
    def recovery_unit(self) -> int:
        return self.geo.chunk_sectors  # a recovery window stays inside one chunk's copies

    def check_roles(self, roles: set[int]) -> None:
        # Which members hold a chunk depends only on (chunk * near) mod raid_disks, so the
        # first raid_disks chunks show every copy set the array has (a tiny array has fewer).
        for chunk in range(min(self.geo.raid_disks, self.geo.array_sectors // self.geo.chunk_sectors)):
            copies = self.geo.find_phys(chunk * self.geo.chunk_sectors)
            if not any(role in roles for role, _ in copies):
                held = sorted({role for role, _ in copies})
                raise AssemblyError(
                    f"too few members to read: every copy of array chunk {chunk} is missing (roles {held})"
                )

    def pieces(self, sector: int, count: int) -> list[Piece]:
        out = []
        chunk = self.geo.chunk_sectors
        end = sector + count
        while sector < end:
            n = min(end - sector, chunk - sector % chunk)  # copies are contiguous within a chunk
            out.append(Piece(sector, n, tuple(self.geo.find_phys(sector))))
            sector += n
        return out

    def member_to_sync(self, role: int, msector: int) -> int | None:
        if msector >= self.geo.dev_sectors:
            return None
        v = self.geo.find_virt(msector, role)
        return v if v < self.geo.array_sectors else None  # incomplete last row: nothing there
