"""Randomised torture runs: a workload with known data, power cuts and faults, then proof.

One run (:func:`run_one`) creates a small array (raid1, raid10 n2/f2/o2, raid5 left-symmetric on
three or four members, raid4; with no bitmap, the classic bitmap or llbitmap) on files, and then
goes through one to three *generations*. Each
generation assembles the members through a :class:`~llraid.torture.simdev.SimWorld` (volatile
write caches), runs a seeded workload and ends with a power cut at a chosen IO (any write, a
superblock write, a bitmap write, a data write or a flush), at the end, or with a clean stop.
What is left of the members is assembled again by the next generation, whose resync or
recovery runs with the workload interleaved (so cuts also fall during resync and recovery).
Generations may fail a member and re-add it or replace it with a spare; *fault* runs inject
EIO on reads, writes, flushes or the bitmap area, or make a member vanish.

At the end the members are assembled once more, and checked:

(a) every write acknowledged and then covered by a completed flush (or written FUA) reads back
    exactly (or as a newer write to the same sector); nothing reads back as garbage; what was
    read right after assembly does not change when resync/recovery runs;
(b) after resync/recovery, all copies agree (a direct comparison of every copy, and
    ``check``'s mismatch count); raid4/5: parity is consistent (the XOR of every member is zero)
    wherever llbitmap does not say Unwritten;
(c) with llbitmap: no chunk was Unwritten/Clean on disk (in the copy assembly loads) while its
    copies differed, and resync read or wrote only chunks the bitmap marked. raid4/5 (see
    ``_must_agree``): no chunk was Clean/CleanUnwritten on disk with inconsistent parity, nor
    Unwritten with inconsistent parity where a write was ever issued.

raid4/5 and the write hole. A power cut can leave a stripe row with data and parity from
different times; resync rebuilds the parity, but a block that must be rebuilt *from* that
parity before then (its member missing or still being recovered) comes back wrong, even data
flushed long before. md makes no promise there: it refuses to start a dirty degraded array
("cannot start dirty degraded array"; ``mdadm --force`` starts it, "data corruption possible").
So the runner (1) lets a pending resync finish before it fails a member on purpose, and (2) when
assembly refuses a dirty degraded array, forces it as mdadm would and excuses exactly the data
blocks of the unavailable members in the stripe rows written but not yet durable at a cut
since the parity was last rebuilt everywhere (:meth:`_Run._excuse_write_hole`); they are not
checked until a newer write to them is durable, and the report counts them (and how many did
read back wrong) apart. Everything else is checked as for the mirrors.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llraid.array import Array, IOFailure, Rdev, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.classic import ClassicBitmap
from llraid.bitmap.lockless import LocklessBitmap
from llraid.create import CreateSpec, create, parse_layout
from llraid.device import SECTOR
from llraid.errors import DirtyDegradedError, LlraidError, NotMdMemberError
from llraid.format.bitmap import BitmapKind
from llraid.format.llbitmap import DATA_OFFSET, LLState
from llraid.member import open_member
from llraid.raid.parity import Raid5Runtime
from llraid.sync import needed_sync, run_sync
from llraid.torture.oracle import Oracle, Verdict
from llraid.torture.simdev import CutPlan, CutReport, Fault, Layout, SimWorld

MiB = 1 << 20
MIRROR_LEVELS = ("raid1", "raid10n2", "raid10f2", "raid10o2")
# raid5: left-symmetric on 3 members, raid5x4 on 4; raid4: parity on the last of 3 to 5 (with 4
# data blocks a one-block write is a read-modify-write; with fewer, reconstruct-write reads less)
PARITY_LEVELS = ("raid5", "raid5x4", "raid4")
LEVELS = MIRROR_LEVELS + PARITY_LEVELS
BITMAPS = ("none", "classic", "lockless")
_BITMAP_KINDS = {"none": BitmapKind.NONE, "classic": BitmapKind.CLASSIC, "lockless": BitmapKind.LOCKLESS}
FAULT_KINDS = ("read", "write", "vanish", "bitmap", "sync", "slow")
# Engine bugs this harness found are fixed (tests/torture/test_known_bugs.py keeps each one as a
# regression test). The workaround switches stay for bisecting: "flush-before-superblocks" and
# "catch-up-at-assembly" make the runner do by hand what the engine now does itself.
KNOWN_WORKAROUNDS: tuple[str, ...] = ("flush-before-superblocks", "catch-up-at-assembly")
KNOWN_BUGS: tuple[str, ...] = ()  # none open
# Mutating ops of each kind a generation issues, roughly (measured over all configurations).
_CUT_RANGE = {"any": 400, "sb": 35, "bitmap": 60, "data": 220, "sync": 100}


@dataclass(frozen=True)
class Config:
    level: str  # one of LEVELS
    bitmap: str  # one of BITMAPS

    @property
    def name(self) -> str:
        return f"{self.level}/{self.bitmap}"


@dataclass
class RunResult:
    seed: int
    config: str
    mode: str  # "cut" or "fault"
    geometry: str = ""
    cuts: list[CutReport] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    writes: int = 0
    writes_durable: int = 0
    verdict: Verdict = field(default_factory=Verdict)
    live: Verdict = field(default_factory=Verdict)
    mismatches: int = 0  # sectors whose copies differ after the final sync (direct comparison)
    check_mismatches: int = 0  # what `check` counted
    clean_while_differing: int = 0  # llbitmap chunks Unwritten/Clean on disk with differing copies
    resync_outside: int = 0  # llbitmap chunks resync touched that the bitmap did not mark
    forced_starts: int = 0  # raid4/5 dirty degraded starts forced (md refuses them)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        v = self.verdict
        return not (
            self.errors
            or v.lost
            or v.garbage
            or v.unstable
            or self.live.lost
            or self.live.garbage
            or self.live.unstable
            or self.mismatches
            or self.check_mismatches
            or self.clean_while_differing
            or self.resync_outside
        )

    def summary(self) -> str:
        cuts = ", ".join(f"{c.kind}@{c.op} in {c.phase} ({c.lost}/{c.pending} lost)" for c in self.cuts)
        bits = [f"seed {self.seed} {self.config} [{self.geometry}] {self.mode}"]
        if cuts:
            bits.append(f"cuts: {cuts}")
        if self.faults:
            bits.append(f"faults: {', '.join(self.faults)}")
        v = self.verdict
        bits.append(
            f"verified {v.verified} lost {v.lost} garbage {v.garbage} unstable {v.unstable} "
            f"live lost {self.live.lost} mismatches {self.mismatches}/{self.check_mismatches} "
            f"clean-while-differing {self.clean_while_differing} resync-outside {self.resync_outside}"
        )
        if self.forced_starts:
            bits.append(
                f"forced dirty degraded starts {self.forced_starts}: {v.excused} sectors excused, "
                f"{v.excused_wrong} of them hit by the write hole"
            )
        if v.first_problem:
            bits.append(f"first problem: {v.first_problem}")
        if self.live.first_problem:
            bits.append(f"first live problem: {self.live.first_problem}")
        bits.extend(f"error: {e}" for e in self.errors)
        return "; ".join(bits)


class _Stop(Exception):
    """The generation's workload budget is spent."""


