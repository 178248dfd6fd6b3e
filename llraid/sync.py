"""Resync, recovery, check and repair (md's md_do_sync): the loop, not the level's work.

The sync thread walks an address space window by window and asks the bitmap, for each window,
whether it may skip it (``skip_sync_blocks``) or must sync it (``start_sync``):

* **resync** (after an unclean shutdown, or chunks marked NeedSync): the sync space (raid1:
  member sectors; raid10: array sectors) from the checkpoint; the personality's
  ``sync_window`` makes one window consistent (md's sync_request). llbitmap
  skips everything but NeedSync chunks; classic syncs its NEEDED chunks; without a bitmap every
  window is synced.
* **recovery** of a member (re-added or new): its member sectors from ``recovery_offset``. A
  re-added member (bitmap_sync) gets only what the bitmap says it missed; a new member gets
  every window the bitmap does not skip (llbitmap: every written chunk; classic/none: all).
* **check** / **repair** (user requests): compare every copy of every window that can hold
  data (llbitmap skips Unwritten chunks) and count mismatched sectors like md's mismatch_cnt;
  repair rewrites the other copies from the first. Check leaves bitmap states alone: upstream's
  check turns NeedSync chunks clean without repairing them (fixtures README, surprise 3), which
  would hide a real difference.

* **Unwritten audit** (``unwritten=True`` with check / repair, llbitmap only): the opposite
  walk, over the chunks marked Unwritten, which every other sync skips. A kernel-made array can
  carry the kernel's discard bug (a discard ending inside a chunk marks the whole chunk
  Unwritten although its tail holds data); a recovery then leaves that data off the new member
  and check reports nothing. The audit reports Unwritten chunks whose copies hold non-zero or
  differing data; repair marks them NeedSync (durably), so the resync that follows makes their
  copies agree and they count as written from then on.

Each window is synced behind the array's sync barrier, so no write to it is in flight while its
copies are read and written. Progress is checkpointed (``resync_offset`` / ``recovery_offset``
in the superblocks, bitmap ``cond_end_sync``) every ``checkpoint_seconds``, so an interrupted
sync resumes where it stopped: like md, an interrupted pass ends the sync of the chunks it has
finished (Endsync) and aborts the rest (Abortsync), and records its position.

Every start, end and interruption is logged on the ``llraid.sync`` logger, in the spirit of md's
"md: resync of RAID array md0" / "md: md0: resync done." messages.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.errors import LlraidError
from llraid.format.llbitmap import LLState
from llraid.format.superblock import MAX_SECTOR
from llraid.raid.barrier import BUCKET_SIZE
from llraid.rdev import Rdev, RdevState

WINDOW = BUCKET_SIZE  # sectors per sync window at most (64 KiB, md's largest raid1/raid10 sync IO)
CHECKPOINT_SECONDS = 5.0
_UNWRITTEN = (int(LLState.UNWRITTEN), int(LLState.CLEAN_UNWRITTEN))  # "no data here" states

log = logging.getLogger("llraid.sync")

# What md calls each pass in its log ("md: data-check of RAID array md0", "md: md0: data-check done.").
_NAMES = {
    SyncKind.RESYNC: "resync",
    SyncKind.RECOVERY: "recovery",
    SyncKind.CHECK: "data-check",
    SyncKind.REPAIR: "repair",
}
_AUDIT_NAMES = {
    SyncKind.CHECK: "audit of Unwritten chunks",
    SyncKind.REPAIR: "audit and repair of Unwritten chunks",
}


@dataclass(frozen=True)
class UnwrittenChunk:
    """A chunk marked Unwritten whose copies hold data (found by the Unwritten audit)."""

    chunk: int
    sector: int  # first sector of the chunk in the sync space (raid1/raid10: array sectors)
    sectors: int
    nonzero: bool  # some copy holds bytes other than zero
    differ: bool  # the copies are not all equal

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "sector": self.sector,
            "offset": self.sector * 512,
            "bytes": self.sectors * 512,
            "nonzero": self.nonzero,
            "copies_differ": self.differ,
        }


@dataclass
class SyncStats:
    kind: str
    start: int = 0
    end: int = 0
    windows_synced: int = 0
    windows_skipped: int = 0
    sectors_synced: int = 0
    mismatches: int = 0  # sectors, as md's mismatch_cnt
    repaired: int = 0  # sectors rewritten because copies differed
    bytes_read: dict[str, int] = field(default_factory=dict)
    bytes_written: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    completed: bool = False
    member: str | None = None  # the member recovered
    stopped_at: int | None = None  # sector the interrupted pass stopped at (its checkpoint)
    unwritten_audited: int | None = None  # chunks the Unwritten audit read (None: not an audit)
    unwritten: list[UnwrittenChunk] = field(default_factory=list)  # what the audit found
    marked_need_sync: int = 0  # audit chunks repair marked NeedSync

    def as_dict(self) -> dict[str, Any]:
        audit: dict[str, Any] | None = None
        if self.unwritten_audited is not None:
            audit = {
                "chunks_audited": self.unwritten_audited,
                "chunks_with_data": len(self.unwritten),
                "marked_need_sync": self.marked_need_sync,
                "chunks": [u.as_dict() for u in self.unwritten],
            }
        return {
            "kind": self.kind,
            "completed": self.completed,
            "start_sector": self.start,
            "end_sector": self.end,
            "member": self.member,
            "windows_synced": self.windows_synced,
            "windows_skipped": self.windows_skipped,
            "sectors_synced": self.sectors_synced,
            "bytes_read": dict(self.bytes_read),
            "bytes_written": dict(self.bytes_written),
            "mismatch_cnt": self.mismatches,
            "repaired_sectors": self.repaired,
            "seconds": round(self.seconds, 3),
            "stopped_at_sector": self.stopped_at,
            "unwritten_audit": audit,
        }


Progress = Callable[[str, int, int], None]  # (kind, done sectors, total sectors)


def needed_sync(array: Array) -> SyncKind | None:
    """What md would start now: recovery of a member, or a resync of marked/unclean data."""
    if array.readonly:
        return None
    resync = array.resync_cp != MAX_SECTOR or array.sync_requested
    recovering = any(d.state is RdevState.RECOVERING for d in array.rdevs)
    if resync and (recovering or not array.is_degraded()):
        # Resync first: a recovery turns the NeedSync chunks it visits into Dirty although it only
        # rebuilds the recovering member's copy, so a resync after it would skip chunks whose
        # other copies still differ. (Degraded without a member to recover: NeedSync waits.)
        return SyncKind.RESYNC
    if recovering:
        return SyncKind.RECOVERY
    return None


class _Sync:
    """One pass of the sync thread; also the accounted member IO (:class:`SyncIO`) that the
    personality's sync windows use."""

    def __init__(
        self,
        array: Array,
        kind: SyncKind,
        stop: threading.Event | None,
        speed_limit: float | None,
        progress: Progress | None,
        checkpoint_seconds: float,
    ) -> None:
        self.array = array
        self.pers = array.personality
        self.bm = array.bitmap
        self.kind = kind
        self.stop = stop or threading.Event()
        self.speed_limit = speed_limit
        self.progress = progress
        self.checkpoint_seconds = checkpoint_seconds
        self.stats = SyncStats(kind.value)
        self.t0 = time.monotonic()
        self.bytes_moved = 0
        self.last_checkpoint = self.t0

    # accounting ---------------------------------------------------------------------------------

    def read(self, d: Rdev, ms: int, n: int) -> bytes:
        data = self.array.read_member(d, ms, n)
        self.stats.bytes_read[d.path] = self.stats.bytes_read.get(d.path, 0) + len(data)
        self.bytes_moved += len(data)
        return data

    def write(self, d: Rdev, ms: int, data: bytes) -> None:
        self.array.write_member(d, ms, data)
        self.stats.bytes_written[d.path] = self.stats.bytes_written.get(d.path, 0) + len(data)
        self.bytes_moved += len(data)

    def mismatch(self, sectors: int) -> None:
        self.stats.mismatches += sectors

    def repaired(self, sectors: int) -> None:
        self.stats.repaired += sectors

    def _throttle(self) -> None:
        if self.speed_limit:
            ahead = self.bytes_moved / self.speed_limit - (time.monotonic() - self.t0)
            if ahead > 0:
                self.stop.wait(ahead)

    def _checkpoint_due(self) -> bool:
        now = time.monotonic()
        if now - self.last_checkpoint >= self.checkpoint_seconds:
            self.last_checkpoint = now
            return True
        return False

    # walks --------------------------------------------------------------------------------------

    def run_space(self) -> None:
        """Resync / check / repair over the sync space."""
        end = self.pers.sync_sectors
        pos = (
            self.array.resync_cp if self.kind is SyncKind.RESYNC and self.array.resync_cp != MAX_SECTOR else 0
        )
        if self.kind is SyncKind.RESYNC and self.array.sync_requested:
            pos = 0  # bitmap-driven: the whole space, skipping what the bitmap says
        self.stats.start, self.stats.end = pos, end
        degraded = self.array.is_degraded()
        self.bm.cond_end_sync(0)
        while pos < end:
            if self.stop.is_set():
                self._interrupt(pos)
                return
            skip = self.bm.skip_sync_blocks(pos, self.kind)
            if skip:
                pos += min(skip, end - pos)
                self.stats.windows_skipped += 1
                continue
            if self.kind is SyncKind.CHECK:
                must, n = True, WINDOW - pos % WINDOW
            else:
                must, n = self.bm.start_sync(pos, degraded)
            n = min(n, WINDOW - pos % WINDOW, end - pos)
            if must or self.kind.requested:
                self._locked(pos, n, functools.partial(self.pers.sync_window, self, self.kind, pos, n))
                self.stats.windows_synced += 1
                self.stats.sectors_synced += n
            else:
                self.stats.windows_skipped += 1
            pos += n
            self._after_window(pos, end)
        self._finish()

    def run_recovery(self, target: Rdev) -> None:
        """Rebuild ``target`` from its recovery offset to the end of the member."""
        assert target.role is not None
        end = self.array.dev_sectors
        ms = target.recovery_offset
        self.stats.start, self.stats.end, self.stats.member = ms, end, target.path
        unit = self.pers.recovery_unit
        self.bm.cond_end_sync(0)
        while ms < end:
            if self.stop.is_set() or target.state is not RdevState.RECOVERING:
                self._interrupt(ms, target)
                return
            step = min(WINDOW - ms % WINDOW, unit - ms % unit, end - ms)
            v = self.pers.member_to_sync(target.role, ms)
            if v is None:
                ms += step
                target.recovery_offset = ms
                continue
            skip = self.bm.skip_sync_blocks(v, SyncKind.RECOVERY)
            if skip:
                ms += min(skip, step)
                target.recovery_offset = ms
                self.stats.windows_skipped += 1
                continue
            must, n = self.bm.start_sync(v, True)
            n = min(n, step)
            if must or not target.bitmap_sync:
                work = functools.partial(self.pers.recover_window, self, target, ms, v, n)
                self._locked(v, n, work)
                self.stats.windows_synced += 1
                self.stats.sectors_synced += n
            else:
                self.stats.windows_skipped += 1
            ms += n
            target.recovery_offset = ms
            if self._checkpoint_due():
                self.bm.cond_end_sync(v + n, force=True)
                self.array.update_sb()
            self._throttle()
            if self.progress:
                self.progress(self.kind.value, ms, end)
        self.array.finish_recovery(target)
        self.stats.completed = True

    def run_unwritten(self) -> None:
        """The Unwritten audit: read every copy of every chunk marked Unwritten; report those
        holding non-zero or differing data; repair marks them NeedSync for the resync."""
        bm = self.bm
        assert isinstance(bm, LocklessBitmap)
        end, cs = self.pers.sync_sectors, bm.chunksize
        self.stats.start, self.stats.end = 0, end
        self.stats.unwritten_audited = 0
        for c in range(bm.chunks):
            if self.stop.is_set():
                self.stats.stopped_at = c * cs
                return
            if int(bm.state(c)) not in _UNWRITTEN:
                continue
            first = c * cs
            n = min(cs, end - first)
            found = [False, False]  # non-zero, copies differ
            for v in range(first, first + n, WINDOW):
                w = min(WINDOW - v % WINDOW, first + n - v)
                self._locked(v, w, functools.partial(self._audit_window, v, w, found))
                self.stats.windows_synced += 1
                self.stats.sectors_synced += w
                self._throttle()
                if self.progress:
                    self.progress(self.kind.value, v + w, end)
            self.stats.unwritten_audited += 1
            # A write that reached the chunk meanwhile made it Dirty: its data is accounted for.
            if (found[0] or found[1]) and int(bm.state(c)) in _UNWRITTEN:
                self.stats.unwritten.append(UnwrittenChunk(c, first, n, found[0], found[1]))
        if self.kind is SyncKind.REPAIR and self.stats.unwritten:
            self.stats.marked_need_sync = bm.mark_need_sync([u.chunk for u in self.stats.unwritten])
        self.stats.completed = True

    def _audit_window(self, v: int, n: int, found: list[bool]) -> None:
        nonzero, differ = self.pers.audit_window(self, v, n)
        found[0] = found[0] or nonzero
        found[1] = found[1] or differ
        if differ:
            self.stats.mismatches += n  # sectors, as check counts them

    def _locked(self, v: int, n: int, work: Callable[[], None]) -> None:
        barrier = self.array.barrier
        buckets = barrier.of(v, n)
        barrier.raise_barrier(buckets)
        try:
            work()
        finally:
            barrier.lower_barrier(buckets)

    def _after_window(self, pos: int, end: int) -> None:
        if self.kind is SyncKind.RESYNC and self._checkpoint_due():
            self.bm.cond_end_sync(pos, force=True)
            self.array.set_resync_checkpoint(pos)
        self._throttle()
        if self.progress:
            self.progress(self.kind.value, pos, end)

    def _interrupt(self, pos: int, target: Rdev | None = None) -> None:
        # md (raid1/raid10 sync_request past max_sector after an abort): Abortsync from the
        # current chunk on, then Endsync for everything, so the chunks already synced stay
        # synced (Dirty) and the next pass skips them. A recovery's member sectors do not map
        # monotonically to the bitmap's space (raid10): abort every chunk it touched.
        self.bm.end_sync(pos if target is None else 0)
        if target is None and self.kind is not SyncKind.CHECK:
            self.bm.close_sync()
        self.stats.stopped_at = pos
        if self.kind is SyncKind.RESYNC:
            self.array.set_resync_checkpoint(pos)
        else:
            self.array.update_sb()

    def _finish(self) -> None:
        if self.kind is not SyncKind.CHECK:
            self.bm.close_sync()
        if self.kind is SyncKind.RESYNC:
            self.array.resync_finished()
        else:
            self.array.update_sb()
        self.stats.completed = True


