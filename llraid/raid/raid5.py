"""raid4/raid5: striped data with one rotating (raid5) or fixed (raid4) parity chunk.

A read of a missing member's data is rebuilt as the XOR of every other member of the stripe
at the same member sector (data and parity alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llraid.errors import AssemblyError
from llraid.raid.base import MemberIO, NoCopyError
from llraid.raid.layout import Raid5Geometry


@dataclass(frozen=True)
class Raid5:
    geo: Raid5Geometry

    @property
    def level(self) -> int:
        return self.geo.level

    @property
    def raid_disks(self) -> int:
        return self.geo.raid_disks

    @property
    def array_sectors(self) -> int:
        return self.geo.array_sectors

    def check_roles(self, roles: set[int]) -> None:
        missing = set(range(self.geo.raid_disks)) - roles
        if len(missing) > 1:
            lost = sorted(missing)
            raise AssemblyError(
                f"too few members to read: raid{self.level} can lose one member, {lost} are missing"
            )

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        out = bytearray()
        chunk = self.geo.chunk_sectors
        end = sector + count
        while sector < end:
            n = min(end - sector, chunk - sector % chunk)
            dd, _pd, msector = self.geo.compute_sector(sector)
            if io.available(dd, msector, n):
                out += io.read(dd, msector, n)
            else:
                out += self._reconstruct(io, dd, msector, n)
            sector += n
        return bytes(out)

    def _reconstruct(self, io: MemberIO, missing: int, msector: int, n: int) -> bytes:
        acc = np.zeros(n * 512, dtype=np.uint8)
        for role in range(self.geo.raid_disks):
            if role == missing:
                continue
            if not io.available(role, msector, n):
                raise NoCopyError(
                    f"cannot rebuild member sectors {msector}..{msector + n - 1} of role {missing}: "
                    f"role {role} is missing too"
                )
            acc ^= np.frombuffer(io.read(role, msector, n), dtype=np.uint8)
        return acc.tobytes()
