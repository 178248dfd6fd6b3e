"""The array (md's ``mddev``): members, state, superblocks, and the IO path.

An :class:`Array` is assembled from member devices, validated as mdadm does (see
:mod:`llraid.assemble`), and then owns them: it reads and writes array sectors through its
personality (raid1, raid10) and its bitmap (none, classic, lockless), keeps the array state
md keeps (clean/active, events, resync checkpoint, per-member recovery offsets, roles) and
writes every member's superblock whenever that state changes.

Write path (one request; many may run at once, none takes an array-wide lock):

1. ``_writes`` gets a reference (md's writes_pending); if the array is marked clean, it is first
   marked active and the superblocks are written (md_write_start), so a crash during the write
   is seen as unclean;
2. the sync barrier of each touched bucket is entered (a resync never copies a range while a
   write to it is in flight, and writes wait while a range is being synced);
3. bitmap ``start_write`` and, if asked, ``unplug``: the write intent is durable first;
4. data to every copy whose member is in sync or recovering (``RWF_DSYNC`` for FUA);
5. bitmap ``end_write``, barrier and reference released.

A member whose write fails is marked faulty (superblocks of the others updated first, so the
failed copy can never be trusted again) and the array goes on degraded; a write that reached no
copy of some sector fails. A read that fails on one copy is served from another and the bad copy
is rewritten (md's fix_read_error); if that rewrite fails too the member is marked faulty.

Safe mode: after ``safe_mode_delay`` seconds without writes the array is marked clean again
(superblocks say "clean"), exactly as md does, so an idle array survives a crash without resync.

Every change md logs is logged on ``llraid.array`` (see :mod:`llraid.logs`): the assembly and
what it found (members kicked as non-fresh, a degraded start, an unclean shutdown, a stale
bitmap, chunks waiting for a sync), member failures, corrected read errors, members added,
re-added, replaced and removed, and the clean stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from llraid.assemble import check_member
from llraid.bitmap.base import Bitmap, NoBitmap
from llraid.bitmap.classic import ClassicBitmap
from llraid.bitmap.lockless import LocklessBitmap
from llraid.bitmap.store import BitmapStore, BitmapTarget
from llraid.device import SECTOR, path_identity
from llraid.errors import AssemblyError, DeviceError, IOFailure, LlraidError
from llraid.format.bitmap import BitmapFlag, BitmapKind, BitmapSuper
from llraid.format.llbitmap import LLState
from llraid.format.superblock import (
    MAX_SECTOR,
    ROLE_FAULTY,
    ROLE_MAX,
    ROLE_SPARE,
    Feature,
    Superblock1,
    format_uuid,
)
from llraid.member import DeviceOpener, Member, open_device, open_member
from llraid.metadata import new_member_superblock
from llraid.raid.barrier import BUCKET_SIZE, SyncBarrier
from llraid.raid.base import MirrorPersonality, RuntimePersonality
from llraid.raid.registry import runtime_personality
from llraid.rdev import Rdev, RdevState

__all__ = ["BUCKET_SIZE", "Array", "ArrayCounters", "IOFailure", "Rdev", "RdevState"]

log = logging.getLogger("llraid.array")

EVENTS_LIMIT = (1 << 64) - 1 - (1 << 32)  # sb.events is a u64; leave room for 2^32 more updates
SAFE_MODE_DELAY = 0.2  # md's default: mark clean 200 ms after the last write


@dataclass
class ArrayCounters:
    """What the array did, for tests, ``detail`` and the benchmark."""

    member_read: dict[str, int] = field(default_factory=dict)  # bytes per member path
    member_written: dict[str, int] = field(default_factory=dict)
    sb_writes: int = 0
    read_errors_corrected: int = 0


class Array:
    """A running md array on member devices."""

    def __init__(self, sb: Superblock1, rdevs: list[Rdev], *, readonly: bool = False) -> None:
        self.sb = sb  # reference superblock: geometry and identity
        self.rdevs = rdevs
        self.readonly = readonly
        self.personality: RuntimePersonality = runtime_personality(sb)
        self.events = sb.events
        self.resync_cp = sb.resync_offset  # MAX_SECTOR: nothing to resync
        # md_run starts every array in_sync: the superblocks keep saying "clean" (and keep the
        # resync checkpoint) until the first write marks the array active.
        self._in_sync = True
        self.counters = ArrayCounters()
        self._sb_lock = threading.RLock()  # superblock writes and member state changes
        self._writes: list[None] = []  # writes in flight (md's writes_pending)
        self._last_write = 0.0
        self.safe_mode_delay = SAFE_MODE_DELAY
        self.barrier = SyncBarrier()
        self.bitmap: Bitmap = NoBitmap()
        self.sync_requested = False
        self._closed = False
        self.fault_log: list[tuple[str, str]] = []  # (member, why) for every member failed
        self.opener: DeviceOpener | None = None
        self._role_map: dict[int, Rdev] = {}
        self._replacements: dict[int, Rdev] = {}  # role -> the member being built to replace it
        self._pending_sb = False  # members failed whose failure the superblocks do not show yet
        self._store: BitmapStore | None = None
        self._bitmap_was_stale = False  # found at assembly: the bitmap's events were behind
        self._dirty_at_load = 0  # llbitmap chunks Dirty/Syncing on disk at assembly
        self._rebuild_role_map()

    # ---- assembly ------------------------------------------------------------------------------

    @classmethod
    def assemble(
        cls,
        paths: Sequence[str],
        *,
        run: bool = False,
        force: bool = False,
        readonly: bool = False,
        bitmap_threads: bool = True,
        opener: DeviceOpener | None = None,
    ) -> Array:
        """Open and validate members, load the bitmap; refuses a degraded start unless ``run``.

        ``opener`` replaces how member devices are opened (tests: simulated devices)."""
        members: list[Member] = []
        try:
            for p in paths:
                members.append(open_member(p, writable=not readonly, opener=opener))
            array = cls._from_members(members, run=run, force=force, readonly=readonly)
            array.opener = opener
        except BaseException:
            for m in members:
                m.device.close()
            raise
        if bitmap_threads and not readonly:
            array.bitmap.start_daemon()
        return array

    @classmethod
    def _from_members(cls, members: list[Member], *, run: bool, force: bool, readonly: bool) -> Array:
        from llraid.assemble import assemble as validate

        asm = validate(members, force=force)
        ref = asm.sb
        runtime_personality(ref)  # refuses levels the running array cannot serve, before anything
        if not readonly and ref.events > EVENTS_LIMIT:
            # every superblock update adds one: a counter this close to 2^64 (only damage puts it
            # there) would overflow in the middle of a write
            raise AssemblyError(
                f"events {ref.events} is at the counter's limit: the array cannot record changes"
            )
        rdevs: list[Rdev] = []
        for role, slot in sorted(asm.slots.items()):
            m = slot.member
            if slot.in_sync_below >= ref.size:
                rdevs.append(Rdev(m, RdevState.IN_SYNC, role))
            else:  # an interrupted recovery: continue where it stopped
                bitmap_sync = bool(m.sb.feature_map & Feature.RECOVERY_BITMAP)
                rdevs.append(Rdev(m, RdevState.RECOVERING, role, slot.in_sync_below, bitmap_sync))
        for m in asm.spares:
            role = ref.role_of(m.sb.dev_number)
            old = next((d for d in rdevs if d.role == role and d.state is RdevState.IN_SYNC), None)
            if m.sb.feature_map & Feature.REPLACEMENT and old is not None and not readonly:
                # a replacement interrupted by a stop or crash: keep building it where it was
                done = m.sb.recovery_offset if m.sb.feature_map & Feature.RECOVERY_OFFSET else 0
                rdevs.append(Rdev(m, RdevState.RECOVERING, role, done, False, replaces=old))
            else:
                rdevs.append(Rdev(m, RdevState.SPARE, None))
        for m in asm.stale + asm.faulty:
            m.device.close()  # kicked (non-fresh or failed); re-add it to bring it back
        array = cls(ref, rdevs, readonly=readonly)
        if not readonly:
            array._activate_spares()
        # mdadm starts an array whose members are in sync or being rebuilt (okcnt + rebuilding).
        present = {d.role for d in array.rdevs if d.state in (RdevState.IN_SYNC, RdevState.RECOVERING)}
        missing = [r for r in range(ref.raid_disks) if r not in present]
        if missing and not run:
            kicked = "".join(f"; {m.path} is stale (events {m.sb.events} < {ref.events})" for m in asm.stale)
            raise AssemblyError(
                f"array would start degraded ({ref.raid_disks - len(missing)} of {ref.raid_disks} members, "
                f"roles {missing} missing{kicked}); use --run to start it anyway"
            )
        array._open_bitmap(force=force)
        array._log_assembly(asm.stale, asm.faulty, missing)
        if not readonly:
            array.catch_up()
            array._settle()  # spares that took a free slot: the superblocks say so
        return array

    def _log_assembly(self, stale: list[Member], faulty: list[Member], missing: list[int]) -> None:
        tag = self.tag
        for m in stale:
            log.warning(
                "%s: kicking non-fresh %s from the array (events %d < %d)",
                tag, m.path, m.sb.events, self.events,
            )  # fmt: skip
        for m in faulty:
            log.warning("%s: not using %s: the array marks it faulty", tag, m.path)
        live = [d for d in self.rdevs if d.state in (RdevState.IN_SYNC, RdevState.RECOVERING)]
        log.info(
            "%s: assembled%s from %d of %d members (events %d, %s bitmap)",
            tag, " read-only" if self.readonly else "", len(live), self.raid_disks, self.events,
            self.bitmap.kind.value,
        )  # fmt: skip
        if missing:
            roles = ", ".join(str(r) for r in missing)
            log.warning("%s: started degraded: no member for role %s", tag, roles)
        for d in self.rdevs:
            if d.state is RdevState.RECOVERING:
                what = f"replacement for role {d.role}" if d.replaces is not None else f"role {d.role}"
                log.info(
                    "%s: %s (%s) is being recovered from sector %d", tag, d.path, what, d.recovery_offset
                )
        why = []
        if self.resync_cp == 0:
            why.append("superblocks say active: unclean shutdown, or never synced")
        elif self.resync_cp != MAX_SECTOR:
            why.append(f"resync interrupted at sector {self.resync_cp}")
        if self._dirty_at_load:
            why.append(f"{self._dirty_at_load} chunks dirty in the bitmap: unclean shutdown")
        if why:
            then = (
                "resync needed (waits: read-only)" if self.readonly
                else "resync needed (waits for a recovery: degraded)" if missing
                else "resync needed"
            )  # fmt: skip
            log.warning("%s: not clean (%s) -- %s", tag, "; ".join(why), then)
        if self._bitmap_was_stale:
            log.warning("%s: bitmap is out of date -- every written chunk will be resynced", tag)
        if isinstance(self.bitmap, LocklessBitmap):
            need = self.bitmap.counts().get(LLState.NEED_SYNC, 0)
            if need:
                log.info("%s: llbitmap: %d chunks need sync", tag, need)

    def _open_bitmap(self, *, force: bool) -> None:
        ref = self.sb
        if not ref.has_bitmap:
            self.bitmap = NoBitmap()
            self._refresh_bitmap_targets()
            return
        store = BitmapStore([], on_error=self._bitmap_io_error, readonly=self.readonly)
        self._store = store
        self._refresh_bitmap_targets()
        if not store.targets:
            raise AssemblyError("no member left to read the bitmap from")
        bsb = BitmapSuper.parse(store.read(0, 256))
        self._bitmap_was_stale = bsb.events < self.events and not bsb.state & BitmapFlag.FIRST_USE
        sync_size = self.sync_sectors
        room = self._bitmap_room()
        if bsb.kind is BitmapKind.LOCKLESS:
            self.bitmap = LocklessBitmap.open(
                store, self, array_uuid=ref.set_uuid, sync_size=sync_size, events=self.events,
                bitmap_offset=ref.bitmap_offset, room=room,
            )  # fmt: skip
        else:
            self.bitmap = ClassicBitmap.open(
                store, self, array_uuid=ref.set_uuid, sync_size=sync_size, events=self.events,
                resync_offset=self.resync_cp, room=room,
            )  # fmt: skip
        if isinstance(self.bitmap, LocklessBitmap):
            # Dirty/Syncing on disk = written when the array stopped without a clean stop
            c = self.bitmap.counts()
            self._dirty_at_load = c.get(LLState.DIRTY, 0) + c.get(LLState.SYNCING, 0)
        self.bitmap.load()

    def _bitmap_room(self) -> int:
        """Sectors every member has for the bitmap before it would reach the data (or, for 1.0,
        the superblock)."""
        rooms = []
        for d in self.rdevs:
            sb = d.sb
            start = sb.super_offset + sb.bitmap_offset
            end = sb.data_offset if sb.data_offset > start else sb.super_offset
            rooms.append(end - start)
        return max(0, min(rooms)) if rooms else 0

    def _refresh_bitmap_targets(self) -> None:
        """The bitmap lives on every member that has a slot and is not faulty."""
        store = self._store
        if store is None:
            return
        targets = []
        for d in sorted(self.rdevs, key=lambda r: (r.state is not RdevState.IN_SYNC, r.role or 0)):
            if d.role is None or d.state is RdevState.FAULTY:
                continue
            if d.target is None:
                d.target = BitmapTarget(d.device, (d.sb.super_offset + d.sb.bitmap_offset) * SECTOR)
            targets.append(d.target)
        store.targets = targets

    def _bitmap_io_error(self, target: BitmapTarget, err: Exception) -> None:
        """Runs inside the bitmap's IO (its locks held): mark only; :meth:`_settle` tells the others."""
        for d in self.rdevs:
            if d.target is target and not self._mark_faulty(d, f"bitmap IO error: {err}"):
                target.failed = False  # the last copy of some data: keep it, the bitmap write fails

    # ---- facts ---------------------------------------------------------------------------------------

    @property
    def level(self) -> int:
        return self.sb.level

    @property
    def raid_disks(self) -> int:
        return self.sb.raid_disks

    @property
    def uuid(self) -> str:
        return format_uuid(self.sb.set_uuid)

    @property
    def tag(self) -> str:
        """How log messages name the array (md: "md/raid10:md0")."""
        return f"raid{self.level} {self.sb.set_name or self.uuid}"

    @property
    def array_sectors(self) -> int:
        return self.personality.array_sectors

    @property
    def array_bytes(self) -> int:
        return self.array_sectors * SECTOR

    @property
    def mirror(self) -> MirrorPersonality | None:
        """The personality if it is a mirrored one (where each copy lives: tools and tests)."""
        return self.personality if isinstance(self.personality, MirrorPersonality) else None

    @property
    def sync_sectors(self) -> int:
        return self.personality.sync_sectors

    @property
    def dev_sectors(self) -> int:
        """Member data sectors in use (md's dev_sectors)."""
        return self.sb.size

    @property
    def in_sync(self) -> bool:
        return self._in_sync

    @property
    def closed(self) -> bool:
        """Stopped (or crashed): its members are closed."""
        return self._closed

    def active(self) -> list[Rdev]:
        """Members in a slot and in sync."""
        return [d for d in self.rdevs if d.state is RdevState.IN_SYNC]

    def by_role(self, role: int) -> Rdev | None:
        """The member serving ``role`` (in sync or recovering), from a map rebuilt whenever
        member states change (every such change is followed by :meth:`update_sb`)."""
        return self._role_map.get(role)

    def _rebuild_role_map(self) -> None:
        live = (RdevState.IN_SYNC, RdevState.RECOVERING)
        self._role_map = {
            d.role: d for d in self.rdevs if d.role is not None and d.state in live and d.replaces is None
        }
        self._replacements = {
            d.role: d
            for d in self.rdevs
            if d.role is not None and d.replaces is not None and d.state is RdevState.RECOVERING
        }

    def is_degraded(self) -> bool:
        """BitmapHost: fewer in-sync members than slots (md's mddev->degraded != 0)."""
        return len({d.role for d in self.active()}) < self.raid_disks

    def request_sync(self) -> None:
        """BitmapHost: chunks now need a resync."""
        self.sync_requested = True

    def flush_members(self) -> None:
        """BitmapHost: completed writes durable on every member (before anything says "clean")."""
        self.flush()

    # ---- ArrayIO: what the personality does its IO through ----------------------------------------------

    def replacement(self, role: int) -> Rdev | None:
        return self._replacements.get(role) if self._replacements else None

    @property
    def copies_agree(self) -> bool:
        return self.resync_cp == MAX_SECTOR and not self.sync_requested

    def parity_known(self, sync_sector: int) -> bool:
        """raid456: the parity of the stripe at ``sync_sector`` may be used to read-modify-write
        (md forces reconstruct-write above the resync checkpoint and where llbitmap says the
        chunk's parity was never built)."""
        if self.resync_cp != MAX_SECTOR and sync_sector >= self.resync_cp:
            return False
        return self.bitmap.blocks_synced(sync_sector)

    def member_reads(self, d: Rdev) -> int:
        return self.counters.member_read.get(d.name, 0)

    def available(self, role: int, sector: int, count: int) -> bool:
        d = self.by_role(role)
        if d is None:
            return False
        return d.state is RdevState.IN_SYNC or sector + count <= d.recovery_offset

    def read_member(self, d: Rdev, msector: int, count: int) -> bytes:
        data = d.device.pread(d.data_off + msector * SECTOR, count * SECTOR)
        reads = self.counters.member_read
        reads[d.name] = reads.get(d.name, 0) + len(data)
        return data

    def write_member(self, d: Rdev, msector: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        d.device.pwrite(d.data_off + msector * SECTOR, data, dsync=fua)
        written = self.counters.member_written
        written[d.name] = written.get(d.name, 0) + len(data)

    # ---- IO path ---------------------------------------------------------------------------------------

    def _check_range(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0 or sector + count > self.array_sectors:
            raise IOFailure(
                f"sectors {sector}..{sector + count} are outside the array ({self.array_sectors} sectors)"
            )

    def read(self, sector: int, count: int) -> bytes:
        """``count`` array sectors; a failed copy is served from another and rewritten."""
        self._check_range(sector, count)
        return self.personality.make_read(self, sector, count)

    def fix_read_error(self, d: Rdev, msector: int, good: bytes) -> None:
        try:
            self.write_member(d, msector, good)
            d.corrected_reads += 1
            self.counters.read_errors_corrected += 1
            log.warning(
                "%s: read error corrected (%d sectors at %d on %s)",
                self.tag, len(good) // SECTOR, msector, d.path,
            )  # fmt: skip
        except DeviceError as e:
            with contextlib.suppress(IOFailure):  # refused: it holds the last copy of other data
                self.fail(d, reason=str(e))

    def read_bytes(self, offset: int, length: int) -> bytes:
        first, last = offset // SECTOR, (offset + length + SECTOR - 1) // SECTOR
        data = self.read(first, last - first)
        return data[offset - first * SECTOR : offset - first * SECTOR + length]

    def write(self, sector: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write whole sectors; returns only when every copy is written (durably with ``fua``)."""
        if self.readonly:
            raise IOFailure("array is read-only")
        if len(data) % SECTOR:
            raise IOFailure(f"write of {len(data)} bytes is not a whole number of sectors")
        count = len(data) // SECTOR
        self._check_range(sector, count)
        if count == 0:
            return
        pers = self.personality
        self._writes.append(None)
        try:
            if self._in_sync:
                self._mark_dirty()
            boff, bcount = pers.bitmap_range(sector, count)
            buckets = self.barrier.of(boff, bcount)
            self.barrier.enter(buckets)
            try:
                if self.bitmap.start_write(boff, bcount):
                    self.bitmap.unplug()
                try:
                    pers.make_write(self, sector, memoryview(data), fua)
                finally:
                    self.bitmap.end_write(boff, bcount)
            finally:
                self.barrier.leave(buckets)
        finally:
            self._last_write = time.monotonic()
            self._writes.pop()

    def write_bytes(self, offset: int, data: bytes) -> None:
        """Any alignment: partial sectors are read, merged and written back (not atomic)."""
        first, last = offset // SECTOR, (offset + len(data) + SECTOR - 1) // SECTOR
        if offset % SECTOR or len(data) % SECTOR:
            buf = bytearray(self.read(first, last - first))
            buf[offset - first * SECTOR : offset - first * SECTOR + len(data)] = data
            data = bytes(buf)
        self.write(first, data)

    def flush(self) -> None:
        """Make every completed write durable on every member (NBD FLUSH)."""
        for d in self.rdevs:
            if d.role is not None and d.state is not RdevState.FAULTY:
                try:
                    d.device.sync()
                except DeviceError as e:
                    self.fail(d, reason=str(e))

    def discard(self, sector: int, count: int) -> None:
        """The range holds no data any more: whole bitmap chunks go back to Unwritten.

        Member data is left as it is (files keep their bytes), so reads of a discarded range
        return what was there; clients must not rely on its content, as with any TRIM.
        """
        self._check_range(sector, count)
        boff, bcount = self.personality.bitmap_range(sector, count)
        buckets = self.barrier.of(boff, bcount)
        self.barrier.enter(buckets)
        try:
            self.bitmap.start_discard(boff, bcount)
            self.bitmap.end_discard(boff, bcount)
        finally:
            self.barrier.leave(buckets)

    # ---- array state and superblocks -------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        with self._sb_lock:
            if self._in_sync:
                self._in_sync = False
                self.update_sb()

    def try_mark_clean(self) -> bool:
        """Safe mode: mark clean if no write is in flight (and none arrived while checking)."""
        with self._sb_lock:
            if self._in_sync or self.readonly or self._closed:
                return False
            if self._writes or time.monotonic() - self._last_write < self.safe_mode_delay:
                return False
            self._in_sync = True
            if self._writes:  # a writer slipped in: it saw in_sync False or waits for our lock
                self._in_sync = False
                return False
            # "clean" may only reach a superblock once every member's completed writes are durable
            # (md writes superblocks with a preflush): else a power cut could leave copies that
            # differ under a clean superblock, and nothing would resync them.
            self.flush()
            self.update_sb()
            return True

    def proactive_sync(self) -> None:
        """raid456 with llbitmap: build the parity of every never-written chunk now (md's
        ``llbitmap/proactive_sync``), so that first writes later need no lazy build."""
        if self.level not in (4, 5, 6):
            raise LlraidError(f"proactive sync builds parity: raid4/5/6 only, not raid{self.level}")
        if self.readonly:
            raise LlraidError("the array is read-only")
        if not self.bitmap.proactive_sync():
            raise LlraidError(
                "proactive sync needs the lockless bitmap (other bitmaps have no Unwritten chunks)"
            )
        self.request_sync()

    def set_resync_checkpoint(self, sector: int) -> None:
        """A resync got this far: record it (md's recovery_cp), bitmap and superblocks."""
        with self._sb_lock:
            if self.resync_cp != MAX_SECTOR:
                self.resync_cp = sector
            self.update_sb()

    def resync_finished(self) -> None:
        """Every copy agrees again: no checkpoint, nothing requested."""
        with self._sb_lock:
            self.resync_cp = MAX_SECTOR
            self.sync_requested = False
            self.update_sb()

    def _role_table(self, max_dev: int) -> tuple[int, ...]:
        roles = [ROLE_SPARE] * max_dev
        for d in self.rdevs:
            n = d.sb.dev_number
            if n >= max_dev:
                continue
            if d.state is RdevState.FAULTY:
                roles[n] = ROLE_FAULTY
            elif d.role is not None:
                roles[n] = d.role
        return tuple(roles)

    def _sb_for(self, d: Rdev, max_dev: int, now: int) -> Superblock1:
        fm = d.sb.feature_map & ~(
            Feature.BITMAP_OFFSET | Feature.RECOVERY_OFFSET | Feature.RECOVERY_BITMAP | Feature.REPLACEMENT
        )
        if self.sb.has_bitmap:
            fm |= Feature.BITMAP_OFFSET
        recovery = 0
        if d.replaces is not None:
            fm |= Feature.REPLACEMENT
        if d.state is RdevState.RECOVERING:
            fm |= Feature.RECOVERY_OFFSET
            if d.bitmap_sync and self.sb.has_bitmap:
                fm |= Feature.RECOVERY_BITMAP
            recovery = d.recovery_offset
        return dataclasses.replace(
            d.sb,
            feature_map=fm,
            utime=now,
            events=self.events,
            resync_offset=self.resync_cp if self._in_sync else 0,
            recovery_offset=recovery,
            max_dev=max_dev,
            dev_roles=self._role_table(max_dev),
            size=self.sb.size,
            cnt_corrected_read=d.sb.cnt_corrected_read + d.corrected_reads,
        ).with_checksum()

    def update_sb(self) -> None:
        """md_update_sb: bump events, write the bitmap superblock, then every member's.

        A member whose superblock cannot be written is marked faulty and the round is repeated,
        so the survivors record it (md does the same through md_error)."""
        with self._sb_lock:
            while True:
                self._pending_sb = False
                self._rebuild_role_map()
                self._preflush()
                self.events += 1
                self.bitmap.update_sb(self.events)
                written = self._write_superblocks()
                if not written:
                    raise IOFailure("no member's superblock could be written")
                if not self._pending_sb:
                    break
            self.sb = next((d.sb for d in self.rdevs if d.state is RdevState.IN_SYNC), self.sb)

    def _preflush(self) -> None:
        """md writes superblocks with a preflush: everything completed before a superblock update
        (data, a sync's copies) is durable on every member before any superblock says more."""
        for d in self.rdevs:
            if d.state is not RdevState.FAULTY and d.device.fd >= 0:
                try:
                    d.device.sync()
                except DeviceError as e:
                    self._mark_faulty(d, str(e), force=True)

    def catch_up(self) -> None:
        """Members accepted one event behind get the current superblock, events unchanged
        (else a second interrupted update could leave them two behind: kicked as stale)."""
        with self._sb_lock:
            behind = [d for d in self.rdevs if d.state is not RdevState.FAULTY and d.sb.events != self.events]
            if behind:
                self._preflush()
                self._write_superblocks(only=behind)

    def _write_superblocks(self, only: list[Rdev] | None = None) -> int:
        max_dev = max([self.sb.max_dev] + [d.sb.dev_number + 1 for d in self.rdevs])
        now = int(time.time())
        written = 0
        for d in self.rdevs if only is None else only:
            if d.state is RdevState.FAULTY:
                continue  # a faulty member is never told anything again
            new = self._sb_for(d, max_dev, now)
            raw = new.build()
            raw += bytes(-len(raw) % SECTOR)
            try:
                d.device.pwrite(new.super_offset * SECTOR, raw)
                d.device.sync()
            except DeviceError as e:
                self._mark_faulty(d, f"superblock write failed: {e}", force=True)
                continue
            d.member.sb = new
            d.corrected_reads = 0
            self.counters.sb_writes += 1
            written += 1
        return written

    # ---- member management -----------------------------------------------------------------------------

    def _find(self, which: Rdev | str | int) -> Rdev:
        if isinstance(which, Rdev):
            return which
        if isinstance(which, int):
            for d in self.rdevs:
                if d.role == which and d.state is not RdevState.SPARE:
                    return d
            raise LlraidError(f"no member in role {which}")
        want = path_identity(which)
        for d in self.rdevs:
            if d.device.fd >= 0 and d.device.identity() == want:
                return d
        raise LlraidError(f"no member {which!r} in this array")

    def fail(self, which: Rdev | str | int, reason: str = "failed by request") -> Rdev:
        """md_error: the member is faulty from now on; the others' superblocks say so."""
        d = self._find(which)
        if not self._mark_faulty(d, reason):
            raise IOFailure(f"{d.path}: {reason} (not failed: it holds the last copy of some data)")
        self._settle()
        return d

    def _mark_faulty(self, d: Rdev, reason: str, *, force: bool = False) -> bool:
        """Mark ``d`` faulty in memory only (no lock, no IO: callable from inside bitmap IO).

        Refuses (returns False) when ``d`` holds the last copy of some data, as md does, unless
        ``force``. The superblocks are brought up to date by :meth:`_settle`."""
        if d.state is RdevState.FAULTY:
            return True
        if d.state is RdevState.IN_SYNC and d.role is not None and not force:
            left = {r.role for r in self.active() if r is not d and r.role is not None}
            try:
                self.personality.check_roles(left)
            except AssemblyError:
                log.error(
                    "%s: %s failed (%s) but holds the last copy of some data: kept", self.tag, d.path, reason
                )
                return False
        was_in_sync = d.state is RdevState.IN_SYNC
        d.state = RdevState.FAULTY
        if d.target is not None:
            d.target.failed = True
        self.fault_log.append((d.path, reason))
        self._rebuild_role_map()
        self._refresh_bitmap_targets()
        self._pending_sb = True
        log.error(
            "%s: disk failure on %s (%s), disabling device; operation continuing on %d of %d members",
            self.tag, d.path, reason, len({r.role for r in self.active()}), self.raid_disks,
        )  # fmt: skip
        if not was_in_sync:
            log.warning("%s: %s was not in sync: its recovery stops", self.tag, d.path)
        return True

    def _settle(self) -> None:
        """After member failures: give free slots to spares and write the superblocks."""
        if self._pending_sb:
            with self._sb_lock:
                if self._pending_sb:
                    self._activate_spares()
                    self.update_sb()

    def finish_recovery(self, d: Rdev) -> None:
        """A member finished recovering: it is in sync; a replaced member is failed out."""
        with self._sb_lock:
            old = d.replaces
            d.state, d.recovery_offset, d.bitmap_sync, d.replaces = RdevState.IN_SYNC, 0, False, None
            if old is not None and old.state is not RdevState.FAULTY:
                old.state = RdevState.FAULTY
                if old.target is not None:
                    old.target.failed = True
                self.fault_log.append((old.path, f"replaced by {d.path}"))
                log.info("%s: %s replaced by %s: marked faulty", self.tag, old.path, d.path)
            self._rebuild_role_map()
            self._refresh_bitmap_targets()
            self.bitmap.close_sync()
            self.update_sb()

    def replace(self, which: Rdev | str | int, path: str, *, force: bool = False) -> Rdev:
        """md's replace: build ``path`` into the role of ``which`` while it keeps serving; the
        old member is failed out when the new one is complete (no window without redundancy)."""
        with self._sb_lock:
            old = self._find(which)
            if old.state is not RdevState.IN_SYNC or old.role is None:
                raise LlraidError(f"{old.path} is {old.state.value}: only an in-sync member can be replaced")
            if old.role in self._replacements:
                raise LlraidError(f"role {old.role} is already being replaced")
            d = self.add_spare(path, force=force)
            if d.state is not RdevState.SPARE:  # took a free slot instead: that is plain recovery
                return d
            d.role, d.state, d.recovery_offset, d.bitmap_sync, d.replaces = (
                old.role, RdevState.RECOVERING, 0, False, old,
            )  # fmt: skip
            self._rebuild_role_map()
            self._refresh_bitmap_targets()
            self.update_sb()
            log.info("%s: replacing %s (role %d) with %s", self.tag, old.path, old.role, d.path)
            return d

    def _activate_spares(self) -> None:
        """md: a spare takes a free slot and is recovered into it (fully)."""
        for d in self.rdevs:
            if d.state is RdevState.SPARE:
                free = [r for r in range(self.raid_disks) if self.by_role(r) is None]
                if not free:
                    return
                d.role, d.state, d.recovery_offset, d.bitmap_sync = free[0], RdevState.RECOVERING, 0, False
                log.info("%s: spare %s takes role %d; a full recovery follows", self.tag, d.path, d.role)
                self._rebuild_role_map()
                self._refresh_bitmap_targets()
                self._pending_sb = True

    def remove(self, which: Rdev | str | int) -> None:
        """Take a faulty or spare member out of the array (md's hot-remove)."""
        with self._sb_lock:
            d = self._find(which)
            if d.state not in (RdevState.FAULTY, RdevState.SPARE):
                raise LlraidError(f"{d.path} is {d.state.value}: fail it first")
            self.rdevs.remove(d)
            d.device.close()
            self._refresh_bitmap_targets()
            self.update_sb()
            log.info("%s: removed %s", self.tag, d.path)

    def re_add(self, path: str) -> Rdev:
        """Bring back a member that left this array: with a bitmap, recover only what it missed."""
        with self._sb_lock:
            try:
                still = self._find(path)
            except LlraidError:
                still = None  # not a member: good
            if still is not None:
                raise LlraidError(f"{path} is still a member ({still.state.value}): remove it first")
            m = open_member(path, writable=True, opener=self.opener)
            try:
                check_member(m)
                if m.sb.set_uuid != self.sb.set_uuid:
                    raise LlraidError(
                        f"{path} belongs to array {format_uuid(m.sb.set_uuid)}, not {self.uuid}"
                    )
                if any(d.sb.dev_number == m.sb.dev_number for d in self.rdevs):
                    raise LlraidError(f"{path}: device number {m.sb.dev_number} is already in the array")
                role = m.sb.role
                if role >= ROLE_MAX or role >= self.raid_disks or self.by_role(role) is not None:
                    raise LlraidError(
                        f"{path}: its old role is taken or unknown; add it as a new spare instead"
                    )
                if m.sb.events > self.events:
                    raise LlraidError(
                        f"{path} is newer than the array (events {m.sb.events} > {self.events})"
                    )
            except BaseException:
                m.device.close()
                raise
            # Bitmap-guided only if the bitmap has been tracking everything since it left.
            bitmap_sync = self.bitmap.covers_since(m.sb.events)
            d = Rdev(m, RdevState.RECOVERING, role, 0, bitmap_sync)
            self.rdevs.append(d)
            self._rebuild_role_map()
            self._refresh_bitmap_targets()
            self.update_sb()
            log.info(
                "%s: re-added %s as role %d (events %d): %s",
                self.tag, path, role, m.sb.events,
                "bitmap-based recovery of what it missed" if bitmap_sync else "full recovery",
            )  # fmt: skip
            return d

    def add_spare(self, path: str, *, force: bool = False) -> Rdev:
        """Add a new member: it takes a free slot (if any) and is fully recovered."""
        with self._sb_lock:
            used = {d.sb.dev_number for d in self.rdevs}
            dev_number = next(i for i in range(len(used) + 1) if i not in used)
            free = [r for r in range(self.raid_disks) if self.by_role(r) is None]
            device = open_device(path, writable=True, opener=self.opener)
            try:
                sb = new_member_superblock(self.sb, device, dev_number, force=force)
                # Its own superblock says "being recovered from 0" from the start: if power fails
                # while the others learn of it, it must never pass for an in-sync member.
                roles = list(sb.dev_roles)
                roles[dev_number] = free[0] if free else ROLE_SPARE
                sb = dataclasses.replace(
                    sb,
                    dev_roles=tuple(roles),
                    feature_map=sb.feature_map | (Feature.RECOVERY_OFFSET if free else 0),
                    recovery_offset=0,
                ).with_checksum()
                raw = sb.build()
                device.pwrite(sb.super_offset * SECTOR, raw + bytes(-len(raw) % SECTOR))
                if self.sb.has_bitmap:
                    # The bitmap area must hold a copy before this member is read from.
                    area_at = (sb.super_offset + sb.bitmap_offset) * SECTOR
                    device.pwrite(area_at, self.bitmap.area_image())
                device.sync()
                m = Member(device, sb)
            except BaseException:
                device.close()
                raise
            d = Rdev(m, RdevState.RECOVERING, free[0], 0, False) if free else Rdev(m, RdevState.SPARE, None)
            self.rdevs.append(d)
            self._rebuild_role_map()
            self._refresh_bitmap_targets()
            self.update_sb()
            if free:
                log.info("%s: added %s into role %d; a full recovery follows", self.tag, path, free[0])
            else:
                log.info("%s: added %s as a spare", self.tag, path)
            return d

    # ---- shutdown --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Clean stop: no more IO, bitmap flushed, superblocks marked clean, members closed."""
        if self._closed:
            return
        self.bitmap.close()
        if not self.readonly:
            self.flush()
            self.bitmap.flush()
            with self._sb_lock:
                self._in_sync = True
                self.update_sb()
        self._close_devices()
        log.info("%s: stopped%s", self.tag, "" if self.readonly else " (clean)")

    def crash(self) -> None:
        """Drop everything without a clean stop (tests: what a power cut or kill -9 leaves)."""
        self.bitmap.close()
        self._close_devices()

    def _close_devices(self) -> None:
        self._closed = True
        for d in self.rdevs:
            d.device.close()

    def __enter__(self) -> Array:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
