"""Simulated member devices: a volatile write cache, power cuts and injected faults.

A :class:`SimWorld` stands for one machine: every member device opened through its
:meth:`SimWorld.opener` is a :class:`SimDevice` backed by the real file at that path (so ``fd``
exists and identity checks by inode work), and all of them share one IO counter, one lock and
one fate at a power cut.

The volatile cache
    What a member's file holds at any time is what reads see: every write, flushed or not.
    What would survive a power cut (the *durable image*) is tracked beside it, per 512-byte
    sector: a sector no unflushed write has touched is durable as it is in the file; a sector
    with unflushed writes keeps its durable content in memory. ``sync()`` makes everything
    durable, ``pwrite(dsync=True)`` makes that one write durable (and nothing else). Every write
    carries a global sequence number; a sector's durable content always comes from the newest
    write that reached the media, so an older cached write can never land over a newer durable
    one (devices keep per-sector order), while writes to different sectors may land in any
    order.

Power cut
    :meth:`SimWorld.power_off` (or the cut plan, at a chosen mutating op) decides, for each
    unflushed write independently and reproducibly (seeded), whether it reached the media, and
    optionally tears multi-sector writes (each sector on its own). The decided durable image is
    written to the file, and from then on every IO of every device of the world raises
    :class:`PowerCutError` (a :class:`~llraid.errors.DeviceError`): the process "died". The
    files can then be assembled again, with plain devices or a new world.

Faults
    :class:`Fault` rules on a path: EIO on reads or writes of a byte range, a member that
    vanishes (every IO fails), flushes that fail, slow IO. They apply to every device opened on
    that path, from the world's op count given, for a given number of hits or forever.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from llraid.device import SECTOR, Device
from llraid.errors import DeviceError, LlraidError

REGIONS = ("sb", "bitmap", "meta", "data")
CUT_KINDS = ("any", "sb", "bitmap", "data", "sync")


class PowerCutError(DeviceError):
    """The power is off: no IO reaches any device of this world any more."""


class InjectedError(DeviceError):
    """An IO error injected by a :class:`Fault`."""


@dataclass(frozen=True)
class Layout:
    """Where the md metadata lives on a member (bytes): classifies IO for cut plans and logs."""

    sb_start: int
    sb_end: int
    bitmap_start: int | None  # None: no bitmap
    data_start: int

    @classmethod
    def of(cls, path: str) -> Layout:
        """The layout of the md member at ``path``."""
        fd = os.open(path, os.O_RDONLY)
        try:
            lay = detect_layout(fd, os.fstat(fd).st_size // SECTOR)
        finally:
            os.close(fd)
        if lay is None:
            raise DeviceError(f"{path}: no md v1.x superblock")
        return lay

    def region(self, offset: int) -> str:
        if offset >= self.data_start:
            return "data"
        if self.sb_start <= offset < self.sb_end:
            return "sb"
        if self.bitmap_start is not None and offset >= self.bitmap_start:
            return "bitmap"
        return "meta"


@dataclass
class Fault:
    """An injected fault on one path.

    ``kind``: ``read`` / ``write`` (EIO on IO overlapping ``[start, end)``), ``sync`` (flushes
    fail), ``vanish`` (every IO fails), ``slow`` (IO overlapping the range sleeps ``delay``).
    Active once the world's op count reaches ``after_op``; ``hits`` is how many IOs it fails
    (None: forever)."""

    kind: str
    start: int = 0
    end: int = 1 << 62
    after_op: int = 0
    hits: int | None = None
    delay: float = 0.0
    fired: int = 0

    def matches(self, op: str, offset: int, length: int, now: int) -> bool:
        if now < self.after_op or (self.hits is not None and self.fired >= self.hits):
            return False
        if self.kind == "vanish":
            return True
        if self.kind == "sync":
            return op == "sync"
        if self.kind == "slow":
            return op != "sync" and offset < self.end and offset + max(length, 1) > self.start
        if op != self.kind:
            return False
        return offset < self.end and offset + max(length, 1) > self.start


@dataclass
class _Rec:
    seq: int
    first: int  # first sector
    data: bytes  # whole sectors
    region: str = "data"


@dataclass
class PathState:
    """Volatile-cache bookkeeping of one member path (shared by every device opened on it)."""

    path: str
    sectors: int
    layout: Layout | None
    img: npt.NDArray[np.uint8]  # (sectors, 512): durable content where ``has_ov``
    has_ov: npt.NDArray[np.bool_]  # durable content differs from (or may differ from) the file
    dseq: npt.NDArray[np.int64]  # sequence number of each sector's durable content
    pending: list[_Rec] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    reads: int = 0
    writes: int = 0
    syncs: int = 0
    bytes_written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0))
    log: list[tuple[str, int, int]] | None = None  # (op, offset, length) while logging

    @property
    def unflushed(self) -> int:
        return len(self.pending)


@dataclass
class CutPlan:
    """Cut the power at the ``nth`` mutating op of ``kind`` (see :data:`CUT_KINDS`)."""

    kind: str = "any"
    nth: int = 1


@dataclass
class CutReport:
    """What a power cut did."""

    op: int  # world op count at the cut
    kind: str  # what the op was: sb / bitmap / data / meta write, or sync; "end" if no op
    phase: str
    pending: int  # unflushed writes at the cut
    survived: int
    lost: int
    torn: int
    path: str | None = None


class SimWorld:
    """One machine: the devices it opened, their caches, its power and its faults."""

    def __init__(
        self,
        seed: int = 0,
        *,
        layout: Layout | None = None,
        cut: CutPlan | None = None,
        survive: float | None = None,
        tear: float = 0.0,
        survive_by_region: dict[str, float] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.layout = layout  # None: read from each member's superblock
        self.plan = cut
        self.survive = survive  # None: a random probability per cut
        self.tear = tear
        self.survive_by_region = survive_by_region or {}  # overrides per region (sb, bitmap, ...)
        self.lock = threading.RLock()
        self.states: dict[str, PathState] = {}
        self.ops = 0  # every IO (reads too): faults' clock
        self.mutations = 0  # writes and syncs
        self.by_kind: dict[str, int] = dict.fromkeys(CUT_KINDS, 0)
        self.seq = 0
        self.dead = False
        self.cut_report: CutReport | None = None
        self.phase = "setup"
        self.on_cut: Callable[[CutReport], None] | None = None
        self.no_cut = False  # while set, no op counts towards the cut plan

    # ---- devices ---------------------------------------------------------------------------

    def opener(self, path: str, writable: bool) -> Device:
        """A :data:`llraid.member.DeviceOpener`."""
        return SimDevice(path, writable, self)

    def state(self, path: str, sectors: int | None = None) -> PathState:
        with self.lock:
            st = self.states.get(path)
            if st is None:
                if sectors is None:
                    sectors = os.stat(path).st_size // SECTOR
                st = PathState(
                    path,
                    sectors,
                    self.layout,
                    np.zeros((sectors, SECTOR), dtype=np.uint8),
                    np.zeros(sectors, dtype=np.bool_),
                    np.zeros(sectors, dtype=np.int64),
                )
                self.states[path] = st
            return st

    def add_fault(self, path: str, fault: Fault, *, in_ops: int = 0) -> Fault:
        """Install ``fault`` on ``path``; the next ``in_ops`` IOs (of any device) still work."""
        with self.lock:
            fault.after_op = self.ops + in_ops + 1
            self.state(path).faults.append(fault)
        return fault

    def clear_faults(self, path: str | None = None) -> None:
        with self.lock:
            for st in self.states.values():
                if path is None or st.path == path:
                    st.faults.clear()

    def set_logging(self, on: bool) -> None:
        with self.lock:
            for st in self.states.values():
                st.log = [] if on else None

    # ---- accounting and the cut --------------------------------------------------------------

    def _tick(self, st: PathState, kind: str) -> bool:
        """Count one mutating op; True if the power goes off at this op."""
        self.mutations += 1
        if self.no_cut:
            return False
        self.by_kind["any"] += 1
        if kind in self.by_kind:
            self.by_kind[kind] += 1
        plan = self.plan
        if plan is None or self.dead:
            return False
        return self.by_kind.get(plan.kind, 0) == plan.nth and (plan.kind == "any" or plan.kind == kind)

    def power_off(self, kind: str = "end", path: str | None = None) -> CutReport:
        """Cut the power now: decide what reached the media, write it to the files."""
        with self.lock:
            if self.cut_report is not None:
                return self.cut_report
            p = self.survive if self.survive is not None else self.rng.choice([0.0, 1.0, self.rng.random()])
            pending = survived = torn = 0
            for st in self.states.values():
                n, s, t = self._decide(st, p)
                pending += n
                survived += s
                torn += t
            self.dead = True
            self.cut_report = CutReport(
                self.mutations, kind, self.phase, pending, survived, pending - survived, torn, path
            )
            if self.on_cut is not None:
                self.on_cut(self.cut_report)
            return self.cut_report

    def _decide(self, st: PathState, p: float) -> tuple[int, int, int]:
        if not st.pending:
            st.has_ov[:] = False
            return 0, 0, 0
        recs = sorted(st.pending, key=lambda r: r.seq)
        touched = np.zeros(st.sectors, dtype=np.bool_)
        for r in recs:
            touched[r.first : r.first + len(r.data) // SECTOR] = True
        fd = os.open(st.path, os.O_RDWR)
        try:
            # Durable base content of every touched sector (from the file where it is durable).
            need = touched & ~st.has_ov
            for a, b in _runs(need):
                raw = os.pread(fd, (b - a) * SECTOR, a * SECTOR)
                st.img[a:b] = np.frombuffer(raw, dtype=np.uint8).reshape(b - a, SECTOR)
            survived = torn = 0
            for r in recs:
                if self.rng.random() >= self.survive_by_region.get(r.region, p):
                    continue
                n = len(r.data) // SECTOR
                mask = r.seq > st.dseq[r.first : r.first + n]
                if n > 1 and self.tear and self.rng.random() < self.tear:
                    part = np.array([self.rng.random() < 0.5 for _ in range(n)], dtype=np.bool_)
                    mask &= part
                    torn += 1
                survived += 1
                rows = np.frombuffer(r.data, dtype=np.uint8).reshape(n, SECTOR)
                st.img[r.first : r.first + n][mask] = rows[mask]
                st.dseq[r.first : r.first + n][mask] = r.seq
            for a, b in _runs(touched):
                os.pwrite(fd, st.img[a:b].tobytes(), a * SECTOR)
            os.fsync(fd)
        finally:
            os.close(fd)
        n_pending = len(recs)
        st.pending.clear()
        st.has_ov[:] = False
        return n_pending, survived, torn


def detect_layout(fd: int, sectors: int) -> Layout | None:
    """The metadata layout of the md member open on ``fd`` (None: no v1.x superblock yet)."""
    from llraid.format.superblock import Superblock1, super_offset_for

    for minor in (2, 1, 0):
        at = super_offset_for(minor, sectors)
        if at < 0 or (at + 8) * SECTOR > sectors * SECTOR:
            continue
        try:
            sb = Superblock1.parse(os.pread(fd, 4096, at * SECTOR))
        except LlraidError:
            continue
        if sb.super_offset != at:
            continue
        so = at * SECTOR
        bm = (at + sb.bitmap_offset) * SECTOR if sb.has_bitmap else None
        return Layout(so, so + 4096, bm, sb.data_offset * SECTOR)
    return None


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``[a, b)`` runs of True in ``mask``."""
    if not mask.any():
        return []
    m = mask.astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], m, [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class SimDevice(Device):
    """A member device of a :class:`SimWorld` (see the module docstring)."""

    def __init__(self, path: str, writable: bool, world: SimWorld) -> None:
        super().__init__(path, writable=writable)
        self.world = world
        self.st = world.state(path, self.sectors)

    def _check(self, op: str, offset: int, length: int) -> None:
        """Power and faults (caller holds the world lock)."""
        w = self.world
        if w.dead:
            raise PowerCutError(f"{self.path}: power is off")
        if self.fd < 0:
            raise DeviceError(f"{self.path}: device is closed")
        for f in self.st.faults:
            if f.matches(op, offset, length, w.ops):
                f.fired += 1
                if f.kind == "slow":
                    time.sleep(f.delay)
                    continue
                what = {"read": "read", "write": "write", "sync": "flush"}.get(op, op)
                raise InjectedError(f"{self.path}: injected {f.kind} fault: {what} error at byte {offset}")

    def _region(self, offset: int) -> str:
        lay = self.st.layout
        if lay is None:
            lay = self.st.layout = detect_layout(self.fd, self.sectors)
        if lay is None:
            lay = self.world.layout  # a new member before its first superblock
        return lay.region(offset) if lay is not None else "data"

    def pread(self, offset: int, length: int) -> bytes:
        with self.world.lock:
            self.world.ops += 1
            self._check("read", offset, length)
            self.st.reads += 1
            if self.st.log is not None:
                self.st.log.append(("read", offset, length))
        return super().pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, dsync: bool = False) -> None:
        if not self.writable:
            raise DeviceError(f"{self.path}: device is opened read-only")
        if offset < 0 or offset + len(data) > self.size:
            raise DeviceError(
                f"{self.path}: write of {len(data)} bytes at {offset} is past the end ({self.size} bytes)"
            )
        w = self.world
        st = self.st
        with w.lock:
            w.ops += 1
            self._check("write", offset, len(data))
            region = self._region(offset)
            cut = w._tick(st, region)
            st.writes += 1
            st.bytes_written[region] += len(data)
            if st.log is not None:
                st.log.append(("write", offset, len(data)))
            first = offset // SECTOR
            last = -(-(offset + len(data)) // SECTOR)
            n = last - first
            w.seq += 1
            seq = w.seq
            aligned = offset % SECTOR == 0 and len(data) % SECTOR == 0
            old: bytes | None = None
            if not aligned or (not dsync and not st.has_ov[first:last].all()) or cut:
                old = os.pread(self.fd, n * SECTOR, first * SECTOR)
            if aligned:
                new = bytes(data)
            else:
                assert old is not None
                buf = bytearray(old)
                buf[offset - first * SECTOR : offset - first * SECTOR + len(data)] = data
                new = bytes(buf)
            if (not dsync or cut) and not st.has_ov[first:last].all():
                assert old is not None
                rows = np.frombuffer(old, dtype=np.uint8).reshape(n, SECTOR)
                fill = ~st.has_ov[first:last]
                st.img[first:last][fill] = rows[fill]
                st.has_ov[first:last] = True
            os.pwrite(self.fd, new, first * SECTOR)
            if dsync and not cut:
                st.dseq[first:last] = seq
                st.has_ov[first:last] = False
            else:
                st.pending.append(_Rec(seq, first, new, region))  # the write at the cut may or may not land
            if cut:
                w.power_off(region, self.path)
                raise PowerCutError(f"{self.path}: power cut during a write at byte {offset}")

    def sync(self) -> None:
        w = self.world
        st = self.st
        with w.lock:
            w.ops += 1
            self._check("sync", 0, 0)
            cut = w._tick(st, "sync")
            st.syncs += 1
            if st.log is not None:
                st.log.append(("sync", 0, 0))
            if cut:
                w.power_off("sync", self.path)
                raise PowerCutError(f"{self.path}: power cut during a flush")
            for r in sorted(st.pending, key=lambda r: r.seq):
                n = len(r.data) // SECTOR
                view = st.dseq[r.first : r.first + n]
                np.maximum(view, r.seq, out=view)
            st.pending.clear()
            st.has_ov[:] = False

    def __repr__(self) -> str:
        return f"SimDevice({self.path!r}, {self.size} bytes)"
