"""Personalities (md's ``md_personality``): what a RAID level does, and what it needs.

A personality maps array sectors to member sectors and owns its level's IO: the read and
write path (md's ``make_request``), one window of resync / recovery / check / repair (md's
``sync_request``), which roles the array can lose (``check_roles``, md's error handler
refuses to fail the last copy) and which bitmap range a request touches. The array
(:mod:`llraid.array`, md core) owns the members, the superblocks, the bitmap and the sync
barrier, and hands each personality an :class:`ArrayIO`; the read-only assembly
(:mod:`llraid.assemble`) hands it the smaller :class:`MemberIO`.

Member sectors are relative to each member's data area, and members are named by role.
Mirrored levels (raid1, raid10) describe a request as :class:`Piece` s: a run of array sectors
and, for each copy, the member role and member sector holding it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from llraid.bitmap.base import SyncKind
from llraid.errors import AssemblyError, DeviceError, IOFailure
from llraid.raid.barrier import BUCKET_SIZE
from llraid.rdev import Rdev


class MemberIO(Protocol):
    """Reads of member data, all a read-only assembly offers."""

    def available(self, role: int, sector: int, count: int) -> bool:
        """True if the member in ``role`` is present and in sync for the whole range."""
        ...

    def read(self, role: int, sector: int, count: int) -> bytes:
        """``count`` sectors from the member in ``role`` at data sector ``sector``."""
        ...


class ArrayIO(Protocol):
    """What md core offers a personality of the running array."""

    def by_role(self, role: int) -> Rdev | None:
        """The member serving ``role`` (in sync or recovering)."""
        ...

    def replacement(self, role: int) -> Rdev | None:
        """The member being built to replace ``role``'s member, if any."""
        ...

    def available(self, role: int, sector: int, count: int) -> bool: ...

    def read_member(self, d: Rdev, msector: int, count: int) -> bytes: ...

    def write_member(self, d: Rdev, msector: int, data: bytes | memoryview, *, fua: bool = False) -> None: ...

    def fail(self, which: Rdev, reason: str) -> Rdev:
        """md_error; raises :class:`IOFailure` if ``which`` holds the last copy of some data."""
        ...

    def fix_read_error(self, d: Rdev, msector: int, good: bytes) -> None:
        """Rewrite a copy that failed to read with good data (fails the member if that fails)."""
        ...

    def member_reads(self, d: Rdev) -> int:
        """Bytes read from ``d`` so far (read balancing)."""
        ...

    def parity_known(self, sync_sector: int) -> bool:
        """raid456: the stripe's parity is valid, so read-modify-write may use it."""
        ...

    @property
    def copies_agree(self) -> bool:
        """No resync is pending: every copy (or parity) is known to be consistent."""
        ...


class SyncIO(Protocol):
    """What the sync loop offers a personality's sync windows: accounted member IO."""

    @property
    def array(self) -> ArrayIO: ...

    def read(self, d: Rdev, msector: int, count: int) -> bytes: ...

    def write(self, d: Rdev, msector: int, data: bytes) -> None: ...

    def mismatch(self, sectors: int) -> None:
        """Count sectors whose copies (or parity) were found to differ (md's mismatch_cnt)."""
        ...

    def repaired(self, sectors: int) -> None: ...


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
        """``count`` array sectors from array sector ``sector`` (read-only assembly)."""
        ...


