"""llbitmap: the lockless write-intent bitmap (md-llbitmap.c), in user space.

Background
    A write-intent bitmap records, durably and *before* data is written, which chunks may have
    copies that disagree, so that after a crash or a member's return only those chunks are
    synced. md's classic bitmap keeps a 16-bit counter per chunk under one lock; llbitmap keeps
    one byte of *state* per chunk and drives it with a fixed table of actions. A write to a chunk
    that is already Dirty changes nothing, so it needs neither a lock nor bitmap IO.

States (one byte per chunk, from byte 1024 of the bitmap area, spec/LLBITMAP.md 2.1)
    Unwritten  never written: nothing to sync, nothing to recover
    Clean      copies agree
    Dirty      written recently; copies agree once in-flight IO completes
    NeedSync   must be synced (crash found it Dirty, degraded write, raid456 first write)
    Syncing    being synced
    NeedSyncUnwritten / SyncingUnwritten / CleanUnwritten: raid456 proactive parity build

Actions and the table: :data:`TABLE` below is the upstream table, row = state, column = action,
``NONE`` = no change; :meth:`LocklessBitmap._apply` adds the written-down overrides (degraded
writes become NeedSync, a degraded sync takes Dirty chunks too, a raid456 first write becomes
NeedSync, invalid bytes become NeedSync).

Durability (the write-intent rule)
    A transition to Dirty or NeedSync marks the 512-byte block holding the byte dirty; the writer
    then calls :meth:`unplug`, which writes every dirty block to every healthy member and returns
    only when they are durable. Other transitions (to Clean, Unwritten, Syncing) are written
    lazily, with the next write of their block or a full flush: losing them only costs a resync.
    If a write marks a chunk of a block that is still waiting to be written, or another chunk of
    the block is already Dirty/NeedSync, the whole block is "infected" (Unwritten/Clean -> Dirty),
    so its neighbours need no bitmap IO for their next writes; not while degraded.

    Only writes (Startwrite) infect. Upstream infects on every Dirty/NeedSync store, so a sync's
    Endsync (Syncing -> Dirty) or a Reload/Stale at assembly can turn a whole block of Unwritten
    chunks (no data) into written ones whenever the block's earlier mark has not been written
    yet, and every later resync, check and recovery then copies them (fixtures e2 and f: the
    kernel's own runs avoided it only because a user write had unplugged the block first).
    Infection only saves later writes bitmap IO; leaving it out is always safe.

    Each block carries two generation numbers: ``_gen`` (bumped under ``_lock`` whenever the
    block is marked dirty) and ``_durable`` (the generation last written durably, advanced by the
    flusher after the member writes returned). A block is durable iff they are equal.

INVARIANT (write fast path; no lock, no IO)
    ``start_write`` first takes a reference on every bitmap page its chunks live in (an atomic
    ``list.append``; the page's daemon suspension flag is checked *after* the append), then, if
    every chunk's byte is already in a state Startwrite does not change (Dirty, NeedSync,
    Syncing) it returns without taking ``_lock``; it still tells the caller to unplug if one of
    the blocks holding those bytes is not yet durable, so no data IO can overtake the bitmap
    write another writer started. Only the daemon turns Dirty into Clean, and only for a page
    whose reference count it has seen drop to zero after it raised the page's suspension flag;
    writers that find the flag raised drop their reference and wait. So:

        no chunk is Clean, in memory or on disk, while a write to it is in flight,

    and a chunk's Dirty byte is durable on every healthy member before its data IO is issued.

Daemon
    Every ``daemon_sleep`` seconds after a chunk became Dirty, pages idle for ``barrier_idle``
    seconds are suspended (waiting at most ``daemon_sleep`` for in-flight writes; a busy page is
    skipped, never blocked on) and their Dirty chunks become Clean. Never while degraded.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from llraid.bitmap.base import Bitmap, BitmapHost, SyncKind, flush_host
from llraid.bitmap.store import BitmapStore
from llraid.errors import BitmapIOError, FormatError
from llraid.format import llbitmap as fmt
from llraid.format.bitmap import (
    BITMAP_MAGIC,
    BITMAP_SB_BYTES,
    VERSION_LLBITMAP,
    BitmapFlag,
    BitmapKind,
    BitmapSuper,
)
from llraid.format.llbitmap import DATA_OFFSET, LLState

PAGE_SIZE = 4096  # the area is handled in 4 KiB pages (page of area byte x: x >> 12)
_monotonic = time.monotonic
DEFAULT_DAEMON_SLEEP = 30.0
DEFAULT_BARRIER_IDLE = 5.0
NONE = 0xFF  # "no transition" in the table; never a stored value


class Action(enum.IntEnum):
    STARTWRITE = 0
    STARTSYNC = 1
    ENDSYNC = 2
    ABORTSYNC = 3
    RELOAD = 4
    DAEMON = 5
    DISCARD = 6
    STALE = 7
    PROACTIVE_SYNC = 8
    CLEAR_UNWRITTEN = 9


_U, _C, _D, _NS, _S, _NSU, _SU, _CU = (int(s) for s in LLState)
_ = NONE

# fmt: off
TABLE: tuple[tuple[int, ...], ...] = (
    #  Start  Start  End   Abort  Reload Daemon Discard Stale Proact Clear
    #  write  sync   sync  sync                               Sync   Unwritten
    (_D,    _,     _,    _,     _,     _,     _,      _,    _NSU,  _),    # Unwritten
    (_D,    _,     _,    _,     _,     _,     _U,     _NS,  _,     _),    # Clean
    (_,     _,     _,    _,     _NS,   _C,    _U,     _NS,  _,     _),    # Dirty
    (_,     _S,    _,    _,     _,     _,     _U,     _,    _,     _),    # NeedSync
    (_,     _S,    _D,   _NS,   _NS,   _,     _U,     _NS,  _,     _),    # Syncing
    (_NS,   _SU,   _,    _U,    _U,    _,     _U,     _U,   _,     _U),   # NeedSyncUnwritten
    (_S,    _SU,   _CU,  _U,    _U,    _,     _U,     _U,   _,     _U),   # SyncingUnwritten
    (_D,    _,     _,    _,     _,     _,     _U,     _U,   _,     _U),   # CleanUnwritten
)
# fmt: on

# Per action, a 256-entry lookup: invalid bytes go to NeedSync, as upstream forces a resync.
_LOOKUP = np.full((len(Action), 256), _NS, dtype=np.uint16)
for _s, _row in enumerate(TABLE):
    for _a, _new in enumerate(_row):
        _LOOKUP[_a, _s] = _new
_MARKING = (_D, _NS, _NSU)  # new states written eagerly
# States in which Startwrite changes nothing: the lock-free fast path (2: NeedSync, which
# still asks for a resync when the array is not degraded, as the upstream state machine does).
_WRITE_NOOP = bytes(
    (2 if s == _NS else 1) if s < len(TABLE) and TABLE[s][Action.STARTWRITE] == NONE else 0
    for s in range(256)
)


def mdadm_chunksize(sync_size: int) -> int:
    """The classic chunk (bytes) mdadm writes into a fresh llbitmap superblock (ignored by md)."""
    from llraid.bitmap.classic import ClassicBitmap

    return ClassicBitmap.choose_chunksize(sync_size, fmt.DEFAULT_SPACE_SECTORS)


class LocklessBitmap(Bitmap):
    kind = BitmapKind.LOCKLESS

    # ---- construction ------------------------------------------------------------------------

    def __init__(
        self,
        store: BitmapStore,
        host: BitmapHost,
        sb: BitmapSuper,
        area: bytearray,
        geometry: fmt.Geometry,
        *,
        space: int,
        io_size: int,
        bitmap_offset: int,
    ) -> None:
        self.store = store
        self.host = host
        self.sb = sb
        self.geo = geometry
        self.chunks = geometry.chunks
        self.chunkshift = geometry.chunkshift
        self.chunksize = geometry.chunksize
        self.space = space
        self.io_size = io_size
        self.bitmap_offset = bitmap_offset
        self.flags = int(sb.state) & ~int(BitmapFlag.SHUTDOWN)
        self._werr = bool(self.flags & BitmapFlag.WRITE_ERROR)  # plain bool: read on every write
        # The kernel never advances events_cleared for llbitmap (spec 3), which makes every old
        # member look bitmap-syncable on re-add (LLBITMAP 7.4 HAZARD). llraid advances it like the
        # classic bitmap does: to the array's events whenever the daemon cleans chunks (only ever
        # while not degraded), so a member that left before that gets a full recovery instead.
        self.events_cleared = sb.events_cleared
        self._events = sb.events
        self.area = area
        self.states = np.frombuffer(area, dtype=np.uint8)  # the whole area; chunk c at DATA_OFFSET + c
        self.npages = len(area) // PAGE_SIZE
        self._block_shift = io_size.bit_length() - 1
        nblocks = len(area) >> self._block_shift
        self._gen = [0] * nblocks
        self._durable = [0] * nblocks
        self._dirty: set[int] = set()  # blocks marked dirty, not yet picked up by a flush
        self._lock = threading.Lock()  # state transitions off the fast path
        self._flush_lock = threading.Lock()  # one flusher at a time
        # Per-page barrier (md's percpu_ref): list length = writes in flight on the page.
        self._refs: list[list[None]] = [[] for _ in range(self.npages)]
        self._suspended = [False] * self.npages
        self._resumed = [threading.Event() for _ in range(self.npages)]
        self._drained = [threading.Event() for _ in range(self.npages)]
        for ev in self._resumed:
            ev.set()
        self._expire = [math.inf] * self.npages
        self._flush_pages = [False] * self.npages
        self._daemon_sleep = float(sb.daemon_sleep) if sb.daemon_sleep else DEFAULT_DAEMON_SLEEP
        self.barrier_idle = DEFAULT_BARRIER_IDLE
        self._deadline: float | None = None  # md's pending timer
        self._timer = threading.Condition()
        self._daemon_thread: threading.Thread | None = None
        self._stop = False
        self._daemon_busy = threading.Lock()
        self.daemon_skipped_pages = 0  # suspend timeouts, for tests and the log
        self.daemon_runs = 0
        self._bind_fast_paths()

    @classmethod
    def open(
        cls,
        store: BitmapStore,
        host: BitmapHost,
        *,
        array_uuid: bytes,
        sync_size: int,
        events: int,
        io_size: int = 512,
        bitmap_offset: int = 8,
        room: int | None = None,
    ) -> LocklessBitmap:
        """Read and validate the bitmap like ``llbitmap_read_sb``; initialise it on first use.

        ``sync_size`` is the array's resync range in sectors (raid1/raid5: component size;
        raid10: array size), ``events`` the array's event count; ``room`` (sectors) is the space
        the members have for the bitmap (a larger reservation is refused: it would overwrite data).
        """
        try:
            page0 = store.read(0, PAGE_SIZE)
        except BitmapIOError as e:
            raise BitmapIOError(f"llbitmap: read super block failed: {e}") from None
        sb = BitmapSuper.parse(page0)
        if sb.magic != BITMAP_MAGIC:
            raise FormatError("llbitmap: invalid super block magic number")
        if sb.version != VERSION_LLBITMAP:
            raise FormatError(f"llbitmap: invalid super block version {sb.version}")
        if sb.uuid != array_uuid:
            raise FormatError("llbitmap: bitmap superblock UUID mismatch")
        space = fmt.space_of(sb)
        if room is not None and space > room:
            # the kernel keeps (and flushes) every reserved page: they must not reach the data
            raise FormatError(f"llbitmap reserves {space} sectors, only {room} fit before the data")
        reserved_pages = -(-space * 512 // PAGE_SIZE)
        if sb.state & BitmapFlag.FIRST_USE:
            geo = fmt.calculate_geometry(sync_size, space)
            npages = max(-(-geo.used_bytes // PAGE_SIZE), reserved_pages)
            area = bytearray(npages * PAGE_SIZE)
            area[:PAGE_SIZE] = page0
            self = cls(store, host, sb, area, geo, space=space, io_size=io_size, bitmap_offset=bitmap_offset)
            self._first_use()
            return self
        bsync = sb.sync_size or sync_size
        if bsync > sync_size:
            raise FormatError(f"llbitmap: sync_size {bsync} exceeds array sync size {sync_size}")
        geo = fmt.geometry_of(sb)
        geo = fmt.Geometry(geo.chunksize, geo.chunkshift, -(-bsync // geo.chunksize), bsync)
        used_pages = -(-geo.used_bytes // PAGE_SIZE)
        npages = max(used_pages, reserved_pages)
        area = bytearray(npages * PAGE_SIZE)
        area[: used_pages * PAGE_SIZE] = page0 + (
            store.read(PAGE_SIZE, (used_pages - 1) * PAGE_SIZE) if used_pages > 1 else b""
        )
        self = cls(store, host, sb, area, geo, space=space, io_size=io_size, bitmap_offset=bitmap_offset)
        if sb.events < events:
            self.flags |= BitmapFlag.STALE  # written data must all be resynced
        self.sb = _replace_sb(sb, sync_size=sync_size)
        return self

    def _first_use(self) -> None:
        """mdadm's fresh bitmap: every chunk Unwritten (Clean with --assume-clean), flushed."""
        self.flags &= ~BitmapFlag.FIRST_USE
        initial = _U
        if self.flags & BitmapFlag.CLEAN:
            self.flags &= ~BitmapFlag.CLEAN
            initial = _C
        self._daemon_sleep = DEFAULT_DAEMON_SLEEP
        self.states[DATA_OFFSET : DATA_OFFSET + self.chunks] = initial
        self._flush_all()

    @staticmethod
    def new_superblock(
        array_uuid: bytes, sync_size: int, *, assume_clean: bool = False, daemon_sleep: int = 5
    ) -> BitmapSuper:
        """The bitmap superblock ``mdadm --create --bitmap=lockless`` writes."""
        state = BitmapFlag.FIRST_USE | (BitmapFlag.CLEAN if assume_clean else 0)
        return BitmapSuper(
            BITMAP_MAGIC, VERSION_LLBITMAP, array_uuid, 0, 0, sync_size, int(state),
            mdadm_chunksize(sync_size), daemon_sleep, 0, fmt.DEFAULT_SPACE_SECTORS, 0, bytes(64), bytes(120),
        )  # fmt: skip

    @staticmethod
    def initial_area(sb: BitmapSuper) -> bytes:
        """What mdadm writes at the bitmap offset: the superblock, then 0xff to 4 KiB (the
        classic all-dirty image computed from its own chunk size)."""
        bits = (sb.sync_size * 512 + sb.chunksize - 1) // sb.chunksize
        size = -(-((bits + 7) // 8 + BITMAP_SB_BYTES) // PAGE_SIZE) * PAGE_SIZE
        return sb.build() + b"\xff" * (size - BITMAP_SB_BYTES)

    # ---- helpers -------------------------------------------------------------------------------

    def _chunk_range(self, offset: int, sectors: int) -> tuple[int, int]:
        first = offset >> self.chunkshift
        last = min((offset + max(sectors, 1) - 1) >> self.chunkshift, self.chunks - 1)
        return first, last

    @staticmethod
    def _page_of(chunk: int) -> int:
        return (chunk + DATA_OFFSET) // PAGE_SIZE

    def state(self, chunk: int) -> LLState | int:
        v = int(self.area[DATA_OFFSET + chunk])
        return LLState(v) if v < len(LLState) else v

    def counts(self) -> dict[LLState, int]:
        counts, _ = fmt.count_states(self.states[DATA_OFFSET : DATA_OFFSET + self.chunks])
        return counts

    @property
    def write_error(self) -> bool:
        return self._werr

    # ---- the state machine ---------------------------------------------------------------------

    def _apply(self, first: int, last: int, action: Action) -> int:
        """Apply ``action`` to chunks ``first..last``; returns the last new state (or NONE)."""
        if self.write_error or first >= self.chunks:
            return NONE
        last = min(last, self.chunks - 1)
        with self._lock:
            degraded = self.host.is_degraded()
            need_resync, result = self._apply_locked(first, last, action, degraded)
        if need_resync:
            self.host.request_sync()
        return result

    def _apply_locked(self, first: int, last: int, action: Action, degraded: bool) -> tuple[bool, int]:
        lo, hi = DATA_OFFSET + first, DATA_OFFSET + last + 1
        cur = self.states[lo:hi]
        if action not in (Action.STARTWRITE, Action.STARTSYNC):
            # No override applies: vectorise unless a new state must be written eagerly (its
            # block's generation and mark are kept chunk by chunk below).
            new = _LOOKUP[action][cur]
            changed = new != NONE
            if not np.isin(new[changed], _MARKING).any():
                need_resync = bool(np.isin(cur, (_NS, _NSU)).any()) and not degraded
                cur[changed] = new[changed]
                return need_resync, int(new[-1])
        raid456 = self.host.level in (4, 5, 6)
        area = self.area
        result = NONE
        need_resync = False
        for pos in range(lo, hi):
            c = area[pos]
            if c in (_NS, _NSU):
                need_resync = not degraded
            new_state = _NS if c >= len(TABLE) else TABLE[c][action]
            if degraded:
                if new_state == _D and action == Action.STARTWRITE:
                    new_state = _NS
                elif c == _D and action == Action.STARTSYNC:
                    new_state = _S
            elif c == _U and new_state == _D and action == Action.STARTWRITE and raid456:
                new_state = _NS
            result = new_state
            if new_state == NONE:
                continue
            if new_state in _MARKING:
                # Bump the block's generation *before* the byte changes, so a fast-path writer
                # that sees the new byte also sees that its block is not yet durable.
                self._gen[pos >> self._block_shift] += 1
                area[pos] = new_state
                infect = action == Action.STARTWRITE and new_state != _NSU and not degraded
                self._mark_block(pos, infect=infect, raid456=raid456)
            else:
                area[pos] = new_state
            if new_state in (_NS, _NSU):
                need_resync = not degraded
            elif new_state == _D:
                self._arm_timer()
        return need_resync, result

    def _mark_block(self, pos: int, *, infect: bool, raid456: bool) -> None:
        """Queue the block of area byte ``pos`` for writing (its generation is already bumped);
        infect its neighbours if it was queued already or holds other Dirty/NeedSync bytes."""
        b = pos >> self._block_shift
        already = b in self._dirty
        self._dirty.add(b)
        if not infect:
            return
        start = max(b << self._block_shift, DATA_OFFSET)  # never touch the header bytes
        end = (b + 1) << self._block_shift
        block = self.states[start:end]
        if not already:
            others = block.copy()
            others[pos - start] = _U
            if not np.isin(others, (_D, _NS)).any():
                return
        block[block == _U] = _NS if raid456 else _D
        block[(block == _C) | (block == _CU)] = _D

    # ---- per-page barrier ------------------------------------------------------------------------

    def _raise_barrier(self, page: int) -> None:
        refs = self._refs[page]
        while True:
            refs.append(None)
            if not self._suspended[page]:
                break
            refs.pop()
            if not refs:
                self._drained[page].set()
            self._resumed[page].wait()
        self._expire[page] = _monotonic() + self.barrier_idle

    def _release_barrier(self, page: int) -> None:
        refs = self._refs[page]
        refs.pop()
        if not refs and self._suspended[page]:
            self._drained[page].set()

    def _suspend(self, page: int, timeout: float) -> bool:
        """Stop new writers on ``page`` and wait for in-flight ones; False on timeout."""
        self._resumed[page].clear()
        self._drained[page].clear()
        self._suspended[page] = True
        deadline = time.monotonic() + timeout
        while self._refs[page]:
            left = deadline - time.monotonic()
            if left <= 0 or not self._drained[page].wait(left):
                if not self._refs[page]:
                    break
                self._resume(page, expire=self._expire[page])
                return False
            self._drained[page].clear()
        return True

    def _resume(self, page: int, expire: float = math.inf) -> None:
        self._expire[page] = expire
        self._suspended[page] = False
        self._resumed[page].set()

    # ---- IO path ---------------------------------------------------------------------------------

    def start_write(self, offset: int, sectors: int) -> bool:
        if self._werr:
            return False
        first, last = self._chunk_range(offset, sectors)
        if first > last:
            return False
        for page in range(self._page_of(first), self._page_of(last) + 1):
            self._raise_barrier(page)
        return self._start_write_locked_pages(first, last)

    def _start_write_locked_pages(self, first: int, last: int) -> bool:
        """Startwrite on chunks whose pages' barriers this writer already holds."""
        # Fast path: no lock, no IO (see INVARIANT in the module docstring).
        area, noop = self.area, _WRITE_NOOP
        need_sync = False
        for pos in range(DATA_OFFSET + first, DATA_OFFSET + last + 1):
            v = noop[area[pos]]
            if not v:
                break
            if v == 2:
                need_sync = True
        else:
            if need_sync and not self.host.is_degraded():
                self.host.request_sync()
            gen, durable, bshift = self._gen, self._durable, self._block_shift
            return any(
                gen[b] != durable[b]
                for b in range((DATA_OFFSET + first) >> bshift, ((DATA_OFFSET + last) >> bshift) + 1)
            )
        self._apply(first, last, Action.STARTWRITE)
        return True

    def end_write(self, offset: int, sectors: int) -> None:
        if self._werr:
            return
        first, last = self._chunk_range(offset, sectors)
        if first > last:
            return
        for page in range(self._page_of(first), self._page_of(last) + 1):
            self._release_barrier(page)

    def _bind_fast_paths(self) -> None:
        """Per-instance start_write/end_write for the one-chunk case, as closures over the
        arrays they touch (no attribute lookups). Same steps, same order as the methods above:
        page reference first, suspension flag checked after it, then the state byte."""
        area, refs, suspended, expire = self.area, self._refs, self._suspended, self._expire
        drained, gen, durable, bshift = self._drained, self._gen, self._durable, self._block_shift
        noop, mono, chunks, shift = _WRITE_NOOP, _monotonic, self.chunks, self.chunkshift
        generic_start, generic_end = self.start_write, self.end_write
        raise_barrier, after_barrier = self._raise_barrier, self._start_write_locked_pages
        me = self

        def start_write(offset: int, sectors: int) -> bool:
            first = offset >> shift
            if me._werr or first != (offset + sectors - 1) >> shift or first >= chunks:
                return generic_start(offset, sectors)
            pos = DATA_OFFSET + first
            page = pos >> 12
            r = refs[page]
            r.append(None)
            if suspended[page]:
                r.pop()
                if not r:
                    drained[page].set()
                raise_barrier(page)
            expire[page] = mono() + me.barrier_idle
            if noop[area[pos]] == 1:
                b = pos >> bshift
                return gen[b] != durable[b]
            return after_barrier(first, first)

        def end_write(offset: int, sectors: int) -> None:
            first = offset >> shift
            if me._werr or first != (offset + sectors - 1) >> shift or first >= chunks:
                return generic_end(offset, sectors)
            page = (DATA_OFFSET + first) >> 12
            r = refs[page]
            r.pop()
            if not r and suspended[page]:
                drained[page].set()
            return None

        self.start_write = start_write  # type: ignore[method-assign]
        self.end_write = end_write  # type: ignore[method-assign]

    def _discard_range(self, offset: int, sectors: int) -> tuple[int, int]:
        first = -(-offset // self.chunksize)  # only whole chunks lose their data
        last = min((offset + sectors) // self.chunksize - 1, self.chunks - 1)
        return first, last

    def start_discard(self, offset: int, sectors: int) -> bool:
        first, last = self._discard_range(offset, sectors)
        if self.write_error or first > last:
            return False
        for page in range(self._page_of(first), self._page_of(last) + 1):
            self._raise_barrier(page)
        self._apply(first, last, Action.DISCARD)
        return False  # Unwritten is written lazily: losing it costs only a needless sync

    def end_discard(self, offset: int, sectors: int) -> None:
        first, last = self._discard_range(offset, sectors)
        if self.write_error or first > last:
            return
        for page in range(self._page_of(first), self._page_of(last) + 1):
            self._release_barrier(page)

    def unplug(self) -> None:
        if not self._dirty and not self._flush_lock.locked():
            return  # nothing marked, and no flush of earlier marks still running
        self._write_blocks(None)

    def _write_blocks(self, blocks: Iterable[int] | None) -> None:
        """Write ``blocks`` (None: every block marked dirty) to all members, durably."""
        with self._flush_lock:
            with self._lock:
                if blocks is None:
                    todo = sorted(self._dirty)
                    self._dirty.clear()
                else:
                    todo = sorted(set(blocks))
                    self._dirty.difference_update(todo)
                gens = [self._gen[b] for b in todo]
                pieces = []
                io = self.io_size
                for run in _runs(todo):
                    start, end = run[0] * io, (run[-1] + 1) * io
                    pieces.append((start, bytes(self.area[start:end])))
            if not pieces:
                return
            try:
                self.store.write(pieces)
            except BitmapIOError:
                self.flags |= BitmapFlag.WRITE_ERROR  # no member holds the bitmap any more
                self._werr = True
                raise
            for b, g in zip(todo, gens, strict=True):
                if self._durable[b] < g:
                    self._durable[b] = g

    def _flush_all(self) -> None:
        """Write every block of every page (md's ``__llbitmap_flush``)."""
        self._write_blocks(range(len(self._gen)))

    # ---- daemon ----------------------------------------------------------------------------------

    @property
    def daemon_sleep(self) -> float:
        return self._daemon_sleep

    @daemon_sleep.setter
    def daemon_sleep(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("daemon_sleep must be positive")
        self._daemon_sleep = float(seconds)
        with self._timer:
            self._timer.notify_all()

    def _arm_timer(self) -> None:
        if self._deadline is None and not self._stop:
            with self._timer:
                if self._deadline is None:
                    self._deadline = time.monotonic() + self._daemon_sleep
                    self._timer.notify_all()

    def start_daemon(self) -> None:
        if self._daemon_thread is not None:
            return
        self._stop = False
        self._daemon_thread = threading.Thread(target=self._daemon_loop, name="llbitmap-daemon", daemon=True)
        self._daemon_thread.start()

    def _daemon_loop(self) -> None:
        while True:
            with self._timer:
                while not self._stop and (self._deadline is None or time.monotonic() < self._deadline):
                    wait = None if self._deadline is None else self._deadline - time.monotonic()
                    self._timer.wait(wait)
                if self._stop:
                    return
                self._deadline = None
            self.daemon_work()

    def close(self) -> None:
        self._stop = True
        with self._timer:
            self._timer.notify_all()
        if self._daemon_thread is not None:
            self._daemon_thread.join()
            self._daemon_thread = None

    def daemon_work(self, now: float | None = None) -> None:
        """One pass of md_llbitmap_daemon_fn: clean expired, idle pages."""
        if self.host.is_degraded() or self.write_error:
            return
        with self._daemon_busy:
            self.daemon_runs += 1
            restart = False
            flushed = False
            now = time.monotonic() if now is None else now
            for page in range(self.npages):
                first = max(page * PAGE_SIZE - DATA_OFFSET, 0)
                last = min((page + 1) * PAGE_SIZE - DATA_OFFSET, self.chunks) - 1
                flush = self._flush_pages[page]
                self._flush_pages[page] = False
                if not flush and now < self._expire[page]:
                    restart = True
                    continue
                if first > last:
                    continue
                if not self._suspend(page, self._daemon_sleep):
                    self.daemon_skipped_pages += 1
                    continue
                try:
                    before = int(
                        np.count_nonzero(self.states[DATA_OFFSET + first : DATA_OFFSET + last + 1] == _D)
                    )
                    if before and not flushed:
                        flush_host(self.host)  # the writes of chunks about to be Clean are durable
                        flushed = True
                    self._apply(first, last, Action.DAEMON)
                    if before:
                        self.events_cleared = self._events
                finally:
                    self._resume(page)
            if restart:
                self._arm_timer()

    def flush(self) -> None:
        """Stop: clean every page that can be cleaned, then write the whole bitmap."""
        for page in range(self.npages):
            self._flush_pages[page] = True
        self.daemon_work()
        self._flush_all()

    # ---- load and sync ---------------------------------------------------------------------------

    def load(self) -> None:
        action = Action.RELOAD
        if self.flags & BitmapFlag.STALE:
            self.flags &= ~BitmapFlag.STALE
            action = Action.STALE
        self._apply(0, self.chunks - 1, action)

    def needs_sync(self) -> bool:
        s = self.states[DATA_OFFSET : DATA_OFFSET + self.chunks]
        return bool(np.isin(s, (_NS, _S, _NSU, _SU)).any())

    def skip_sync_blocks(self, offset: int, kind: SyncKind) -> int:
        p = offset >> self.chunkshift
        if p >= self.chunks or self.write_error:
            return 0
        blocks = self.chunksize - (offset & (self.chunksize - 1))
        c = self.area[DATA_OFFSET + p]
        if c in (_U, _CU):
            return blocks
        if self.host.is_degraded():
            return 0
        if c in (_C, _D) and kind is SyncKind.RESYNC:
            return blocks
        return 0

    def start_sync(self, offset: int, degraded: bool) -> tuple[bool, int]:
        blocks = self.chunksize - (offset & (self.chunksize - 1))
        if self.write_error:
            return True, blocks  # a disabled bitmap knows nothing: sync everything
        p = offset >> self.chunkshift
        if p >= self.chunks:
            return False, blocks
        state = self._apply(p, p, Action.STARTSYNC)
        return state in (_S, _SU), blocks

    def covers_since(self, events: int) -> bool:
        return events >= self.events_cleared

    def mark_need_sync(self, chunks: Iterable[int]) -> int:
        """Force chunks still Unwritten to NeedSync, durably; returns how many were marked.

        Not an upstream action: llraid's Unwritten audit uses it for chunks that hold data
        although marked Unwritten (the kernel's discard bug), so the resync makes their copies
        agree and recoveries copy them from then on. Written to every member before returning,
        so a crash before the resync still resyncs them."""
        if self.write_error:
            return 0
        marked = 0
        with self._lock:
            degraded = self.host.is_degraded()
            for c in chunks:
                pos = DATA_OFFSET + c
                if c >= self.chunks or self.area[pos] not in (_U, _CU):
                    continue  # written meanwhile: its own write intent covers it
                self._gen[pos >> self._block_shift] += 1
                self.area[pos] = _NS
                self._mark_block(pos, infect=False, raid456=False)
                marked += 1
        self.unplug()
        if marked and not degraded:
            self.host.request_sync()
        return marked

    def start_recovery(self) -> None:
        """Before a real recovery: the new member has no parity for *Unwritten chunks."""
        self._apply(0, self.chunks - 1, Action.CLEAR_UNWRITTEN)

    def end_sync(self, offset: int) -> None:
        self._apply(offset >> self.chunkshift, self.chunks - 1, Action.ABORTSYNC)

    def close_sync(self) -> None:
        now = time.monotonic()
        for page in range(self.npages):
            self._expire[page] = now  # let the daemon clean right away
        self._apply(0, self.chunks - 1, Action.ENDSYNC)

    def cond_end_sync(self, sector: int, force: bool = False) -> None:
        now = time.monotonic()
        if sector == 0:
            self._last_end_sync = now
            return
        if not force and now < getattr(self, "_last_end_sync", 0.0) + self._daemon_sleep:
            return
        complete = sector - sector % self.chunksize
        if complete:
            self._apply(0, (complete >> self.chunkshift) - 1, Action.ENDSYNC)
        self._flush_all()
        self._last_end_sync = time.monotonic()

    def blocks_synced(self, offset: int) -> bool:
        p = offset >> self.chunkshift
        return p < self.chunks and self.area[DATA_OFFSET + p] in (_C, _D, _CU)

    def proactive_sync(self) -> bool:
        if self.host.level not in (4, 5, 6):
            raise ValueError("proactive_sync is only for raid4/5/6")
        self._apply(0, self.chunks - 1, Action.PROACTIVE_SYNC)
        return True

    # ---- superblock and views ----------------------------------------------------------------------

    def update_sb(self, events: int) -> None:
        if self.write_error:
            return
        self._events = events
        self.events_cleared = min(self.events_cleared, events)
        self.sb = _replace_sb(
            self.sb,
            events=events,
            state=int(self.flags & ~BitmapFlag.SHUTDOWN),
            chunksize=self.chunksize,
            sync_size=self.geo.sync_size,
            events_cleared=self.events_cleared,
            sectors_reserved=self.space,
            daemon_sleep=max(1, round(self._daemon_sleep)),
        )
        with self._lock:
            self.area[:BITMAP_SB_BYTES] = self.sb.build()
        self._write_blocks(range(-(-DATA_OFFSET // self.io_size)))

    def area_image(self) -> bytes:
        with self._lock:
            return bytes(self.area)

    def bits_view(self) -> str:
        if self.write_error:
            return "bitmap io error\n"
        return fmt.bits_text(self.counts())

    def metadata_view(self) -> str:
        return (
            f"chunksize {self.chunksize}\nchunkshift {self.chunkshift}\nchunks {self.chunks}\n"
            f"offset {self.bitmap_offset}\ndaemon_sleep {round(self._daemon_sleep)}\n"
        )


def _replace_sb(sb: BitmapSuper, **changes: Any) -> BitmapSuper:
    return dataclasses.replace(sb, **changes)


def _runs(blocks: list[int]) -> list[list[int]]:
    """Sorted block numbers grouped into runs of consecutive numbers."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][-1] + 1 == b:
            out[-1].append(b)
        else:
            out.append([b])
    return out
