"""Resync, recovery, check and repair end to end, counted in bytes.

Every scenario of the issue, on raid1 (2 and 3 members) and raid10 (n2, f2, o2 on 4 members, n2
on 3) with no bitmap, the classic bitmap and llbitmap. What a sync must copy is computed from the
bitmap itself (llbitmap: block infection makes the marked set coarser than the writes), and the
bytes the sync moved (``SyncStats.bytes_read`` / ``bytes_written``, ``Array.counters``) must match
it exactly; with a bitmap they must also be a small part of the array.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llraid.array import Array, Rdev, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.classic import NEEDED, ClassicBitmap
from llraid.create import create
from llraid.errors import AssemblyError
from llraid.format.bitmap import BitmapKind
from llraid.format.llbitmap import LLState
from llraid.format.superblock import MAX_SECTOR, Feature
from llraid.sync import Progress, SyncStats, needed_sync, run_sync, sync_until_idle
from tests.test_array import (
    BITMAPS,
    CLASSIC,
    GEOS,
    LOCKLESS,
    NONE,
    R10_F2,
    R10_N2,
    R10_N2_3,
    R10_O2,
    RAID1_2,
    RAID1_3,
    SECTOR,
    Geo,
    MiB,
    assemble,
    blob,
    chunks_in,
    chunks_of,
    clean_bitmap,
    damage,
    differing,
    llbitmap,
    make_spec,
    member_dir,
    member_files,
    member_sectors_in_use,
    new_array,
    read_sb,
    sbs_on_disk,
    sectors_on_role,
    spare_file,
    states,
    sync_sectors_of,
)

BIG = 256 * MiB  # members for the "much less than the array" checks (sparse: costs nothing)


@pytest.fixture
def mdir(tmp_path: Path) -> Iterator[Path]:
    yield from member_dir(tmp_path)


def moved(stats: SyncStats) -> tuple[int, int]:
    return sum(stats.bytes_read.values()), sum(stats.bytes_written.values())


def counters_delta(array: Array, before: dict[str, int]) -> dict[str, int]:
    now = array.counters.member_written
    return {p: n - before.get(p, 0) for p, n in now.items() if n != before.get(p, 0)}


def sector_on_role(array: Array, role: int, start: int) -> int:
    """The first 4 KiB-aligned array sector from ``start`` one of whose copies ``role`` holds."""
    assert array.mirror is not None
    s = start - start % 8
    while True:
        if any(r == role for r, _ in array.mirror.pieces(s, 8)[0].copies):
            return s
        s += 1024


def state_of(d: Rdev) -> RdevState:
    return d.state  # (mypy narrows d.state after an assert; the sync changes it)


def interrupt_at(fraction: float) -> tuple[threading.Event, Progress]:
    stop = threading.Event()

    def progress(kind: str, done: int, total: int) -> None:
        if done >= total * fraction:
            stop.set()

    return stop, progress


# ---- create: the initial sync ----------------------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_initial_sync_after_create(mdir: Path, geo: Geo, bitmap: BitmapKind) -> None:
    """Without --assume-clean: llbitmap has every chunk Unwritten and copies nothing; without a
    bitmap (and with mdadm's all-set classic bits) the whole array is synced."""
    paths = member_files(mdir, geo.disks)
    create(paths, make_spec(geo, bitmap))
    array = assemble(paths)
    assert array.resync_cp == 0 and needed_sync(array) is SyncKind.RESYNC
    # members that do not agree yet, as new disks would not
    bad_path, _ = damage(array, 4096, blob("garbage", 64 * 1024))
    (stats,) = sync_until_idle(array)
    assert stats.kind == "resync" and stats.completed
    sync_bytes = array.sync_sectors * SECTOR
    if bitmap is LOCKLESS:
        assert stats.sectors_synced == 0 and moved(stats) == (0, 0)
        assert chunks_in(array, LLState.UNWRITTEN) == set(range(llbitmap(array).chunks))
        assert differing(array, 4096, 128) == [4096]  # nothing was ever written there
    else:
        assert stats.sectors_synced == array.sync_sectors
        if geo.level == 1:  # raid1: the first copy is copied over the others
            assert stats.bytes_read == {paths[0]: sync_bytes}
            assert stats.bytes_written == {p: sync_bytes for p in paths[1:]}
        else:  # raid10: copies compared, the differing ones rewritten
            assert moved(stats) == (sync_bytes * 2, 64 * 1024)
            assert stats.bytes_written == {bad_path: 64 * 1024}
            assert stats.mismatches == stats.repaired == 128
        assert not differing(array, 4096, 128)
    assert needed_sync(array) is None and array.resync_cp == MAX_SECTOR
    array.stop()
    assert all(sb.resync_offset == MAX_SECTOR for sb in sbs_on_disk(paths))
    with assemble(paths) as array:
        assert needed_sync(array) is None


# ---- resync after an unclean shutdown ----------------------------------------------------------------


@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_crash_resyncs_only_dirty_chunks_llbitmap(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, LOCKLESS, size=BIG)
    writes = [(0, blob(0, 16 * 1024)), (20_000, blob(1, 4096)), (60_000, blob(2, 8192))]
    with assemble(paths) as array:
        for sector, data in writes:
            array.write(sector, data)
        written = chunks_of(array, [(s, len(d) // SECTOR) for s, d in writes])
        array.crash()
    array = assemble(paths)
    need = chunks_in(array, LLState.NEED_SYNC)
    assert written <= need and not chunks_in(array, LLState.DIRTY)  # Reload: Dirty -> NeedSync
    assert array.resync_cp == 0 and needed_sync(array) is SyncKind.RESYNC
    # the second write reached only the first copy before the crash
    torn_path, _ = damage(array, 20_000, blob("torn", 4096))
    # copies of a never-written chunk that differ: the resync must not even look at them
    far = (array.sync_sectors - 4096) // 128 * 128
    assert LLState(states(array)[far >> llbitmap(array).chunkshift]) is LLState.UNWRITTEN
    damage(array, far, blob("far", 4096))

    before = dict(array.counters.member_written)
    stats = run_sync(array, SyncKind.RESYNC)
    assert stats.completed
    assert stats.sectors_synced == sync_sectors_of(array, need)
    assert stats.sectors_synced * SECTOR <= array.array_bytes // 4  # much less than the array
    nbytes = stats.sectors_synced * SECTOR
    if geo.level == 1:
        assert stats.bytes_read == {paths[0]: nbytes}
        assert stats.bytes_written == {p: nbytes for p in paths[1:]}
    else:
        assert moved(stats) == (2 * nbytes, 64 * 1024)
        assert stats.bytes_written == {torn_path: 64 * 1024}
        assert stats.mismatches == 128
    assert counters_delta(array, before) == stats.bytes_written
    assert not differing(array, 0, 65_536)
    assert array.read(20_000, 8) == blob(1, 4096)
    assert differing(array, far, 8) == [far]  # skipped
    assert needed_sync(array) is None
    assert run_sync(array, SyncKind.CHECK).mismatches == 0  # check skips Unwritten too
    array.stop()
    with assemble(paths) as array:
        assert needed_sync(array) is None
        for sector, data in writes:
            assert array.read(sector, len(data) // SECTOR) == data


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2], ids=str)
def test_crash_resync_classic_is_bitmap_driven(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, CLASSIC, size=BIG)
    with assemble(paths) as array:
        bm = array.bitmap
        assert isinstance(bm, ClassicBitmap)
        chunk = bm.chunk_sectors  # mdadm's 64 MiB
        nchunks = -(-array.sync_sectors // chunk)
        assert nchunks >= 4
        array.write(1000, blob(0, 4096))
        array.crash()
    array = assemble(paths)
    bm = array.bitmap
    assert isinstance(bm, ClassicBitmap)
    assert [bool(bm.counter(c) & NEEDED) for c in range(nchunks)] == [True] + [False] * (nchunks - 1)
    damage(array, 1000, blob("torn", 4096))
    far = 3 * chunk + 1024
    damage(array, far, blob("far", 4096))
    stats = run_sync(array)
    assert stats.completed and stats.sectors_synced == chunk
    if geo.level == 1:
        assert stats.bytes_written == {paths[1]: chunk * SECTOR}
    else:
        assert moved(stats) == (2 * chunk * SECTOR, 64 * 1024)
    assert not differing(array, 0, 2048)
    assert array.read(1000, 8) == blob(0, 4096)
    assert differing(array, far, 8) == [far]
    assert needed_sync(array) is None
    array.stop()


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2_3], ids=str)
def test_crash_resync_without_bitmap_is_full(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, NONE)
    with assemble(paths) as array:
        array.write(1000, blob(0, 4096))
        array.crash()
    with assemble(paths) as array:
        assert array.resync_cp == 0 and needed_sync(array) is SyncKind.RESYNC
        damage(array, 1000, blob("torn", 4096))
        stats = run_sync(array)
        assert stats.completed and stats.sectors_synced == array.sync_sectors
        assert not differing(array)
        assert needed_sync(array) is None


def test_idle_array_needs_no_resync_after_a_crash(mdir: Path) -> None:
    """Marked clean by safe mode, then killed: nothing to resync."""
    paths = new_array(mdir, RAID1_2, NONE)
    array = assemble(paths)
    array.write(0, blob(0, 4096))
    array.safe_mode_delay = 0.0
    assert array.try_mark_clean()
    array.crash()
    with assemble(paths) as array:
        assert array.resync_cp == MAX_SECTOR and needed_sync(array) is None


# ---- re-add: only what the member missed --------------------------------------------------------


@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_readd_recovers_only_degraded_writes_llbitmap(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, LOCKLESS)
    role = geo.disks - 1
    path = paths[role]
    before = [(0, blob(0, 64 * 1024)), (40_000, blob(1, 4096))]
    with assemble(paths) as array:
        for sector, data in before:
            array.write(sector, data)
        clean_bitmap(array)
        assert not chunks_in(array, LLState.DIRTY)
        array.fail(role)
        array.remove(role)
        degraded = [
            (sector_on_role(array, role, 512), blob(2, 4096)),  # a Clean chunk
            (sector_on_role(array, role, 80_000), blob(3, 8192)),  # an Unwritten one
            (sector_on_role(array, role, 110_000) + 3, blob(4, 64 * 1024 + 512)),  # 2 chunks
            (sector_on_role(array, (role + 1) % geo.disks, 100_000), blob(5, 4096)),
        ]
        for sector, data in degraded:
            array.write(sector, data)
        need = chunks_in(array, LLState.NEED_SYNC)
        assert need == chunks_of(array, [(s, len(d) // SECTOR) for s, d in degraded])  # no infection
        rdev = array.re_add(path)
        assert rdev.bitmap_sync and rdev.state is RdevState.RECOVERING and rdev.role == role
        assert needed_sync(array) is SyncKind.RECOVERY
        stats = run_sync(array, SyncKind.RECOVERY)
        assert stats.completed and stats.member == path
        expect = sectors_on_role(array, need, role) * SECTOR
        assert 0 < expect <= 5 * 128 * SECTOR
        assert stats.bytes_written == {path: expect}
        assert moved(stats) == (expect, expect)
        assert state_of(rdev) is RdevState.IN_SYNC
        sb = read_sb(path)
        assert not sb.feature_map & (Feature.RECOVERY_OFFSET | Feature.RECOVERY_BITMAP)
        assert sb.events == array.events and sb.role == role
        assert not differing(array)
        for sector, data in before + degraded:
            assert array.read(sector, len(data) // SECTOR) == data
        sync_until_idle(array)
    with assemble(paths) as array:
        assert needed_sync(array) is None and not array.is_degraded()


@pytest.mark.parametrize("bitmap", [CLASSIC, NONE], ids=lambda b: b.value)
def test_readd_classic_is_bitmap_driven_none_is_full(mdir: Path, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, RAID1_2, bitmap, size=BIG)
    chunk = 131072  # mdadm's 64 MiB classic chunk
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        array.write(2 * chunk, blob(1, 4096))
        clean_bitmap(array)
        array.fail(1)
        array.remove(1)
        array.write(chunk + 100, blob(2, 4096))
        rdev = array.re_add(paths[1])
        assert rdev.bitmap_sync is (bitmap is CLASSIC)
        stats = run_sync(array, SyncKind.RECOVERY)
        assert stats.completed
        expect = chunk if bitmap is CLASSIC else array.dev_sectors
        assert stats.bytes_written == {paths[1]: expect * SECTOR}
        for sector in (0, chunk + 100, 2 * chunk):
            assert not differing(array, sector, 8)
        assert array.read(chunk + 100, 8) == blob(2, 4096)


@pytest.mark.parametrize(
    "bitmap",
    [
        NONE,
        CLASSIC,
        LOCKLESS,
    ],
    ids=lambda b: b.value,
)
def test_readd_after_the_array_was_whole_again(mdir: Path, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, RAID1_2, bitmap)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        array.fail(1)
        array.remove(1)
        spare = spare_file(mdir)
        array.add_spare(spare)
        sync_until_idle(array)
        assert not array.is_degraded()
        array.write(300 * 128, blob("while m1 was away", 4096))  # the array is whole: Dirty
        clean_bitmap(array)  # ... and the daemon cleans it
        array.fail(spare)
        array.remove(spare)
        array.re_add(paths[1])
        sync_until_idle(array)
        assert not differing(array)
        for _ in range(4):  # whichever copy serves the read
            assert array.read(300 * 128, 8) == blob("while m1 was away", 4096)


def test_no_resync_after_a_recovery(mdir: Path) -> None:
    paths = new_array(mdir, RAID1_2, NONE)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        array.fail(1)
        array.remove(1)
        array.re_add(paths[1])
        stats = sync_until_idle(array)
        assert [s.kind for s in stats] == ["recovery"]


# ---- a new member -------------------------------------------------------------------------------


@pytest.mark.parametrize("bitmap", BITMAPS, ids=lambda b: b.value)
@pytest.mark.parametrize("geo", GEOS, ids=str)
def test_new_member_recovery(mdir: Path, geo: Geo, bitmap: BitmapKind) -> None:
    """llbitmap: only chunks that were ever written; classic and none: everything."""
    paths = new_array(mdir, geo, bitmap)
    role = 1
    writes = [(0, blob(0, 16 * 1024)), (70_000, blob(1, 4096))]  # one write per llbitmap block
    with assemble(paths) as array:
        for sector, data in writes:
            array.write(sector, data)
        array.fail(role)
        array.remove(role)
        if bitmap is LOCKLESS:
            written = set(range(llbitmap(array).chunks)) - chunks_in(array, LLState.UNWRITTEN)
            assert written == chunks_of(array, [(s, len(d) // SECTOR) for s, d in writes])
        spare = spare_file(mdir)
        rdev = array.add_spare(spare)
        assert rdev.role == role and rdev.state is RdevState.RECOVERING and not rdev.bitmap_sync
        assert needed_sync(array) is SyncKind.RECOVERY
        stats = run_sync(array, SyncKind.RECOVERY)
        assert stats.completed and stats.member == spare
        if bitmap is LOCKLESS:
            expect = sectors_on_role(array, written, role) * SECTOR
            assert expect <= 2 * 128 * SECTOR
        else:
            expect = member_sectors_in_use(array, role) * SECTOR
            assert expect >= array.dev_sectors * SECTOR * 0.9
        assert stats.bytes_written == ({spare: expect} if expect else {})
        assert state_of(rdev) is RdevState.IN_SYNC
        assert not differing(array)
        for sector, data in writes:
            assert array.read(sector, len(data) // SECTOR) == data
    members = [p for p in paths if p != paths[role]] + [spare]
    with assemble(members) as array:  # a whole array again: no --run
        assert not array.is_degraded() and needed_sync(array) is None
        new = array.by_role(role)
        assert new is not None and new.path == spare


# ---- discard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2, R10_F2], ids=str)
def test_discard_then_resync_skips_discarded_chunks(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, LOCKLESS)
    with assemble(paths) as array:
        array.write(0, blob(0, 10 * 64 * 1024))  # chunks 0..9; the whole block goes Dirty
        array.crash()
    array = assemble(paths)
    cs = llbitmap(array).chunksize
    need0 = chunks_in(array, LLState.NEED_SYNC)
    assert set(range(512)) <= need0
    array.discard(100 * cs, 100 * cs)  # chunks 100..199
    array.discard(300 * cs + 1, 2 * cs - 1)  # only chunk 301 is wholly inside
    discarded = set(range(100, 200)) | {301}
    assert discarded <= chunks_in(array, LLState.UNWRITTEN)
    need = chunks_in(array, LLState.NEED_SYNC)
    assert need == need0 - discarded
    damage(array, 150 * cs, blob("discarded", 4096))
    check = run_sync(array, SyncKind.CHECK)  # check skips them too
    assert check.mismatches == 0
    assert moved(check)[0] == sync_sectors_of(array, need) * SECTOR * geo.copies
    stats = run_sync(array)
    assert stats.completed and stats.sectors_synced == sync_sectors_of(array, need)
    assert differing(array, 150 * cs, 8) == [150 * cs]  # not synced
    array.stop()


def test_discard_without_bitmap_changes_nothing(mdir: Path) -> None:
    paths = new_array(mdir, RAID1_2, NONE)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        array.discard(0, 1024)
        assert array.read(0, 8) == blob(0, 4096)
        assert needed_sync(array) is None


# ---- a stale bitmap ------------------------------------------------------------------------------


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2, R10_O2], ids=str)
def test_stale_bitmap_resyncs_every_written_chunk(mdir: Path, geo: Geo) -> None:
    paths = new_array(mdir, geo, LOCKLESS)
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        array.write(2000, blob(1, 4096))  # second chunk of the block: all 512 go Dirty
        array.write(90_000, blob(2, 4096))  # alone in its block
        written = set(range(llbitmap(array).chunks)) - chunks_in(array, LLState.UNWRITTEN)
        assert len(written) == 513
    # the bitmap superblocks say an older event count than the md superblocks
    for p in paths:
        sb = read_sb(p)
        with open(p, "r+b") as f:
            at = (sb.super_offset + sb.bitmap_offset) * SECTOR + 24  # bitmap_super_t.events
            assert struct.unpack("<Q", os.pread(f.fileno(), 8, at))[0] == sb.events
            os.pwrite(f.fileno(), struct.pack("<Q", sb.events - 2), at)
    with assemble(paths) as array:
        assert array.resync_cp == MAX_SECTOR  # stopped cleanly, but the bitmap cannot be trusted
        assert chunks_in(array, LLState.NEED_SYNC) == written
        assert needed_sync(array) is SyncKind.RESYNC
        stats = run_sync(array)
        assert stats.completed and stats.sectors_synced == sync_sectors_of(array, written)
        assert needed_sync(array) is None


def test_stale_bitmap_does_not_infect_unwritten_neighbours(mdir: Path) -> None:
    """Two Clean chunks in one block, the rest Unwritten: a stale load makes exactly those two
    NeedSync. (Upstream's Stale store infects the block on the second chunk: 510 Unwritten
    chunks would become NeedSync and be resynced.)"""
    paths = new_array(mdir, RAID1_2, LOCKLESS)
    cs = 128
    with assemble(paths) as array:
        array.write(0, blob(0, 4096))
        clean_bitmap(array)  # chunk 0 Clean before chunk 2 is written: no infection
        array.write(2 * cs, blob(1, 4096))
        clean_bitmap(array)
        assert chunks_in(array, LLState.CLEAN) == {0, 2}
    for p in paths:
        sb = read_sb(p)
        with open(p, "r+b") as f:
            os.pwrite(
                f.fileno(),
                struct.pack("<Q", sb.events - 2),
                (sb.super_offset + sb.bitmap_offset) * SECTOR + 24,
            )
    with assemble(paths) as array:
        assert chunks_in(array, LLState.NEED_SYNC) == {0, 2}
        assert chunks_in(array, LLState.UNWRITTEN) == set(range(llbitmap(array).chunks)) - {0, 2}
        stats = run_sync(array)
        assert stats.completed and stats.sectors_synced == 2 * cs
        assert chunks_in(array, LLState.DIRTY) == {0, 2}


# ---- check and repair ------------------------------------------------------------------------------


CHECK_CASES = [(g, LOCKLESS) for g in GEOS] + [
    (g, b) for g in (RAID1_2, RAID1_3, R10_N2, R10_N2_3) for b in (NONE, CLASSIC)
]


@pytest.mark.parametrize(("geo", "bitmap"), CHECK_CASES, ids=[f"{g}-{b.value}" for g, b in CHECK_CASES])
def test_check_and_repair(mdir: Path, geo: Geo, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, geo, bitmap)
    writes = [(0, blob(0, 256 * 1024)), (10_000, blob(1, 64 * 1024))]
    with assemble(paths) as array:
        for sector, data in writes:
            array.write(sector, data)
    array = assemble(paths)
    bad = [256, 10_003, 10_200]  # three different 64 KiB windows (all in written chunks)
    for s in bad:
        damage(array, s, b"\xaa" * SECTOR)
    unwritten = 100_000
    damage(array, unwritten, b"\xbb" * SECTOR)
    windows = len(bad) + (0 if bitmap is LOCKLESS else 1)  # llbitmap skips Unwritten chunks
    before = states(array) if bitmap is LOCKLESS else None

    stats = run_sync(array, SyncKind.CHECK)
    assert stats.completed and stats.kind == "check"
    assert stats.mismatches == 128 * windows  # sectors, as md's mismatch_cnt
    assert stats.repaired == 0 and stats.bytes_written == {}
    if bitmap is LOCKLESS:
        assert before is not None and np.array_equal(states(array), before)  # check changes no state
        written = set(range(llbitmap(array).chunks)) - chunks_in(array, LLState.UNWRITTEN)
        assert moved(stats)[0] == sync_sectors_of(array, written) * SECTOR * geo.copies
    else:
        assert moved(stats)[0] == array.sync_sectors * SECTOR * geo.copies
    assert all(differing(array, s, 1) for s in bad)  # check repairs nothing

    stats = run_sync(array, SyncKind.REPAIR)
    assert stats.completed and stats.mismatches == stats.repaired == 128 * windows
    assert moved(stats)[1] == 128 * SECTOR * windows
    assert run_sync(array, SyncKind.CHECK).mismatches == 0
    assert not any(differing(array, s, 1) for s in bad)
    assert bool(differing(array, unwritten, 1)) is (bitmap is LOCKLESS)
    for sector, data in writes:
        assert array.read(sector, len(data) // SECTOR) == data
    assert needed_sync(array) is None
    array.stop()


def test_check_of_a_degraded_array_compares_nothing(mdir: Path) -> None:
    paths = new_array(mdir, RAID1_2, NONE)
    with assemble(paths[:1], run=True) as array:
        stats = run_sync(array, SyncKind.CHECK)
        assert stats.completed and stats.mismatches == 0 and moved(stats) == (0, 0)


# ---- progress, speed limit, checkpoints, resume ------------------------------------------------


def test_progress_and_speed_limit(mdir: Path) -> None:
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE, size=8 * 2048))  # an 8 MiB array, resync pending
    with assemble(paths) as array:
        seen: list[tuple[str, int, int]] = []
        t0 = time.monotonic()
        stats = run_sync(array, progress=lambda k, d, t: seen.append((k, d, t)), speed_limit=32 * MiB)
        elapsed = time.monotonic() - t0
        assert stats.completed and moved(stats) == (8 * MiB, 8 * MiB)
        assert elapsed >= 0.45 and stats.seconds >= 0.45  # 16 MiB moved at 32 MiB/s
        assert {k for k, _, _ in seen} == {"resync"} and {t for _, _, t in seen} == {16384}
        done = [d for _, d, _ in seen]
        assert done == sorted(set(done)) and done[-1] == 16384
        t0 = time.monotonic()
        run_sync(array, SyncKind.CHECK)
        assert time.monotonic() - t0 < elapsed


@pytest.mark.parametrize("how", ["stop", "crash-after-safe-mode"])
def test_resync_checkpoints_and_resumes(mdir: Path, how: str) -> None:
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE, size=8 * 2048))
    array = assemble(paths)
    if how != "stop":
        array.safe_mode_delay = 0.0
        assert array.in_sync  # md starts arrays clean: the superblocks carry the checkpoint
    on_disk: list[int] = []
    stop = threading.Event()

    def progress(kind: str, done: int, total: int) -> None:
        if done >= total * 0.4 and not on_disk:
            on_disk.append(read_sb(paths[0]).resync_offset)
        if done >= total // 2:
            stop.set()

    stats = run_sync(array, stop=stop, progress=progress, speed_limit=16 * MiB, checkpoint_seconds=0.05)
    assert not stats.completed
    cp = array.resync_cp
    assert 0 < cp < array.sync_sectors
    if how == "stop":
        array.stop()
    else:
        assert 0 < on_disk[0] < cp  # periodic checkpoints reached the superblocks
        array.crash()
    assert {sb.resync_offset for sb in sbs_on_disk(paths)} == {cp}
    with assemble(paths) as array:
        assert array.resync_cp == cp and needed_sync(array) is SyncKind.RESYNC
        stats = run_sync(array)
        assert stats.completed and stats.start == cp
        assert stats.sectors_synced == array.sync_sectors - cp
        assert stats.bytes_written == {paths[1]: (array.sync_sectors - cp) * SECTOR}


def test_resync_of_an_idle_array_resumes_after_a_crash(mdir: Path) -> None:
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE))
    array = assemble(paths)
    stop, progress = interrupt_at(0.5)
    stats = run_sync(array, stop=stop, progress=progress)
    assert not stats.completed
    cp = array.resync_cp
    assert cp > 0
    array.crash()
    with assemble(paths) as array:
        assert array.resync_cp == cp


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2], ids=str)
def test_interrupted_bitmap_resync_keeps_the_chunks_it_finished(mdir: Path, geo: Geo) -> None:
    """As md: an interrupted pass aborts the chunk it was in and ends the sync of the ones it
    finished, so after a clean stop the next pass syncs only the rest (before: every chunk the
    pass had started stayed Syncing, went back to NeedSync at the next assembly, and was synced
    again)."""
    paths = new_array(mdir, geo, LOCKLESS)
    array = assemble(paths)
    array.write(0, blob("w", 8 * MiB))
    array.crash()
    array = assemble(paths)
    need = chunks_in(array, LLState.NEED_SYNC)
    stop, progress = interrupt_at(0.1)
    first = run_sync(array, stop=stop, progress=progress)
    assert not first.completed and first.stopped_at is not None
    done = first.sectors_synced // llbitmap(array).chunksize
    assert 0 < done < len(need)
    assert not chunks_in(array, LLState.SYNCING)
    assert len(chunks_in(array, LLState.NEED_SYNC)) == len(need) - done
    array.stop()
    with assemble(paths) as array:
        assert len(chunks_in(array, LLState.NEED_SYNC)) == len(need) - done
        (rest,) = sync_until_idle(array)
        assert rest.completed and first.sectors_synced + rest.sectors_synced == sync_sectors_of(array, need)


def test_resync_restarts_from_zero_after_a_crash_with_writes(mdir: Path) -> None:
    """Written during the resync (active, not clean): the superblocks say 0, md starts over."""
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE))
    array = assemble(paths)
    array.safe_mode_delay = 0.0
    assert array.in_sync
    stop = threading.Event()

    def progress(kind: str, done: int, total: int) -> None:
        if done == total // 4 // 128 * 128:
            array.write(total - 8, blob(0, 4096))
        if done >= total // 2:
            stop.set()

    assert not run_sync(array, stop=stop, progress=progress).completed
    assert array.resync_cp > 0
    array.crash()
    with assemble(paths) as array:
        assert array.resync_cp == 0
        stats = run_sync(array)
        assert stats.start == 0 and stats.sectors_synced == array.sync_sectors


