"""The read-write engine of the parity levels (md's raid5.c, without its stripe cache).

Addresses: the sync space and the bitmap cover member sectors (whole stripe rows, see
LAYOUTS 5.5), so a write enters the barrier and the bitmap with its rows' member range and a
sync window is a member-sector range of one or more rows.

Writes (md's ``handle_stripe_dirtying``), per segment of a stripe row in which every data
block is either wholly written or untouched:

* every data block written (full stripe): parity from the new data, nothing read;
* otherwise read-modify-write (read the old data being replaced and the old parity) or
  reconstruct-write (read the data not being replaced), whichever reads fewer blocks; md
  prefers reconstruct-write on a tie;
* reconstruct-write is forced while the parity of the row is not known to be valid (above
  the resync checkpoint, or an llbitmap chunk whose parity was never built: ``parity_known``);
* degraded: a missing block being written forces reconstruct-write, a missing block not
  being written forces read-modify-write (which keeps what the missing block reads as,
  whatever the parity held), a missing parity block is simply not written.

A stripe row is locked while it is read and written (concurrent writes to one row serialise,
other rows proceed); reads that must reconstruct a missing block take the same lock, so they
never see a row half updated.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from llraid.bitmap.base import SyncKind
from llraid.errors import AssemblyError, DeviceError, IOFailure
from llraid.raid.base import ArrayIO, SyncIO
from llraid.raid.raid5 import Raid5
from llraid.rdev import Rdev

SECTOR = 512
PAGE_SECTORS = 8  # md compares and counts parity in 4 KiB stripe pages (mismatch_cnt in sectors)
NR_STRIPE_LOCKS = 256

Block = npt.NDArray[np.uint8]


def xor_blocks(blocks: list[Block]) -> Block:
    acc = blocks[0].copy()
    for b in blocks[1:]:
        acc ^= b
    return acc


def as_block(data: bytes | memoryview) -> Block:
    return np.frombuffer(data, dtype=np.uint8)


class _ReadFailed(Exception):
    """A member failed a read while a write was planning its parity; it is failed now."""


@dataclass(frozen=True)
class RowMap:
    """Who holds what in one stripe row."""

    data: tuple[int, ...]  # role of each data block, in array (logical) order
    parity: int  # role of the parity block


class StripeGeometry(Protocol):
    """What cutting writes into stripe rows needs of a raid4/5/6 geometry."""

    @property
    def chunk_sectors(self) -> int: ...

    @property
    def chunk_shift(self) -> int: ...

    @property
    def data_disks(self) -> int: ...


Segment = tuple[int, int, dict[int, Block]]  # (member sector, sectors, {data index: new block})


def row_writes(geo: StripeGeometry, sector: int, data: memoryview) -> Iterator[tuple[int, list[Segment]]]:
    """A write of whole sectors cut into stripe rows, and each row into segments in which every
    data block is either wholly written or untouched: ``(stripe, segments)`` per row."""
    chunk = geo.chunk_sectors
    width = chunk * geo.data_disks
    end = sector + len(data) // SECTOR
    pos = sector
    while pos < end:
        stripe = pos // width
        row_start, row_end = stripe * width, min(end, (stripe + 1) * width)
        spans: dict[int, tuple[int, int]] = {}  # data index -> written part, chunk-relative
        for i in range(geo.data_disks):
            lo = max(pos, row_start + i * chunk) - row_start - i * chunk
            hi = min(row_end, row_start + (i + 1) * chunk) - row_start - i * chunk
            if lo < hi:
                spans[i] = (lo, hi)
        cuts = sorted({0, chunk} | {x for span in spans.values() for x in span})
        segments: list[Segment] = []
        for a, b in itertools.pairwise(cuts):
            new: dict[int, Block] = {}
            for i, (lo, hi) in spans.items():
                if lo <= a and b <= hi:
                    off = (row_start + i * chunk + a - sector) * SECTOR
                    new[i] = as_block(data[off : off + (b - a) * SECTOR])
            if new:
                segments.append(((stripe << geo.chunk_shift) + a, b - a, new))
        yield stripe, segments
        pos = row_end


def write_role(io: ArrayIO, role: int, ms: int, block: Block, fua: bool) -> None:
    """A block to the member serving ``role`` and to its replacement being built, if any; a
    member whose write fails is failed (IOFailure if the array cannot lose it)."""
    for d in (io.by_role(role), io.replacement(role)):
        if d is None:
            continue
        try:
            io.write_member(d, ms, block.tobytes(), fua=fua)
        except DeviceError as e:
            io.fail(d, reason=str(e))


class StripeLocks:
    """A fixed set of locks, a stripe row hashed onto one (rows far apart may share)."""

    def __init__(self) -> None:
        self._locks = [threading.Lock() for _ in range(NR_STRIPE_LOCKS)]

    def of(self, row: int) -> threading.Lock:
        return self._locks[row % NR_STRIPE_LOCKS]


@dataclass(frozen=True)
class Raid5Runtime(Raid5):
    """raid4/raid5 for the running array: :class:`Raid5`'s reads plus writes and sync."""

    _rows: tuple[RowMap, ...] = field(init=False, repr=False, compare=False)
    _locks: StripeLocks = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        geo = self.geo
        # Which role holds which block repeats every raid_disks rows (parity rotates); a tiny
        # array has fewer rows than that, and only those exist.
        rows = []
        width = geo.chunk_sectors * geo.data_disks
        for stripe in range(min(geo.raid_disks, geo.array_sectors // width)):
            data = []
            for i in range(geo.data_disks):
                dd, pd, _ = geo.compute_sector(stripe * width + i * geo.chunk_sectors)
                data.append(dd)
            rows.append(RowMap(tuple(data), pd))
        object.__setattr__(self, "_rows", tuple(rows))
        object.__setattr__(self, "_locks", StripeLocks())

    # ---- facts ------------------------------------------------------------------------------

    @property
    def sync_sectors(self) -> int:
        return self.geo.dev_sectors  # resync and the bitmap walk member sectors

    @property
    def recovery_unit(self) -> int:
        return self.geo.chunk_sectors

    def row(self, stripe: int) -> RowMap:
        return self._rows[stripe % self.geo.raid_disks]

    def bitmap_range(self, sector: int, count: int) -> tuple[int, int]:
        start, end = self.geo.bitmap_range(sector, count)
        return start, end - start

    def member_to_sync(self, role: int, msector: int) -> int | None:
        return msector if msector < self.geo.dev_sectors else None

    def check_roles(self, roles: set[int]) -> None:
        missing = set(range(self.geo.raid_disks)) - roles
        if len(missing) > 1:
            raise AssemblyError(
                f"too few members: raid{self.level} can lose one member, {sorted(missing)} are missing"
            )

    # ---- reads ------------------------------------------------------------------------------

    def make_read(self, io: ArrayIO, sector: int, count: int) -> bytes:
        geo = self.geo
        out = bytearray()
        end = sector + count
        while sector < end:
            n = min(end - sector, geo.chunk_sectors - (sector & geo.chunk_mask))
            dd, _pd, ms = geo.compute_sector(sector)
            d = io.by_role(dd)
            if d is not None and io.available(dd, ms, n):
                try:
                    out += io.read_member(d, ms, n)
                except DeviceError:  # md: rebuild from the others and rewrite the bad block
                    with self._locks.of(ms >> geo.chunk_shift):
                        good = self._rebuild(io, dd, ms, n)
                    io.fix_read_error(d, ms, good)
                    out += good
            else:
                with self._locks.of(ms >> geo.chunk_shift):
                    out += self._rebuild(io, dd, ms, n)
            sector += n
        return bytes(out)

    def _rebuild(self, io: ArrayIO, missing: int, ms: int, n: int) -> bytes:
        """The block of role ``missing`` at member sectors ``[ms, ms+n)``: XOR of every other
        member of the row (data and parity alike)."""
        blocks = []
        for role in range(self.geo.raid_disks):
            if role == missing:
                continue
            d = io.by_role(role)
            if d is None or not io.available(role, ms, n):
                raise IOFailure(
                    f"cannot rebuild member sectors {ms}..{ms + n - 1} of role {missing}: "
                    f"role {role} is missing too"
                )
            try:
                blocks.append(as_block(io.read_member(d, ms, n)))
            except DeviceError as e:
                io.fail(d, reason=str(e))
                raise IOFailure(f"cannot rebuild role {missing}: {d.path} failed to read") from None
        return xor_blocks(blocks).tobytes()

    # ---- writes -----------------------------------------------------------------------------

    def make_write(self, io: ArrayIO, sector: int, data: memoryview, fua: bool) -> None:
        for stripe, segments in row_writes(self.geo, sector, data):
            with self._locks.of(stripe):
                for ms, n, new in segments:
                    self._write_segment(io, self.row(stripe), ms, n, new, fua)

    def _write_segment(
        self, io: ArrayIO, rm: RowMap, ms: int, n: int, new: dict[int, Block], fua: bool
    ) -> None:
        """Member sectors ``[ms, ms+n)`` of one row; ``new`` maps data index -> new block.

        A member that fails a read is failed and the segment is planned again without it (md
        handles the stripe again, degraded); nothing has been written when a read fails."""
        for _ in range(len(rm.data) + 1):  # each round has one member fewer
            try:
                self._try_write_segment(io, rm, ms, n, new, fua)
                return
            except _ReadFailed:
                continue
        raise IOFailure(f"cannot write member sectors {ms}..{ms + n - 1}: members keep failing")

    def _try_write_segment(
        self, io: ArrayIO, rm: RowMap, ms: int, n: int, new: dict[int, Block], fua: bool
    ) -> None:
        readable = {r for r in (*rm.data, rm.parity) if io.by_role(r) is not None and io.available(r, ms, n)}
        unwritten = [i for i in range(len(rm.data)) if i not in new]
        missing = [r for r in (*rm.data, rm.parity) if r not in readable]
        if len(missing) > 1:
            raise IOFailure(f"cannot write member sectors {ms}..{ms + n - 1}: roles {missing} are missing")
        parity: Block | None
        if not unwritten:  # full stripe: nothing to read
            parity = xor_blocks(list(new.values()))
        elif missing == [rm.parity]:
            parity = None  # nothing to keep consistent on a missing parity member
        else:
            rcw_ok = all(rm.data[i] in readable for i in unwritten)
            rmw_ok = rm.parity in readable and all(rm.data[i] in readable for i in new)
            if not (rcw_ok or rmw_ok):
                raise IOFailure(f"cannot write member sectors {ms}..{ms + n - 1}: too few members readable")
            use_rmw = rmw_ok
            if rcw_ok and rmw_ok:
                # reads: rmw the replaced blocks plus parity, rcw the blocks kept
                use_rmw = len(new) + 1 < len(unwritten) and io.parity_known(ms)
            if use_rmw:
                parity = as_block(self._read(io, rm.parity, ms, n)).copy()
                for i, block in new.items():
                    parity ^= as_block(self._read(io, rm.data[i], ms, n))
                    parity ^= block
            else:
                kept = [as_block(self._read(io, rm.data[i], ms, n)) for i in unwritten]
                parity = xor_blocks([*new.values(), *kept])
        targets: list[tuple[int, Block]] = [(rm.data[i], b) for i, b in new.items()]
        if parity is not None:
            targets.append((rm.parity, parity))
        for role, block in targets:
            self._write(io, role, ms, block, fua)

    def _read(self, io: ArrayIO, role: int, ms: int, n: int) -> bytes:
        d = io.by_role(role)
        assert d is not None
        try:
            return io.read_member(d, ms, n)
        except DeviceError as e:
            io.fail(d, reason=str(e))  # raises IOFailure if the array cannot lose it
            raise _ReadFailed from None

    def _write(self, io: ArrayIO, role: int, ms: int, block: Block, fua: bool) -> None:
        write_role(io, role, ms, block, fua)

    # ---- sync -------------------------------------------------------------------------------

    def sync_window(self, sio: SyncIO, kind: SyncKind, sector: int, count: int) -> None:
        """Resync / check / repair: parity of member sectors ``[sector, sector+count)`` compared
        with the XOR of the data, per 4 KiB page; resync and repair rewrite what differs."""
        geo = self.geo
        io = sio.array
        end = sector + count
        while sector < end:
            n = min(end - sector, geo.chunk_sectors - (sector & geo.chunk_mask))
            rm = self.row(sector >> geo.chunk_shift)
            roles = (*rm.data, rm.parity)
            devs = [io.by_role(r) for r in roles]
            if all(d is not None and io.available(r, sector, n) for r, d in zip(roles, devs, strict=True)):
                self._sync_segment(sio, kind, rm, sector, n)
            sector += n

    def _sync_segment(self, sio: SyncIO, kind: SyncKind, rm: RowMap, ms: int, n: int) -> None:
        io = sio.array
        blocks = []
        for r in rm.data:
            d = io.by_role(r)
            assert d is not None
            blocks.append(as_block(self._sync_read(sio, d, ms, n)))
        pdev = io.by_role(rm.parity)
        assert pdev is not None
        stored = as_block(self._sync_read(sio, pdev, ms, n))
        parity = xor_blocks(blocks)
        pages = (parity != stored).reshape(-1, PAGE_SECTORS * SECTOR).any(axis=1)
        bad = int(np.count_nonzero(pages))
        if not bad:
            return
        sio.mismatch(bad * PAGE_SECTORS)
        if kind is SyncKind.CHECK:
            return
        try:
            sio.write(pdev, ms, parity.tobytes())
        except DeviceError as e:
            io.fail(pdev, reason=str(e))
        new = io.replacement(rm.parity)
        if new is not None:
            sio.write(new, ms, parity.tobytes())
        sio.repaired(bad * PAGE_SECTORS)

    @staticmethod
    def _sync_read(sio: SyncIO, d: Rdev, ms: int, n: int) -> bytes:
        try:
            return sio.read(d, ms, n)
        except DeviceError as e:
            sio.array.fail(d, reason=str(e))
            raise IOFailure(f"sync read failed on {d.path}") from None

    def audit_window(self, sio: SyncIO, sector: int, count: int) -> tuple[bool, bool]:
        """Non-zero data blocks in an Unwritten window. Parity is not compared: a never-written
        chunk's parity is legitimately unbuilt (lazy parity), so only data counts."""
        io = sio.array
        geo = self.geo
        end = sector + count
        nonzero = False
        while sector < end:
            n = min(end - sector, geo.chunk_sectors - (sector & geo.chunk_mask))
            for r in self.row(sector >> geo.chunk_shift).data:
                d = io.by_role(r)
                if d is not None and io.available(r, sector, n):
                    nonzero = nonzero or any(self._sync_read(sio, d, sector, n))
            sector += n
        return nonzero, False

    def recover_window(self, sio: SyncIO, target: Rdev, msector: int, sector: int, count: int) -> None:
        """Rebuild ``target``'s member sectors ``[msector, msector+count)`` (sync space = member
        sectors): a copy of the member it replaces if that one is readable, else the XOR of
        every other role."""
        io = sio.array
        assert target.role is not None
        old = io.by_role(target.role)
        if old is not None and old is not target and io.available(target.role, msector, count):
            sio.write(target, msector, self._sync_read(sio, old, msector, count))
            return
        blocks = []
        for role in range(self.geo.raid_disks):
            if role == target.role:
                continue
            d = io.by_role(role)
            if d is None or not io.available(role, msector, count):
                raise IOFailure(
                    f"no data to rebuild member sectors {msector}..{msector + count - 1}: "
                    f"role {role} is missing"
                )
            blocks.append(as_block(self._sync_read(sio, d, msector, count)))
        sio.write(target, msector, xor_blocks(blocks).tobytes())
