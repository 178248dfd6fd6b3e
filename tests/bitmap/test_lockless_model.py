"""``LocklessBitmap`` against a reference model written from spec/LLBITMAP.md.

The oracle is the spec text itself: the transition table is parsed at test time from the markdown
of LLBITMAP.md section 2.3 (states from 2.1), and :class:`Model` implements, straight from the
prose, the overrides of 2.4, the persistence rule of 3.1, block infection (3.2), unplug (3.3), the
per-page expiry used by the daemon (4.1/4.2), the entry points of 5 and the load rules of 6.2.
Nothing in the model is taken from ``llraid/bitmap/lockless.py``.

Conventions of the model (spec 1, 3.1-3.3, ONDISK 5):

* the model's ``mem`` is the in-memory bitmap area (header + gap + one state byte per chunk from
  byte 1024), ``disk`` the bytes most recently written to the member;
* a block is 512 bytes of the area; chunk ``c`` lives at byte ``1024 + c``; bytes of the last
  chunk's block past the last chunk are state bytes too (infection changes them like any other),
  the 1024-byte header is never touched. Their initial value is whatever was on disk: mdadm's
  image is 0xff up to 4 KiB (the kernel fixtures show those bytes still 0xff after infection:
  not a state, so infection leaves them alone), zero (Unwritten) beyond; the stateful test also
  starts from zeroed and random tails;
* "marked" = the block changed through a Dirty/NeedSync/NeedSyncUnwritten store since the last
  unplug or full flush, i.e. it is not durable yet; unplug writes the marked blocks as they are
  then, cond_end_sync and flush write every page.

Choices where the spec leaves room, each next to its code: discards take only fully covered chunks
(7.6 "newest", not the 6.18 end-chunk formula quoted in 5); a page's expiry starts at "never"
(4.1 does not say).

One deliberate deviation from 3.1/3.2: only Startwrite infects. Upstream also infects on the
Dirty/NeedSync stores of Endsync, Reload and Stale, which turns Unwritten chunks (no data) into
written ones after a sync (fixtures e2, f; README "Notes on upstream vs the spec").
"""

from __future__ import annotations

import functools
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.bitmap.store import BitmapStore, BitmapTarget
from llraid.device import Device
from llraid.format.bitmap import BitmapFlag
from llraid.format.llbitmap import LLState
from tests.conftest import BY_NAME

SPEC_DIR = Path(os.environ.get("LLRAID_SPEC", Path(__file__).resolve().parents[2] / ".." / "shared" / "spec"))

UUID = bytes(range(16, 32))
DATA = 1024  # BITMAP_DATA_OFFSET
BLOCK = 512  # io_size: the md array's logical block size
PAGE = 4096
RESERVED = 256 * 512  # mdadm's sectors_reserved
CHUNK = 128  # MIN_CHUNK_SIZE: every test array here is small enough for it
FAR = 1e15  # a daemon "now" after every expiry time

# State values (spec 2.1; test_spec_states checks them against the spec text).
U, C, D, NS, S, NSU, SU, CU = range(8)
# Action names exactly as the spec's table header spells them (test_spec_table_shape checks).
SW, SS, ES, AS, RL, DM, DC, ST, PS, CLR = (
    "Startwrite",
    "Startsync",
    "Endsync",
    "Abortsync",
    "Reload",
    "Daemon",
    "Discard",
    "Stale",
    "ProactiveSync",
    "ClearUnwritten",
)
ACTIONS = (SW, SS, ES, AS, RL, DM, DC, ST, PS, CLR)
RAID456 = (4, 5, 6)


# ---- the spec, parsed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    states: dict[str, int]  # 2.1: name -> byte value (None excluded)
    actions: tuple[str, ...]  # 2.3 header order
    table: dict[tuple[int, str], int | None]  # (state, action) -> new state, None = "—"

    def new(self, state: int, action: str) -> int | None:
        return self.table[(state, action)]


def _table_at(lines: list[str], start: int) -> list[list[str]]:
    """The markdown table starting at ``lines[start]``: rows of stripped cells, no separator."""
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows


