"""The running array end to end: assembly rules, the IO path, member failures, safe mode.

Arrays are created with :func:`llraid.create.create` on small sparse files (or memfds) and driven
through :class:`llraid.array.Array` exactly as the daemon would, with the background threads off
(``bitmap_threads=False``) so that every bitmap state is deterministic; the bitmap daemon is run
by hand where a test needs Dirty chunks cleaned.

The helpers at the top are shared with ``tests/test_sync.py``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from llraid.array import Array, IOFailure, Rdev, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.classic import NEEDED, ClassicBitmap
from llraid.bitmap.lockless import LocklessBitmap
from llraid.create import CreateError, CreateSpec, create, parse_layout
from llraid.errors import AssemblyError, ChecksumError, DeviceError, LlraidError
from llraid.fixtures import copy_sparse
from llraid.format.bitmap import BitmapKind
from llraid.format.llbitmap import DATA_OFFSET, LLState
from llraid.format.superblock import MAX_SECTOR, ROLE_FAULTY, Superblock1
from llraid.member import open_member
from llraid.sync import needed_sync, run_sync, sync_until_idle

MiB = 1 << 20
SECTOR = 512
MEMBER_BYTES = 64 * MiB


# ---- shared helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geo:
    level: int
    disks: int
    layout: str | None = None

    def __str__(self) -> str:
        return f"raid{self.level}x{self.disks}" + (f"{self.layout}" if self.layout else "")

    @property
    def copies(self) -> int:
        return self.disks if self.level == 1 else 2


RAID1_2 = Geo(1, 2)
RAID1_3 = Geo(1, 3)
R10_N2 = Geo(10, 4, "n2")
R10_F2 = Geo(10, 4, "f2")
R10_O2 = Geo(10, 4, "o2")
R10_N2_3 = Geo(10, 3, "n2")
GEOS = [RAID1_2, RAID1_3, R10_N2, R10_F2, R10_O2, R10_N2_3]
BITMAPS = [BitmapKind.NONE, BitmapKind.CLASSIC, BitmapKind.LOCKLESS]
NONE, CLASSIC, LOCKLESS = BITMAPS


def make_spec(
    geo: Geo, bitmap: BitmapKind, *, assume_clean: bool = False, size: int | None = None
) -> CreateSpec:
    return CreateSpec(
        level=geo.level,
        raid_devices=geo.disks,
        layout=parse_layout(geo.level, geo.layout),
        chunk_sectors=0 if geo.level == 1 else 1024,
        bitmap=bitmap,
        assume_clean=assume_clean,
        name="test",
        minor=2,
        size=size,
        homehost="llraid-test",
    )


def member_files(directory: Path, count: int, size: int = MEMBER_BYTES, prefix: str = "m") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = directory / f"{prefix}{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


def spare_file(directory: Path, name: str = "spare.img", size: int = MEMBER_BYTES) -> str:
    p = directory / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def assemble(paths: Iterable[str], *, run: bool = False, readonly: bool = False) -> Array:
    return Array.assemble(list(paths), run=run, readonly=readonly, bitmap_threads=False)


def new_array(
    directory: Path,
    geo: Geo,
    bitmap: BitmapKind,
    *,
    size: int = MEMBER_BYTES,
    assume_clean: bool | None = None,
    paths: list[str] | None = None,
) -> list[str]:
    """Members of a new array in its steady state (initial sync done, stopped cleanly).

    llbitmap is created without ``--assume-clean`` (every chunk Unwritten, the initial sync
    copies nothing); none and classic with it (equivalent to a finished initial sync on zeroed
    files, without spending the time), and classic is started and stopped once so that mdadm's
    all-set initial bits are cleared as md's daemon would.
    """
    if paths is None:
        paths = member_files(directory, geo.disks, size)
    if assume_clean is None:
        assume_clean = bitmap is not LOCKLESS
    create(paths, make_spec(geo, bitmap, assume_clean=assume_clean))
    if bitmap is LOCKLESS and not assume_clean:
        with assemble(paths) as array:
            (stats,) = sync_until_idle(array)
            assert stats.completed and stats.sectors_synced == 0
    elif bitmap is CLASSIC:
        with assemble(paths):
            pass  # a clean stop flushes the bitmap: mdadm's all-set bits are cleared
    return paths


def blob(seed: object, nbytes: int) -> bytes:
    return random.Random(str(seed)).randbytes(nbytes)


def read_sb(path: str) -> Superblock1:
    m = open_member(path)
    try:
        return m.sb
    finally:
        m.device.close()


def poke(path: str, msector: int, data: bytes) -> None:
    """Write member data sector ``msector`` behind the array's back (damage a copy)."""
    offset = read_sb(path).data_offset * SECTOR
    with open(path, "r+b") as f:
        assert os.pwrite(f.fileno(), data, offset + msector * SECTOR) == len(data)