@pytest.mark.parametrize("bitmap", [NONE, LOCKLESS], ids=lambda b: b.value)
@pytest.mark.parametrize("how", ["stop", "crash"])
@pytest.mark.parametrize("geo", [RAID1_2, R10_N2], ids=str)
def test_recovery_checkpoints_and_resumes(mdir: Path, geo: Geo, how: str, bitmap: BitmapKind) -> None:
    paths = new_array(mdir, geo, bitmap, assume_clean=True)  # llbitmap all Clean: all copied
    role = 1
    array = assemble(paths)
    array.write(0, blob(0, 1 << 20))
    array.fail(role)
    array.remove(role)
    spare = spare_file(mdir)
    rdev = array.add_spare(spare)
    stop, progress = interrupt_at(0.5)
    stats = run_sync(array, stop=stop, progress=progress, checkpoint_seconds=0.05)
    assert not stats.completed and rdev.state is RdevState.RECOVERING
    cp = rdev.recovery_offset
    assert 0 < cp < array.dev_sectors
    getattr(array, how)()
    sb = read_sb(spare)
    assert sb.feature_map & Feature.RECOVERY_OFFSET and sb.recovery_offset == cp and sb.role == role
    members = [p for p in paths if p != paths[role]] + [spare]
    with assemble(members, run=True) as array:
        (rdev,) = (d for d in array.rdevs if d.path == spare)
        assert rdev.state is RdevState.RECOVERING and rdev.recovery_offset == cp
        if how == "crash":  # unclean: md resyncs first (recovery_cp < MaxSector), then recovers
            resync = run_sync(array)
            assert resync.kind == "resync" and resync.completed
            assert rdev.recovery_offset == cp
        stats = run_sync(array)
        assert stats.kind == "recovery" and stats.completed and stats.start == cp
        assert array.mirror is not None
        rest = sum(
            min(128, array.dev_sectors - ms)
            for ms in range(cp, array.dev_sectors, 128)
            if array.mirror.member_to_sync(role, ms) is not None
        )
        assert stats.bytes_written == {spare: rest * SECTOR}
        sync_until_idle(array)
        assert not differing(array)
        assert array.read(0, 2048) == blob(0, 1 << 20)
    with assemble(members) as array:
        assert not array.is_degraded() and needed_sync(array) is None


