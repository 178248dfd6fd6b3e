"""The classic md bitmap: counters, page flags, unplug ordering, daemon, load, sync, errors."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llraid.bitmap.base import Bitmap, SyncKind
from llraid.bitmap.classic import (
    COUNTER_MAX,
    NEEDED,
    RESYNC,
    ClassicBitmap,
    PageFlag,
)
from llraid.bitmap.store import BitmapStore, BitmapTarget
from llraid.device import Device
from llraid.errors import BitmapIOError, FormatError
from llraid.format.bitmap import BITMAP_MAGIC, BitmapFlag, BitmapKind, BitmapSuper
from llraid.format.superblock import MAX_SECTOR
from llraid.member import open_member
from tests.conftest import fixture

UUID = bytes(range(0x10, 0x20))
AREA_AT = 4096  # byte offset of the bitmap area inside each test member file
CS = 8  # sectors per chunk in most tests (4 KiB chunks)


class FakeHost:
    def __init__(self, *, degraded: bool = False) -> None:
        self.degraded = degraded
        self.sync_requests = 0

    @property
    def level(self) -> int:
        return 1

    def is_degraded(self) -> bool:
        return self.degraded

    def request_sync(self) -> None:
        self.sync_requests += 1


class GateStore(BitmapStore):
    """A store whose writes can be held at the door, and which records what it was asked."""

    def __init__(self, targets: Sequence[BitmapTarget], on_error: Callable[..., None] | None = None) -> None:
        super().__init__(targets, on_error)
        self.hold = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.pieces: list[list[tuple[int, int]]] = []  # (offset, length) per write call

    def write(self, pieces: Sequence[tuple[int, bytes]]) -> None:
        self.pieces.append([(o, len(d)) for o, d in pieces])
        if self.hold:
            self.entered.set()
            self.gate.wait()
        super().write(pieces)


@dataclasses.dataclass
class Rig:
    bm: ClassicBitmap
    host: FakeHost
    store: GateStore
    paths: list[Path]
    errors: list[str]

    def disk_bit(self, chunk: int, member: int = 0) -> bool:
        with open(self.paths[member], "rb") as f:
            f.seek(AREA_AT + 256 + chunk // 8)
            return bool(f.read(1)[0] >> (chunk % 8) & 1)

    def disk_sb(self, member: int = 0) -> BitmapSuper:
        with open(self.paths[member], "rb") as f:
            f.seek(AREA_AT)
            return BitmapSuper.parse(f.read(256))

    def disk_area(self, length: int, member: int = 0) -> bytes:
        with open(self.paths[member], "rb") as f:
            f.seek(AREA_AT)
            return f.read(length)


def write_member(path: Path, sb: BitmapSuper, set_chunks: Sequence[int] | None) -> None:
    """A member file with the bitmap area at AREA_AT: mdadm's all-ones, or just ``set_chunks``."""
    area = bytearray(ClassicBitmap.initial_area(sb))
    if set_chunks is not None:
        area[256:] = bytes(len(area) - 256)
        for c in set_chunks:
            area[256 + c // 8] |= 1 << (c % 8)
    with open(path, "wb") as f:
        f.write(bytes(AREA_AT) + bytes(area) + bytes(4096))


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[MakeRig]:
    made: list[Rig] = []
    devices: list[Device] = []

    def make(
        *,
        chunks: int = 40,
        chunk_sectors: int = CS,
        members: int = 2,
        set_chunks: Sequence[int] | None = (),
        sb_events: int = 10,
        events: int = 10,
        events_cleared: int | None = None,
        resync_offset: int = MAX_SECTOR,
        degraded: bool = False,
        load: bool = True,
        daemon_sleep: int = 5,
        readonly: Sequence[int] = (),
        sb_changes: dict[str, int] | None = None,
    ) -> Rig:
        sync_size = chunks * chunk_sectors
        sb = ClassicBitmap.new_superblock(UUID, sync_size, chunk_sectors * 512, daemon_sleep=daemon_sleep)
        sb = dataclasses.replace(
            sb, events=sb_events, events_cleared=sb_events if events_cleared is None else events_cleared
        )
        if sb_changes:
            sb = dataclasses.replace(sb, **sb_changes)  # type: ignore[arg-type]
        paths = []
        targets = []
        for i in range(members):
            path = tmp_path / f"r{len(made)}m{i}.img"
            write_member(path, sb, set_chunks)
            dev = Device(str(path), writable=i not in readonly)
            devices.append(dev)
            paths.append(path)
            targets.append(BitmapTarget(dev, AREA_AT))
        errors: list[str] = []
        store = GateStore(targets, lambda t, e: errors.append(t.name))
        host = FakeHost(degraded=degraded)
        bm = ClassicBitmap.open(
            store, host, array_uuid=UUID, sync_size=sync_size, events=events, resync_offset=resync_offset
        )
        if load:
            bm.load()
        rig = Rig(bm, host, store, paths, errors)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.bm.close()
    for dev in devices:
        dev.close()


def passes(bm: ClassicBitmap, n: int) -> None:
    for _ in range(n):
        bm.daemon_pass()


# ---- superblock creation, chunk choice, validation ------------------------------------------


def test_new_superblock_is_what_mdadm_writes() -> None:
    sb = ClassicBitmap.new_superblock(UUID, 1000, 65536)
    assert (sb.magic, sb.version, sb.uuid, sb.events, sb.events_cleared) == (BITMAP_MAGIC, 4, UUID, 0, 0)
    assert (sb.sync_size, sb.chunksize, sb.daemon_sleep, sb.write_behind, sb.state) == (1000, 65536, 5, 0, 0)
    area = ClassicBitmap.initial_area(sb)
    assert len(area) == 4096 and area[:256] == sb.build() and set(area[256:]) == {0xFF}
    assert len(ClassicBitmap.initial_area(sb, 512)) == 512
    big = ClassicBitmap.new_superblock(UUID, 8 * 40000, 4096)  # 40000 bits = 5000 bytes
    assert len(ClassicBitmap.initial_area(big)) == 8192
    for bad in ({"chunksize": 1000}, {"daemon_sleep": 0}, {"write_behind": COUNTER_MAX + 1}):
        args: dict[str, int] = {"chunksize": 4096, **bad}
        with pytest.raises((ValueError, FormatError)):
            ClassicBitmap.new_superblock(UUID, 1000, **args)
    with pytest.raises(ValueError):
        ClassicBitmap.new_superblock(UUID[:8], 1000, 4096)


def test_choose_chunksize_like_mdadm() -> None:
    # Anything up to tens of TiB gets mdadm's 64 MiB floor (the fixtures were made that way).
    assert ClassicBitmap.choose_chunksize(253952, 8) == 64 << 20
    assert ClassicBitmap.choose_chunksize(2**30, 8) == 64 << 20
    # 64 TiB per member in 128 KiB of room: 2**34 + 1 bits at 4 KiB, halved 15 times.
    assert ClassicBitmap.choose_chunksize(2**37, 256) == 128 << 20
    assert ClassicBitmap.choose_chunksize(2**37, 100000) == 128 << 20  # room capped at 256
    assert ClassicBitmap.choose_chunksize(2**37, 8) == 4 << 30
    with pytest.raises(ValueError):
        ClassicBitmap.choose_chunksize(1000, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 6}, "version 6"),
        ({"version": 5}, "version 5"),
        ({"version": 2}, "version 2"),
        ({"chunksize": 4000}, "power of two"),
        ({"chunksize": 256}, "power of two"),
        ({"daemon_sleep": 0}, "daemon sleep"),
        ({"write_behind": COUNTER_MAX + 1}, "write-behind"),
        ({"magic": 0x12345678}, "magic"),
    ],
)
def test_open_refuses_what_md_refuses(make_rig: MakeRig, changes: dict[str, int], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        make_rig(sb_changes=changes)


def test_open_refuses_foreign_uuid(tmp_path: Path) -> None:
    sb = ClassicBitmap.new_superblock(UUID, 80, 4096)
    write_member(tmp_path / "m", sb, ())
    with Device(str(tmp_path / "m"), writable=True) as dev:
        store = BitmapStore([BitmapTarget(dev, AREA_AT)])
        with pytest.raises(FormatError, match="UUID"):
            ClassicBitmap.open(
                store, FakeHost(), array_uuid=bytes(16), sync_size=80, events=0, resync_offset=MAX_SECTOR
            )


def test_version3_is_host_endian(make_rig: MakeRig) -> None:
    rig = make_rig(sb_changes={"version": 3}, set_chunks=[9])
    assert BitmapFlag.HOSTENDIAN in rig.bm.flags
    assert rig.bm.counter(9) == 2


def test_open_facts(make_rig: MakeRig) -> None:
    rig = make_rig(chunks=70000, chunk_sectors=1, load=False)
    bm = rig.bm
    assert isinstance(bm, Bitmap) and bm.kind is BitmapKind.CLASSIC
    assert (bm.chunks, bm.chunksize, bm.chunk_sectors, bm.file_pages) == (70000, 512, 1, 3)
    assert bm.flags == BitmapFlag(0) and bm.dirty_bits == 0 and not bm.needs_sync()
    assert bm.skip_sync_blocks(0, SyncKind.RESYNC) == 0


# ---- write path: counters and page flags ------------------------------------------------------


def test_first_writer_sets_bit_and_dirties_page(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    assert bm.start_write(5 * CS + 3, 2) is True
    assert bm.counter(5) == 3 and bm.dirty_bits == 1
    assert bm.page_flags(0) == PageFlag.DIRTY
    assert not rig.disk_bit(5), "the bit is only in memory until unplug"
    bm.unplug()
    assert rig.disk_bit(5, 0) and rig.disk_bit(5, 1)
    assert bm.page_flags(0) == PageFlag(0)
    assert bm.start_write(5 * CS, CS) is False, "bit already durable: no unplug needed"
    assert bm.counter(5) == 4
    bm.end_write(5 * CS, CS)
    assert bm.counter(5) == 3
    bm.end_write(5 * CS + 3, 2)
    assert bm.counter(5) == 2


def test_counter_transitions_through_daemon(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    bm.start_write(0, 1)
    bm.unplug()
    bm.end_write(0, 1)
    assert bm.counter(0) == 2
    passes(bm, 1)
    assert bm.counter(0) == 1 and bm.dirty_bits == 1  # first pass: 2 -> 1
    passes(bm, 1)
    assert bm.counter(0) == 0 and bm.dirty_bits == 0  # second: bit cleared in memory
    assert bm.page_flags(0) == PageFlag.PENDING
    assert rig.disk_bit(0), "a cleared bit is written lazily"
    passes(bm, 1)
    assert not rig.disk_bit(0, 0) and not rig.disk_bit(0, 1)  # third: PENDING -> NEEDWRITE, written
    assert bm.page_flags(0) == PageFlag(0)


def test_start_write_on_counter_one_and_two(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    bm.start_write(0, 2 * CS)
    bm.unplug()
    bm.end_write(0, 2 * CS)
    passes(bm, 1)
    assert (bm.counter(0), bm.counter(1)) == (1, 1)
    assert bm.start_write(0, CS) is False  # 1 -> 3: bit still set, nothing to write
    assert bm.counter(0) == 3
    bm.end_write(0, CS)
    passes(bm, 1)  # chunk 0: 2 -> 1; chunk 1: 1 -> 0
    assert (bm.counter(0), bm.counter(1)) == (1, 0)
    assert bm.start_write(CS, 1) is True  # 0 -> 3: bit set again, page DIRTY
    assert bm.counter(1) == 3 and bm.page_flags(0) & PageFlag.DIRTY
    bm.unplug()
    bm.end_write(CS, 1)
    bm.start_write(CS, 1)
    assert bm.counter(1) == 3  # 2 -> 3


def test_ranges_cover_every_chunk_they_touch_and_stop_at_the_end(make_rig: MakeRig) -> None:
    rig = make_rig(chunks=10)
    bm = rig.bm
    bm.start_write(CS + 7, CS + 2)  # last sector of chunk 1, all of 2, first of 3
    assert [bm.counter(i) for i in range(5)] == [0, 3, 3, 3, 0]
    bm.unplug()
    assert [rig.disk_bit(i) for i in range(5)] == [False, True, True, True, False]
    bm.end_write(CS + 7, CS + 2)
    assert [bm.counter(i) for i in range(5)] == [0, 2, 2, 2, 0]
    bm.start_write(9 * CS + 4, 100)  # runs past the end: only chunk 9
    assert bm.counter(9) == 3 and bm.dirty_bits == 4
    assert bm.start_write(10 * CS, 8) is True  # beyond the end: nothing counted
    bm.unplug()
    assert bm.start_write(10 * CS, 8) is False
    bm.end_write(10 * CS, 8)
    with pytest.raises(ValueError, match="without a start_write"):
        bm.end_write(0, 1)


def test_counter_overflow_waits_for_an_end_write(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    for _ in range(COUNTER_MAX - 2):
        bm.start_write(0, 1)
    assert bm.counter(0) == COUNTER_MAX
    waiter = threading.Thread(target=bm.start_write, args=(0, 1))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "a writer beyond COUNTER_MAX must wait"
    bm.end_write(0, 1)
    waiter.join(5)
    assert not waiter.is_alive()
    assert bm.counter(0) == COUNTER_MAX


def test_pages_and_final_page_length(make_rig: MakeRig) -> None:
    # 70000 one-sector chunks: 256 + 8750 bytes, three pages, the last written as 1024 bytes.
    rig = make_rig(chunks=70000, chunk_sectors=1)
    bm = rig.bm
    rig.store.pieces.clear()
    bm.start_write(65000, 1)  # byte 256 + 8125 -> page 2
    assert bm.page_flags(2) == PageFlag.DIRTY and bm.page_flags(0) == PageFlag(0)
    bm.unplug()
    assert rig.store.pieces == [[(8192, 1024)]]
    assert rig.disk_bit(65000)
    bm.start_write(100, 1)
    bm.start_write(40000, 1)  # page 1
    bm.unplug()
    assert rig.store.pieces[-1] == [(0, 4096), (4096, 4096)]
    bm.flush()
    assert rig.store.pieces[-1] == [(0, 4096), (4096, 4096), (8192, 1024)]


# ---- unplug ordering ------------------------------------------------------------------------


def test_unplug_waits_for_a_write_carrying_its_bit(make_rig: MakeRig) -> None:
    """B's chunk bit was set by A, whose page write is still in flight: B must not go ahead."""
    rig = make_rig(members=1)
    bm, store = rig.bm, rig.store
    assert bm.start_write(3 * CS, 1) is True  # A: first writer of chunk 3
    store.hold = True
    a = threading.Thread(target=bm.unplug)
    a.start()
    try:
        assert store.entered.wait(5)
        assert bm.start_write(3 * CS, 1) is True, "B must unplug: its bit is not durable yet"
        b = threading.Thread(target=bm.unplug)
        b.start()
        b.join(0.2)
        assert b.is_alive(), "B's unplug returned while A's write was still in flight"
        syncs = store.syncs
    finally:
        store.hold = False
        store.gate.set()  # never leave A stuck, even when an assertion failed
        a.join(5)
    b.join(5)
    assert rig.disk_bit(3)
    assert store.syncs == syncs + 1, "B found its bit written by A: no second write"
    assert bm.start_write(3 * CS, 1) is False


def test_many_writers_see_their_bit_on_disk(make_rig: MakeRig) -> None:
    rig = make_rig(chunks=64, set_chunks=())
    bm = rig.bm
    bm.daemon_sleep = 0.01
    bm.start_daemon()
    fds = [os.open(p, os.O_RDONLY) for p in rig.paths]
    chunks_in = 64

    def worker(seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        for _ in range(30):
            first = rng.randrange(chunks_in)
            offset = first * CS + rng.randrange(CS)
            sectors = rng.randrange(1, 3 * CS)
            if bm.start_write(offset, sectors):
                bm.unplug()
            last = min((offset + sectors - 1) // CS, chunks_in - 1)
            for chunk in range(first, last + 1):
                for fd in fds:
                    byte = os.pread(fd, 1, AREA_AT + 256 + chunk // 8)[0]
                    assert byte >> (chunk % 8) & 1, f"chunk {chunk} not on disk during its write"
                    checked += 1
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.005)
            bm.end_write(offset, sectors)
        return checked

    try:
        with ThreadPoolExecutor(32) as pool:
            total = sum(pool.map(worker, range(32)))
    finally:
        bm.close()
        for fd in fds:
            os.close(fd)
    assert total > 32 * 30
    assert bm.daemon_error is None
    assert rig.errors == []
    bm.flush()
    assert bm.dirty_bits == 0
    assert all(bm.counter(i) == 0 for i in range(chunks_in))
    assert set(rig.disk_area(256 + 8)[256:]) == {0}


# ---- daemon -----------------------------------------------------------------------------------


def test_daemon_never_clears_a_chunk_with_a_writer(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    bm.start_write(7 * CS, 1)
    bm.unplug()
    passes(bm, 6)
    assert bm.counter(7) == 3 and rig.disk_bit(7)
    bm.end_write(7 * CS, 1)
    passes(bm, 2)
    assert rig.disk_bit(7), "cleared in memory after two passes, on disk one later"
    passes(bm, 1)
    assert not rig.disk_bit(7)


def test_daemon_honours_daemon_sleep(make_rig: MakeRig) -> None:
    rig = make_rig()
    bm = rig.bm
    bm.start_write(0, 1)
    bm.unplug()
    bm.end_write(0, 1)
    bm.daemon_work()  # less than 5 s since load: nothing happens
    assert bm.counter(0) == 2
    bm.daemon_sleep = 0.5
    time.sleep(0.01)
    bm.daemon_work()  # still less than 0.5 s since load
    assert bm.counter(0) == 2
    time.sleep(0.5)
    bm.daemon_work()
    assert bm.counter(0) == 1
    bm.daemon_work()  # too soon again
    assert bm.counter(0) == 1


def test_daemon_thread_cleans_and_sleeps_until_needed(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[1, 2])
    bm = rig.bm
    bm.daemon_sleep = 0.01
    bm.start_daemon()
    bm.start_daemon()  # a second call does nothing

    def wait_clear(chunk: int) -> None:
        deadline = time.monotonic() + 5
        while rig.disk_bit(chunk) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not rig.disk_bit(chunk)

    wait_clear(1)
    wait_clear(2)
    time.sleep(0.1)  # all clean: the daemon now waits without a timeout
    writes = rig.store.syncs
    time.sleep(0.1)
    assert rig.store.syncs == writes, "an all-clean daemon writes nothing"
    if bm.start_write(3 * CS, 1):
        bm.unplug()
    assert rig.disk_bit(3)
    bm.end_write(3 * CS, 1)  # wakes the daemon
    wait_clear(3)
    bm.close()
    bm.close()


def test_degraded_writes_stay_needed(make_rig: MakeRig) -> None:
    rig = make_rig(degraded=True, sb_events=10, events=10, events_cleared=9)
    bm = rig.bm
    bm.update_sb(11)
    bm.start_write(4 * CS, 1)
    bm.unplug()
    bm.end_write(4 * CS, 1)
    assert bm.counter(4) == NEEDED | 2
    assert bm.needs_sync()
    passes(bm, 8)
    assert bm.counter(4) == NEEDED | 2 and rig.disk_bit(4)
    assert bm.events_cleared == 9, "events_cleared does not advance while degraded"
    bm.flush()
    assert rig.disk_bit(4) and rig.disk_sb().events_cleared == 9 and rig.disk_sb().events == 11


def test_events_cleared_advances_and_is_recorded(make_rig: MakeRig) -> None:
    rig = make_rig(sb_events=10, events=10, events_cleared=8)
    bm = rig.bm
    assert bm.events_cleared == 8 and "can_clear true" in bm.metadata_view()
    bm.start_write(0, 1)
    bm.unplug()
    bm.end_write(0, 1)
    assert bm.events_cleared == 10
    assert "can_clear false" in bm.metadata_view()
    assert rig.disk_sb().events_cleared == 8
    passes(bm, 1)  # records events_cleared in the sb page and writes page 0
    assert rig.disk_sb(0).events_cleared == 10 and rig.disk_sb(1).events_cleared == 10
    assert "can_clear true" in bm.metadata_view()
    bm.update_sb(9)  # md rolled its events back: events_cleared may not stay ahead
    assert bm.events_cleared == 9
    assert (rig.disk_sb().events, rig.disk_sb().events_cleared) == (9, 9)


def test_update_sb_keeps_page0_bits(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[2])
    bm = rig.bm
    bm.daemon_sleep = 7.5
    bm.start_write(5 * CS, 1)  # DIRTY, not yet unplugged
    bm.update_sb(42)
    sb = rig.disk_sb()
    assert (sb.events, sb.events_cleared, sb.daemon_sleep, sb.state) == (42, 10, 7, 0)
    assert rig.disk_bit(2) and rig.disk_bit(5), "page 0 is written with its in-memory bits"
    assert bm.start_write(5 * CS, 1) is False
    assert sb.chunksize == 4096 and sb.uuid == UUID


# ---- load -----------------------------------------------------------------------------------


def test_load_after_clean_shutdown(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[3, 17], resync_offset=MAX_SECTOR)
    bm = rig.bm
    assert [bm.counter(i) for i in (2, 3, 17)] == [0, 2, 2]
    assert not bm.needs_sync() and rig.host.sync_requests == 0
    assert bm.start_sync(3 * CS, False) == (False, CS), "set but not NEEDED: no resync"
    passes(bm, 3)
    assert not rig.disk_bit(3) and not rig.disk_bit(17) and bm.dirty_bits == 0


def test_load_after_unclean_shutdown(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[3, 17], resync_offset=0)
    bm = rig.bm
    assert [bm.counter(i) for i in (2, 3, 17)] == [0, NEEDED | 2, NEEDED | 2]
    assert bm.needs_sync() and rig.host.sync_requests == 1
    passes(bm, 5)
    assert rig.disk_bit(3) and rig.disk_bit(17), "NEEDED chunks wait for the resync"


def test_load_from_a_resync_checkpoint(make_rig: MakeRig) -> None:
    # Chunk i is NEEDED when its end (i+1)*CS is at or after the checkpoint.
    rig = make_rig(set_chunks=[3, 9, 17], resync_offset=10 * CS)
    assert [rig.bm.counter(i) for i in (3, 9, 17)] == [2, NEEDED | 2, NEEDED | 2]


@pytest.mark.parametrize(("cleared", "needed"), [(10, False), (9, True)])
def test_load_degraded_keeps_bits_for_readd(make_rig: MakeRig, cleared: int, needed: bool) -> None:
    rig = make_rig(set_chunks=[5], resync_offset=MAX_SECTOR, degraded=True, events_cleared=cleared)
    assert rig.bm.counter(5) == (NEEDED | 2 if needed else 2)


@pytest.mark.parametrize(("resync_offset", "needed"), [(MAX_SECTOR, 0), (0, NEEDED)])
def test_stale_bitmap_is_set_to_all_ones(make_rig: MakeRig, resync_offset: int, needed: int) -> None:
    rig = make_rig(chunks=100, set_chunks=[4], sb_events=7, events=9, load=False, resync_offset=resync_offset)
    bm = rig.bm
    assert BitmapFlag.STALE in bm.flags and bm.events_cleared == 9
    bm.update_sb(9)  # a stale sb write keeps STALE on disk until load rewrote the bits
    assert rig.disk_sb().state == BitmapFlag.STALE
    bm.load()
    assert BitmapFlag.STALE not in bm.flags
    for member in (0, 1):
        assert all(rig.disk_bit(i, member) for i in range(100))
        assert (rig.disk_sb(member).events, rig.disk_sb(member).state) == (9, 0)
    assert bm.dirty_bits == 100
    assert all(bm.counter(i) == needed | 2 for i in range(100))


# ---- sync -----------------------------------------------------------------------------------


def sync_walk(bm: ClassicBitmap, size: int, degraded: bool = False) -> list[int]:
    """Offsets the sync thread would copy, walking the whole range like md_do_sync."""
    todo = []
    offset = 0
    while offset < size:
        must, sectors = bm.start_sync(offset, degraded)
        assert sectors >= 8
        if must:
            todo.append(offset)
        offset += sectors
    return todo


def test_resync_flow(make_rig: MakeRig) -> None:
    rig = make_rig(chunks=5000, set_chunks=[3, 17, 2500], resync_offset=0)
    bm = rig.bm
    size = 5000 * CS
    want = [3 * CS, 17 * CS, 2500 * CS]
    assert sync_walk(bm, size, degraded=True) == want
    assert bm.counter(3) == NEEDED | 2, "a degraded probe changes nothing"
    # Counter pages hold 2048 chunks: one with live counters is answered chunk by chunk
    # (at least 8 sectors), one without any in a single step.
    assert bm.start_sync(1000 * CS, True) == (False, CS)
    assert bm.start_sync(4096 * CS, True) == (False, 2048 * CS)
    assert sync_walk(bm, size) == want
    assert [bm.counter(i) for i in (3, 17, 2500)] == [RESYNC | 2] * 3
    assert sync_walk(bm, size) == want, "RESYNC still says sync it"
    bm.close_sync()
    assert [bm.counter(i) for i in (3, 17, 2500)] == [2] * 3
    assert not bm.needs_sync()
    passes(bm, 3)
    assert bm.dirty_bits == 0 and not rig.disk_bit(3) and not rig.disk_bit(2500)


def test_aborted_sync_is_retried(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[3, 17], resync_offset=0)
    bm = rig.bm
    assert bm.start_sync(17 * CS, False)[0]
    assert bm.counter(17) == RESYNC | 2
    bm.end_sync(17 * CS)
    assert bm.counter(17) == NEEDED | 2
    bm.end_sync(0)  # no RESYNC there: nothing changes
    assert bm.counter(0) == 0 and bm.counter(3) == NEEDED | 2
    bm.close_sync()
    assert bm.counter(17) == NEEDED | 2 and bm.needs_sync()


def test_cond_end_sync_checkpoints(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[3, 17], resync_offset=0)
    bm = rig.bm
    bm.cond_end_sync(0)
    sync_walk(bm, 40 * CS)
    bm.cond_end_sync(30 * CS)  # within daemon_sleep of the start: nothing
    assert bm.counter(3) == RESYNC | 2
    bm.cond_end_sync(17 * CS + 5, force=True)  # rounded down to chunk 17's start
    assert (bm.counter(3), bm.counter(17)) == (2, RESYNC | 2)
    bm.daemon_sleep = 0.001
    time.sleep(0.005)
    bm.cond_end_sync(18 * CS)
    assert bm.counter(17) == 2


# ---- member errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["readonly", "closed"])
def test_write_error_on_one_member(make_rig: MakeRig, how: str) -> None:
    rig = make_rig(readonly=[1] if how == "readonly" else [])
    bm = rig.bm
    if how == "closed":
        rig.store.targets[1].device.close()
    bm.start_write(6 * CS, 1)
    bm.unplug()
    assert rig.errors == [str(rig.paths[1])]
    assert rig.store.targets[1].failed
    assert rig.disk_bit(6, 0) and not rig.disk_bit(6, 1)
    bm.start_write(8 * CS, 1)
    bm.unplug()
    assert rig.disk_bit(8, 0) and rig.errors == [str(rig.paths[1])]


def test_write_error_on_every_member(make_rig: MakeRig) -> None:
    rig = make_rig(readonly=[0, 1], load=False)
    bm = rig.bm
    assert bm.start_write(6 * CS, 1)
    with pytest.raises(BitmapIOError):
        bm.unplug()
    assert BitmapFlag.WRITE_ERROR in bm.flags
    assert bm.start_write(6 * CS, 1) is True, "the bit is still not durable"
    assert bm.page_flags(0) & PageFlag.DIRTY


# ---- flush, views ------------------------------------------------------------------------------


def test_flush_cleans_and_writes_everything(make_rig: MakeRig) -> None:
    rig = make_rig(set_chunks=[1, 2, 30])
    bm = rig.bm
    bm.start_write(30 * CS, 1)
    bm.update_sb(12)
    bm.flush()
    assert [rig.disk_bit(i) for i in (1, 2, 30)] == [False, False, True]
    assert rig.disk_sb(1).events == 12
    bm.end_write(30 * CS, 1)
    bm.flush()
    assert bm.dirty_bits == 0 and not rig.disk_bit(30)


def test_views(make_rig: MakeRig) -> None:
    rig = make_rig(chunks=3000, set_chunks=[1], resync_offset=0)
    bm = rig.bm
    bm.start_write(2 * CS, 1)
    assert bm.bits_view() == "chunks 3000\ndirty 2\nneeded 1\nresync 0\nwriting 1\npages 1/2\n"
    assert bm.status_line() == "bitmap: 1/2 pages [4KB], 4KB chunk"
    view = bm.metadata_view()
    assert view.splitlines() == [
        "location +8",
        "space 0",
        "time_base 5",
        "backlog 0",
        "chunksize 4096",
        "metadata internal",
        "can_clear true",
        "max_backlog_used 0",
    ]
    bm.daemon_sleep = 0.01
    assert "time_base 0.010\n" in bm.metadata_view()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            bm.daemon_sleep = bad
    assert bm.daemon_sleep == 0.01


# ---- model check ------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 11), st.integers(1, 3)),
        st.tuples(st.just("end"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("daemon"), st.just(0), st.just(0)),
        st.tuples(st.just("unplug"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_counters_follow_the_model(ops: list[tuple[str, int, int]]) -> None:
    """Random writes and daemon passes against the spec's counter rules (non-degraded)."""
    chunks = 12
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m"
        sb = ClassicBitmap.new_superblock(UUID, chunks * CS, CS * 512)
        write_member(path, sb, ())
        with Device(str(path), writable=True) as dev:
            bm = ClassicBitmap.open(
                BitmapStore([BitmapTarget(dev, AREA_AT)]),
                FakeHost(),
                array_uuid=UUID,
                sync_size=chunks * CS,
                events=0,
                resync_offset=MAX_SECTOR,
            )
            bm.load()
            model = [0] * chunks
            open_writes: list[tuple[int, int]] = []
            for op, a, b in ops:
                if op == "start":
                    n = min(b, chunks - a)
                    need = bm.start_write(a * CS, n * CS)
                    for c in range(a, a + n):
                        model[c] = max(model[c], 2) + 1
                    if need:
                        bm.unplug()
                    open_writes.append((a, n))
                elif op == "end" and open_writes:
                    a, n = open_writes.pop(a % len(open_writes))
                    bm.end_write(a * CS, n * CS)
                    for c in range(a, a + n):
                        model[c] -= 1
                elif op == "daemon":
                    bm.daemon_pass()
                    model = [{1: 0, 2: 1}.get(c, c) for c in model]
                elif op == "unplug":
                    bm.unplug()
                assert [bm.counter(c) for c in range(chunks)] == model
                assert bm.dirty_bits == sum(1 for c in model if c)
                with open(path, "rb") as f:
                    f.seek(AREA_AT + 256)
                    disk = int.from_bytes(f.read(2), "little")
                for c in range(chunks):
                    if model[c] > 2:
                        assert disk >> c & 1, "a chunk being written must be set on disk"


# ---- the kernel's own bitmap ----------------------------------------------------------------


def test_kernel_fixture_raid10(unpacked: Callable[[str], list[Path]]) -> None:
    name = "c-raid10n2-internal-bitmap"
    paths = unpacked(name)
    assert len(paths) == 4
    member = open_member(str(paths[0]))
    try:
        assert member.bitmap_sb is not None
        assert member.bitmap_sector * 512 == 8192
        sb = member.bitmap_sb
        array_uuid = member.sb.set_uuid
        events = member.sb.events
        resync_offset = member.sb.resync_offset
    finally:
        member.device.close()
    devices = [Device(str(p)) for p in paths]  # read-only: nothing here writes
    try:
        store = BitmapStore([BitmapTarget(d, 8192) for d in devices])
        bm = ClassicBitmap.open(
            store,
            FakeHost(),
            array_uuid=array_uuid,
            sync_size=sb.sync_size,
            events=events,
            resync_offset=resync_offset,
        )
        text = fixture(name).examine_file(0, "examine_bitmap").read_text()
        facts = dict(re.findall(r"^\s*([A-Za-z ]+?) : (.*)$", text, re.M))
        total, dirty = map(int, re.findall(r"\d+", facts["Bitmap"])[:2])
        assert (bm.chunks, bm.dirty_bits) == (total, dirty) == (2, 0)
        assert facts["Daemon"] == f"{int(bm.daemon_sleep)}s flush period" == "5s flush period"
        assert bm.events_cleared == int(facts["Events Cleared"])
        assert facts["Chunksize"] == f"{bm.chunksize >> 20} MB"
        assert BitmapFlag.STALE not in bm.flags
        assert bm.bits_view().startswith("chunks 2\ndirty 0\nneeded 0\n")
        assert "chunksize 67108864\n" in bm.metadata_view()
    finally:
        for d in devices:
            d.close()