def _geometry(cfg: Config, rng: random.Random) -> tuple[int, int, str | None, int]:
    """``(level, disks, layout, chunk_sectors)``."""
    if cfg.level in PARITY_LEVELS:
        disks = {"raid5": 3, "raid5x4": 4}.get(cfg.level) or rng.choice([3, 4, 5, 5])
        level, layout = (4, None) if cfg.level == "raid4" else (5, "ls")
        return level, disks, layout, rng.choice([16, 128, 1024])
    if cfg.level == "raid1":
        return 1, rng.choice([2, 2, 3]), None, 0
    layout = cfg.level.removeprefix("raid10")
    disks = rng.choice([4, 4, 3, 2]) if layout != "n2" else rng.choice([4, 4, 3])
    return 10, disks, layout, rng.choice([16, 128, 1024])


def _layout_of(path: str) -> Layout:
    m = open_member(path)
    try:
        sb = m.sb
        so = sb.super_offset * SECTOR
        bm = (sb.super_offset + sb.bitmap_offset) * SECTOR if sb.has_bitmap else None
        return Layout(so, so + 4096, bm, sb.data_offset * SECTOR)
    finally:
        m.device.close()


class _Run:
    """One torture run (see the module docstring)."""

    def __init__(self, seed: int, cfg: Config, workdir: Path, mode: str, workarounds: frozenset[str]) -> None:
        self.workarounds = workarounds
        self.rng = random.Random(seed)
        self.cfg = cfg
        self.dir = workdir
        self.res = RunResult(seed, cfg.name, mode)
        self.bitmap = _BITMAP_KINDS[cfg.bitmap]
        self.member_bytes = 8 * MiB
        self.paths: list[str] = []
        self.new_spares: set[str] = set()
        self.nspare = 0
        self.array: Array | None = None
        self.world: SimWorld | None = None
        self.oracle: Oracle | None = None
        self.budget = 0
        self.membership: tuple[tuple[str, str], ...] = ()
        self.trace: list[str] | None = [] if os.environ.get("LLRAID_TORTURE_TRACE") else None
        self.parity = cfg.level in PARITY_LEVELS
        # raid4/5: stripe rows whose parity a cut may have left stale, until a resync with every
        # member in sync has run (see _note_cut)
        self.suspect_rows: set[int] = set()

    # ---- set-up -----------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        p = self.dir / name
        with open(p, "wb") as f:
            f.truncate(self.member_bytes)
        return str(p)

    def create(self) -> None:
        level, disks, layout, chunk = _geometry(self.cfg, self.rng)
        self.res.geometry = f"raid{level}x{disks}{layout or ''}" + (f" chunk {chunk}" if chunk else "")
        self.paths = [self._file(f"m{i}.img") for i in range(disks)]
        assume_clean = self.bitmap is not BitmapKind.LOCKLESS
        spec = CreateSpec(
            level=level,
            raid_devices=disks,
            layout=parse_layout(level, layout),
            chunk_sectors=chunk,
            bitmap=self.bitmap,
            assume_clean=assume_clean,
            name="torture",
            minor=2,
            size=None,
            homehost="torture",
        )
        create(self.paths, spec)
        self.layout = _layout_of(self.paths[0])
        # First start: llbitmap initialises its chunks, classic clears mdadm's all-set bits.
        with Array.assemble(self.paths, bitmap_threads=False) as array:
            run_sync(array)
            self.oracle = Oracle(array.array_sectors, self.rng.getrandbits(64))
            self.sectors = array.array_sectors
            self.bm_chunk = 128
            if isinstance(array.bitmap, LocklessBitmap):
                self.bm_chunk = array.bitmap.chunksize
            self.raid_chunk = chunk or 128
            self.row_width = self.raid_chunk * (disks - 1) if self.parity else 0  # array sectors

    # ---- the workload --------------------------------------------------------------------------

    def _trace(self, what: str) -> None:
        if self.trace is not None:
            w = self.world
            self.trace.append(f"[{w.mutations if w else '-'}] {what}")

    def _trace_members(self, when: str) -> None:
        if self.trace is None:
            return
        for p in self.paths:
            try:
                m = open_member(p)
            except LlraidError as e:
                self.trace.append(f"  {when} {Path(p).name}: {e}")
                continue
            sb = m.sb
            m.device.close()
            self.trace.append(
                f"  {when} {Path(p).name}: dev {sb.dev_number} role {sb.role} events {sb.events} "
                f"resync {sb.resync_offset:#x} feature {sb.feature_map:#x} recovery {sb.recovery_offset} "
                f"roles {sb.dev_roles[:6]}"
            )

    @property
    def a(self) -> Array:
        assert self.array is not None
        return self.array

    @property
    def o(self) -> Oracle:
        assert self.oracle is not None
        return self.oracle

    def _spend(self) -> None:
        if self.budget <= 0:
            raise _Stop
        self.budget -= 1

    def _range(self) -> tuple[int, int]:
        rng, n = self.rng, self.sectors
        how = rng.random()
        # raid4/5: whole stripe rows too, so "whole chunks" below are full-stripe writes
        unit = rng.choice([self.row_width if self.parity else self.bm_chunk, self.raid_chunk])
        if how < 0.35:  # a hot area: sectors are overwritten often
            start = rng.randrange(0, min(n, 4096))
            count = rng.choice([1, 8, rng.randint(1, 64), rng.randint(1, 256)])
        elif how < 0.6:
            start = rng.randrange(0, n)
            count = rng.choice([1, 8, rng.randint(1, 64), rng.randint(1, 256)])
        elif how < 0.8:  # whole chunks
            start = rng.randrange(0, max(1, n // unit)) * unit
            count = unit * rng.choice([1, 1, 2])
        else:  # across a chunk boundary
            b = rng.randrange(1, max(2, n // unit)) * unit
            start = max(0, b - rng.randint(1, 24))
            count = rng.randint(2, 64)
        count = max(1, min(count, n - start))
        return start, count

    def write(self, start: int | None = None, count: int | None = None) -> None:
        self._spend()
        if start is None or count is None:
            start, count = self._range()
        fua = self.rng.random() < 0.2
        wid, data = self.o.new_write(start, count)
        self.res.writes += 1
        self._trace(f"write #{wid} {start}+{count}{' fua' if fua else ''}")
        self.a.write(start, data, fua=fua)
        self.o.acknowledged(wid, fua)

    def flush(self) -> None:
        self._spend()
        self.flush_now()

    def flush_now(self) -> None:
        covered = self.o.flush_started()
        self._trace(f"flush {covered}")
        self._phase("flush")
        self.a.flush()
        self._phase("workload")
        self.o.flush_done(covered)

    def read(self, start: int | None = None, count: int | None = None) -> None:
        self._spend()
        if start is None or count is None:
            start, count = self._range()
        self._membership_changed()
        data = self.read_array(self.a, start, count)
        v = self.o.check(start, data, live=True)
        self.res.live.add(v)

    def read_array(self, array: Array, start: int, count: int) -> bytes:
        return array.read(start, count)

    def daemon(self) -> None:
        self._spend()
        bm = self.a.bitmap
        self._trace("daemon")
        self._phase("daemon")
        if isinstance(bm, LocklessBitmap):
            bm.daemon_work(now=time.monotonic() + 1e9)
        elif isinstance(bm, ClassicBitmap):
            bm.daemon_pass()
        self._phase("workload")

    def _phase(self, what: str) -> None:
        if self.world is not None and self.world.phase in ("workload", "flush", "daemon", "mark-clean"):
            self.world.phase = what

    def mark_clean(self) -> None:
        self._spend()
        self.a.safe_mode_delay = 0.0
        self._phase("mark-clean")
        self._trace("mark clean")
        self._trace(f"marked clean: {self.a.try_mark_clean()}")
        self._phase("workload")

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.55:
            self.write()
        elif r < 0.65:
            self.flush()
        elif r < 0.85:
            self.read()
        elif r < 0.93:
            self.daemon()
        else:
            self.mark_clean()

    def _membership_changed(self) -> None:
        """Reads may move to another copy when members change: forget what was read."""
        sig = tuple((d.path, d.state.value) for d in self.a.rdevs)
        if sig != self.membership:
            self.membership = sig
            self.o.seen[:] = -2

    def sync(self, kind: SyncKind | None = None) -> None:
        """Resync or recovery to the end, with workload steps between its windows."""
        rng = self.rng
        rate = rng.choice([0.0, 0.05, 0.3])

        def progress(kind: str, done: int, total: int) -> None:
            if rng.random() < rate:
                for _ in range(rng.randint(1, 3)):
                    if self.budget <= 0:
                        break  # the sync goes on to its end; the generation ends after it
                    self.step()

        if self.world is not None:
            self.world.phase = (kind or needed_sync(self.a) or SyncKind.RESYNC).value
        cp = rng.choice([1000.0, 1000.0, 0.002])
        self._trace(f"sync {kind or needed_sync(self.a)} (checkpoints {cp})")
        stats = run_sync(self.a, kind, progress=progress, checkpoint_seconds=cp)
        self._trace(f"sync done: {stats.kind} completed {stats.completed} synced {stats.sectors_synced}")
        if self.world is not None:
            self.world.phase = "workload"
        if not stats.completed:
            raise LlraidError(f"{stats.kind} did not complete")

    def sync_all(self) -> None:
        for _ in range(4):
            kind = needed_sync(self.a)
            if kind is None:
                break
            self.sync(kind)
        if self.parity and needed_sync(self.a) is None and self.a.copies_agree and not self.a.is_degraded():
            # every stripe the bitmap (or the unclean superblock) marked has its parity rebuilt;
            # forgetting suspects early is the strict direction: a row the engine failed to
            # resync is then never excused
            self.suspect_rows.clear()

    def _before_failure(self) -> None:
        """raid4/5 survive one failure, and an unclean shutdown whose resync has not finished is one
        already: the stripes being written at the crash may hold stale parity (the write hole), so
        a member lost now takes data of those stripes with it, in md as here. Finish the resync
        first, as md's guarantee requires; mirrors have no such window."""
        if self.parity and needed_sync(self.a) is not None:
            self._trace("sync before a failure")
            self.sync_all()

    # ---- membership events and faults --------------------------------------------------------------

    def _live_rdev(self) -> Rdev:
        live = [d for d in self.a.rdevs if d.state is RdevState.IN_SYNC]
        return self.rng.choice(live)

    def _replace(self, d: Rdev, *, readd: bool) -> None:
        """``d`` is faulty: remove it, then re-add it or add a new spare, and recover."""
        assert self.world is not None
        self.a.remove(d)
        self.paths.remove(d.path)
        self.world.clear_faults(d.path)
        for _ in range(self.rng.randint(0, 6)):
            self.step()  # degraded writes
        if readd:
            self._trace(f"re-add {Path(d.path).name}")
            self.res.events.append(f"re-add {Path(d.path).name}")
            self.a.re_add(d.path)
            self.paths.append(d.path)
        else:
            self.nspare += 1
            new = self._file(f"s{self.nspare}.img")
            self.new_spares.add(new)
            self.paths.append(new)
            self.res.events.append(f"spare {Path(new).name} for {Path(d.path).name}")
            self._trace(f"add spare {Path(new).name}")
            assert self.world is not None
            self.a.add_spare(new)
        self.sync_all()

    def fail_event(self) -> None:
        self._before_failure()
        d = self._live_rdev()
        try:
            self.a.fail(d)
        except IOFailure:
            self.res.events.append(f"fail {Path(d.path).name} refused (last copy of some data)")
            return
        self.res.events.append(f"fail {Path(d.path).name}")
        self._trace(f"fail {Path(d.path).name}")
        for _ in range(self.rng.randint(0, 6)):
            self.step()
        self._replace(d, readd=self.rng.random() < 0.6)

    def _fault_target(self) -> tuple[int, int, int, int]:
        """``(array sector, count, role, member sector)``: a range and a member holding some of it
        (a copy; raid4/5: its data block, or the parity block a write of it updates)."""
        rng = self.rng
        start, count = self._range()
        pers = self.a.personality
        if isinstance(pers, Raid5Runtime):
            geo = pers.geo
            dd, pd, ms = geo.compute_sector(start)
            n = min(count, geo.chunk_sectors - (start & geo.chunk_mask))
            return start, n, dd if rng.random() < 0.7 else pd, ms
        assert self.a.mirror is not None
        piece = self.a.mirror.pieces(start, count)[0]
        role, ms = rng.choice([(r, ms) for r, ms in piece.copies if self.a.available(r, ms, piece.count)])
        return piece.sector, piece.count, role, ms

    def fault_event(self) -> None:
        assert self.world is not None
        rng = self.rng
        kinds = [k for k in FAULT_KINDS if k != "bitmap" or self.bitmap is not BitmapKind.NONE]
        kind = rng.choice(kinds)
        if any(d.state is not RdevState.IN_SYNC for d in self.a.rdevs if d.role is not None):
            return  # one fault at a time: a member that is not in sync holds no full copy
        self._before_failure()
        lay = self.layout
        sector, count, role, ms = self._fault_target()
        d = self.a.by_role(role)
        assert d is not None
        name = Path(d.path).name
        lo = lay.data_start + ms * SECTOR
        hi = lo + count * SECTOR
        self.res.faults.append(f"{kind} on {name}")
        self._trace(f"fault {kind} on {name} [{lo}, {hi})")
        if kind == "read":
            self.world.add_fault(d.path, Fault("read", lo, hi))
            for _ in range(rng.randint(1, 4)):
                self.read(sector, count)
            self.world.clear_faults(d.path)
            return
        if kind == "slow":
            self.world.add_fault(d.path, Fault("slow", delay=0.0002, hits=50))
            for _ in range(rng.randint(2, 8)):
                self.step()
            self.world.clear_faults(d.path)
            return
        self.budget += 40  # the IO that meets the fault is not cut short by the budget
        if kind == "write":
            self.world.add_fault(d.path, Fault("write", lo, hi))
            self.write(sector, count)
        elif kind == "vanish":
            self.world.add_fault(d.path, Fault("vanish"), in_ops=rng.randint(0, 4))
            for _ in range(4):
                if d.state is RdevState.FAULTY:
                    break
                self.write()
                self.flush()
        elif kind == "bitmap":
            assert lay.bitmap_start is not None
            self.world.add_fault(d.path, Fault("write", lay.bitmap_start, lay.data_start))
            for _ in range(6):
                if d.state is RdevState.FAULTY:
                    break
                # idle chunks become clean, so the next write to them writes the bitmap
                if isinstance(self.a.bitmap, LocklessBitmap):
                    self.a.bitmap.daemon_work(now=time.monotonic() + 1e9)
                elif isinstance(self.a.bitmap, ClassicBitmap):
                    for _ in range(3):
                        self.a.bitmap.daemon_pass()
                self.write()
            if d.state is not RdevState.FAULTY:  # a superblock change writes the bitmap header
                self.a.update_sb()
        elif kind == "sync":
            self.world.add_fault(d.path, Fault("sync"))
            self.write()
            self.flush()
        if d.state is not RdevState.FAULTY:
            self.res.errors.append(f"{kind} fault on {name}: the member was not marked faulty")
            self.world.clear_faults(d.path)
            return
        for _ in range(rng.randint(0, 5)):
            self.step()  # degraded, still serving from the good copies
        self._replace(d, readd=rng.random() < 0.5)

    # ---- raid4/5's write hole ----------------------------------------------------------------------

    def _note_cut(self) -> None:
        """At a power cut: the stripe rows of every write not yet durable may now hold data and
        parity from different times (some member writes landed, others did not)."""
        if not self.parity:
            return
        for start, count in self.o.pending():
            first = start // self.row_width
            last = (start + count - 1) // self.row_width
            self.suspect_rows.update(range(first, last + 1))

    def _excuse_write_hole(self, array: Array) -> None:
        """A dirty degraded raid4/5 was started by force: in every suspect row, the data blocks of
        the roles that are not available there can only be rebuilt from parity that may be stale.
        That is all the write hole can reach (present blocks are read as they are, and a later
        write to the row keeps what a missing block rebuilds to), so only those are excused."""
        pers = array.personality
        assert isinstance(pers, Raid5Runtime)
        geo = pers.geo
        chunk = geo.chunk_sectors
        for row in sorted(self.suspect_rows):
            ms = row << geo.chunk_shift
            for role in range(geo.raid_disks):
                d = array.by_role(role)
                if d is not None and d.state is RdevState.IN_SYNC:
                    continue
                # a recovering member serves its block below its recovery offset
                lo = ms if d is None else min(max(ms, d.recovery_offset), ms + chunk)
                v = geo.compute_blocknr(ms, role)
                if v is None or lo == ms + chunk:
                    continue  # the parity block (nothing but parity is lost), or recovered
                self.o.excuse(v + lo - ms, ms + chunk - lo)

    # ---- generations ----------------------------------------------------------------------------------

    def _cut_at(self, kind: str) -> int:
        """The op of ``kind`` to cut at: uniform over about what a generation issues."""
        return self.rng.randint(1, _CUT_RANGE[kind])

    def _assemble(self, opener: Callable[[str, bool], Any] | None) -> Array:
        paths = []
        for p in self.paths:
            if p in self.new_spares:
                try:
                    open_member(p).device.close()
                except NotMdMemberError:
                    self.res.events.append(f"{Path(p).name} never got its superblock: left out")
                    continue
            paths.append(p)
        self.paths = paths
        try:
            array = Array.assemble(paths, run=True, bitmap_threads=False, opener=opener)
        except DirtyDegradedError as e:
            if not self.parity:
                raise
            # md refuses this ("cannot start dirty degraded array"); do what `mdadm --assemble
            # --force` does, and excuse exactly the data the write hole may have taken
            self.res.forced_starts += 1
            self.res.events.append(f"forced dirty degraded start ({e})")
            self._trace("forced dirty degraded start")
            array = Array.assemble(paths, run=True, force=True, bitmap_threads=False, opener=opener)
            self._excuse_write_hole(array)
        if "flush-before-superblocks" in self.workarounds:
            update = array.update_sb

            def flushed_update() -> None:
                with array._sb_lock:
                    array.flush()
                    update()

            array.update_sb = flushed_update  # type: ignore[method-assign]
        world = self.world
        behind = any(d.sb.events != array.events for d in array.rdevs if d.state is not RdevState.FAULTY)
        if "catch-up-at-assembly" in self.workarounds and world is not None and not world.dead and behind:
            world.no_cut = True
            try:
                array.update_sb()
            finally:
                world.no_cut = False
        return array

    def generation(self, g: int, last: bool) -> None:
        rng = self.rng
        res = self.res
        cut_mode = res.mode == "cut"
        plan = None
        if cut_mode:
            kinds = ["any", "any", "any", "sb", "data", "sync"]
            if self.bitmap is not BitmapKind.NONE:
                kinds.append("bitmap")
            kind = rng.choice(kinds)
            plan = CutPlan(kind, self._cut_at(kind))
        world = SimWorld(rng.getrandbits(32), layout=self.layout, cut=plan, tear=rng.choice([0.0, 0.0, 0.3]))
        self.world = world
        world.phase = "assemble"
        self.budget = rng.randint(50, 200)
        self._trace(f"generation {g}: cut plan {plan}")
        self._trace_members("before")
        stopped = False
        try:
            self.array = self._assemble(world.opener)
            self.membership = ()
            world.phase = "workload"
            if needed_sync(self.a) is not None and rng.random() < 0.8:
                self.sync_all()
            events = rng.random()
            if res.mode == "fault":
                at = {rng.randint(0, self.budget // 2)} | ({self.budget // 2} if events < 0.3 else set())
            elif events < 0.25:
                at = {rng.randint(0, self.budget // 2)}
            else:
                at = set()
            i = 0
            while True:
                if i in at:
                    (self.fault_event if res.mode == "fault" else self.fail_event)()
                self.step()
                i += 1
        except _Stop:
            pass
        except LlraidError as e:
            if not world.dead:
                res.errors.append(f"gen {g} ({world.phase}): unexpected {type(e).__name__}: {e}")
        except Exception as e:
            tb = traceback.format_exc(limit=-3).strip().splitlines()
            res.errors.append(f"gen {g} ({world.phase}): crash {type(e).__name__}: {e} | {' / '.join(tb)}")
        if not world.dead and self.array is not None and not res.errors:
            end = rng.random()
            if end < 0.3 or (not cut_mode and end < 0.6):
                world.phase = "stop"
                try:
                    self.a.stop()
                    stopped = True
                    self.o.everything_durable()
                except LlraidError as e:
                    if not world.dead:
                        res.errors.append(f"gen {g}: stop failed: {type(e).__name__}: {e}")
        if not world.dead and not stopped:
            world.power_off()
        if world.dead:
            self._note_cut()
            self.o.power_cut()
            assert world.cut_report is not None
            res.cuts.append(world.cut_report)
            self._trace(f"power cut: {world.cut_report}")
        if self.array is not None and not stopped:
            try:
                self.array.crash()
            except Exception as e:
                res.errors.append(f"gen {g}: crash() raised {type(e).__name__}: {e}")
        self.array = None

    # ---- the proof -------------------------------------------------------------------------------

    def _member_data(self, array: Array) -> dict[int, np.ndarray[Any, np.dtype[np.uint8]]]:
        out = {}
        for d in array.rdevs:
            if d.role is not None and d.state in (RdevState.IN_SYNC, RdevState.RECOVERING):
                raw = d.device.pread(d.data_offset_bytes, array.dev_sectors * SECTOR)
                out[d.role] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, SECTOR)
        return out

    def _differing(self, array: Array) -> list[tuple[int, int]]:
        """``(sync sector, count)`` of 128-sector windows whose available copies differ.

        Windows, not whole pieces: a raid10 piece is a whole raid chunk (8 bitmap chunks), and a
        difference in one sector must not be blamed on the other seven bitmap chunks."""
        assert array.mirror is not None
        data = self._member_data(array)
        out = []
        step = 4096
        for s in range(0, array.array_sectors, step):
            for p in array.mirror.pieces(s, min(step, array.array_sectors - s)):
                for off in range(0, p.count, 128):
                    n = min(128, p.count - off)
                    copies = [
                        data[r][ms + off : ms + off + n]
                        for r, ms in p.copies
                        if r in data and array.available(r, ms + off, n)
                    ]
                    if len(copies) > 1 and any(not np.array_equal(copies[0], c) for c in copies[1:]):
                        out.append((p.sector + off, n))
        return out

    def _inconsistent(self, array: Array) -> npt.NDArray[np.bool_]:
        """raid4/5, per member sector (the sync space): True where parity is inconsistent, i.e.
        the XOR of every member's sector is not zero. Only where every member is available: with
        one missing there is nothing to compare (its block is whatever the others XOR to)."""
        pers = array.personality
        assert isinstance(pers, Raid5Runtime)
        dev = pers.sync_sectors
        usable = dev
        acc: npt.NDArray[np.uint8] | None = None
        for role in range(array.raid_disks):
            d = array.by_role(role)
            if d is None:
                return np.zeros(dev, dtype=np.bool_)
            if d.state is not RdevState.IN_SYNC:
                usable = min(usable, d.recovery_offset)
            block = np.frombuffer(d.device.pread(d.data_offset_bytes, dev * SECTOR), dtype=np.uint8)
            acc = block.copy() if acc is None else acc ^ block
        assert acc is not None
        out = np.asarray(acc.reshape(dev, SECTOR).any(axis=1), dtype=np.bool_)
        out[usable:] = False
        return out

    def _holds_data(self, array: Array, ms: int, end: int) -> bool:
        """raid4/5: a write was ever issued to array data held in member sectors ``[ms, end)``."""
        pers = array.personality
        assert isinstance(pers, Raid5Runtime)
        geo = pers.geo
        while ms < end:
            n = min(end - ms, geo.chunk_sectors - (ms & geo.chunk_mask))
            for role in range(geo.raid_disks):
                v = geo.compute_blocknr(ms, role)
                if v is not None and bool((self.o.issued[v : v + n] > 0).any()):
                    return True
            ms += n
        return False

    def _windows(self, mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
        """``(sector, count)`` of the 128-sector windows holding a True sector of ``mask``."""
        out = []
        for w in np.flatnonzero(np.logical_or.reduceat(mask, np.arange(0, len(mask), 128))):
            start = int(w) * 128
            out.append((start, min(128, len(mask) - start)))
        return out

    def _must_agree(self, array: Array, bm: LocklessBitmap, chunk: int, state: int) -> bool:
        """(c): True if llbitmap chunk ``chunk`` must not be in ``state`` on disk while its copies
        differ (mirrors) or its parity is inconsistent (raid4/5).

        Mirrors: not Unwritten or Clean (reload keeps them, resync skips them). raid4/5 (md's
        raid456 rules): Clean and CleanUnwritten claim valid parity (``blocks_synced``: writes
        read-modify-write from it, resync skips it), so never. Unwritten is the one state
        allowed stale parity, because it promises there is no data whose parity matters: the
        first write leaves it (NeedSync, a lazy parity build) durably before any member write.
        So Unwritten with inconsistent parity is wrong only where a write was ever issued. The
        other states are resynced after reload (Dirty, Syncing -> NeedSync)."""
        if not self.parity:
            return state in (LLState.UNWRITTEN, LLState.CLEAN)
        if state in (LLState.CLEAN, LLState.CLEAN_UNWRITTEN):
            return True
        if state == LLState.UNWRITTEN:
            start = chunk << bm.chunkshift
            return self._holds_data(array, start, min(start + bm.chunksize, array.personality.sync_sectors))
        return False

    def _ondisk_states(self, array: Array, bm: LocklessBitmap) -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
        out = []
        # the copy assembly loads: the first in-sync member by role (BitmapStore reads targets[0])
        for d in sorted(array.rdevs, key=lambda r: r.role if r.role is not None else 1 << 30)[:1]:
            if d.state is RdevState.IN_SYNC:
                at = (d.sb.super_offset + d.sb.bitmap_offset) * SECTOR + DATA_OFFSET
                raw = d.device.pread(at, bm.chunks)
                out.append(np.frombuffer(raw, dtype=np.uint8))
        return out

    def final(self) -> None:
        res = self.res
        world = SimWorld(self.rng.getrandbits(32), layout=self.layout)
        self.world = world
        world.phase = "final"
        self._trace("final")
        self._trace_members("final")
        try:
            array = self._assemble(world.opener)
        except LlraidError as e:
            res.errors.append(f"final assembly failed: {type(e).__name__}: {e}")
            return
        self.array = array
        try:
            self._prove(array, world)
        except Exception as e:
            tb = traceback.format_exc(limit=-3).strip().splitlines()
            res.errors.append(f"final ({world.phase}): {type(e).__name__}: {e} | {' / '.join(tb)}")
        finally:
            try:
                array.stop()
            except LlraidError:
                array.crash()
            self.array = None

    def _read_all(self, array: Array, *, stable: bool) -> Verdict:
        total = Verdict()
        step = 2048
        for s in range(0, array.array_sectors, step):
            n = min(step, array.array_sectors - s)
            total.add(self.o.check(s, self.read_array(array, s, n), live=False, stable=stable))
        return total

    def _prove(self, array: Array, world: SimWorld) -> None:
        res = self.res
        bm = array.bitmap
        marked: set[int] = set()
        if isinstance(bm, LocklessBitmap):
            # (c) on disk: a chunk whose copies differ must not be Unwritten or Clean in the loaded copy.
            shift = bm.chunkshift
            differing_chunks: set[int] = set()
            if self.parity:
                differing_chunks = {int(ms) >> shift for ms in np.flatnonzero(self._inconsistent(array))}
            else:
                for v, n in self._differing(array):
                    differing_chunks.update(range(v >> shift, ((v + n - 1) >> shift) + 1))
            for states in self._ondisk_states(array, bm):
                bad = [c for c in sorted(differing_chunks) if self._must_agree(array, bm, c, states[c])]
                res.clean_while_differing += len(bad)
                if bad:
                    what = "its parity is inconsistent" if self.parity else "its copies differ"
                    res.errors.append(
                        f"llbitmap chunk {bad[0]} is {LLState(int(states[bad[0]])).name} on disk while {what}"
                    )
            live = bm.states[DATA_OFFSET : DATA_OFFSET + bm.chunks]
            marked = {int(c) for c in np.flatnonzero(np.isin(live, (LLState.NEED_SYNC, LLState.SYNCING)))}
        self.o.power_cut()
        pre = self._read_all(array, stable=True)
        # a member lost for good: give the array a new one so every copy is rebuilt and checked
        if any(array.by_role(r) is None for r in range(array.raid_disks)):
            self.nspare += 1
            new = self._file(f"s{self.nspare}.img")
            res.events.append(f"final spare {Path(new).name}")
            array.add_spare(new)
            self.paths.append(new)
        for _ in range(4):
            kind = needed_sync(array)
            if kind is None:
                break
            world.phase = kind.value
            logging = kind is SyncKind.RESYNC and isinstance(bm, LocklessBitmap)
            allowed = set(marked)
            if logging and self.parity:
                # raid456: a recovery that ends non-degraded "infects" the Unwritten chunks of a
                # block holding Dirty ones into NeedSync (a lazy parity build, md-llbitmap's
                # rule), so a resync after it may build those too: what the bitmap marks when the
                # resync starts (and, degraded, its Dirty chunks, which md syncs then) is allowed
                assert isinstance(bm, LocklessBitmap)
                now = bm.states[DATA_OFFSET : DATA_OFFSET + bm.chunks]
                due = [LLState.NEED_SYNC, LLState.SYNCING] + ([LLState.DIRTY] if array.is_degraded() else [])
                allowed |= {int(c) for c in np.flatnonzero(np.isin(now, due))}
            world.set_logging(logging)
            stats = run_sync(array, kind)
            if logging:
                assert isinstance(bm, LocklessBitmap)
                outside = self._touched(array, world) - allowed
                res.resync_outside += len(outside)
                if outside:
                    res.errors.append(f"resync touched unmarked llbitmap chunks {sorted(outside)[:5]}")
            world.set_logging(False)
            if not stats.completed:
                res.errors.append(f"final {kind.value} did not complete")
                return
        world.phase = "verify"
        post = self._read_all(array, stable=True)
        res.verdict = post
        res.verdict.unstable = max(post.unstable, pre.unstable)
        res.verdict.lost = max(post.lost, pre.lost)
        res.verdict.garbage = max(post.garbage, pre.garbage)
        if res.verdict.first_problem is None:
            res.verdict.first_problem = pre.first_problem
        if self.parity:
            # (b) raid4/5: parity consistent wherever llbitmap does not say Unwritten (never written,
            # so never built: lazy parity); without llbitmap, everywhere
            mask = self._inconsistent(array)
            if isinstance(bm, LocklessBitmap):
                live = bm.states[DATA_OFFSET : DATA_OFFSET + bm.chunks]
                unwritten = np.repeat(live == LLState.UNWRITTEN, bm.chunksize)[: len(mask)]
                mask &= ~unwritten
            res.mismatches = int(mask.sum())
            if res.mismatches:
                where = self._windows(mask)[:3]
                res.errors.append(f"parity inconsistent after sync at member sectors {where}")
        else:
            diff = self._differing(array)
            res.mismatches = sum(n for _, n in diff)
            if diff:
                res.errors.append(f"copies differ after sync at sync sectors {diff[:3]}")
        world.phase = "check"
        res.check_mismatches = run_sync(array, SyncKind.CHECK).mismatches
        res.writes_durable = self.o.writes_durable

    def _touched(self, array: Array, world: SimWorld) -> set[int]:
        """llbitmap chunks whose data a member IO logged in ``world`` touched."""
        bm = array.bitmap
        assert isinstance(bm, LocklessBitmap)
        chunks: set[int] = set()
        step_of = self.raid_chunk if array.level == 10 else 128
        for d in array.rdevs:
            st = world.states.get(d.path)
            if st is None or st.log is None or d.role is None:
                continue
            for _op, off, length in st.log:
                if off < d.data_offset_bytes:
                    continue
                ms = (off - d.data_offset_bytes) // SECTOR
                end = ms + max(1, length // SECTOR)
                while ms < end:
                    n = min(end - ms, step_of - ms % step_of)
                    v = array.personality.member_to_sync(d.role, ms)
                    if v is not None:
                        chunks.update(range(v >> bm.chunkshift, ((v + n - 1) >> bm.chunkshift) + 1))
                    ms += n
        return chunks

    def run(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self.create()
            gens = self.rng.choice([1, 1, 2, 2, 3]) if self.res.mode == "cut" else self.rng.choice([1, 2])
            for g in range(gens):
                self.generation(g, g == gens - 1)
                if self.res.errors:
                    break
            self.final()
            if self.oracle is not None:
                self.res.writes_durable = self.oracle.writes_durable
        except Exception as e:
            tb = traceback.format_exc(limit=-3).strip().splitlines()
            self.res.errors.append(f"run: {type(e).__name__}: {e} | {' / '.join(tb)}")
        self.res.seconds = time.monotonic() - t0
        if self.trace is not None:
            self.res.events.extend(self.trace)
        return self.res


def run_one(
    seed: int,
    config: Config,
    workdir: str | Path | None = None,
    *,
    mode: str | None = None,
    workarounds: Iterable[str] = KNOWN_BUGS,
) -> RunResult:
    """One run; ``mode`` "cut" or "fault" (None: chosen from the seed). Reproducible by seed."""
    if mode is None:
        mode = "fault" if random.Random(seed ^ 0x5EED).random() < 0.3 else "cut"
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="llraid-torture-")) if workdir is None else Path(workdir)
    d = base / f"run-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        return _Run(seed, config, d, mode, frozenset(workarounds)).run()
    finally:
        shutil.rmtree(d if not own else base, ignore_errors=True)


# ---- many runs ------------------------------------------------------------------------------------


@dataclass
class TortureReport:
    runs: int = 0
    seed: int = 0
    cuts: int = 0
    faults: int = 0
    writes: int = 0
    writes_durable: int = 0
    bytes_verified: int = 0
    bytes_lost: int = 0
    bytes_garbage: int = 0
    unstable_sectors: int = 0
    live_bytes_checked: int = 0
    mismatches: int = 0
    check_mismatches: int = 0
    clean_while_differing: int = 0
    resync_outside_marked: int = 0
    forced_starts: int = 0  # raid4/5 dirty degraded starts forced (md refuses them without --force)
    excused_bytes: int = 0  # write-hole data not checked after them
    excused_wrong_bytes: int = 0  # of which read back wrong: what the write hole took
    errors: int = 0
    seconds: float = 0.0
    by_config: Counter[str] = field(default_factory=Counter)
    cut_kinds: Counter[str] = field(default_factory=Counter)
    cut_phases: Counter[str] = field(default_factory=Counter)
    fault_kinds: Counter[str] = field(default_factory=Counter)
    unflushed_writes_at_cuts: int = 0
    unflushed_writes_lost: int = 0
    failures: list[str] = field(default_factory=list)
    workarounds: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, r: RunResult) -> None:
        self.runs += 1
        self.by_config[r.config] += 1
        self.cuts += len(r.cuts)
        for c in r.cuts:
            self.cut_kinds[c.kind] += 1
            self.cut_phases[c.phase] += 1
            self.unflushed_writes_at_cuts += c.pending
            self.unflushed_writes_lost += c.lost
        self.faults += len(r.faults)
        for f in r.faults:
            self.fault_kinds[f.split()[0]] += 1
        self.writes += r.writes
        self.writes_durable += r.writes_durable
        v = r.verdict
        self.bytes_verified += v.verified * SECTOR
        self.bytes_lost += (v.lost + r.live.lost) * SECTOR
        self.bytes_garbage += (v.garbage + r.live.garbage) * SECTOR
        self.unstable_sectors += v.unstable + r.live.unstable
        self.live_bytes_checked += r.live.sectors * SECTOR
        self.mismatches += r.mismatches
        self.check_mismatches += r.check_mismatches
        self.clean_while_differing += r.clean_while_differing
        self.resync_outside_marked += r.resync_outside
        self.forced_starts += r.forced_starts
        self.excused_bytes += v.excused * SECTOR
        self.excused_wrong_bytes += v.excused_wrong * SECTOR
        self.errors += len(r.errors)
        self.seconds += r.seconds
        if not r.ok:
            self.failures.append(r.summary())

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "seed": self.seed,
            "cuts": self.cuts,
            "faults": self.faults,
            "writes": self.writes,
            "writes_durable": self.writes_durable,
            "bytes_verified": self.bytes_verified,
            "bytes_lost": self.bytes_lost,
            "bytes_garbage": self.bytes_garbage,
            "unstable_sectors": self.unstable_sectors,
            "live_bytes_checked": self.live_bytes_checked,
            "mismatches": self.mismatches,
            "check_mismatches": self.check_mismatches,
            "clean_while_differing": self.clean_while_differing,
            "resync_outside_marked": self.resync_outside_marked,
            "forced_starts": self.forced_starts,
            "excused_bytes": self.excused_bytes,
            "excused_wrong_bytes": self.excused_wrong_bytes,
            "unflushed_writes_at_cuts": self.unflushed_writes_at_cuts,
            "unflushed_writes_lost": self.unflushed_writes_lost,
            "errors": self.errors,
            "by_config": dict(sorted(self.by_config.items())),
            "cut_kinds": dict(sorted(self.cut_kinds.items())),
            "cut_phases": dict(sorted(self.cut_phases.items())),
            "fault_kinds": dict(sorted(self.fault_kinds.items())),
            "failures": list(self.failures),
            "seconds": round(self.seconds, 2),
            "workarounds": list(self.workarounds),
            "ok": self.ok,
        }


Progress = Callable[[int, int, RunResult], None]  # (runs done, runs total, last result)


def run_torture(
    runs: int,
    seed: int,
    *,
    levels: Sequence[str] = LEVELS,
    bitmaps: Sequence[str] = BITMAPS,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
    mode: str | None = None,
    workarounds: Iterable[str] = KNOWN_BUGS,
) -> TortureReport:
    """``runs`` randomised runs over ``levels`` x ``bitmaps`` (round robin), seeded by ``seed``.

    Run ``i`` uses seed ``seed * 1_000_003 + i`` and can be repeated alone with
    :func:`run_one`."""
    for lv in levels:
        if lv not in LEVELS:
            raise LlraidError(f"unknown level {lv!r} (known: {', '.join(LEVELS)})")
    for bm in bitmaps:
        if bm not in BITMAPS:
            raise LlraidError(f"unknown bitmap {bm!r} (known: {', '.join(BITMAPS)})")
    configs = [Config(lv, bm) for lv in levels for bm in bitmaps]
    workarounds = frozenset(workarounds)
    if workarounds - set(KNOWN_WORKAROUNDS):
        raise LlraidError(f"unknown workarounds {sorted(workarounds - set(KNOWN_WORKAROUNDS))}")
    report = TortureReport(seed=seed, workarounds=sorted(workarounds))
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="llraid-torture-")) if workdir is None else Path(workdir)
    try:
        for i in range(runs):
            cfg = configs[i % len(configs)]
            r = run_one(run_seed(seed, i), cfg, base, mode=mode, workarounds=workarounds)
            report.add(r)
            if progress is not None:
                progress(i + 1, runs, r)
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)
    return report


def run_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


def format_report(report: TortureReport) -> str:
    d = report.as_dict()
    lines = [
        f"torture: {report.runs} runs (seed {report.seed}), {report.cuts} power cuts, "
        f"{report.faults} faults, {report.seconds:.1f} s",
        f"  writes: {report.writes} acknowledged or in flight, {report.writes_durable} made durable "
        f"(FUA or flushed)",
        f"  at the cuts: {report.unflushed_writes_at_cuts} unflushed member writes, "
        f"{report.unflushed_writes_lost} of them lost",
        f"  verified: {report.bytes_verified} bytes required to survive, {report.live_bytes_checked} bytes "
        "read back while running",
        f"  lost: {report.bytes_lost} bytes, garbage: {report.bytes_garbage} bytes, "
        f"unstable reads: {report.unstable_sectors} sectors",
        f"  mismatches after sync (copies differ / parity inconsistent): {report.mismatches} sectors "
        f"(check: {report.check_mismatches})",
        f"  llbitmap: {report.clean_while_differing} chunks clean while copies differed or parity was "
        f"inconsistent, {report.resync_outside_marked} chunks resynced outside the marked ones",
        "  cut at: " + ", ".join(f"{k} {v}" for k, v in d["cut_kinds"].items()),
        "  cut during: " + ", ".join(f"{k} {v}" for k, v in d["cut_phases"].items()),
    ]
    if report.forced_starts:
        lines.append(
            f"  raid4/5 write hole: {report.forced_starts} dirty degraded starts forced (md refuses them), "
            f"{report.excused_bytes} bytes excused, {report.excused_wrong_bytes} of them read back wrong"
        )
    if d["fault_kinds"]:
        lines.append("  faults: " + ", ".join(f"{k} {v}" for k, v in d["fault_kinds"].items()))
    lines.append("  configs: " + ", ".join(f"{k} {v}" for k, v in d["by_config"].items()))
    if report.workarounds:
        lines.append("  stepping around open engine bugs: " + ", ".join(report.workarounds))
    if report.failures:
        lines.append(f"FAILED: {len(report.failures)} runs")
        lines.extend(f"  {f}" for f in report.failures[:20])
    else:
        lines.append("OK: nothing lost")
    return "\n".join(lines)


def default_workdir() -> str:
    return os.environ.get("LLRAID_TORTURE_DIR") or tempfile.gettempdir()
