"""llbitmap behaviour: kernel fixtures, durability, daemon, errors, and a concurrency stress test."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.bitmap.store import BitmapStore, BitmapTarget
from llraid.device import Device
from llraid.errors import BitmapIOError, FormatError
from llraid.fixtures import copy_sparse
from llraid.format.bitmap import BitmapFlag, BitmapSuper
from llraid.format.llbitmap import DATA_OFFSET, LLState
from llraid.member import open_member
from tests.conftest import BY_NAME

UUID = bytes(range(16))
AREA_AT = 8192  # where the tests put the bitmap area in their member files


class Host:
    def __init__(self, level: int = 1, degraded: bool = False) -> None:
        self.level = level
        self.degraded = degraded
        self.sync_requests = 0

    def is_degraded(self) -> bool:
        return self.degraded

    def request_sync(self) -> None:
        self.sync_requests += 1


class Members:
    """Member files holding a fresh mdadm-style llbitmap area, and a store over them."""

    def __init__(self, tmp: Path, n: int, sync_size: int, *, assume_clean: bool = False) -> None:
        self.paths = [tmp / f"m{i}.img" for i in range(n)]
        area = LocklessBitmap.initial_area(
            LocklessBitmap.new_superblock(UUID, sync_size, assume_clean=assume_clean)
        )
        for p in self.paths:
            with open(p, "wb") as f:
                f.truncate(AREA_AT + 256 * 1024)
                f.seek(AREA_AT)
                f.write(area)
        self.devices = [Device(str(p), writable=True) for p in self.paths]
        self.failed: list[str] = []
        self.store = BitmapStore(
            [BitmapTarget(d, AREA_AT) for d in self.devices], on_error=lambda t, e: self.failed.append(t.name)
        )

    def on_disk(self, member: int, chunk: int) -> int:
        return os.pread(self.devices[member].fd, 1, AREA_AT + DATA_OFFSET + chunk)[0]

    def close(self) -> None:
        for d in self.devices:
            d.close()


@pytest.fixture
def members(tmp_path: Path) -> Iterator[Callable[..., Members]]:
    made: list[Members] = []

    def make(n: int = 2, sync_size: int = 128 * 1000, assume_clean: bool = False) -> Members:
        d = tmp_path / f"set{len(made)}"
        d.mkdir()
        made.append(Members(d, n, sync_size, assume_clean=assume_clean))
        return made[-1]

    yield make
    for m in made:
        m.close()


def open_bm(
    m: Members, host: Host | None = None, sync_size: int = 128 * 1000, events: int = 0
) -> LocklessBitmap:
    return LocklessBitmap.open(m.store, host or Host(), array_uuid=UUID, sync_size=sync_size, events=events)


# ---- kernel fixtures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "e-raid1-llbitmap-crash",
        "e2-raid1-llbitmap-crash-single-write",
        "f-raid1-llbitmap-degraded-stale-member",
    ],
)
def test_load_matches_kernel_after_reassembly(name: str, unpacked: Callable[[str], list[Path]]) -> None:
    """Dirty on disk after a crash -> NeedSync after load, exactly as the kernel's sysfs showed."""
    fx = BY_NAME[name]
    path = unpacked(name)[0]
    member = open_member(str(path))
    try:
        store = BitmapStore([BitmapTarget(member.device, member.bitmap_sector * 512)])
        degraded = name.startswith("f")  # f assembles with its stale member kicked
        host = Host(degraded=degraded)
        bm = LocklessBitmap.open(
            store, host, array_uuid=member.sb.set_uuid, sync_size=member.sb.size, events=member.sb.events
        )
        bm.load()
        live = fx.dir / "boot2-reassemble/live-1-assembled"
        assert bm.bits_view() == (live / "sysfs_llbitmap_bits.txt").read_text()
        assert bm.metadata_view() == (live / "sysfs_llbitmap_metadata.txt").read_text()
        assert host.sync_requests == (0 if degraded else 1)  # NeedSync asks for a resync unless degraded
    finally:
        member.device.close()