def peek(path: str, msector: int, count: int) -> bytes:
    offset = read_sb(path).data_offset * SECTOR
    with open(path, "rb") as f:
        return os.pread(f.fileno(), count * SECTOR, offset + msector * SECTOR)


def copy_of(array: Array, sector: int, which: int = -1) -> tuple[str, int]:
    """``(member path, member sector)`` of one copy of array sector ``sector``."""
    assert array.mirror is not None
    role, ms = array.mirror.pieces(sector, 1)[0].copies[which]
    d = array.by_role(role)
    assert d is not None
    return d.path, ms


def damage(array: Array, sector: int, data: bytes, which: int = -1) -> tuple[str, int]:
    """Overwrite one copy of array sectors ``[sector, sector + len(data)/512)`` (same piece)."""
    assert array.mirror is not None
    (piece,) = array.mirror.pieces(sector, len(data) // SECTOR)
    role, ms = piece.copies[which]
    d = array.by_role(role)
    assert d is not None
    assert os.pwrite(d.device.fd, data, d.data_offset_bytes + ms * SECTOR) == len(data)
    return d.path, ms


def differing(array: Array, sector: int = 0, count: int | None = None) -> list[int]:
    """Array sectors of the pieces whose available copies are not all equal."""
    assert array.mirror is not None
    end = array.array_sectors if count is None else sector + count
    out = []
    while sector < end:
        n = min(4096, end - sector)
        for p in array.mirror.pieces(sector, n):
            seen = set()
            for role, ms in p.copies:
                d = array.by_role(role)
                if d is not None and array.available(role, ms, p.count):
                    seen.add(d.device.pread(d.data_offset_bytes + ms * SECTOR, p.count * SECTOR))
            if len(seen) > 1:
                out.append(p.sector)
        sector += n
    return out


def llbitmap(array: Array) -> LocklessBitmap:
    bm = array.bitmap
    assert isinstance(bm, LocklessBitmap)
    return bm


def states(array: Array) -> npt.NDArray[np.uint8]:
    bm = llbitmap(array)
    return bm.states[DATA_OFFSET : DATA_OFFSET + bm.chunks].copy()


def chunks_in(array: Array, *wanted: LLState) -> set[int]:
    return {int(c) for c in np.flatnonzero(np.isin(states(array), [int(s) for s in wanted]))}


def chunks_of(array: Array, ranges: Iterable[tuple[int, int]]) -> set[int]:
    """llbitmap chunks touched by array ranges ``(sector, sectors)``."""
    shift = llbitmap(array).chunkshift
    return {c for s, n in ranges for c in range(s >> shift, ((s + n - 1) >> shift) + 1)}


def sync_sectors_of(array: Array, chunks: Iterable[int]) -> int:
    cs = llbitmap(array).chunksize
    return sum(min(cs, array.sync_sectors - c * cs) for c in chunks)


def sectors_on_role(array: Array, chunks: Iterable[int], role: int) -> int:
    """Member sectors of ``role`` that hold a copy of the given llbitmap chunks."""
    assert array.mirror is not None
    cs = llbitmap(array).chunksize
    total = 0
    for c in chunks:
        start = c * cs
        for p in array.mirror.pieces(start, min(cs, array.sync_sectors - start)):
            total += p.count * sum(1 for r, _ in p.copies if r == role)
    return total


def member_sectors_in_use(array: Array, role: int) -> int:
    """Member data sectors of ``role`` that hold array data (what a full recovery writes)."""
    assert array.mirror is not None
    step = 128
    return sum(
        min(step, array.dev_sectors - ms)
        for ms in range(0, array.dev_sectors, step)
        if array.mirror.member_to_sync(role, ms) is not None
    )


def clean_bitmap(array: Array) -> None:
    """Run the bitmap daemon as if it had been idle for long: Dirty chunks become Clean."""
    bm = array.bitmap
    if isinstance(bm, LocklessBitmap):
        bm.daemon_work(now=time.monotonic() + 1e6)
    elif isinstance(bm, ClassicBitmap):
        for _ in range(3):
            bm.daemon_pass()


def break_writes(d: Rdev) -> None:
    """Every later write to this member fails (EBADF) while reads still work."""
    ro = os.open(d.path, os.O_RDONLY)
    try:
        os.dup2(ro, d.device.fd)
    finally:
        os.close(ro)


def sbs_on_disk(paths: Iterable[str]) -> list[Superblock1]:
    return [read_sb(p) for p in paths]


SHM = Path("/dev/shm")


def member_dir(tmp_path: Path) -> Iterator[Path]:
    """Where members of sync-heavy tests live: tmpfs when there is one, else ``tmp_path``.

    A full resync or recovery writes whole members and every superblock update fdatasyncs
    them; on a shared disk that is most of the run time (about 4x here), while the code paths
    are the same on any file system. Light tests keep their members in ``tmp_path``.
    """
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="llraid-test-", dir=SHM))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture
def mdir(tmp_path: Path) -> Iterator[Path]:
    yield from member_dir(tmp_path)