@functools.cache
def spec() -> Spec:
    path = SPEC_DIR / "LLBITMAP.md"
    if not path.is_file():
        pytest.skip(f"spec not found at {path} (set LLRAID_SPEC)")
    lines = path.read_text(encoding="utf-8").splitlines()
    sec21 = next(i for i, ln in enumerate(lines) if ln.startswith("### 2.1"))
    head21 = next(i for i in range(sec21, len(lines)) if lines[i].startswith("| value | state"))
    states: dict[str, int] = {}
    for cells in _table_at(lines, head21)[1:]:
        value = int(cells[0], 0)
        if value != 0xFF:  # None: "never stored"
            states[cells[1]] = value
    head23 = next(i for i, ln in enumerate(lines) if ln.startswith("| from \\ action |"))
    rows = _table_at(lines, head23)
    actions = tuple(rows[0][1:])
    table: dict[tuple[int, str], int | None] = {}
    for cells in rows[1:]:
        m = re.fullmatch(r"(\w+) \((\d+)\)", cells[0])
        assert m, f"unexpected row label {cells[0]!r} in LLBITMAP.md 2.3"
        value = int(m.group(2))
        assert states[m.group(1)] == value
        for action, cell in zip(actions, cells[1:], strict=True):
            table[(value, action)] = None if cell in ("—", "-", "") else states[cell]
    return Spec(states, actions, table)


# ---- the reference model --------------------------------------------------------------------------