@pytest.mark.parametrize("name", ["a-raid1-llbitmap", "b-raid10n2-llbitmap", "h-raid5-llbitmap"])
def test_clean_fixtures_load_unchanged(name: str, unpacked: Callable[[str], list[Path]]) -> None:
    member = open_member(str(unpacked(name)[0]))
    try:
        store = BitmapStore([BitmapTarget(member.device, member.bitmap_sector * 512)])
        sync = BY_NAME[name].array_sectors if member.sb.level == 10 else member.sb.size
        host = Host(level=member.sb.level)
        bm = LocklessBitmap.open(
            store, host, array_uuid=member.sb.set_uuid, sync_size=sync, events=member.sb.events
        )
        before = bytes(bm.area)
        bm.load()
        assert bytes(bm.area) == before and host.sync_requests == 0
        counts = {s.title: n for s, n in bm.counts().items() if n}
        assert counts == BY_NAME[name].members[0]["bitmap_state_counts"]
    finally:
        member.device.close()


def test_first_use_assume_clean_fixture(unpacked: Callable[[str], list[Path]], tmp_path: Path) -> None:
    """i1: mdadm's FIRST_USE|CLEAN superblock: every chunk Clean with the kernel's geometry."""
    path = copy_sparse(unpacked("i1-raid1-llbitmap-assume-clean-nowrite")[0], tmp_path / "i1.img")
    with Device(str(path), writable=True) as dev:
        member = open_member(str(path))
        member.device.close()
        store = BitmapStore([BitmapTarget(dev, 8192)])
        bm = LocklessBitmap.open(
            store, Host(), array_uuid=member.sb.set_uuid, sync_size=member.sb.size, events=0
        )
        assert (bm.chunksize, bm.chunks, bm.daemon_sleep) == (128, 1008, 30)
        assert bm.counts()[LLState.CLEAN] == 1008
        assert os.pread(dev.fd, 1008, 8192 + DATA_OFFSET) == b"\x01" * 1008  # flushed at first use


# ---- creation, durability, views --------------------------------------------------------------------