# ---- basic IO, all geometries and bitmaps ---------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_write_read_and_restart(tmp_path: Path, geo: Geo, bitmap: BitmapKind) -> None:
    paths = new_array(tmp_path, geo, bitmap)
    with assemble(paths) as array:
        assert not array.is_degraded() and array.in_sync and needed_sync(array) is None
        assert array.level == geo.level and array.raid_disks == geo.disks
        assert array.bitmap.kind is bitmap
        end = array.array_sectors
        writes = {
            0: blob(1, 4096),
            1000: blob(2, 100 * 1024),
            70001: blob(3, 3 * SECTOR),
            end - 16: blob(4, 8192),
        }
        for sector, data in writes.items():
            array.write(sector, data)
        array.write_bytes(12345, b"unaligned bytes")
        for sector, data in writes.items():
            assert array.read(sector, len(data) // SECTOR) == data
            assert not differing(array, sector, len(data) // SECTOR)
        assert array.read_bytes(12345, 15) == b"unaligned bytes"
        with pytest.raises(IOFailure):
            array.write(end - 1, bytes(1024))
        with pytest.raises(IOFailure):
            array.read(end, 1)
    with assemble(paths) as array:
        assert needed_sync(array) is None and array.resync_cp == MAX_SECTOR
        for sector, data in writes.items():
            assert array.read(sector, len(data) // SECTOR) == data
        assert array.read_bytes(12345, 15) == b"unaligned bytes"


def test_readonly_assembly_writes_nothing(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_2, LOCKLESS)
    with assemble(paths) as array:
        array.write(0, blob("ro", 8192))
    before = [Path(p).read_bytes() for p in paths]
    with assemble(paths, readonly=True) as array:
        assert array.read(0, 16) == blob("ro", 8192)
        with pytest.raises(IOFailure, match="read-only"):
            array.write(0, bytes(512))
    assert [Path(p).read_bytes() for p in paths] == before


# ---- assembly: uuid, roles, events, degraded starts ----------------------------------------------


def test_assembly_refuses_members_of_different_arrays(tmp_path: Path) -> None:
    a = new_array(tmp_path / "a", RAID1_2, NONE)
    b = new_array(tmp_path / "b", RAID1_2, NONE)
    with pytest.raises(AssemblyError, match="different arrays"):
        assemble([a[0], b[1]])
    with pytest.raises(AssemblyError, match="different arrays"):
        assemble([a[0], b[1]], run=True)


def test_assembly_refuses_two_members_claiming_one_device_number(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_2, LOCKLESS)
    twin = str(copy_sparse(Path(paths[0]), tmp_path / "twin.img"))
    with pytest.raises(AssemblyError, match="device number 0"):
        assemble([paths[0], twin])


def test_assembly_refuses_a_bad_checksum(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_2, NONE)
    with open(paths[1], "r+b") as f:
        os.pwrite(f.fileno(), b"\x77", 8 * SECTOR + 64)  # inside the name: only the checksum is wrong
    with pytest.raises(ChecksumError):
        assemble(paths)


@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_missing_member_starts_only_with_run(tmp_path: Path, geo: Geo) -> None:
    paths = new_array(tmp_path, geo, LOCKLESS)
    present = paths[1:]
    with pytest.raises(AssemblyError, match="--run"):
        assemble(present)
    with assemble(present, run=True) as array:
        assert array.is_degraded() and array.by_role(0) is None
        array.write(0, blob("deg", 64 * 1024))
        assert array.read(0, 128) == blob("deg", 64 * 1024)
        # a degraded write is NeedSync (for the member that missed it), never cleaned
        assert chunks_in(array, LLState.NEED_SYNC) == {0}
        clean_bitmap(array)
        assert chunks_in(array, LLState.NEED_SYNC) == {0}
        assert needed_sync(array) is None  # nothing to recover into
    if geo.level == 10 and geo.layout == "n2" and geo.disks == 4:
        with pytest.raises(AssemblyError, match="too few"):  # both copies of chunk 0 missing
            assemble(paths[2:], run=True)


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
def test_stale_member_is_kicked_and_never_read(tmp_path: Path, bitmap: BitmapKind) -> None:
    paths = new_array(tmp_path, RAID1_2, bitmap)
    snapshot = copy_sparse(Path(paths[1]), tmp_path / "old-m1.img")
    data = blob("fresh", 256 * 1024)
    with assemble(paths) as array:
        array.write(0, data)
    fresh_events = read_sb(paths[0]).events
    # m1 comes back with what it held before those writes (events 2+ behind): stale
    copy_sparse(snapshot, Path(paths[1]))
    stale_sb = read_sb(paths[1])
    assert stale_sb.events + 1 < fresh_events
    with pytest.raises(AssemblyError, match=r"stale.*--run|--run.*stale"):
        assemble(paths)
    with assemble(paths, run=True) as array:
        assert [d.path for d in array.rdevs] == [paths[0]]
        assert array.is_degraded()
        assert array.read(0, 512) == data
        array.write(512, blob("more", 4096))
    assert read_sb(paths[1]) == stale_sb  # never told anything


def set_events(path: str, events: int) -> None:
    sb = dataclasses.replace(read_sb(path), events=events).with_checksum()
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), sb.build(), sb.super_offset * SECTOR)


def test_member_one_event_behind_is_still_fresh(tmp_path: Path) -> None:
    """md and mdadm accept a member whose events are one behind (``ev1 + 1 >= events``)."""
    paths = new_array(tmp_path, RAID1_2, LOCKLESS)
    set_events(paths[1], read_sb(paths[0]).events - 1)
    with assemble(paths) as array:
        assert len(array.active()) == 2
    set_events(paths[1], read_sb(paths[0]).events - 2)
    with pytest.raises(AssemblyError, match="stale"):
        assemble(paths)


def write_sb(path: str, sb: Superblock1) -> None:
    sb = sb.with_checksum()
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), sb.build(), sb.super_offset * SECTOR)