def run_sync(
    array: Array,
    kind: SyncKind | None = None,
    *,
    stop: threading.Event | None = None,
    speed_limit: float | None = None,
    progress: Progress | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    unwritten: bool = False,
) -> SyncStats:
    """Run one sync pass to the end (or until ``stop``); ``kind`` None = what is needed.

    ``unwritten`` (with CHECK or REPAIR): the Unwritten audit instead of the usual pass."""
    kind = kind or needed_sync(array)
    if kind is None:
        return SyncStats("idle", completed=True)
    if unwritten and (not kind.requested or not isinstance(array.bitmap, LocklessBitmap)):
        raise LlraidError("the Unwritten audit is a check or repair of an array with the lockless bitmap")
    s = _Sync(array, kind, stop, speed_limit, progress, checkpoint_seconds)
    name = _AUDIT_NAMES[kind] if unwritten else _NAMES[kind]
    if kind is SyncKind.RECOVERY:
        targets = [d for d in array.rdevs if d.state is RdevState.RECOVERING]
        if not targets:
            return SyncStats("idle", completed=True)
        if not all(d.bitmap_sync for d in targets):
            array.bitmap.start_recovery()
        for d in targets:
            how = "bitmap-based" if d.bitmap_sync else "full"
            log.info(
                "%s: %s recovery of %s (role %s) from sector %d of %d",
                array.tag, how, d.path, d.role, d.recovery_offset, array.dev_sectors,
            )  # fmt: skip
            s.run_recovery(d)
            if not s.stats.completed:
                break
    else:
        where = "" if unwritten else _start_text(array, kind)
        log.info("%s: %s started%s", array.tag, name, where)
        if unwritten:
            s.run_unwritten()
        else:
            s.run_space()
    s.stats.seconds = time.monotonic() - s.t0
    _log_end(array, name, s.stats)
    return s.stats