class RuntimePersonality(Personality, Protocol):
    """A personality the running array can read, write and sync through."""

    @property
    def sync_sectors(self) -> int:
        """Size of the resync / bitmap address space."""
        ...

    @property
    def recovery_unit(self) -> int:
        """Sectors a recovery window never crosses (a chunk, or the sync window)."""
        ...

    def bitmap_range(self, sector: int, count: int) -> tuple[int, int]:
        """The sync-space (bitmap) range an array request touches."""
        ...

    def member_to_sync(self, role: int, msector: int) -> int | None:
        """The sync-space sector that member sector ``msector`` of ``role`` holds (None: none)."""
        ...

    def make_read(self, io: ArrayIO, sector: int, count: int) -> bytes: ...

    def make_write(self, io: ArrayIO, sector: int, data: memoryview, fua: bool) -> None:
        """Write whole sectors to every member that must hold them."""
        ...

    def sync_window(self, sio: SyncIO, kind: SyncKind, sector: int, count: int) -> None:
        """Resync / check / repair sync-space sectors ``[sector, sector+count)``."""
        ...

    def recover_window(self, sio: SyncIO, target: Rdev, msector: int, sector: int, count: int) -> None:
        """Rebuild ``target``'s member sectors from ``msector`` (sync-space ``sector``, ``count``)."""
        ...

    def audit_window(self, sio: SyncIO, sector: int, count: int) -> tuple[bool, bool]:
        """``(holds non-zero data, copies/parity differ)`` for a window the bitmap calls
        Unwritten (the Unwritten audit: such a window should hold nothing)."""
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

    level: int

    @property
    @abstractmethod
    def sync_sectors(self) -> int:
        """Size of the resync / bitmap address space (raid1: member sectors; raid10: array)."""

    @property
    def recovery_unit(self) -> int:
        return BUCKET_SIZE

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

    # ---- make_request --------------------------------------------------------------------------

    def make_read(self, io: ArrayIO, sector: int, count: int) -> bytes:
        """A failed copy is served from another and rewritten (md's fix_read_error)."""
        out = bytearray()
        balance = io.copies_agree  # balance reads only while every copy is known to agree
        for p in self.pieces(sector, count):
            if balance or (p.count <= BUCKET_SIZE and p.sector % BUCKET_SIZE + p.count <= BUCKET_SIZE):
                out += self._read_piece(io, p, balance)
                continue
            # Copies may differ: read in the sync windows, each from the copy resync would copy
            # from (the first one usable for that window), so a read never changes its answer
            # when the resync runs - also where a member is recovered part way through a piece.
            s, end = p.sector, p.sector + p.count
            while s < end:
                n = min(end - s, BUCKET_SIZE - s % BUCKET_SIZE)
                copies = tuple((r, ms + (s - p.sector)) for r, ms in p.copies)
                out += self._read_piece(io, Piece(s, n, copies), False)
                s += n
        return bytes(out)

    def _read_piece(self, io: ArrayIO, p: Piece, balance: bool) -> bytes:
        copies: list[tuple[Rdev, int]] = []
        for r, ms in p.copies:
            d = io.by_role(r)
            if d is not None and io.available(r, ms, p.count):
                copies.append((d, ms))
        if balance and len(copies) > 1:
            # the copy on the member that has read least so far (md: least busy non-rotational)
            best = min(range(len(copies)), key=lambda i: io.member_reads(copies[i][0]))
            copies = copies[best:] + copies[:best]
        bad: list[tuple[Rdev, int]] = []
        for d, ms in copies:
            try:
                data = io.read_member(d, ms, p.count)
            except DeviceError:
                bad.append((d, ms))
                continue
            for bd, bms in bad:
                io.fix_read_error(bd, bms, data)
            return data
        raise IOFailure(f"no member could read array sectors {p.sector}..{p.sector + p.count - 1}")

    def make_write(self, io: ArrayIO, sector: int, data: memoryview, fua: bool) -> None:
        """Every copy on every member in sync or recovering, and on a replacement being built."""
        for p in self.pieces(sector, len(data) // 512):
            chunk = data[(p.sector - sector) * 512 : (p.sector - sector + p.count) * 512]
            written = 0
            for role, ms in p.copies:
                d = io.by_role(role)
                if d is None:
                    continue
                try:
                    io.write_member(d, ms, chunk, fua=fua)
                    written += 1
                except DeviceError as e:
                    io.fail(d, reason=str(e))
                r = io.replacement(role)
                if r is not None:
                    try:
                        io.write_member(r, ms, chunk, fua=fua)
                    except DeviceError as e:
                        io.fail(r, reason=str(e))
            if not written:
                raise IOFailure(f"no member could write array sectors {p.sector}..{p.sector + p.count - 1}")

    # ---- sync_request --------------------------------------------------------------------------

    def sync_window(self, sio: SyncIO, kind: SyncKind, sector: int, count: int) -> None:
        """raid1 resync copies the first usable copy over the others (md's raid1 does); raid10
        resync, check and repair compare every copy with the first and rewrite those that differ."""
        io = sio.array
        copy_all = kind is SyncKind.RESYNC and self.level == 1
        for p in self.pieces(sector, count):
            live: list[tuple[Rdev, int]] = []
            for r, ms in p.copies:
                d = io.by_role(r)
                if d is not None and io.available(r, ms, p.count):
                    live.append((d, ms))
            if len(live) < 2:
                continue  # nothing to compare or copy to
            src, src_ms = live[0]
            try:
                data = sio.read(src, src_ms, p.count)
            except DeviceError as e:
                io.fail(src, reason=str(e))
                raise IOFailure(f"sync read failed on {src.path}") from None
            if copy_all:
                targets = live[1:]
            else:
                targets = [(d, ms) for d, ms in live[1:] if sio.read(d, ms, p.count) != data]
                if targets:
                    sio.mismatch(p.count)
            if kind is SyncKind.CHECK:
                continue
            for d, ms in targets:
                try:
                    sio.write(d, ms, data)
                except DeviceError as e:
                    io.fail(d, reason=str(e))
                if not copy_all:
                    sio.repaired(p.count)

    def audit_window(self, sio: SyncIO, sector: int, count: int) -> tuple[bool, bool]:
        io = sio.array
        nonzero = differ = False
        for p in self.pieces(sector, count):
            zero = bytes(p.count * 512)
            first: bytes | None = None
            for r, ms in p.copies:
                d = io.by_role(r)
                if d is None or not io.available(r, ms, p.count):
                    continue
                try:
                    data = sio.read(d, ms, p.count)
                except DeviceError as e:
                    io.fail(d, reason=str(e))
                    continue
                nonzero = nonzero or data != zero
                if first is None:
                    first = data
                elif data != first:
                    differ = True
        return nonzero, differ

    def recover_window(self, sio: SyncIO, target: Rdev, msector: int, sector: int, count: int) -> None:
        """Copy sync-space sectors ``[sector, sector+count)`` onto ``target`` at ``msector``."""
        io = sio.array
        out = bytearray()
        for p in self.pieces(sector, count):
            for r, pms in p.copies:
                d = io.by_role(r)
                if d is None or d is target or not io.available(r, pms, p.count):
                    continue
                try:
                    out += sio.read(d, pms, p.count)
                    break
                except DeviceError as e:
                    io.fail(d, reason=str(e))
            else:
                raise IOFailure(
                    f"no in-sync copy to recover array sectors {p.sector}..{p.sector + p.count - 1}"
                )
        sio.write(target, msector, bytes(out))