def test_assembly_takes_roles_from_the_freshest_superblock(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_2, NONE)
    with assemble(paths) as array:
        array.fail(1)
    fresh = read_sb(paths[0])
    assert fresh.dev_roles[1] == ROLE_FAULTY
    # m1 never heard of its failure; even with a fresh enough event count it must not be used
    set_events(paths[1], fresh.events - 1)
    assert read_sb(paths[1]).role == 1
    with pytest.raises(AssemblyError, match="--run"):
        assemble(paths)
    with assemble(paths, run=True) as array:
        assert [d.path for d in array.active()] == [paths[0]] and array.by_role(1) is None
    # two members that the freshest superblock puts in one role (m1 made fresh again: a faulty
    # member is closed at assembly and its superblock is no longer kept up to date)
    fresh = read_sb(paths[0])
    set_events(paths[1], fresh.events)
    write_sb(
        paths[0], dataclasses.replace(fresh, events=fresh.events + 1, dev_roles=(0, 0, *fresh.dev_roles[2:]))
    )
    with pytest.raises(AssemblyError, match="both hold role 0"):
        assemble(paths, run=True)


# ---- safe mode and superblocks -----------------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
def test_active_before_first_write_and_clean_after_idle(tmp_path: Path, bitmap: BitmapKind) -> None:
    paths = new_array(tmp_path, RAID1_2, bitmap)
    array = assemble(paths)
    try:
        on_disk = sbs_on_disk(paths)
        assert array.in_sync and all(sb.is_clean for sb in on_disk)
        e0 = array.events
        seen: list[list[Superblock1]] = []
        real = array.write_member

        def spy(d: Rdev, msector: int, data: bytes | memoryview, *, fua: bool = False) -> None:
            if not seen:
                seen.append(sbs_on_disk(paths))  # what a crash at the first data write would find
            real(d, msector, data, fua=fua)

        array.write_member = spy  # type: ignore[method-assign]
        array.write(0, blob("x", 4096))
        assert seen and all(not sb.is_clean and sb.events == e0 + 1 for sb in seen[0])
        assert not array.in_sync and array.events == e0 + 1
        array.write(8, blob("y", 4096))  # already active: no superblock write
        assert array.events == e0 + 1
        array.safe_mode_delay = 0.3
        assert not array.try_mark_clean()  # the last write is too recent
        time.sleep(0.35)
        assert array.try_mark_clean()
        assert array.in_sync and array.events == e0 + 2
        assert all(sb.is_clean and sb.events == e0 + 2 for sb in sbs_on_disk(paths))
        array.crash()  # clean on disk: nothing to resync
    finally:
        array.crash()
    with assemble(paths) as array:
        assert array.resync_cp == MAX_SECTOR
        if bitmap is LOCKLESS:
            # llbitmap ignores the clean flag: the chunk still Dirty (daemon not run) is resynced
            assert chunks_in(array, LLState.NEED_SYNC) == {0}
            assert run_sync(array).sectors_synced == llbitmap(array).chunksize
        assert needed_sync(array) is None
        assert array.read(0, 16) == blob("x", 4096) + blob("y", 4096)


