"""raid6: striped data with two parity blocks per stripe row, P (XOR) and Q (Reed-Solomon).

Read-only here: a read of a member that is missing (or not in sync for the range) is rebuilt
from the rest of its stripe row, whichever two blocks of the row are gone: one data block
from P, or from Q when P is gone too; two data blocks from P and Q together. The Q arithmetic
takes the data blocks in the kernel's syndrome slot order (:class:`StripeLayout`), which is
not the array order for every layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from llraid.errors import AssemblyError
from llraid.raid import gf256
from llraid.raid.base import MemberIO, NoCopyError
from llraid.raid.gf256 import Block
from llraid.raid.layout import Raid6Geometry, StripeLayout

SECTOR = 512


@dataclass(frozen=True)
class Raid6:
    geo: Raid6Geometry

    @property
    def level(self) -> int:
        return 6

    @property
    def raid_disks(self) -> int:
        return self.geo.raid_disks

    @property
    def array_sectors(self) -> int:
        return self.geo.array_sectors

    def check_roles(self, roles: set[int]) -> None:
        missing = set(range(self.geo.raid_disks)) - roles
        if len(missing) > 2:
            raise AssemblyError(
                f"too few members to read: raid6 can lose two members, {sorted(missing)} are missing"
            )

    def read(self, io: MemberIO, sector: int, count: int) -> bytes:
        parts: list[bytes] = []
        width = self.geo.chunk_sectors * self.geo.data_disks  # array sectors per stripe row
        end = sector + count
        while sector < end:
            n = min(end, sector - sector % width + width) - sector
            self._read_row(io, sector, n, parts)
            sector += n
        return b"".join(parts)

    def _read_row(self, io: MemberIO, sector: int, count: int, parts: list[bytes]) -> None:
        """Append ``count`` array sectors from ``sector``, all inside one stripe row, to ``parts``."""
        geo = self.geo
        chunk = geo.chunk_sectors
        pieces: list[tuple[int, int, int]] = []  # (data role, member sector, sectors)
        end = sector + count
        while sector < end:
            n = min(end - sector, chunk - sector % chunk)
            dd, _pd, _qd, msector = geo.compute_sector(sector)
            pieces.append((dd, msector, n))
            sector += n
        lost = [(dd, ms, n) for dd, ms, n in pieces if not io.available(dd, ms, n)]
        rebuilt: dict[int, Block] = {}
        lo = 0
        if lost:
            # One rebuild over the member range every lost piece shares: a row lost twice over
            # (two data members gone) is solved once, not once per piece.
            lo = min(ms for _, ms, _ in lost)
            hi = max(ms + n for _, ms, n in lost)
            rebuilt = self.stripe_blocks(io, lo, hi - lo, {dd for dd, _, _ in lost})
        for dd, ms, n in pieces:
            block = rebuilt.get(dd)
            if block is None:
                parts.append(io.read(dd, ms, n))
            else:
                start = (ms - lo) * SECTOR
                parts.append(block[start : start + n * SECTOR].tobytes())

    def stripe_blocks(self, io: MemberIO, msector: int, count: int, roles: Iterable[int]) -> dict[int, Block]:
        """The contents of ``roles`` (data, P or Q) at member sectors ``[msector,
        msector + count)`` of one stripe row, read where the member is available and rebuilt
        from the rest of the row where it is not.

        Reads only what the rebuild needs: one lost data block takes the row's other data and
        P (Q only when P is lost too); P or Q themselves are regenerated from the data.
        """
        geo = self.geo
        stripe = msector >> geo.chunk_shift
        if (msector + count - 1) >> geo.chunk_shift != stripe or count <= 0:
            raise ValueError(f"member sectors {msector}+{count} are not inside one stripe row")
        row = geo.stripe(stripe)
        wanted = sorted(set(roles))
        missing = [r for r in range(geo.raid_disks) if not io.available(r, msector, count)]
        if not any(r in missing for r in wanted):
            return {r: _read(io, r, msector, count) for r in wanted}
        if len(missing) > 2:
            raise NoCopyError(
                f"cannot rebuild member sectors {msector}..{msector + count - 1} of roles "
                f"{[r for r in wanted if r in missing]}: roles {missing} are all missing"
            )
        data, lost_slots = self._data_by_slot(io, row, msector, count, missing)
        p_ok = row.p_role not in missing
        p = _read(io, row.p_role, msector, count) if p_ok and lost_slots else None
        if len(lost_slots) == 2:
            assert p is not None
            q = _read(io, row.q_role, msector, count)
            x, y = lost_slots
            data[x], data[y] = gf256.recover_two_data(data, x, y, p, q)
        elif len(lost_slots) == 1:
            (x,) = lost_slots
            if p is not None:
                data[x] = gf256.recover_data_from_p(data, x, p)
            else:
                data[x] = gf256.recover_data_from_q(data, x, _read(io, row.q_role, msector, count))
        out: dict[int, Block] = {}
        for r in wanted:
            if r not in missing:
                out[r] = _read(io, r, msector, count)
            elif r == row.p_role:
                out[r] = gf256.p_syndrome(data)
            elif r == row.q_role:
                out[r] = gf256.q_syndrome(data)
            else:
                k = row.data_index(r)
                assert k is not None
                block = data[row.slots[k]]
                assert block is not None
                out[r] = block
        return out

    @staticmethod
    def _data_by_slot(
        io: MemberIO, row: StripeLayout, msector: int, count: int, missing: list[int]
    ) -> tuple[list[Block | None], list[int]]:
        """The row's data blocks in syndrome slot order (``None`` where lost or, for DDF,
        where the slot is empty) and the slots that are lost."""
        data: list[Block | None] = [None] * row.syndrome_disks
        lost: list[int] = []
        for role, slot in zip(row.data_roles, row.slots, strict=True):
            if role in missing:
                lost.append(slot)
            else:
                data[slot] = _read(io, role, msector, count)
        return data, sorted(lost)


def _read(io: MemberIO, role: int, msector: int, count: int) -> Block:
    return np.frombuffer(io.read(role, msector, count), dtype=np.uint8)