class Model:
    """llbitmap as LLBITMAP.md describes it, one chunk at a time like the kernel loop."""

    def __init__(self, image: bytes, chunks: int, level: int) -> None:
        self.spec = spec()
        self.nstates = len(self.spec.states)
        self.mem = bytearray(image)
        self.disk = bytearray(image)
        self.chunks = chunks
        self.level = level
        self.degraded = False
        self.marked: set[int] = set()
        self.npages = -(-(DATA + chunks) // PAGE)
        # 4.1: raise barrier sets expire = now + barrier_idle, resume sets "never", close_sync
        # sets "now". The spec does not say what a page starts with; the model assumes "never"
        # (upstream allocates the page control zeroed, i.e. expire 0 = already expired).
        self.expired = [False] * self.npages
        self.flush_flag = [False] * self.npages
        self.requests = 0
        self.stale = False

    @property
    def raid456(self) -> bool:
        return self.level in RAID456

    # 2.4: the effective transition
    def apply(self, first: int, last: int, action: str) -> int | None:
        if first >= self.chunks or first > last:
            return None
        last = min(last, self.chunks - 1)
        need_resync = False
        new: int | None = None
        for chunk in range(first, last + 1):
            pos = DATA + chunk
            c = self.mem[pos]
            if c >= self.nstates:
                new = NS  # invalid byte: forced resync
            else:
                if c in (NS, NSU):
                    need_resync = not self.degraded
                new = self.spec.new(c, action)
            if self.degraded:
                if new == D and action == SW:
                    new = NS
                elif c == D and action == SS:
                    new = S
            elif c == U and new == D and action == SW and self.raid456:
                new = NS
            if new is None:
                continue
            self._store(pos, new, infect=action == SW)
            if new in (NS, NSU):
                need_resync = not self.degraded
        if need_resync:
            self.requests += 1
        return new

    # 3.1 / 3.2
    def _store(self, pos: int, new: int, *, infect: bool) -> None:
        self.mem[pos] = new
        if new in (D, NS):
            self._mark(pos, infect=infect)
        elif new == NSU:
            self._mark(pos, infect=False)

    def _mark(self, pos: int, *, infect: bool) -> None:
        b = pos // BLOCK
        if self.degraded or not infect:
            self.marked.add(b)
            return
        if b in self.marked:
            self._infect(b)
            return
        self.marked.add(b)
        block = self.mem[max(b * BLOCK, DATA) : (b + 1) * BLOCK]
        if block.count(D) + block.count(NS) > 1:  # another chunk than ``pos`` (itself D or NS)
            self._infect(b)

    def _infect(self, b: int) -> None:
        """Unwritten -> Dirty (raid1/10) or NeedSync (raid456), Clean/CleanUnwritten -> Dirty."""
        table = bytearray(range(256))
        table[U] = NS if self.raid456 else D
        table[C] = table[CU] = D
        lo, hi = max(b * BLOCK, DATA), (b + 1) * BLOCK
        self.mem[lo:hi] = self.mem[lo:hi].translate(table)

    # 3.3 / 4.2: IO to the members
    def unplug(self) -> None:
        for b in self.marked:
            self.disk[b * BLOCK : (b + 1) * BLOCK] = self.mem[b * BLOCK : (b + 1) * BLOCK]
        self.marked.clear()

    def full_flush(self) -> None:
        self.disk[:] = self.mem
        self.marked.clear()

    def not_durable(self, first: int, last: int) -> bool:
        return any(b in self.marked for b in range((DATA + first) // BLOCK, (DATA + last) // BLOCK + 1))

    # 4.1 / 4.2: barrier and daemon
    def _raise_barrier(self, first: int, last: int) -> None:
        for page in range((DATA + first) // PAGE, (DATA + last) // PAGE + 1):
            self.expired[page] = True  # now + barrier_idle, long before FAR

    def _page_chunks(self, page: int) -> tuple[int, int]:
        return max(page * PAGE - DATA, 0), min((page + 1) * PAGE - DATA, self.chunks) - 1

    def daemon(self) -> None:
        if self.degraded:
            return
        for page in range(self.npages):
            flush, self.flush_flag[page] = self.flush_flag[page], False
            if not flush and not self.expired[page]:
                continue
            self.apply(*self._page_chunks(page), DM)
            self.expired[page] = False  # resume: expire = never

    def flush(self) -> None:
        self.flush_flag = [True] * self.npages
        self.daemon()
        self.full_flush()

    # 5: entry points
    def start_write(self, offset: int, sectors: int) -> bool:
        first = offset // CHUNK
        last = min((offset + sectors - 1) // CHUNK, self.chunks - 1)
        self._raise_barrier(first, last)  # newest: barrier before the transition
        self.apply(first, last, SW)
        return self.not_durable(first, last)

    def discard(self, offset: int, sectors: int) -> None:
        # 7.6, newest: only chunks fully covered by the discard lose their data.
        first = -(-offset // CHUNK)
        last = min((offset + sectors) // CHUNK - 1, self.chunks - 1)
        if first <= last:
            self._raise_barrier(first, last)
            self.apply(first, last, DC)

    def load(self) -> None:
        action = ST if self.stale else RL
        self.stale = False
        self.apply(0, self.chunks - 1, action)

    def start_sync(self, offset: int) -> tuple[bool, int]:
        blocks = CHUNK - offset % CHUNK
        return self.apply(offset // CHUNK, offset // CHUNK, SS) in (S, SU), blocks

    def end_sync(self, offset: int) -> None:
        self.apply(offset // CHUNK, self.chunks - 1, AS)

    def close_sync(self) -> None:
        self.expired = [True] * self.npages
        self.apply(0, self.chunks - 1, ES)

    def cond_end_sync(self, sector: int) -> None:
        if sector == 0:
            return  # only remembers the time
        complete = sector - sector % CHUNK
        if complete:
            self.apply(0, complete // CHUNK - 1, ES)
        self.full_flush()

    def proactive_sync(self) -> None:
        self.apply(0, self.chunks - 1, PS)

    def start_recovery(self) -> None:
        self.apply(0, self.chunks - 1, CLR)

    # 7.4 and 5 (blocks_synced)
    def skip_sync_blocks(self, offset: int, kind: SyncKind) -> int:
        blocks = CHUNK - offset % CHUNK
        c = self.mem[DATA + offset // CHUNK]
        if c in (U, CU):
            return blocks
        if self.degraded:
            return 0
        if c in (C, D) and kind is SyncKind.RESYNC:
            return blocks
        return 0

    def blocks_synced(self, offset: int) -> bool:
        return self.mem[DATA + offset // CHUNK] in (C, D, CU)


# ---- the implementation under test ----------------------------------------------------------------


class Host:
    def __init__(self, level: int) -> None:
        self.level = level
        self.degraded = False
        self.requests = 0

    def is_degraded(self) -> bool:
        return self.degraded

    def request_sync(self) -> None:
        self.requests += 1


class Rig:
    """A member file with a fresh mdadm llbitmap area at ``offset``, opened (FIRST_USE)."""

    def __init__(
        self, directory: Path, sync_size: int, level: int, *, offset: int = 8192, assume_clean: bool = False
    ) -> None:
        self.offset = offset
        self.sync_size = sync_size
        self.path = directory / "member.img"
        sb = LocklessBitmap.new_superblock(UUID, sync_size, assume_clean=assume_clean)
        self.written = LocklessBitmap.initial_area(sb)
        with open(self.path, "wb") as f:
            f.truncate(offset + RESERVED + 65536)
            f.seek(offset)
            f.write(self.written)
        self.dev = Device(str(self.path), writable=True)
        self.host = Host(level)
        self.bm = LocklessBitmap.open(
            BitmapStore([BitmapTarget(self.dev, offset)]),
            self.host,
            array_uuid=UUID,
            sync_size=sync_size,
            events=0,
        )
        # What the model starts from: what mdadm left on disk, then FIRST_USE (6.1) sets every
        # chunk to the initial state and writes every page.
        self.chunks = -(-sync_size // CHUNK)
        image = bytearray(RESERVED)
        image[: len(self.written)] = self.written
        image[DATA : DATA + self.chunks] = bytes([C if assume_clean else U]) * self.chunks
        self.model = Model(bytes(image), self.chunks, level)

    def set_byte(self, pos: int, value: int) -> None:
        """Start from an arbitrary in-memory state (before any action; not written)."""
        self.bm.area[pos] = value
        self.model.mem[pos] = value

    def state(self, chunk: int) -> int:
        return int(self.bm.area[DATA + chunk])

    def disk(self, start: int, end: int) -> bytes:
        return os.pread(self.dev.fd, end - start, self.offset + start)

    def write(self, offset: int, sectors: int) -> bool:
        """The write protocol of base.py: start_write, unplug if asked, (data), end_write."""
        need = self.bm.start_write(offset, sectors)
        if need:
            self.bm.unplug()
        self.bm.end_write(offset, sectors)
        return need

    def close(self) -> None:
        self.dev.close()


def _diff(impl: bytes, model: bytes, base: int) -> str:
    bad = [i for i, (a, b) in enumerate(zip(impl, model, strict=True)) if a != b]
    shown = ", ".join(
        f"area byte {base + i} (chunk {base + i - DATA}): impl {impl[i]} model {model[i]}" for i in bad[:10]
    )
    return f"{len(bad)} bytes differ: {shown}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(sync_size: int = 128 * 1008, level: int = 1, assume_clean: bool = False) -> Rig:
        d = tmp_path / f"rig{len(made)}"
        d.mkdir()
        made.append(Rig(d, sync_size, level, assume_clean=assume_clean))
        return made[-1]

    yield make
    for r in made:
        r.close()


# ---- the spec parses as expected ------------------------------------------------------------------


def test_spec_states() -> None:
    assert spec().states == {s.title: int(s) for s in LLState}
    assert tuple(spec().states[s.title] for s in LLState) == (U, C, D, NS, S, NSU, SU, CU)


def test_spec_table_shape() -> None:
    sp = spec()
    assert sp.actions == ACTIONS
    assert len(sp.table) == 8 * 10
    # a few cells spelled out, so that a mis-parse cannot go unnoticed
    assert sp.new(U, SW) == D and sp.new(D, DM) == C and sp.new(S, ES) == D and sp.new(NS, SS) == S
    assert sp.new(D, SW) is None and sp.new(U, PS) == NSU and sp.new(CU, CLR) == U


# ---- every cell of the table, through the public API ----------------------------------------------

CELL_CHUNK = 700  # block 3 of page 0; every other chunk is Unwritten


def _apply_via_api(r: Rig, chunk: int, action: str) -> None:
    bm = r.bm
    if action == SW:
        bm.start_write(chunk * CHUNK, CHUNK)
        bm.end_write(chunk * CHUNK, CHUNK)
    elif action == SS:
        bm.start_sync(chunk * CHUNK, False)
    elif action == ES:
        bm.close_sync()
    elif action == AS:
        bm.end_sync(chunk * CHUNK)
    elif action == RL:
        bm.load()
    elif action == DM:
        r.write(0, 8)  # a write in another block of the same page: the page expires (4.1)
        bm.daemon_work(now=FAR)
    elif action == DC:
        bm.start_discard(chunk * CHUNK, CHUNK)
        bm.end_discard(chunk * CHUNK, CHUNK)
    elif action == ST:
        bm.flags |= BitmapFlag.STALE
        bm.load()
    elif action == PS:
        bm.proactive_sync()
    elif action == CLR:
        bm.start_recovery()
    else:
        raise AssertionError(action)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("state", range(8), ids=[s.title for s in LLState])
def test_table_cell(rig: Callable[..., Rig], state: int, action: str) -> None:
    r = rig(level=5 if action == PS else 1)  # ProactiveSync is raid456-only; no raid456 override else
    r.set_byte(DATA + CELL_CHUNK, state)
    _apply_via_api(r, CELL_CHUNK, action)
    new = spec().new(state, action)
    assert r.state(CELL_CHUNK) == (state if new is None else new)


# ---- the overrides of 2.4 -------------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("value", [8, 9, 0x80, 0xFF])
def test_invalid_byte_forces_needsync(rig: Callable[..., Rig], value: int, action: str) -> None:
    r = rig(level=5 if action == PS else 1)
    r.set_byte(DATA + CELL_CHUNK, value)
    _apply_via_api(r, CELL_CHUNK, action)
    assert r.state(CELL_CHUNK) == NS
    assert r.host.requests >= 1  # a new NeedSync asks for a resync (not degraded)


@pytest.mark.parametrize("level", [1, 10, 5, 6])
@pytest.mark.parametrize(
    ("state", "expected"), [(U, NS), (C, NS), (CU, NS), (D, D), (NS, NS), (S, S), (NSU, NS), (SU, S)]
)
def test_degraded_write(rig: Callable[..., Rig], level: int, state: int, expected: int) -> None:
    r = rig(level=level)
    r.host.degraded = True
    r.set_byte(DATA + CELL_CHUNK, state)
    r.set_byte(DATA + CELL_CHUNK + 1, D)  # a Dirty neighbour would infect the block if not degraded
    r.write(CELL_CHUNK * CHUNK, CHUNK)
    assert r.state(CELL_CHUNK) == expected
    states = bytes(r.bm.area[DATA : DATA + r.chunks])
    assert states.count(U) == r.chunks - 2  # no infection
    assert r.host.requests == 0  # NeedSync does not ask for a resync while degraded


def test_degraded_writes_fixture_f_pattern(rig: Callable[..., Rig]) -> None:
    """README "llbitmap on disk": degraded writes make exactly the written chunks NeedSync."""
    r = rig(assume_clean=True)
    r.host.degraded = True
    for start, n in [(1024, 2048), (60000, 1000)]:
        r.write(start, n)
    states = bytes(r.bm.area[DATA : DATA + r.chunks])
    need = {c for c in range(r.chunks) if states[c] == NS}
    assert need == set(range(8, 24)) | set(range(468, 477))
    assert states.count(C) == r.chunks - len(need)


@pytest.mark.parametrize("degraded", [False, True])
@pytest.mark.parametrize("state", range(8))
def test_startsync(rig: Callable[..., Rig], state: int, degraded: bool) -> None:
    r = rig()
    r.host.degraded = degraded
    r.set_byte(DATA + CELL_CHUNK, state)
    must, blocks = r.bm.start_sync(CELL_CHUNK * CHUNK + 5, degraded)
    new = spec().new(state, SS)
    if degraded and state == D:
        new = S  # degraded Startsync on Dirty: resync dirty data too
    expected = state if new is None else new
    assert r.state(CELL_CHUNK) == expected
    assert must == (expected in (S, SU)) and blocks == CHUNK - 5


@pytest.mark.parametrize(
    ("level", "state", "expected", "requests"),
    [
        (1, U, D, 0),
        (10, U, D, 0),
        (4, U, NS, 1),  # lazy raid456 parity build
        (5, U, NS, 1),
        (6, U, NS, 1),
        (5, CU, D, 0),  # parity already valid
        (5, C, D, 0),
        (5, NSU, NS, 1),
        (5, SU, S, 0),
    ],
)
def test_first_write(rig: Callable[..., Rig], level: int, state: int, expected: int, requests: int) -> None:
    r = rig(level=level)
    r.set_byte(DATA + CELL_CHUNK, state)
    need = r.write(CELL_CHUNK * CHUNK, 8)
    assert r.state(CELL_CHUNK) == expected
    if expected in (D, NS):
        assert need, "the new Dirty/NeedSync byte must be written before the data (3.1)"
    assert r.host.requests == requests
    assert r.disk(DATA + CELL_CHUNK, DATA + CELL_CHUNK + 1)[0] == (
        expected if expected in (D, NS) else U
    )  # 3.1: Dirty/NeedSync are written before the data, Syncing is not


def test_write_to_needsync_chunk_requests_resync(rig: Callable[..., Rig]) -> None:
    """2.4: a chunk read as NeedSync sets need_resync (not degraded), whatever the action."""
    r = rig()
    r.set_byte(DATA + CELL_CHUNK, NS)
    r.write(CELL_CHUNK * CHUNK, 8)
    assert r.state(CELL_CHUNK) == NS
    assert r.host.requests == 1, "start_write over a NeedSync chunk must request a resync (spec 2.4)"


def test_infected_needsync_later_in_range_requests_recovery(rig: Callable[..., Rig]) -> None:
    """2.4 reads each chunk when the loop reaches it: on raid456, infection can have turned a
    later Unwritten chunk of the range into NeedSync, which then asks for a (lazy) recovery."""
    r = rig(level=5)
    r.set_byte(DATA + 100, C)
    r.set_byte(DATA + 101, C)
    r.write(100 * CHUNK, 3 * CHUNK)  # 100: C->D; 101: C->D, block marked: infect (102: U->NS)
    assert [r.state(c) for c in (99, 100, 101, 102)] == [NS, D, D, NS]
    assert r.host.requests == 1, "chunk 102 is NeedSync when the loop reads it (spec 2.4)"


# ---- infection (3.2) ------------------------------------------------------------------------------


def test_single_write_dirties_one_chunk(rig: Callable[..., Rig]) -> None:
    """e2: one 4 KiB write (sectors 12800..12807 = chunk 100) dirties exactly one chunk."""
    r = rig()
    assert r.write(12800, 8)
    states = bytes(r.bm.area[DATA : DATA + r.chunks])
    assert states[100] == D and states.count(U) == r.chunks - 1
    assert r.disk(DATA, DATA + r.chunks) == states


@pytest.mark.parametrize("level", [1, 5])
def test_two_marks_before_unplug_infect_block(rig: Callable[..., Rig], level: int) -> None:
    r = rig(level=level)
    r.set_byte(DATA + 300, C)
    r.set_byte(DATA + 301, CU)
    r.set_byte(DATA + 302, S)
    assert r.bm.start_write(100 * CHUNK, 1)
    r.bm.end_write(100 * CHUNK, 1)
    assert r.bm.start_write(200 * CHUNK, 1)  # block 2 still waiting to be written
    r.bm.end_write(200 * CHUNK, 1)
    block = bytes(r.bm.area[DATA : DATA + 512])
    first = NS if level in RAID456 else D
    expected = [first] * 512
    expected[300] = expected[301] = D
    expected[302] = S
    assert list(block) == expected
    assert bytes(r.bm.area[DATA + 512 : DATA + r.chunks]) == bytes([U]) * (
        r.chunks - 512
    )  # block 3 untouched


def test_other_dirty_chunk_infects_after_unplug(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.write(100 * CHUNK, 1)  # marked, then unplugged: durable
    r.write(200 * CHUNK, 1)  # block not marked, but chunk 100 is Dirty: infect
    assert bytes(r.bm.area[DATA : DATA + 512]) == bytes([D]) * 512


def test_no_infection_after_daemon_cleaned(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.write(100 * CHUNK, 1)
    r.bm.daemon_work(now=FAR)
    assert r.state(100) == C
    r.write(200 * CHUNK, 1)
    states = bytes(r.bm.area[DATA : DATA + r.chunks])
    assert (states[100], states[200], states.count(U)) == (C, D, r.chunks - 2)


def _standard_ios(writes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The fixture writer's IOs: 1 MiB (2048 sectors) at a time."""
    for start, n in writes:
        for s in range(start, start + n, 2048):
            yield s, min(2048, start + n - s)


def _standard_set(sync_size: int) -> list[tuple[int, int]]:
    return [(0, 2048), (10001, 3001), (sync_size - 2048, 2048)]


def test_standard_writes_raid1_dirty_everything(rig: Callable[..., Rig]) -> None:
    r = rig(sync_size=129024)
    for s, n in _standard_ios(_standard_set(129024)):
        r.write(s, n)
    assert r.chunks == 1008
    assert bytes(r.bm.area[DATA : DATA + 1008]) == bytes([D]) * 1008
    assert r.disk(DATA, DATA + 1008) == bytes([D]) * 1008  # what the crash fixture e holds


def test_standard_writes_raid10(rig: Callable[..., Rig]) -> None:
    r = rig(sync_size=253952, level=10)
    for s, n in _standard_ios(_standard_set(253952)):
        r.write(s, n)
    assert r.chunks == 1984
    states = bytes(r.bm.area[DATA : DATA + 1984])
    assert states == bytes([D]) * 512 + bytes([U]) * 1024 + bytes([D]) * 448


KERNEL_CASES = {
    # name: (level, bitmap sync size (raid1: member size, raid10: array size), crashed: no stop flush)
    "a-raid1-llbitmap": (1, 129024, False),
    "b-raid10n2-llbitmap": (10, 253952, False),
    "e-raid1-llbitmap-crash": (1, 129024, True),
    "e2-raid1-llbitmap-crash-single-write": (1, 129024, True),
    "f-raid1-llbitmap-degraded-stale-member": (1, 129024, False),
    "g1-raid10f2-llbitmap": (10, 253952, False),
    "g2-raid10o2-llbitmap": (10, 253952, False),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_made_bitmap_bytes(
    name: str, rig: Callable[..., Rig], unpacked: Callable[[str], list[Path]]
) -> None:
    """Replay the fixture's writes (1 MiB IOs) and compare the on-disk state bytes, including
    the bytes past the last chunk, with the member the kernel wrote (bitmap at byte 8192)."""
    level, sync_size, crash = KERNEL_CASES[name]
    fx = BY_NAME[name]
    writes = [(int(w["start_sector"]), int(w["sectors"])) for w in fx.entry["writes"]]
    r = rig(sync_size=sync_size, level=level)
    if name.startswith("f"):  # phase 1, the daemon cleans, m1 fails, phase 2 while degraded
        for s, n in _standard_ios(writes[:3]):
            r.write(s, n)
        r.bm.daemon_work(now=FAR)
        r.host.degraded = True
        writes = writes[3:]
    for s, n in _standard_ios(writes):
        r.write(s, n)
    if not crash:
        r.bm.flush()  # mdadm --stop
    with open(unpacked(name)[0], "rb") as f:
        f.seek(8192 + DATA)
        kernel = f.read(PAGE - DATA)
    ours = r.disk(DATA, PAGE)
    assert ours == kernel, _diff(ours, kernel, DATA)


# ---- the model-based stateful test ----------------------------------------------------------------

LENGTHS = st.one_of(st.integers(1, 256), st.integers(1, 8192), st.integers(1, 1 << 19))
OFFSETS = st.integers(0, 1 << 22)
INVALID = (8, 9, 0x80, 0xFF)


def _scratch_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # fdatasync is free there


class LLBitmapMachine(RuleBasedStateMachine):
    check_requests = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(dir=_scratch_dir())
        self.rig: Rig | None = None

    def teardown(self) -> None:
        if self.rig is not None:
            self.rig.close()
        self.tmp.cleanup()

    @property
    def r(self) -> Rig:
        assert self.rig is not None
        return self.rig

    @initialize(
        level=st.sampled_from([1, 10, 4, 5, 6]),
        nchunks=st.one_of(st.integers(1, 1500), st.integers(3000, 3600)),
        partial=st.integers(1, CHUNK),
        offset=st.integers(0, 1 << 16),
        assume_clean=st.booleans(),
        preset=st.sampled_from(["fresh", "sparse", "random", "palette", "palette"]),
        tail=st.sampled_from(["keep", "zero", "random"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def create(
        self,
        level: int,
        nchunks: int,
        partial: int,
        offset: int,
        assume_clean: bool,
        preset: str,
        tail: str,
        seed: int,
    ) -> None:
        sync_size = CHUNK * (nchunks - 1) + partial
        d = Path(self.tmp.name)
        self.rig = r = Rig(d, sync_size, level, offset=offset, assume_clean=assume_clean)
        assert (r.bm.chunks, r.bm.chunksize) == (nchunks, CHUNK)
        rng = random.Random(seed)
        values = [*range(8), *INVALID]
        weights = [6, 6, 4, 3, 2, 1, 1, 2, 1, 1, 1, 1]
        if preset == "random":  # every byte from any value
            for c in range(nchunks):
                r.set_byte(DATA + c, rng.choices(values, weights)[0])
        elif preset == "palette":  # per block, runs of two or three values (e.g. Clean and Unwritten)
            for b in range(DATA // BLOCK, (DATA + nchunks - 1) // BLOCK + 1):
                palette = rng.sample(range(8), rng.randint(2, 3))
                if rng.random() < 0.2:
                    palette.append(rng.choice(INVALID))
                pos = b * BLOCK
                while pos < min((b + 1) * BLOCK, DATA + nchunks):
                    value = rng.choice(palette)
                    for _ in range(rng.randint(1, 48)):
                        if pos < DATA + nchunks:
                            r.set_byte(pos, value)
                        pos += 1
        elif preset == "sparse":
            for _ in range(rng.randint(1, 12)):
                r.set_byte(DATA + rng.randrange(nchunks), rng.choices(values, weights)[0])
        end = ((DATA + nchunks - 1) // BLOCK + 1) * BLOCK
        for pos in range(DATA + nchunks, end):
            if tail == "zero":
                r.set_byte(pos, U)
            elif tail == "random":
                r.set_byte(pos, rng.choices(values, weights)[0])

    def _range(self, start: int, length: int) -> tuple[int, int]:
        s = start % self.r.sync_size
        return s, max(1, min(length, self.r.sync_size - s))

    @rule(start=OFFSETS, length=LENGTHS)
    def write(self, start: int, length: int) -> None:
        s, n = self._range(start, length)
        need = self.r.bm.start_write(s, n)
        model_need = self.r.model.start_write(s, n)
        self.r.bm.end_write(s, n)
        if model_need:
            assert need, "start_write said no unplug is needed, but a block of the range is not durable"

    @rule(start=OFFSETS, length=LENGTHS)
    def discard(self, start: int, length: int) -> None:
        s, n = self._range(start, length)
        self.r.bm.start_discard(s, n)
        self.r.model.discard(s, n)
        self.r.bm.end_discard(s, n)

    @rule()
    def unplug(self) -> None:
        self.r.bm.unplug()
        self.r.model.unplug()

    @rule()
    def daemon(self) -> None:
        self.r.bm.daemon_work(now=FAR)
        self.r.model.daemon()

    @rule()
    def flush(self) -> None:
        self.r.bm.flush()
        self.r.model.flush()

    @rule(stale=st.booleans())
    def load(self, stale: bool) -> None:
        if stale:
            self.r.bm.flags |= BitmapFlag.STALE
            self.r.model.stale = True
        self.r.bm.load()
        self.r.model.load()

    @rule(start=OFFSETS)
    def start_sync(self, start: int) -> None:
        s = start % self.r.sync_size
        got = self.r.bm.start_sync(s, self.r.host.degraded)
        assert got == self.r.model.start_sync(s)

    @rule(start=OFFSETS)
    def end_sync(self, start: int) -> None:
        s = start % self.r.sync_size
        self.r.bm.end_sync(s)
        self.r.model.end_sync(s)

    @rule()
    def close_sync(self) -> None:
        self.r.bm.close_sync()
        self.r.model.close_sync()

    @rule(start=OFFSETS)
    def cond_end_sync(self, start: int) -> None:
        s = start % (self.r.sync_size + 1)
        self.r.bm.cond_end_sync(s, force=True)
        self.r.model.cond_end_sync(s)

    @rule()
    def proactive_sync(self) -> None:
        if self.r.host.level in RAID456:
            self.r.bm.proactive_sync()
            self.r.model.proactive_sync()
        else:
            with pytest.raises(ValueError):
                self.r.bm.proactive_sync()  # EINVAL (9.1)

    @rule()
    def start_recovery(self) -> None:
        self.r.bm.start_recovery()
        self.r.model.start_recovery()

    @rule()
    def toggle_degraded(self) -> None:
        self.r.host.degraded = self.r.model.degraded = not self.r.host.degraded

    @rule(start=OFFSETS, kind=st.sampled_from(list(SyncKind)))
    def query(self, start: int, kind: SyncKind) -> None:
        s = start % self.r.sync_size
        assert self.r.bm.skip_sync_blocks(s, kind) == self.r.model.skip_sync_blocks(s, kind)
        if self.r.host.level in RAID456:
            assert self.r.bm.blocks_synced(s) == self.r.model.blocks_synced(s)

    @invariant()
    def agrees_with_model(self) -> None:
        if self.rig is None:
            return
        r, m = self.rig, self.rig.model
        end = ((DATA + r.chunks - 1) // BLOCK + 1) * BLOCK  # chunks and the last block's tail
        impl = bytes(r.bm.area[DATA:end])
        assert impl == bytes(m.mem[DATA:end]), "in memory: " + _diff(impl, bytes(m.mem[DATA:end]), DATA)
        used = m.npages * PAGE
        disk = r.disk(DATA, used)
        assert disk == bytes(m.disk[DATA:used]), "on disk: " + _diff(disk, bytes(m.disk[DATA:used]), DATA)
        if self.check_requests:
            assert r.host.requests == m.requests, "request_sync calls differ from spec 2.4"


class LLBitmapRequestsMachine(LLBitmapMachine):
    check_requests = True


def test_model_states_and_disk() -> None:
    """States in memory, the bytes on disk, start_write's answer, start_sync, skip_sync_blocks."""
    run_state_machine_as_test(
        LLBitmapMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_model_sync_requests() -> None:
    """The same, also counting request_sync calls against 2.4's need_resync."""
    run_state_machine_as_test(
        LLBitmapRequestsMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