def _start_text(array: Array, kind: SyncKind) -> str:
    """Where the pass starts, as :meth:`_Sync.run_space` decides it."""
    if kind is SyncKind.RESYNC and array.sync_requested:
        return " (bitmap-driven: only the chunks the bitmap marks)"
    if kind is SyncKind.RESYNC and array.resync_cp not in (0, MAX_SECTOR):
        return f" at sector {array.resync_cp} of {array.sync_sectors} (resuming)"
    return f" ({array.sync_sectors} sectors)"


def _log_end(array: Array, name: str, st: SyncStats) -> None:
    moved = f"read {sum(st.bytes_read.values())} bytes, wrote {sum(st.bytes_written.values())} bytes"
    if not st.completed:
        # resync and recovery record where they stopped; a check or repair starts over
        resumes = st.kind in ("resync", "recovery")
        log.warning(
            "%s: %s interrupted at sector %s of %d%s",
            array.tag, name, st.stopped_at, st.end,
            "; checkpoint recorded, the next run resumes there" if resumes else "",
        )  # fmt: skip
        return
    if st.member is not None:
        text = f"{array.tag}: recovery of {st.member} done: {st.sectors_synced} sectors rebuilt, {moved}"
        log.info("%s", text)
        return
    text = f"{array.tag}: {name} done: {st.sectors_synced} sectors, {moved}"
    if st.kind in ("check", "repair"):
        text += f", mismatch_cnt {st.mismatches}"
    if st.kind == "repair":
        text += f", {st.repaired} sectors repaired"
    if st.unwritten_audited is not None:
        text += f"; {st.unwritten_audited} Unwritten chunks audited, {len(st.unwritten)} hold data"
        if st.marked_need_sync:
            text += f", {st.marked_need_sync} marked NeedSync for resync"
    if st.unwritten or (st.mismatches and st.kind == "check"):
        log.warning("%s", text)
    else:
        log.info("%s", text)
    for u in st.unwritten[:10]:
        log.warning(
            "%s: chunk %d (array bytes %d..%d) is marked Unwritten but holds %s",
            array.tag, u.chunk, u.sector * 512, (u.sector + u.sectors) * 512 - 1,
            "data that differs between copies" if u.differ else "data",
        )  # fmt: skip
    if len(st.unwritten) > 10:
        log.warning("%s: ... and %d more such chunks", array.tag, len(st.unwritten) - 10)


def sync_until_idle(array: Array, **kw: Any) -> list[SyncStats]:
    """Every sync md would run now, one after another (recovery first, then resync)."""
    done = []
    while (kind := needed_sync(array)) is not None:
        stats = run_sync(array, kind, **kw)
        done.append(stats)
        if not stats.completed:
            break
    return done