def test_fresh_bitmap_is_unwritten_and_flushed(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    assert bm.counts()[LLState.UNWRITTEN] == 1000
    assert all(m.on_disk(i, c) == LLState.UNWRITTEN for i in range(2) for c in (0, 999))
    m2 = members(assume_clean=True)
    assert open_bm(m2).counts()[LLState.CLEAN] == 1000
    assert m2.on_disk(1, 500) == LLState.CLEAN


def test_write_is_durable_on_every_member_before_data(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    assert bm.start_write(128 * 700 + 5, 8) is True  # first write: the block must be written
    assert m.on_disk(0, 700) == m.on_disk(1, 700) == LLState.UNWRITTEN  # not yet: caller unplugs
    bm.unplug()
    assert m.on_disk(0, 700) == m.on_disk(1, 700) == LLState.DIRTY
    bm.end_write(128 * 700 + 5, 8)
    # A second write to the same chunk: already Dirty and durable -> no unplug, no IO.
    writes = m.store.writes
    assert bm.start_write(128 * 700, 128) is False
    bm.end_write(128 * 700, 128)
    assert m.store.writes == writes


def test_second_writer_waits_for_first_writers_bitmap_io(members: Callable[..., Members]) -> None:
    """A writer that finds its chunk Dirty while the block is still unwritten must unplug too."""
    m = members()
    bm = open_bm(m)
    assert bm.start_write(0, 8)
    assert bm.start_write(0, 8) is True  # Dirty in memory only: this writer must unplug as well
    bm.unplug()
    assert bm.start_write(0, 8) is False
    for _ in range(3):
        bm.end_write(0, 8)


def test_infection_and_degraded_writes(members: Callable[..., Members]) -> None:
    m = members()
    host = Host()
    bm = open_bm(m, host)
    bm.start_write(0, 128 * 2)  # two chunks of one block change together: the block is infected
    c = bm.counts()
    assert (
        c[LLState.DIRTY] == 512 - 2 + 2
        and bm.state(511) == LLState.DIRTY
        and bm.state(512) == LLState.UNWRITTEN
    )
    bm.unplug()
    bm.end_write(0, 128 * 2)
    host.degraded = True
    bm.start_write(128 * 600, 128 * 3)  # degraded: NeedSync, exactly the written chunks
    bm.unplug()
    assert [bm.state(x) for x in (599, 600, 601, 602, 603)] == [LLState.UNWRITTEN] + [
        LLState.NEED_SYNC
    ] * 3 + [LLState.UNWRITTEN]
    assert m.on_disk(0, 601) == LLState.NEED_SYNC
    assert host.sync_requests == 0  # degraded NeedSync waits for recovery, no resync request
    bm.end_write(128 * 600, 128 * 3)


def test_views_and_tunables(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    assert bm.metadata_view() == "chunksize 128\nchunkshift 7\nchunks 1000\noffset 8\ndaemon_sleep 30\n"
    assert bm.bits_view().startswith("unwritten 1000\nclean 0\ndirty 0\n")
    bm.daemon_sleep = 7
    bm.barrier_idle = 2
    bm.update_sb(events=5)
    sb = BitmapSuper.parse(os.pread(m.devices[1].fd, 256, AREA_AT))
    assert (sb.events, sb.daemon_sleep, sb.chunksize, sb.state, sb.sync_size) == (5, 7, 128, 0, 128 * 1000)
    with pytest.raises(ValueError):
        bm.daemon_sleep = 0


# ---- daemon -------------------------------------------------------------------------------------------


def test_daemon_cleans_only_idle_pages(members: Callable[..., Members]) -> None:
    m = members(sync_size=128 * 5000)  # chunks on pages 0 and 1
    bm = open_bm(m, sync_size=128 * 5000)
    bm.barrier_idle = 100.0
    bm.start_write(0, 8)
    bm.unplug()
    bm.end_write(0, 8)
    bm.daemon_work(now=time.monotonic())  # written just now: not idle yet
    assert bm.state(0) == LLState.DIRTY
    bm.daemon_work(now=time.monotonic() + 101)
    assert bm.state(0) == LLState.CLEAN
    assert m.on_disk(0, 0) == LLState.DIRTY  # Clean is written lazily...
    bm.flush()
    assert m.on_disk(0, 0) == m.on_disk(1, 0) == LLState.CLEAN  # ...or on a full flush


def test_daemon_skips_a_busy_page_without_blocking_writers(members: Callable[..., Members]) -> None:
    m = members(sync_size=128 * 5000)
    bm = open_bm(m, sync_size=128 * 5000)
    bm.daemon_sleep = 0.05  # also the suspend timeout
    bm.start_write(0, 8)  # in flight on page 0 for the whole daemon pass
    bm.unplug()
    bm.start_write(128 * 4000, 8)  # page 1, completes
    bm.unplug()
    bm.end_write(128 * 4000, 8)
    t0 = time.monotonic()
    bm.daemon_work(now=t0 + 1000)
    assert bm.daemon_skipped_pages == 1
    assert bm.state(0) == LLState.DIRTY and bm.state(4000) == LLState.CLEAN
    assert bm.start_write(8, 8) is False  # page 0 was resumed: writers go on
    bm.end_write(8, 8)
    bm.end_write(0, 8)
    bm.daemon_work(now=time.monotonic() + 1000)
    assert bm.state(0) == LLState.CLEAN


def test_daemon_does_nothing_while_degraded(members: Callable[..., Members]) -> None:
    m = members()
    host = Host()
    bm = open_bm(m, host)
    bm.start_write(0, 8)
    bm.unplug()
    bm.end_write(0, 8)
    host.degraded = True
    bm.flush()
    assert bm.state(0) == LLState.DIRTY
    host.degraded = False
    bm.flush()
    assert bm.state(0) == LLState.CLEAN


def test_daemon_thread_runs_after_a_write(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    bm.daemon_sleep = 0.02
    bm.barrier_idle = 0.01
    bm.start_daemon()
    try:
        bm.start_write(0, 8)
        bm.unplug()
        bm.end_write(0, 8)
        deadline = time.monotonic() + 5
        while bm.state(0) != LLState.CLEAN and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bm.state(0) == LLState.CLEAN
    finally:
        bm.close()


# ---- reload, stale, sync --------------------------------------------------------------------------------


def test_reload_after_crash_resyncs_only_dirty(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    bm.update_sb(events=1)  # the array marks itself active before its first write
    bm.start_write(128 * 3, 8)
    bm.unplug()  # chunk 3 Dirty on disk; "crash" now
    host = Host()
    again = open_bm(m, host, events=1)
    again.load()
    assert again.state(3) == LLState.NEED_SYNC and host.sync_requests == 1
    assert again.counts()[LLState.UNWRITTEN] == 999
    # resync: Unwritten skipped, NeedSync synced, then Dirty -> Clean by the daemon
    assert again.skip_sync_blocks(0, SyncKind.RESYNC) == 128
    assert again.start_sync(128 * 3, degraded=False) == (True, 128)
    assert again.state(3) == LLState.SYNCING
    again.close_sync()
    assert again.state(3) == LLState.DIRTY
    again.flush()
    assert again.state(3) == LLState.CLEAN and m.on_disk(1, 3) == LLState.CLEAN


def test_stale_bitmap_resyncs_everything_written(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    bm.start_write(0, 8)
    bm.unplug()
    bm.end_write(0, 8)
    bm.flush()  # chunk 0 Clean, the rest Unwritten
    bm.update_sb(events=3)
    host = Host()
    again = open_bm(m, host, events=9)  # the array moved on without this bitmap
    assert again.flags & BitmapFlag.STALE
    again.load()
    assert again.state(0) == LLState.NEED_SYNC and again.counts()[LLState.UNWRITTEN] == 999


def test_recovery_skips_only_unwritten_and_readd_syncs_only_degraded_writes(
    members: Callable[..., Members],
) -> None:
    m = members()
    host = Host()
    bm = open_bm(m, host)
    bm.start_write(128 * 5, 8)
    bm.unplug()
    bm.end_write(128 * 5, 8)
    bm.flush()  # chunk 5 Clean, the rest Unwritten
    host.degraded = True  # a member failed; writes go on
    bm.start_write(128 * 9, 8)
    bm.unplug()
    bm.end_write(128 * 9, 8)

    def walk() -> tuple[list[int], list[int]]:
        visited, must = [], []
        offset = 0
        while offset < 128 * 1000:
            skip = bm.skip_sync_blocks(offset, SyncKind.RECOVERY)
            if skip:
                offset += skip
                continue
            visited.append(offset // 128)
            sync, n = bm.start_sync(offset, degraded=True)
            if sync:
                must.append(offset // 128)
            offset += n
        return visited, must

    visited, must = walk()
    # A brand-new member: the personality copies every chunk not skipped (written ones only).
    assert visited == [5, 9]
    # A re-added member: only what the bitmap says must be synced (the degraded write).
    assert must == [9]
    bm.close_sync()
    assert bm.state(9) == LLState.DIRTY and bm.state(5) == LLState.CLEAN


def test_discard_unwrites_whole_chunks_only(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    bm.start_write(0, 128 * 4)
    bm.unplug()
    bm.end_write(0, 128 * 4)
    bm.start_discard(64, 128 * 3)  # covers chunk 1 and 2 fully, 0 and 3 partly
    bm.end_discard(64, 128 * 3)
    assert [bm.state(c) for c in range(4)] == [
        LLState.DIRTY,
        LLState.UNWRITTEN,
        LLState.UNWRITTEN,
        LLState.DIRTY,
    ]


# ---- errors ------------------------------------------------------------------------------------------------


def test_bad_bitmap_superblocks(members: Callable[..., Members]) -> None:
    m = members()
    with pytest.raises(FormatError, match="UUID mismatch"):
        LocklessBitmap.open(m.store, Host(), array_uuid=bytes(16), sync_size=128 * 1000, events=0)
    bm = open_bm(m)
    bm.update_sb(events=1)
    with pytest.raises(FormatError, match="exceeds array sync size"):
        open_bm(m, sync_size=128 * 999)
    os.pwrite(m.devices[0].fd, (4).to_bytes(4, "little"), AREA_AT + 4)
    os.pwrite(m.devices[1].fd, (4).to_bytes(4, "little"), AREA_AT + 4)
    with pytest.raises(FormatError, match="version 4"):
        open_bm(m)


def test_read_error_tries_next_member(members: Callable[..., Members]) -> None:
    m = members()
    open_bm(m).update_sb(events=1)
    os.close(m.devices[0].fd)  # member 0 now fails every IO
    m.devices[0].fd = os.open(os.devnull, os.O_WRONLY)
    bm = open_bm(m)
    assert m.failed == [str(m.paths[0])]
    assert bm.counts()[LLState.UNWRITTEN] == 1000


def test_write_error_kicks_member_and_keeps_going(members: Callable[..., Members]) -> None:
    m = members()
    bm = open_bm(m)
    os.close(m.devices[1].fd)
    m.devices[1].fd = os.open(m.paths[1], os.O_RDONLY)  # writes to member 1 now fail
    bm.start_write(0, 8)
    bm.unplug()
    assert m.failed == [str(m.paths[1])] and m.on_disk(0, 0) == LLState.DIRTY
    bm.end_write(0, 8)
    os.close(m.devices[0].fd)
    m.devices[0].fd = os.open(m.paths[0], os.O_RDONLY)
    m.store.targets[0].failed = False
    bm.start_write(128 * 900, 8)
    with pytest.raises(BitmapIOError):
        bm.unplug()  # nowhere left to record the write intent: the write must fail
    assert bm.write_error and bm.bits_view() == "bitmap io error\n"


# ---- concurrency -----------------------------------------------------------------------------------


def run_stress(
    bm: LocklessBitmap, m: Members, *, threads: int, seconds: float, seed: int
) -> tuple[int, list[str], int]:
    """Writers check, while their write is in flight, that no chunk of theirs is Clean in memory
    or on disk, while the daemon runs all the time and a flusher writes the whole bitmap over and
    over. Writes last longer than ``barrier_idle``, so the daemon does reach pages that still
    have writes in flight (and must wait for them). Returns (checks, violations, max Clean seen)."""
    violations: list[str] = []
    checks = [0]
    cleaned = [0]
    stop = threading.Event()
    chunks = bm.chunks

    def check(first: int, last: int, where: str) -> None:
        for c in range(first, last + 1):
            if bm.state(c) == LLState.CLEAN:
                violations.append(f"chunk {c} Clean in memory {where}")
            for i in range(len(m.devices)):
                if m.on_disk(i, c) == LLState.CLEAN:
                    violations.append(f"chunk {c} Clean on member {i} {where}")
        checks[0] += 1

    def writer(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        while not stop.is_set():
            first = rnd.randrange(chunks)
            last = min(first + rnd.choice((0, 0, 0, 1, 4)), chunks - 1)
            off, sectors = first * 128 + rnd.randrange(64), (last - first) * 128 + 64
            if bm.start_write(off, sectors):
                bm.unplug()
            check(first, last, "after unplug")
            until = time.monotonic() + rnd.random() * 0.01  # the data IO, longer than barrier_idle
            while time.monotonic() < until:
                time.sleep(0.0005)
                check(first, last, "during the write")
            bm.end_write(off, sectors)

    def flusher() -> None:
        while not stop.is_set():
            bm._flush_all()  # writes Clean bytes too: exposes any wrongly cleaned chunk on disk
            cleaned[0] = max(cleaned[0], bm.counts()[LLState.CLEAN])
            time.sleep(0.003)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    workers.append(threading.Thread(target=flusher))
    bm.daemon_sleep = 0.003
    bm.barrier_idle = 0.001
    bm.start_daemon()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    bm.close()
    return checks[0], violations, cleaned[0]


SPREAD = 128 * 20000  # 20000 chunks on 5 bitmap pages, so pages go idle between writes


@pytest.mark.slow
def test_stress_no_chunk_clean_while_written(members: Callable[..., Members]) -> None:
    m = members(sync_size=SPREAD)
    bm = open_bm(m, sync_size=SPREAD)
    checks, violations, cleaned = run_stress(bm, m, threads=32, seconds=3.0, seed=1)
    assert violations == []
    assert checks > 1000
    assert bm.daemon_runs > 10
    assert cleaned > 0  # the daemon really cleaned chunks while writes were going on


@pytest.mark.slow
def test_stress_checker_catches_a_broken_barrier(
    members: Callable[..., Members], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check fails if the daemon does not wait for writers: the test can fail."""
    m = members(sync_size=SPREAD)
    bm = open_bm(m, sync_size=SPREAD)
    monkeypatch.setattr(bm, "_suspend", lambda page, timeout: True)
    _, violations, _ = run_stress(bm, m, threads=32, seconds=2.0, seed=2)
    assert violations
