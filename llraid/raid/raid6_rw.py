"""raid6 for the running array: :class:`Raid6`'s reads plus writes, sync and recovery.

Same addressing, locking and bitmap rules as raid4/5 (:mod:`llraid.raid.parity`): the sync
space is member sectors of whole stripe rows, a stripe row is locked while it is updated and
while a missing block of it is rebuilt for a read.

Writes, per segment of a stripe row in which every data block is wholly written or untouched,
are reconstruct-writes: P and Q are computed from the full data of the segment, the new blocks
plus the kept ones, read where their member is available and rebuilt from the rest of the row
(P, Q and the old contents of the blocks being replaced) where it is not, so whatever a
missing block read as before the write it reads as after it. A full-stripe write reads
nothing. (md also has a read-modify-write for raid6; reconstruct-write is always correct, never
relies on parity that may be stale, and is what md forces while an llbitmap chunk's parity
has not been built.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llraid.bitmap.base import SyncKind
from llraid.errors import AssemblyError, DeviceError, IOFailure
from llraid.raid import gf256
from llraid.raid.base import ArrayIO, SyncIO
from llraid.raid.gf256 import Block
from llraid.raid.layout import StripeLayout
from llraid.raid.parity import PAGE_SECTORS, SECTOR, StripeLocks, row_writes, write_role
from llraid.raid.raid6 import Raid6
from llraid.rdev import Rdev

RETRIES = 3  # a read error fails its member and the row is read again (raid6 survives two)


class _Members:
    """The running array seen as :class:`~llraid.raid.base.MemberIO` (what :class:`Raid6`'s
    stripe maths reads through); a member whose read fails is failed (md_error) and the
    error goes up so the caller retries without it."""

    def __init__(self, io: ArrayIO, accounted: SyncIO | None = None, exclude: int | None = None) -> None:
        self.io = io
        self.sync = accounted
        self.exclude = exclude  # a role treated as missing (its read just failed)

    def available(self, role: int, sector: int, count: int) -> bool:
        if role == self.exclude:
            return False
        return self.io.by_role(role) is not None and self.io.available(role, sector, count)

    def read(self, role: int, sector: int, count: int) -> bytes:
        d = self.io.by_role(role)
        assert d is not None
        try:
            if self.sync is not None:
                return self.sync.read(d, sector, count)
            return self.io.read_member(d, sector, count)
        except DeviceError as e:
            self.io.fail(d, reason=str(e))  # IOFailure if the array cannot lose it
            raise


@dataclass(frozen=True)
class Raid6Runtime(Raid6):
    _locks: StripeLocks = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_locks", StripeLocks())

    # ---- facts ------------------------------------------------------------------------------

    @property
    def sync_sectors(self) -> int:
        return self.geo.dev_sectors

    @property
    def recovery_unit(self) -> int:
        return self.geo.chunk_sectors

    def bitmap_range(self, sector: int, count: int) -> tuple[int, int]:
        start, end = self.geo.bitmap_range(sector, count)
        return start, end - start

    def member_to_sync(self, role: int, msector: int) -> int | None:
        return msector if msector < self.geo.dev_sectors else None

    def check_roles(self, roles: set[int]) -> None:
        missing = set(range(self.geo.raid_disks)) - roles
        if len(missing) > 2:
            raise AssemblyError(f"too few members: raid6 can lose two members, {sorted(missing)} are missing")

    def _rows(self, msector: int, count: int) -> list[tuple[int, int]]:
        """``[msector, msector+count)`` cut at stripe-row boundaries."""
        out = []
        end = msector + count
        while msector < end:
            n = min(end - msector, self.geo.chunk_sectors - (msector & self.geo.chunk_mask))
            out.append((msector, n))
            msector += n
        return out

    def _blocks(
        self,
        io: ArrayIO,
        ms: int,
        n: int,
        roles: list[int],
        sio: SyncIO | None = None,
        exclude: int | None = None,
    ) -> dict[int, Block]:
        """``roles`` of one row segment, read or rebuilt. A read error has failed its member
        (:class:`_Members`), so the segment is simply read again without it."""
        last: Exception | None = None
        for _ in range(RETRIES):
            try:
                return self.stripe_blocks(_Members(io, sio, exclude), ms, n, roles)
            except DeviceError as e:
                last = e
            except AssemblyError as e:  # NoCopyError: three blocks of the row are gone
                raise IOFailure(str(e)) from None
        raise IOFailure(f"member sectors {ms}..{ms + n - 1}: reads keep failing ({last})")

    # ---- reads ------------------------------------------------------------------------------

    def make_read(self, io: ArrayIO, sector: int, count: int) -> bytes:
        geo = self.geo
        parts: list[bytes] = []
        end = sector + count
        while sector < end:
            n = min(end - sector, geo.chunk_sectors - (sector & geo.chunk_mask))
            dd, _p, _q, ms = geo.compute_sector(sector)
            d = io.by_role(dd)
            if d is not None and io.available(dd, ms, n):
                try:
                    parts.append(io.read_member(d, ms, n))
                    sector += n
                    continue
                except DeviceError:  # md: rebuild from the others and rewrite the bad block
                    with self._locks.of(ms >> geo.chunk_shift):
                        good = self._blocks(io, ms, n, [dd], exclude=dd)[dd].tobytes()
                    io.fix_read_error(d, ms, good)
                    parts.append(good)
                    sector += n
                    continue
            with self._locks.of(ms >> geo.chunk_shift):
                parts.append(self._blocks(io, ms, n, [dd])[dd].tobytes())
            sector += n
        return b"".join(parts)

    # ---- writes -----------------------------------------------------------------------------

    def make_write(self, io: ArrayIO, sector: int, data: memoryview, fua: bool) -> None:
        for stripe, segments in row_writes(self.geo, sector, data):
            with self._locks.of(stripe):
                row = self.geo.stripe(stripe)
                for ms, n, new in segments:
                    self._write_segment(io, row, ms, n, new, fua)

    def _write_segment(
        self, io: ArrayIO, row: StripeLayout, ms: int, n: int, new: dict[int, Block], fua: bool
    ) -> None:
        kept_roles = [row.data_roles[k] for k in range(len(row.data_roles)) if k not in new]
        kept = self._blocks(io, ms, n, kept_roles) if kept_roles else {}
        slots: list[Block | None] = [None] * row.syndrome_disks
        for k, role in enumerate(row.data_roles):
            slots[row.slots[k]] = new[k] if k in new else kept[role]
        p, q = gf256.gen_syndrome(slots)
        targets = [(row.data_roles[k], block) for k, block in new.items()]
        targets += [(row.p_role, p), (row.q_role, q)]
        for role, block in targets:
            write_role(io, role, ms, block, fua)

    # ---- sync -------------------------------------------------------------------------------

    def sync_window(self, sio: SyncIO, kind: SyncKind, sector: int, count: int) -> None:
        """P and Q compared with the data's syndrome per 4 KiB page; resync and repair rewrite
        what differs. Rows with a member missing have nothing to compare against."""
        io = sio.array
        for ms, n in self._rows(sector, count):
            row = self.geo.stripe(ms >> self.geo.chunk_shift)
            roles = [*row.data_roles, row.p_role, row.q_role]
            if not all(io.by_role(r) is not None and io.available(r, ms, n) for r in roles):
                continue
            got = self._blocks(io, ms, n, roles, sio)
            slots: list[Block | None] = [None] * row.syndrome_disks
            for k, role in enumerate(row.data_roles):
                slots[row.slots[k]] = got[role]
            p, q = gf256.gen_syndrome(slots)
            page = PAGE_SECTORS * SECTOR
            bad_p = (p != got[row.p_role]).reshape(-1, page).any(axis=1)
            bad_q = (q != got[row.q_role]).reshape(-1, page).any(axis=1)
            bad = int(np.count_nonzero(bad_p | bad_q))
            if not bad:
                continue
            sio.mismatch(bad * PAGE_SECTORS)
            if kind is SyncKind.CHECK:
                continue
            for role, block, wrong in ((row.p_role, p, bad_p), (row.q_role, q, bad_q)):
                if not wrong.any():
                    continue
                for d in (io.by_role(role), io.replacement(role)):
                    if d is not None:
                        self._sync_write(sio, d, ms, block)
            sio.repaired(bad * PAGE_SECTORS)

    @staticmethod
    def _sync_write(sio: SyncIO, d: Rdev, ms: int, block: Block) -> None:
        try:
            sio.write(d, ms, block.tobytes())
        except DeviceError as e:
            sio.array.fail(d, reason=str(e))

    def audit_window(self, sio: SyncIO, sector: int, count: int) -> tuple[bool, bool]:
        """Non-zero data blocks in an Unwritten window (parity may be unbuilt there: lazy)."""
        io = sio.array
        nonzero = False
        for ms, n in self._rows(sector, count):
            for r in self.geo.stripe(ms >> self.geo.chunk_shift).data_roles:
                if io.by_role(r) is not None and io.available(r, ms, n):
                    nonzero = nonzero or any(_Members(io, sio).read(r, ms, n))
        return nonzero, False

    def recover_window(self, sio: SyncIO, target: Rdev, msector: int, sector: int, count: int) -> None:
        """Rebuild ``target``'s member sectors: a copy of the member it replaces if that one is
        readable, else its blocks (data, P or Q) from the rest of each row."""
        io = sio.array
        assert target.role is not None
        old = io.by_role(target.role)
        if old is not None and old is not target and io.available(target.role, msector, count):
            sio.write(target, msector, _Members(io, sio).read(target.role, msector, count))
            return
        out = [
            self._blocks(io, ms, n, [target.role], sio)[target.role] for ms, n in self._rows(msector, count)
        ]
        sio.write(target, msector, b"".join(b.tobytes() for b in out))