@pytest.mark.parametrize("bitmap", [CLASSIC, LOCKLESS], ids=lambda b: b.value)
def test_write_intent_is_durable_before_the_data(tmp_path: Path, bitmap: BitmapKind) -> None:
    paths = new_array(tmp_path, R10_N2, bitmap)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))  # active now
        clean_bitmap(array)
        sector = 200_000
        seen: list[list[bytes]] = []
        real = array.write_member
        sb = read_sb(paths[0])
        area_at = (sb.super_offset + sb.bitmap_offset) * SECTOR

        def spy(d: Rdev, msector: int, data: bytes | memoryview, *, fua: bool = False) -> None:
            if not seen:
                seen.append([Path(p).read_bytes()[area_at : area_at + 8192] for p in paths])
            real(d, msector, data, fua=fua)

        def marked(area: bytes) -> bool:
            if bitmap is LOCKLESS:
                return area[DATA_OFFSET + (sector >> llbitmap(array).chunkshift)] == LLState.DIRTY
            bm = array.bitmap
            assert isinstance(bm, ClassicBitmap)
            chunk = sector // bm.chunk_sectors
            return bool(area[256 + chunk // 8] & (1 << (chunk % 8)))

        assert not any(marked(Path(p).read_bytes()[area_at : area_at + 8192]) for p in paths)
        array.write_member = spy  # type: ignore[method-assign]
        array.write(sector, blob(1, 4096))
        assert len(seen[0]) == 4 and all(marked(area) for area in seen[0])


def test_superblocks_go_to_every_member_on_every_change(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_3, LOCKLESS)
    with assemble(paths) as array:

        def check(members: list[str]) -> None:
            on_disk = sbs_on_disk(members)
            assert {sb.events for sb in on_disk} == {array.events}
            assert len({sb.dev_roles for sb in on_disk}) == 1
            assert len({(sb.resync_offset, sb.feature_map) for sb in on_disk}) == 1

        writes = array.counters.sb_writes
        array.write(0, blob(0, 4096))  # clean -> active
        assert array.counters.sb_writes == writes + 3
        check(paths)
        array.update_sb()
        assert array.counters.sb_writes == writes + 6
        check(paths)
        before = read_sb(paths[2])
        array.fail(2)
        assert array.counters.sb_writes == writes + 8  # the faulty member is told nothing
        check(paths[:2])
        assert read_sb(paths[2]) == before
        assert read_sb(paths[0]).dev_roles[2] == ROLE_FAULTY
        array.remove(2)
        check(paths[:2])
        assert read_sb(paths[0]).dev_roles[:3] == (0, 1, 0xFFFF)


# ---- reads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_reads_balance_between_copies(tmp_path: Path, geo: Geo) -> None:
    paths = new_array(tmp_path, geo, NONE)
    with assemble(paths) as array:
        assert array.mirror is not None
        rng = random.Random(7)
        per_copy: dict[int, int] = {}
        for _ in range(256):  # aligned 64 KiB reads anywhere: one piece each
            sector = rng.randrange(0, array.array_sectors // 128) * 128
            before = dict(array.counters.member_read)
            array.read(sector, 128)
            (piece,) = array.mirror.pieces(sector, 128)
            (reader,) = (p for p, n in array.counters.member_read.items() if n != before.get(p, 0))
            paths_by_copy = [d.path for r, _ in piece.copies if (d := array.by_role(r)) is not None]
            i = paths_by_copy.index(reader)
            per_copy[i] = per_copy.get(i, 0) + 1
        total = sum(array.counters.member_read.values())
        assert total == 256 * 128 * SECTOR
        for p in paths:  # every member serves its share
            assert array.counters.member_read.get(p, 0) >= total / geo.disks / 2
        for i in range(geo.copies):  # and every copy, not only the first
            assert per_copy.get(i, 0) >= 256 / geo.copies / 3, per_copy


def test_large_reads_balance_on_raid10(tmp_path: Path) -> None:
    paths = new_array(tmp_path, R10_N2, NONE)
    with assemble(paths) as array:
        array.read(0, 8 * 2048)
        got = array.counters.member_read
        for p in paths:
            assert got.get(p, 0) >= 8 * MiB / 4 / 2, got


def test_no_read_balancing_while_copies_may_differ(tmp_path: Path) -> None:
    paths = member_files(tmp_path, 2)
    create(paths, make_spec(RAID1_2, NONE, assume_clean=False))  # initial resync pending
    with assemble(paths) as array:
        assert array.resync_cp == 0
        array.read(0, 8 * 2048)
        assert array.counters.member_read == {paths[0]: 8 * MiB}


def _fail_first_read(
    monkeypatch: pytest.MonkeyPatch, array: Array, sector: int, count: int, *, also_writes: bool = False
) -> list[Rdev]:
    """The first member read of a copy of ``[sector, +count)`` finds garbage and fails."""
    assert array.mirror is not None
    failed: list[Rdev] = []
    (piece,) = array.mirror.pieces(sector, count)
    for role, ms in piece.copies:
        d = array.by_role(role)
        assert d is not None
        lo = d.data_offset_bytes + ms * SECTOR
        real = d.device.pread

        def pread(
            offset: int, length: int, d: Rdev = d, lo: int = lo, real: Callable[..., bytes] = real
        ) -> bytes:
            if not failed and offset < lo + count * SECTOR and offset + length > lo:
                failed.append(d)
                os.pwrite(d.device.fd, b"\xee" * count * SECTOR, lo)  # what is left there is garbage
                if also_writes:
                    break_writes(d)
                raise DeviceError(f"{d.path}: read error at byte {offset}: Input/output error")
            return real(offset, length)

        monkeypatch.setattr(d.device, "pread", pread)
    return failed


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
@pytest.mark.parametrize("geo", [RAID1_2, RAID1_3, R10_N2, R10_F2], ids=str)
def test_read_error_is_served_from_another_copy_and_rewritten(
    mdir: Path, monkeypatch: pytest.MonkeyPatch, geo: Geo, bitmap: BitmapKind
) -> None:
    paths = new_array(mdir, geo, bitmap)
    data = blob("good", 64 * 1024)
    with assemble(paths) as array:
        array.write(1024, data)
        failed = _fail_first_read(monkeypatch, array, 1024, 128)
        assert array.read(1024, 128) == data
        assert len(failed) == 1
        bad = failed[0]
        assert bad.state is RdevState.IN_SYNC and not array.fault_log
        assert array.counters.read_errors_corrected == 1
        assert not differing(array, 1024, 128)  # the bad copy was rewritten with the good data
        monkeypatch.undo()
        assert array.read(1024, 128) == data
    assert read_sb(bad.path).cnt_corrected_read == 1
    assert all(read_sb(p).cnt_corrected_read == 0 for p in paths if p != bad.path)


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
def test_read_error_that_cannot_be_rewritten_fails_the_member(
    mdir: Path, monkeypatch: pytest.MonkeyPatch, bitmap: BitmapKind
) -> None:
    paths = new_array(mdir, RAID1_2, bitmap)
    data = blob("good", 64 * 1024)
    with assemble(paths) as array:
        array.write(0, data)
        failed = _fail_first_read(monkeypatch, array, 0, 128, also_writes=True)
        assert array.read(0, 128) == data
        (bad,) = failed
        assert bad.state is RdevState.FAULTY and array.is_degraded()
        assert [p for p, _ in array.fault_log] == [bad.path]
        good = next(p for p in paths if p != bad.path)
        assert read_sb(good).dev_roles[bad.sb.dev_number] == ROLE_FAULTY
        assert array.read(0, 128) == data


# ---- write errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
@pytest.mark.parametrize("geo", [RAID1_2, RAID1_3, R10_N2, R10_O2], ids=str)
def test_write_error_marks_member_faulty(mdir: Path, geo: Geo, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, geo, bitmap)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))  # active, and the bitmap chunk of sector 0 is marked
        path, _ = copy_of(array, 8)
        victim = next(d for d in array.rdevs if d.path == path)
        before = read_sb(path)
        break_writes(victim)
        e0 = array.events
        array.write(8, blob(1, 4096))  # same bitmap chunk: only the data write meets the error
        assert array.read(0, 16) == blob(0, 4096) + blob(1, 4096)
        assert victim.state is RdevState.FAULTY and array.is_degraded()
        assert [p for p, _ in array.fault_log] == [path]
        assert array.events > e0
        for sb in sbs_on_disk(p for p in paths if p != path):
            assert sb.events == array.events and sb.dev_roles[victim.sb.dev_number] == ROLE_FAULTY
        assert read_sb(path) == before
        # degraded writes are remembered for the member that misses them
        far = 100_000
        array.write(far, blob(2, 4096))
        if bitmap is LOCKLESS:
            assert LLState(states(array)[far >> llbitmap(array).chunkshift]) is LLState.NEED_SYNC
            assert chunks_in(array, LLState.NEED_SYNC) == chunks_of(array, [(far, 8)])  # no infection
        elif bitmap is CLASSIC:
            bm = array.bitmap
            assert isinstance(bm, ClassicBitmap)
            assert bm.counter(far // bm.chunk_sectors) & NEEDED
        array.remove(path)
        array.re_add(path)
        stats = sync_until_idle(array)
        assert stats[0].kind == "recovery" and stats[0].completed
        assert not array.is_degraded()
        assert not differing(array)
        assert array.read(far, 8) == blob(2, 4096)


def test_write_to_the_last_member_that_fails_is_an_error(mdir: Path) -> None:
    paths = new_array(mdir, RAID1_2, NONE)
    with assemble(paths) as array:
        array.write(0, bytes(4096))
        array.fail(1)
        (last,) = array.active()
        break_writes(last)
        with pytest.raises(IOFailure):
            array.write(0, blob(0, 4096))
        assert last.state is RdevState.IN_SYNC  # md never fails the last copy
        array.crash()


def test_superblock_write_error_fails_the_member_not_the_write(tmp_path: Path) -> None:
    paths = new_array(tmp_path, RAID1_2, NONE)
    with assemble(paths) as array:
        victim = array.by_role(1)
        assert victim is not None
        break_writes(victim)
        array.write(0, blob(0, 4096))  # clean -> active: superblocks first
        assert victim.state is RdevState.FAULTY
        assert [p for p, _ in array.fault_log] == [victim.path]
        assert read_sb(paths[0]).dev_roles[1] == ROLE_FAULTY
        assert array.read(0, 8) == blob(0, 4096)


@pytest.mark.parametrize("bitmap", [CLASSIC, LOCKLESS], ids=lambda b: b.value)
def test_bitmap_write_error_fails_the_member(tmp_path: Path, bitmap: BitmapKind) -> None:
    paths = new_array(tmp_path, RAID1_2, bitmap)
    array = assemble(paths)
    array.write(0, blob(0, 4096))  # active: no superblock write on the next write
    clean_bitmap(array)  # the next write must set a bit / mark a chunk Dirty
    victim = array.by_role(1)
    assert victim is not None
    break_writes(victim)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            array.write(0, blob(1, 4096))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(2)
    assert not t.is_alive(), "array.write() hung after a bitmap write error"
    assert not errors
    assert victim.state is RdevState.FAULTY
    array.stop()


# ---- member management -------------------------------------------------------------------------------


def test_re_add_and_add_spare_refuse_foreign_devices(tmp_path: Path) -> None:
    paths = new_array(tmp_path / "a", RAID1_2, LOCKLESS)
    other = new_array(tmp_path / "b", RAID1_2, LOCKLESS)
    with assemble(paths) as array:
        array.fail(1)
        array.remove(1)
        with pytest.raises(LlraidError, match="belongs to array"):
            array.re_add(other[1])
        before = Path(other[1]).read_bytes()
        with pytest.raises(CreateError, match="md superblock"):
            array.add_spare(other[1])
        assert Path(other[1]).read_bytes() == before
        with pytest.raises(CreateError, match="too small"):
            array.add_spare(spare_file(tmp_path, size=16 * MiB))
        array.re_add(paths[1])
        with pytest.raises(LlraidError):
            array.re_add(paths[1])  # already there


@pytest.mark.parametrize("bitmap", [NONE, LOCKLESS], ids=lambda b: b.value)
def test_hot_spare_takes_over_a_failed_member(mdir: Path, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, RAID1_2, bitmap)
    with assemble(paths) as array:
        array.write(0, blob(0, 64 * 1024))
        spare = array.add_spare(spare_file(mdir))
        assert spare.state.value == "spare"
        array.fail(1)
        assert needed_sync(array) is not None
        sync_until_idle(array)
        assert spare.state is RdevState.IN_SYNC and spare.role == 1
        assert not differing(array)


# ---- memfd members ----------------------------------------------------------------------------------


@pytest.fixture
def memfd_members() -> Iterator[Callable[[str], str]]:
    fds: list[int] = []

    def make(name: str) -> str:
        fd = os.memfd_create(name)
        os.ftruncate(fd, MEMBER_BYTES)
        fds.append(fd)
        return f"/proc/self/fd/{fd}"

    yield make
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2], ids=str)
def test_memfd_members_end_to_end(tmp_path: Path, memfd_members: Callable[[str], str], geo: Geo) -> None:
    paths = [memfd_members(f"llraid-m{i}") for i in range(geo.disks)]
    new_array(tmp_path, geo, LOCKLESS, paths=paths)
    writes = [(0, blob(0, 64 * 1024)), (50_000, blob(1, 4096)), (100_000, blob(2, 8192))]
    with assemble(paths) as array:
        for sector, data in writes:
            array.write(sector, data)
        array.crash()
    with assemble(paths) as array:
        need = chunks_in(array, LLState.NEED_SYNC)
        assert chunks_of(array, [(s, len(d) // SECTOR) for s, d in writes]) <= need
        stats = run_sync(array)
        assert stats.completed and stats.sectors_synced == sync_sectors_of(array, need)
        assert not differing(array)
        # fail, write degraded, re-add: only the degraded write is recovered
        clean_bitmap(array)
        path, _ = copy_of(array, 0)
        role = next(d.role for d in array.rdevs if d.path == path)
        assert role is not None
        array.fail(path)
        array.remove(path)
        array.write(30_000, blob(3, 4096))
        array.re_add(path)
        recovery, *_ = sync_until_idle(array)
        assert recovery.kind == "recovery" and recovery.completed
        expect = sectors_on_role(array, chunks_of(array, [(30_000, 8)]), role) * SECTOR
        assert recovery.bytes_written == ({path: expect} if expect else {})
        assert not differing(array)
        assert run_sync(array, SyncKind.CHECK).mismatches == 0
    with assemble(paths) as array:
        assert needed_sync(array) is None
        for sector, data in [*writes, (30_000, blob(3, 4096))]:
            assert array.read(sector, len(data) // SECTOR) == data


def test_fail_by_path_finds_the_right_memfd(tmp_path: Path, memfd_members: Callable[[str], str]) -> None:
    files = new_array(tmp_path, RAID1_2, LOCKLESS, assume_clean=True)
    paths = []
    for f in files:  # same content in memfds that share one name
        p = memfd_members("member")
        with open(f, "rb") as src, open(p, "r+b") as dst:
            dst.write(src.read(4 * MiB))
        paths.append(p)
    with assemble(paths) as array:
        d = array.fail(paths[1])
        assert d.path == paths[1] and d.role == 1


# ---- replace ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
def test_replace_keeps_redundancy_and_copies_only_written_chunks_with_llbitmap(
    tmp_path: Path, bitmap: BitmapKind
) -> None:
    paths = new_array(tmp_path, R10_N2, bitmap)
    new = spare_file(tmp_path, "new.img")
    with assemble(paths) as array:
        array.write(2048, blob("a", 64 * 1024))
        r = array.replace(2, new)
        assert r.state is RdevState.RECOVERING and r.role == 2 and r.replaces is not None
        assert not array.is_degraded()  # the old member keeps serving while the new one is built
        assert read_sb(new).feature_map & 16  # MD_FEATURE_REPLACEMENT on disk
        array.write(2048 + 128, blob("b", 4096))  # a write during the replacement reaches both
        stats = run_sync(array)
        assert stats.kind == "recovery" and stats.completed
        written = stats.bytes_written[new]
        half = array.array_bytes // 2  # n2 on 4 members: a member holds half of the array
        if bitmap is LOCKLESS:
            assert 0 < written < half  # only chunks that were ever written (and their block)
        else:
            assert written == half  # no way to know what was written: everything
        states = {d.path: (d.state, d.role) for d in array.rdevs}
        assert states[paths[2]][0] is RdevState.FAULTY and states[new] == (RdevState.IN_SYNC, 2)
        assert run_sync(array, SyncKind.CHECK).mismatches == 0
        array.remove(paths[2])
    with assemble([paths[0], paths[1], new, paths[3]]) as array:
        assert array.read(2048, 128) == blob("a", 64 * 1024)
        assert array.read(2048 + 128, 8) == blob("b", 4096)


def test_replace_resumes_after_a_crash(tmp_path: Path) -> None:
    paths = new_array(tmp_path, R10_N2, LOCKLESS)
    new = spare_file(tmp_path, "new.img")
    array = assemble(paths)
    array.write(0, blob("c", 1 << 20))
    array.replace(1, new)
    array.crash()  # before any recovery ran
    with assemble([*paths, new]) as array:
        r = next(d for d in array.rdevs if d.path == new)
        assert r.state is RdevState.RECOVERING and r.replaces is not None and r.replaces.path == paths[1]
        passes = sync_until_idle(array)  # the crash's resync first, then the replacement
        assert [p.kind for p in passes] == ["resync", "recovery"] and all(p.completed for p in passes)
        assert run_sync(array, SyncKind.CHECK).mismatches == 0
        assert {d.path for d in array.active()} == {paths[0], new, paths[2], paths[3]}