def test_array_with_a_member_being_recovered_starts_without_run(mdir: Path) -> None:
    paths = new_array(mdir, RAID1_2, NONE)
    array = assemble(paths)
    array.fail(1)
    array.remove(1)
    spare = spare_file(mdir)
    array.add_spare(spare)
    stop, progress = interrupt_at(0.5)
    assert not run_sync(array, stop=stop, progress=progress).completed
    array.stop()
    try:
        array = assemble([paths[0], spare])
    except AssemblyError as e:
        pytest.fail(str(e))
    with array:
        assert needed_sync(array) is SyncKind.RECOVERY


# ---- many writers while a sync runs -------------------------------------------------------------


def dirty_every_block(array: Array) -> None:
    """Two chunks written per 512-chunk block: block infection makes every chunk Dirty."""
    cs = llbitmap(array).chunksize
    for block in range(-(-llbitmap(array).chunks // 512)):
        for c in (block * 512, block * 512 + 1):
            if c < llbitmap(array).chunks:
                array.write(c * cs, array.read(c * cs, 8))


CONCURRENT = [
    (RAID1_2, LOCKLESS, SyncKind.RESYNC),
    (R10_N2, CLASSIC, SyncKind.CHECK),
    (RAID1_3, NONE, SyncKind.RESYNC),
    (R10_F2, LOCKLESS, SyncKind.REPAIR),
    (R10_O2, NONE, SyncKind.RESYNC),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("geo", "bitmap", "kind"), CONCURRENT, ids=[f"{g}-{b.value}-{k.value}" for g, b, k in CONCURRENT]
)
def test_concurrent_writers_during_sync(mdir: Path, geo: Geo, bitmap: BitmapKind, kind: SyncKind) -> None:
    paths = member_files(mdir, geo.disks)
    create(paths, make_spec(geo, bitmap, assume_clean=not (kind is SyncKind.RESYNC and bitmap is NONE)))
    if bitmap is LOCKLESS and kind is SyncKind.RESYNC:
        with assemble(paths) as array:
            dirty_every_block(array)
            array.crash()  # every chunk NeedSync
    array = Array.assemble(paths, bitmap_threads=True)  # the bitmap daemon races with everyone
    try:
        if bitmap is not NONE:
            array.bitmap.daemon_sleep = 0.05
        if bitmap is LOCKLESS:
            llbitmap(array).barrier_idle = 0.01
        nthreads, per_thread, unit = 16, 40, 24  # 12 KiB writes: some cross bucket/chunk edges
        rng = np.random.default_rng(1)
        slots = rng.choice(array.array_sectors // unit, size=nthreads * per_thread, replace=False)
        plan = [
            [int(s) * unit for s in slots[i * per_thread : (i + 1) * per_thread]] for i in range(nthreads)
        ]
        barrier = threading.Barrier(nthreads + 1)
        errors: list[BaseException] = []
        done_at: list[float] = []
        syncing: list[float] = []

        def writer(i: int) -> None:
            try:
                barrier.wait()
                for j, sector in enumerate(plan[i]):
                    data = blob((i, j), unit * SECTOR)
                    array.write(sector, data)
                    assert array.read(sector, unit) == data
                    done_at.append(time.monotonic())
            except BaseException as e:
                errors.append(e)

        def progress(kind: str, done: int, total: int) -> None:
            if not syncing:
                syncing.append(time.monotonic())

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(nthreads)]
        for t in threads:
            t.start()
        barrier.wait()
        speed = array.sync_sectors * SECTOR * geo.copies / 0.5  # about half a second
        stats = run_sync(array, kind, speed_limit=speed, progress=progress)
        sync_end = time.monotonic()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert stats.completed
        during = sum(1 for t in done_at if syncing[0] < t < sync_end)
        assert during >= nthreads  # they really ran at the same time
        for i in range(nthreads):
            for j, sector in enumerate(plan[i]):
                assert array.read(sector, unit) == blob((i, j), unit * SECTOR), (i, j, sector)
        check = run_sync(array, SyncKind.CHECK)
        assert check.mismatches == 0
        if kind is SyncKind.CHECK:
            assert stats.mismatches == 0
    finally:
        array.stop()
    with assemble(paths) as array:
        assert needed_sync(array) is None
        for i in range(0, nthreads, 3):
            for j, sector in enumerate(plan[i]):
                assert array.read(sector, unit) == blob((i, j), unit * SECTOR)
