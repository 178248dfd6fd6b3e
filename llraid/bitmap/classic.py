"""The classic md write-intent bitmap (md-bitmap.c), kept as the comparator for llbitmap.

Two representations
-------------------
*On disk* the bitmap is one bit per chunk right after the 256-byte bitmap superblock (LSB first,
spec/ONDISK.md 4); a set bit means "this chunk may differ between the copies". Everything the
kernel writes is a copy of the *in-memory image* of that area (``_image``): the superblock
followed by the bits, cut into 4 KiB pages exactly as they sit on disk (page 0 holds the
superblock and the first 30720 bits, every further page 32768 bits).

*In memory* every chunk also has a 16-bit counter::

    bit 15      NEEDED   the chunk must be resynced (set bit found at load, degraded write, ...)
    bit 14      RESYNC   a resync of the chunk is in progress
    bits 13..0  COUNTER  writes in flight + the on-disk bit: 0 = clean and bit clear,
                         1 = bit set, may be cleared at the next daemon pass,
                         2 = bit set and idle, 2 + n = n writes in flight (max 16383)

The counters are grouped in counter pages of 2048 chunks (a 4 KiB kernel page of u16). Each
counter page keeps ``count`` (chunks whose counter is non-zero: it is "allocated" while that is
positive, which is what /proc/mdstat's ``A/B pages`` shows) and ``pending`` (some counter in it
is 1 or 2, so the daemon must look at it). The kernel's allocation failure fallback (hijacked
pages) does not exist here.

The single lock
---------------
One :class:`threading.Lock` (``_lock``, the kernel's ``counts.lock`` spinlock) protects every
counter, the counter-page bookkeeping, the in-memory image and the page flags. start_write and
end_write take it once per chunk, the daemon once per pass. That lock on the write fast path is
exactly what llbitmap was written to remove, so it stays here on purpose: benchmarks compare the
two. Writers that would overflow a counter wait on a condition bound to the same lock.

Two more locks stay off the start_write/end_write path: ``_io_lock`` serialises bitmap page
writes (the kernel waits for ``pending_writes`` instead), and ``_daemon_mutex`` serialises
daemon passes against load (the kernel's ``bitmap_info.mutex``).

Page flags of the on-disk image
-------------------------------
``DIRTY``      bits were *set* in the page: it must reach disk before the data writes that set
               them. Written by :meth:`ClassicBitmap.unplug`, which waits.
``PENDING``    bits were *cleared* in the page; becomes NEEDWRITE at the next daemon pass.
``NEEDWRITE``  the page must be written (cleared bits, superblock change); written lazily by
               the daemon, or by the next unplug.

Write ordering (the data-safety rule)
-------------------------------------
A page write takes a snapshot of the page under ``_lock`` and clears its flags in the same
critical section, so a bit set before the snapshot is in it and a bit set after re-marks the
page DIRTY. Writes run one at a time under ``_io_lock`` (so an older snapshot can never land
after a newer one), and a page snapshotted while DIRTY counts as "in flight" until the store
returns. Hence:

* start_write returns True while any page is DIRTY *or* in flight: a writer whose chunk bit was
  set by another thread, whose write has not completed yet, must still unplug;
* unplug first waits for the write in progress (by taking ``_io_lock``), then writes whatever
  is still DIRTY or NEEDWRITE. Every bit set before unplug was called is then durable: either
  its page was still DIRTY and this unplug wrote it, or an earlier writer snapshotted it and
  finished before this unplug got the lock. Concurrent unplugs thus share one write (a group
  commit), which is what the kernel gets from its plug lists.

Two-pass daemon
---------------
Every ``daemon_sleep`` seconds a pass turns PENDING pages into NEEDWRITE, records an advanced
``events_cleared`` in the superblock (page 0 NEEDWRITE), then looks at the counters of pending
counter pages: 2 -> 1, and 1 -> 0 with the on-disk bit cleared in memory (page PENDING). It then
writes the NEEDWRITE pages in order up to the first DIRTY one. So a chunk that became idle is
cleared in memory two passes later and on disk one pass after that (2-3 periods, md.rst
"time_base"); a chunk with a writer in flight (counter > 2) or NEEDED/RESYNC set is never
touched. When a pass finds nothing to do (``allclean``) the daemon thread sleeps until a write
or sync end makes something cleanable again.

Behaviour reference: spec/CLASSIC_BITMAP.md; formats: spec/ONDISK.md 3, 4 and 6.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
import time
from collections.abc import Callable

from llraid.bitmap.base import Bitmap, BitmapHost, SyncKind, flush_host
from llraid.bitmap.store import BitmapStore
from llraid.errors import FormatError, LlraidError
from llraid.format.bitmap import (
    BITMAP_MAGIC,
    BITMAP_SB_BYTES,
    VERSION_CLASSIC,
    VERSION_CLASSIC_HOSTENDIAN,
    BitmapFlag,
    BitmapKind,
    BitmapSuper,
)
from llraid.format.classic import check_chunksize, classic_area_bytes, classic_chunks, parse_bits

# ---- counter layout (md-bitmap.h) ---------------------------------------------------------
NEEDED = 0x8000
RESYNC = 0x4000
COUNTER_MASK = 0x3FFF
COUNTER_MAX = COUNTER_MASK  # 16383

COUNTERS_PER_PAGE = 2048  # u16 counters in one 4 KiB counter page
COUNTER_PAGE_SHIFT = 11

# ---- the on-disk image ---------------------------------------------------------------------
PAGE_SIZE = 4096
PAGE_SHIFT = 12
IO_ALIGN = 512  # the final page is written up to the used bytes rounded up to this

# Page flags as plain ints: they are tested and set under the lock on every write, where an
# IntFlag's object arithmetic would cost more than the test itself.
PAGE_DIRTY = 1
PAGE_PENDING = 2
PAGE_NEEDWRITE = 4

# Superblock state bits as ints: ``~`` on an IntFlag would also drop bits it does not know.
STATE_STALE = int(BitmapFlag.STALE)
STATE_WRITE_ERROR = int(BitmapFlag.WRITE_ERROR)
STATE_HOSTENDIAN = int(BitmapFlag.HOSTENDIAN)

SYNC_PROBE_SECTORS = PAGE_SIZE >> 9  # start_sync answers for at least one page of data
DEFAULT_DAEMON_SLEEP = 5
MDADM_MIN_CHUNK = 4096
MDADM_DEFAULT_CHUNK = 64 << 20  # mdadm never picks a smaller chunk than 64 MiB by itself
MDADM_MAX_ROOM = 256  # sectors: mdadm's cap on the room when it picks the chunk itself


class PageFlag(enum.IntFlag):
    """The flags of one 4 KiB page of the on-disk image (md-bitmap.c ``bitmap_page_attr``)."""

    DIRTY = PAGE_DIRTY
    PENDING = PAGE_PENDING
    NEEDWRITE = PAGE_NEEDWRITE


def _round_up(value: int, boundary: int) -> int:
    return -(-value // boundary) * boundary


class ClassicBitmap(Bitmap):
    """md's classic bitmap over the bitmap areas of a :class:`BitmapStore`.

    Build it with :meth:`open`, then :meth:`load` before the first write.
    """

    kind = BitmapKind.CLASSIC

    def __init__(
        self,
        store: BitmapStore,
        host: BitmapHost,
        sb: BitmapSuper,
        area: bytes,
        *,
        sync_size: int,
        events: int,
        resync_offset: int,
        location: int = 8,
        space: int = 0,
    ) -> None:
        """Use :meth:`open`; ``area`` is the bitmap area as read (superblock first)."""
        self._store = store
        self._host = host
        self._sb = sb
        self._sync_size = sync_size
        self._events = events
        self._resync_offset = resync_offset
        self._location = location
        # md caps its idea of the space to what the superblock says was reserved.
        self._space = sb.sectors_reserved if space == 0 or space > sb.sectors_reserved else space

        self._chunk_sectors = sb.chunksize >> 9
        self._chunkshift = self._chunk_sectors.bit_length() - 1
        self._chunks = -(-sync_size // self._chunk_sectors)
        self._used = classic_area_bytes(self._chunks)  # superblock + bits actually in use
        self._io_end = _round_up(self._used, IO_ALIGN)
        self._file_pages = -(-self._used // PAGE_SIZE)

        self._image = bytearray(self._file_pages * PAGE_SIZE)
        n = min(len(area), len(self._image))
        self._image[:n] = area[:n]
        self._bits_set = int(parse_bits(bytes(self._image), self._chunks).sum()) if self._chunks else 0
        self._page_flags = [0] * self._file_pages
        self._ndirty = 0  # pages with PAGE_DIRTY
        self._inflight_dirty = 0  # pages snapshotted while DIRTY whose write has not returned

        ncpages = -(-self._chunks // COUNTERS_PER_PAGE)
        self._counters = [0] * self._chunks
        self._cpage_count = [0] * ncpages
        self._cpage_pending = [False] * ncpages

        self._flags = sb.state
        if sb.version == VERSION_CLASSIC_HOSTENDIAN:
            self._flags |= STATE_HOSTENDIAN
        if sb.events < events:
            self._flags |= STATE_STALE  # "bitmap file is out of date": full recovery
        # A stale bitmap says nothing about the recent past, so nothing older may rely on it.
        self._events_cleared = events if self._flags & STATE_STALE else sb.events_cleared
        self._need_sync = False  # events_cleared advanced and not yet recorded in the sb page
        self._allclean = False
        self._daemon_seconds = float(sb.daemon_sleep)
        self._last_run = time.monotonic()
        self._last_end_sync = time.monotonic()

        self._lock = threading.Lock()
        self._overflow = threading.Condition(self._lock)
        self._io_lock = threading.Lock()
        self._daemon_mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._daemon_idle = False  # the daemon thread sleeps until something is cleanable
        self.daemon_error: LlraidError | None = None  # last failure of the background thread

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: BitmapStore,
        host: BitmapHost,
        *,
        array_uuid: bytes,
        sync_size: int,
        events: int,
        resync_offset: int,
        location: int = 8,
        space: int = 0,
        room: int | None = None,
    ) -> ClassicBitmap:
        """Read and validate the bitmap superblock and bits, like md_bitmap_create/read_sb.

        ``sync_size`` (sectors), ``events`` and ``resync_offset`` are the array's; the chunk
        count follows the array's ``sync_size``, not the one stored in the superblock.
        ``location`` (sectors from the md superblock) and ``space`` (sectors, 0 = unknown) are
        only reported by :meth:`metadata_view`; ``room`` (sectors) is how much the member has
        for the bitmap: a bitmap that would not fit is refused, it would overwrite data.
        """
        sb = BitmapSuper.parse(store.read(0, BITMAP_SB_BYTES))
        cls._validate(sb, array_uuid)
        chunks = -(-sync_size // (sb.chunksize >> 9))
        length = _round_up(classic_area_bytes(chunks), IO_ALIGN)
        if room is not None and length > room * 512:
            fits = room * 512
            raise FormatError(
                f"classic bitmap of {chunks} chunks needs {length} bytes, only {fits} fit before the data"
            )
        area = sb.build() + store.read(BITMAP_SB_BYTES, length - BITMAP_SB_BYTES)
        return cls(
            store,
            host,
            sb,
            area,
            sync_size=sync_size,
            events=events,
            resync_offset=resync_offset,
            location=location,
            space=space,
        )

    @staticmethod
    def _validate(sb: BitmapSuper, array_uuid: bytes) -> None:
        if sb.version not in (VERSION_CLASSIC_HOSTENDIAN, VERSION_CLASSIC):
            # 5 is clustered md, 6 llbitmap: the classic code refuses both.
            raise FormatError(f"invalid bitmap superblock: unrecognized superblock version {sb.version}")
        check_chunksize(sb.chunksize)
        if sb.daemon_sleep < 1:
            raise FormatError(f"invalid bitmap superblock: daemon sleep {sb.daemon_sleep} out of range")
        if sb.write_behind > COUNTER_MAX:
            raise FormatError(f"invalid bitmap superblock: write-behind limit {sb.write_behind} out of range")
        if sb.uuid != array_uuid:
            raise FormatError("bitmap superblock UUID mismatch")

    @staticmethod
    def new_superblock(
        array_uuid: bytes,
        sync_size: int,
        chunksize: int,
        daemon_sleep: int = DEFAULT_DAEMON_SLEEP,
        write_behind: int = 0,
        sectors_reserved: int = 0,
    ) -> BitmapSuper:
        """The superblock ``mdadm --create --bitmap=internal`` writes (version 4, events 0)."""
        if len(array_uuid) != 16:
            raise ValueError("the array uuid is 16 bytes")
        check_chunksize(chunksize)
        if daemon_sleep < 1:
            raise ValueError("daemon_sleep must be at least 1 second")
        if not 0 <= write_behind <= COUNTER_MAX:
            raise ValueError(f"write_behind must be 0..{COUNTER_MAX}")
        return BitmapSuper(
            magic=BITMAP_MAGIC,
            version=VERSION_CLASSIC,
            uuid=array_uuid,
            events=0,
            events_cleared=0,
            sync_size=sync_size,
            state=0,
            chunksize=chunksize,
            daemon_sleep=daemon_sleep,
            write_behind=write_behind,
            sectors_reserved=sectors_reserved,
            nodes=0,
            cluster_name=bytes(64),
            pad=bytes(120),
        )

    @staticmethod
    def initial_area(sb: BitmapSuper, boundary: int = PAGE_SIZE) -> bytes:
        """Superblock plus all-ones bits over mdadm's ``calc_bitmap_size(sb, boundary)``.

        mdadm uses a 4096 boundary, or 512 when the bitmap offset is not a multiple of 8.
        """
        size = _round_up(classic_area_bytes(classic_chunks(sb)), boundary)
        return sb.build() + b"\xff" * (size - BITMAP_SB_BYTES)

    @staticmethod
    def choose_chunksize(size_sectors: int, room_sectors: int) -> int:
        """mdadm's chunk size (bytes) for ``size_sectors`` per member and the bitmap room.

        The smallest power of two from 4 KiB whose bits fit in the room, but at least 64 MiB;
        the room is capped at 128 KiB as mdadm does when no ``--bitmap-chunk`` is given.
        """
        room = min(room_sectors, MDADM_MAX_ROOM)
        max_bits = (room * 512 - BITMAP_SB_BYTES) * 8
        if max_bits <= 0:
            raise ValueError(f"no room for a bitmap in {room_sectors} sectors")
        chunk = MDADM_MIN_CHUNK
        bits = size_sectors * 512 // chunk + 1
        while bits > max_bits:
            chunk *= 2
            bits = (bits + 1) // 2
        return max(chunk, MDADM_DEFAULT_CHUNK)

    # ---- facts -------------------------------------------------------------------------------

    @property
    def chunks(self) -> int:
        return self._chunks

    @property
    def chunksize(self) -> int:
        """Bytes of data per chunk (bit)."""
        return self._sb.chunksize

    @property
    def chunk_sectors(self) -> int:
        return self._chunk_sectors

    @property
    def events(self) -> int:
        """The array events this bitmap last heard of (open or :meth:`update_sb`)."""
        return self._events

    @property
    def events_cleared(self) -> int:
        return self._events_cleared

    def covers_since(self, events: int) -> bool:
        return events >= self._events_cleared

    @property
    def flags(self) -> BitmapFlag:
        return BitmapFlag(self._flags & sum(BitmapFlag))

    @property
    def dirty_bits(self) -> int:
        """How many chunk bits are set in the image of the on-disk bitmap."""
        with self._lock:
            return self._bits_set

    @property
    def file_pages(self) -> int:
        """4 KiB pages of the on-disk image in use."""
        return self._file_pages

    def counter(self, chunk: int) -> int:
        """The raw 16-bit counter of ``chunk`` (NEEDED | RESYNC | COUNTER)."""
        with self._lock:
            return self._counters[chunk]

    def page_flags(self, page: int) -> PageFlag:
        with self._lock:
            return PageFlag(self._page_flags[page])

    def needs_sync(self) -> bool:
        """Some chunk is NEEDED or being resynced."""
        with self._lock:
            return any(c & (NEEDED | RESYNC) for c in self._counters)

    # ---- bit and counter helpers (caller holds _lock) ---------------------------------------

    def _set_bit(self, chunk: int) -> None:
        at = BITMAP_SB_BYTES + (chunk >> 3)
        mask = 1 << (chunk & 7)
        byte = self._image[at]
        if not byte & mask:
            self._image[at] = byte | mask
            self._bits_set += 1
        page = at >> PAGE_SHIFT
        flags = self._page_flags[page]
        if not flags & PAGE_DIRTY:
            self._page_flags[page] = flags | PAGE_DIRTY
            self._ndirty += 1

    def _clear_bit(self, chunk: int) -> None:
        at = BITMAP_SB_BYTES + (chunk >> 3)
        mask = 1 << (chunk & 7)
        byte = self._image[at]
        if byte & mask:
            self._image[at] = byte & ~mask
            self._bits_set -= 1
        page = at >> PAGE_SHIFT
        flags = self._page_flags[page]
        if not flags & PAGE_NEEDWRITE:  # already due to be written: the write will carry it
            self._page_flags[page] = flags | PAGE_PENDING
            self._allclean = False

    def _mark_unclean(self) -> None:
        """Something can be cleaned now: make sure the daemon thread is not asleep for good."""
        self._allclean = False
        if self._daemon_idle:
            self._daemon_idle = False
            self._wake.set()

    def _span(self, offset: int) -> tuple[int, int]:
        """``(chunk, sectors)`` answered by one counter at ``offset``, as md_bitmap_get_counter.

        A counter page with no non-zero counter stands for its whole span (2048 chunks), so
        sync probes skip idle regions in big steps; so does anything beyond the last chunk.
        """
        chunk = offset >> self._chunkshift
        cpage = chunk >> COUNTER_PAGE_SHIFT
        if chunk >= self._chunks or not self._cpage_count[cpage]:
            page_sectors = self._chunk_sectors << COUNTER_PAGE_SHIFT
            return -1, page_sectors - (offset & (page_sectors - 1))
        return chunk, self._chunk_sectors - (offset & (self._chunk_sectors - 1))

    # ---- IO path -------------------------------------------------------------------------------

    def start_write(self, offset: int, sectors: int) -> bool:
        """Count one more writer on every chunk of the range; the first one sets the bit.

        True while some page holds set bits that are not yet durable (DIRTY, or being written
        by another thread's unplug): the caller must :meth:`unplug` before its data IO.
        """
        counters = self._counters
        shift = self._chunkshift
        end = offset + sectors
        while offset < end:
            chunk = offset >> shift
            if chunk >= self._chunks:
                break
            with self._lock:
                c = counters[chunk]
                while c & COUNTER_MASK == COUNTER_MAX:
                    self._overflow.wait()  # 16383 writers on one chunk: wait for one to end
                    c = counters[chunk]
                if c == 0:
                    self._set_bit(chunk)
                    self._cpage_count[chunk >> COUNTER_PAGE_SHIFT] += 1
                    c = 2
                elif c == 1:
                    c = 2  # the bit is still set: just keep it from being cleared
                counters[chunk] = c + 1
            offset = (chunk + 1) << shift
        with self._lock:
            return self._ndirty > 0 or self._inflight_dirty > 0

    def end_write(self, offset: int, sectors: int) -> None:
        """One writer less on every chunk; a degraded write leaves its chunks NEEDED."""
        degraded = self._host.is_degraded()
        counters = self._counters
        shift = self._chunkshift
        end = offset + sectors
        while offset < end:
            chunk = offset >> shift
            if chunk >= self._chunks:
                break
            with self._lock:
                c = counters[chunk]
                if c & COUNTER_MASK == 0:
                    raise ValueError(f"end_write of chunk {chunk} without a start_write")
                if not degraded:
                    if self._events_cleared < self._events:
                        # Every member has seen everything up to now: devices at least this
                        # new may be re-added with a bitmap-guided recovery.
                        self._events_cleared = self._events
                        self._need_sync = True
                elif not c & NEEDED:
                    c |= NEEDED  # a missing member did not get this write
                if c & COUNTER_MASK == COUNTER_MAX:
                    self._overflow.notify_all()
                c -= 1
                counters[chunk] = c
                if c <= 2:  # idle (and no NEEDED/RESYNC): the daemon may start clearing it
                    self._cpage_pending[chunk >> COUNTER_PAGE_SHIFT] = True
                    self._mark_unclean()
            offset = (chunk + 1) << shift

    def unplug(self) -> None:
        """Write every DIRTY or NEEDWRITE page; return when the store has them durably.

        Waits first for a page write already in progress, which may carry bits this caller's
        start_write relied on (see the module docstring).
        """
        with self._lock:
            if (
                not self._ndirty
                and not self._inflight_dirty
                and not any(f & PAGE_NEEDWRITE for f in self._page_flags)
            ):
                return  # every set bit is durable and nothing else is due
        self._write_pages(self._select_flagged)

    # ---- page writes ---------------------------------------------------------------------------

    def _select_flagged(self) -> list[int]:
        return [p for p, f in enumerate(self._page_flags) if f & (PAGE_DIRTY | PAGE_NEEDWRITE)]

    def _select_needwrite(self) -> list[int]:
        """The daemon's choice: NEEDWRITE pages in order, up to the first DIRTY one.

        unplug writes that page and all after it; stopping there keeps the superblock page
        ahead of the others. A stale bitmap is not written until load rewrote it.
        """
        if self._flags & STATE_STALE:
            return []
        chosen = []
        for p, f in enumerate(self._page_flags):
            if f & PAGE_DIRTY:
                break
            if f & PAGE_NEEDWRITE:
                chosen.append(p)
        return chosen

    def _select_all(self) -> list[int]:
        return list(range(self._file_pages))

    def _page_piece(self, page: int) -> tuple[int, bytes]:
        start = page * PAGE_SIZE
        return start, bytes(self._image[start : min(start + PAGE_SIZE, self._io_end)])

    def _write_pages(self, select: Callable[[], list[int]], before: Callable[[], None] | None = None) -> None:
        """Snapshot the selected pages (clearing their flags) and write them, one writer at a time.

        ``before`` runs under the lock just before the selection (superblock updates).
        """
        with self._io_lock:
            with self._lock:
                if before is not None:
                    before()
                pages = select()
                old = [self._page_flags[p] for p in pages]
                dirty = 0
                pieces = []
                for p, flags in zip(pages, old, strict=True):
                    if flags & PAGE_DIRTY:
                        dirty += 1
                    self._page_flags[p] = 0  # the snapshot carries sets, clears and the sb
                    pieces.append(self._page_piece(p))
                self._ndirty -= dirty
                self._inflight_dirty += dirty
            if not pieces:
                return
            try:
                self._store.write(pieces)
            except BaseException:
                with self._lock:
                    # Nothing reached any member: the pages are as unwritten as before.
                    self._flags |= STATE_WRITE_ERROR
                    for p, flags in zip(pages, old, strict=True):
                        now = self._page_flags[p]
                        if flags & PAGE_DIRTY and not now & PAGE_DIRTY:
                            self._ndirty += 1
                        self._page_flags[p] = now | (flags & PAGE_DIRTY) | PAGE_NEEDWRITE
                    self._inflight_dirty -= dirty
                raise
            with self._lock:
                self._inflight_dirty -= dirty

    def _put_sb(self, sb: BitmapSuper) -> None:
        """Install a new in-memory superblock and copy it into page 0 (caller holds _lock)."""
        self._sb = sb
        self._image[:BITMAP_SB_BYTES] = self._sb.build()

    # ---- daemon --------------------------------------------------------------------------------

    def daemon_work(self) -> None:
        """One daemon pass (two-pass clearing); nothing if ``daemon_sleep`` has not elapsed."""
        with self._daemon_mutex:
            now = time.monotonic()
            if now - self._last_run < self._daemon_seconds:
                return
            self._last_run = now
            if not self._allclean:
                flush_host(self._host)  # bits cleared by this pass cover durable data only
            with self._lock:
                if self._allclean:
                    self._daemon_idle = True
                    return
                self._allclean = True
                self._clean_pass()
            self._write_pages(self._select_needwrite)

    def _clean_pass(self) -> None:
        """Steps 2-4 of a daemon pass (caller holds _lock)."""
        flags = self._page_flags
        for p, f in enumerate(flags):
            if f & PAGE_PENDING:  # bits cleared by the previous pass: write them now
                flags[p] = (f & ~PAGE_PENDING) | PAGE_NEEDWRITE
        if self._need_sync:
            self._need_sync = False
            self._put_sb(dataclasses.replace(self._sb, events_cleared=self._events_cleared))
            flags[0] |= PAGE_NEEDWRITE
        counters = self._counters
        for cpage, pending in enumerate(self._cpage_pending):
            if not pending:
                continue
            self._cpage_pending[cpage] = False
            first = cpage << COUNTER_PAGE_SHIFT
            for chunk in range(first, min(first + COUNTERS_PER_PAGE, self._chunks)):
                c = counters[chunk]
                if c == 1 and not self._need_sync:
                    counters[chunk] = 0
                    self._cpage_count[cpage] -= 1
                    self._clear_bit(chunk)
                elif c == 1 or c == 2:
                    counters[chunk] = 1
                    self._cpage_pending[cpage] = True
                    self._allclean = False

    def daemon_pass(self) -> None:
        """One daemon pass now, whatever the time since the last one (flush runs three)."""
        with self._daemon_mutex:
            self._last_run -= 2 * self._daemon_seconds + 1
        self.daemon_work()

    def start_daemon(self) -> None:
        """Run the daemon in a background thread until :meth:`close`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._daemon_loop, name="classic-bitmap-daemon", daemon=True)
        self._thread.start()

    def _daemon_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                idle = self._daemon_idle
            timeout = None if idle else max(0.0, self._last_run + self._daemon_seconds - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.daemon_work()
            except LlraidError as e:  # no member took the write; the array will hear from IO
                self.daemon_error = e

    def close(self) -> None:
        """Stop and join the daemon thread (no flush)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join()
        self._thread = None

    @property
    def daemon_sleep(self) -> float:
        return self._daemon_seconds

    @daemon_sleep.setter
    def daemon_sleep(self, seconds: float) -> None:
        if not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"daemon_sleep must be a positive number of seconds, not {seconds}")
        self._daemon_seconds = float(seconds)
        self._wake.set()  # let a sleeping daemon thread pick up the new period

    def flush(self) -> None:
        """Three daemon passes with the clock pushed back, then the superblock and every page."""
        for _ in range(3):
            self.daemon_pass()
        self._write_pages(self._select_all, self._sb_fields)

    # ---- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Turn the bits read at open into counters; a stale bitmap is first set to all ones."""
        with self._daemon_mutex:
            # Forget any in-memory resync state (nothing after a fresh open, but cheap).
            sector = 0
            while sector < self._sync_size:
                sector += self.start_sync(sector, False)[1]
            self.close_sync()

            start = 0
            if not self._host.is_degraded() or self._events_cleared == self._events:
                start = self._resync_offset
            # Otherwise keep every set bit NEEDED: a re-added member will need those chunks.

            if self._flags & STATE_STALE:
                with self._lock:
                    for p in range(self._file_pages):
                        lo = BITMAP_SB_BYTES if p == 0 else p * PAGE_SIZE
                        self._image[lo : (p + 1) * PAGE_SIZE] = b"\xff" * ((p + 1) * PAGE_SIZE - lo)
                self._write_pages(self._select_all)

            with self._lock:
                bits = parse_bits(bytes(self._image[: self._used]), self._chunks) if self._chunks else None
                self._bits_set = 0 if bits is None else int(bits.sum())
                shift = self._chunkshift
                if bits is not None:
                    for chunk in bits.nonzero()[0].tolist():
                        c = self._counters[chunk]
                        if c == 0:
                            c = 2
                            cpage = chunk >> COUNTER_PAGE_SHIFT
                            self._cpage_count[cpage] += 1
                            self._cpage_pending[cpage] = True
                        if (chunk + 1) << shift >= start:
                            c |= NEEDED
                        self._counters[chunk] = c
                self._flags &= ~STATE_STALE
                self._mark_unclean()
                needed = any(c & NEEDED for c in self._counters)
            self._last_run = time.monotonic()
        if needed:
            self._host.request_sync()
        self.update_sb(self._events)

    def _sb_fields(self) -> None:
        """Bring the in-memory superblock up to date (caller holds _lock)."""
        if self._events < self._events_cleared:
            # md's events can step back by one (clean/dirty roll-back): never claim the future.
            self._events_cleared = self._events
        self._put_sb(
            dataclasses.replace(
                self._sb,
                events=self._events,
                events_cleared=self._events_cleared,
                state=self._flags & ~STATE_WRITE_ERROR,
                daemon_sleep=max(1, int(self._daemon_seconds)),
                sync_size=self._sync_size,
            )
        )

    def update_sb(self, events: int) -> None:
        """Record the array's new event count and write page 0 (superblock + in-memory bits)."""

        def record() -> None:
            self._events = events
            self._sb_fields()

        self._write_pages(lambda: [0], record)

    # ---- sync ----------------------------------------------------------------------------------

    def skip_sync_blocks(self, offset: int, kind: SyncKind) -> int:
        """Always 0: the classic bitmap answers through :meth:`start_sync` only."""
        return 0

    def start_sync(self, offset: int, degraded: bool) -> tuple[bool, int]:
        """Whether the chunks from ``offset`` must be synced, covering at least 8 sectors.

        NEEDED becomes RESYNC unless ``degraded`` (then it is a probe that changes nothing).
        """
        must = False
        covered = 0
        while covered < SYNC_PROBE_SECTORS:
            with self._lock:
                chunk, span = self._span(offset)
                if chunk >= 0:
                    c = self._counters[chunk]
                    if c & RESYNC:
                        must = True
                    elif c & NEEDED:
                        must = True
                        if not degraded:
                            self._counters[chunk] = (c | RESYNC) & ~NEEDED
            offset += span
            covered += span
        return must, covered

    def _end_sync_one(self, offset: int, aborted: bool) -> int:
        """End the resync of the counter at ``offset``; returns the sectors it stands for."""
        with self._lock:
            chunk, span = self._span(offset)
            if chunk >= 0:
                c = self._counters[chunk]
                if c & RESYNC:
                    c &= ~RESYNC
                    if aborted and not c & NEEDED:
                        c |= NEEDED  # retry it next time
                    elif c <= 2:
                        self._cpage_pending[chunk >> COUNTER_PAGE_SHIFT] = True
                        self._mark_unclean()
                    self._counters[chunk] = c
            return span

    def end_sync(self, offset: int) -> None:
        """The sync was aborted at ``offset``: the chunk being synced there stays NEEDED."""
        self._end_sync_one(offset, True)

    def close_sync(self) -> None:
        """The sync finished: no chunk is being resynced any more."""
        sector = 0
        while sector < self._sync_size:
            sector += self._end_sync_one(sector, False)

    def cond_end_sync(self, sector: int, force: bool = False) -> None:
        """Checkpoint below ``sector`` (at most every daemon_sleep unless forced).

        The caller has already waited for its sync IO below ``sector`` and records the
        checkpoint (``curr_resync_completed``) in the md superblock.
        """
        now = time.monotonic()
        if sector == 0:
            self._last_end_sync = now
            return
        if not force and now - self._last_end_sync < self._daemon_seconds:
            return
        limit = min(sector & ~(self._chunk_sectors - 1), self._sync_size)
        s = 0
        while s < limit:
            s += self._end_sync_one(s, False)
        self._last_end_sync = time.monotonic()

    # ---- views ---------------------------------------------------------------------------------

    def status_line(self) -> str:
        """The /proc/mdstat line: ``bitmap: A/B pages [NKB], CKB chunk``."""
        with self._lock:
            used = sum(1 for n in self._cpage_count if n)
        total = len(self._cpage_count)
        return f"bitmap: {used}/{total} pages [{used * PAGE_SIZE >> 10}KB], {self.chunksize >> 10}KB chunk"

    def area_image(self) -> bytes:
        with self._lock:
            return bytes(self._image[: self._io_end])

    def bits_view(self) -> str:
        """Chunk counts, one ``name value`` per line, in the spirit of llbitmap's sysfs ``bits``.

        ``chunks`` bits in all; ``dirty`` bits set in the on-disk image; ``needed`` chunks that
        must be resynced; ``resync`` chunks being resynced; ``writing`` chunks with writes in
        flight; ``pages`` allocated/total counter pages as /proc/mdstat shows them.
        """
        with self._lock:
            dirty = self._bits_set
            needed = sum(1 for c in self._counters if c & NEEDED)
            resync = sum(1 for c in self._counters if c & RESYNC)
            writing = sum(1 for c in self._counters if c & COUNTER_MASK > 2)
            used = sum(1 for n in self._cpage_count if n)
        return (
            f"chunks {self._chunks}\ndirty {dirty}\nneeded {needed}\nresync {resync}\n"
            f"writing {writing}\npages {used}/{len(self._cpage_count)}\n"
        )

    def metadata_view(self) -> str:
        """What md's ``md/bitmap/*`` sysfs files would show, one ``name value`` per line."""
        secs = int(self._daemon_seconds)
        ms = round((self._daemon_seconds - secs) * 1000)
        time_base = f"{secs}.{ms:03d}" if ms else str(secs)
        with self._lock:
            can_clear = "false" if self._need_sync else "true"
        return (
            f"location {self._location:+d}\n"
            f"space {self._space}\n"
            f"time_base {time_base}\n"
            f"backlog {self._sb.write_behind}\n"
            f"chunksize {self._sb.chunksize}\n"
            "metadata internal\n"
            f"can_clear {can_clear}\n"
            "max_backlog_used 0\n"
        )
