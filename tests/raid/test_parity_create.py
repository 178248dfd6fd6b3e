"""raid4/5 made by llraid: mdadm's create (last member as a spare that recovery builds), the
lockless bitmap's lazy parity (first write -> NeedSync, reconstruct-write until the chunk's
parity is built), degraded writes, new members, and the choice of read-modify-write."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import numpy as np
import pytest

from llraid.array import Array, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.create import CreateSpec, create, parse_layout
from llraid.device import SECTOR
from llraid.errors import LlraidError
from llraid.format.bitmap import BitmapKind
from llraid.format.llbitmap import LLState
from llraid.format.superblock import MAX_SECTOR, ROLE_SPARE
from llraid.member import open_member
from llraid.raid.parity import Raid5Runtime
from llraid.sync import needed_sync, run_sync, sync_until_idle

MEMBER = 24 << 20
CHUNK = 128  # sectors (64 KiB): small rows keep the tests quick


def _members(tmp: Path, n: int, *, garbage: bool = False) -> list[str]:
    paths = []
    rng = random.Random(n)
    for i in range(n):
        p = tmp / f"m{i}.img"
        with open(p, "wb") as f:
            if garbage:  # what an old disk holds: parity of never-written chunks is not valid
                f.write(rng.randbytes(MEMBER))
            else:
                f.truncate(MEMBER)
        paths.append(str(p))
    return paths


def _create(paths: list[str], bitmap: BitmapKind, *, level: int = 5, assume_clean: bool = False) -> None:
    spec = CreateSpec(
        level=level, raid_devices=len(paths), layout=parse_layout(level, None), chunk_sectors=CHUNK,
        bitmap=bitmap, assume_clean=assume_clean, name="p", minor=2, size=None, homehost="llraid-test",
    )  # fmt: skip
    create(paths, spec, force=True)


def _consistent(a: Array, msector: int, count: int) -> bool:
    """XOR of every member at these member sectors is zero (parity matches the data)."""
    acc = np.zeros(count * SECTOR, dtype=np.uint8)
    for d in a.rdevs:
        acc ^= np.frombuffer(a.read_member(d, msector, count), dtype=np.uint8)
    return not acc.any()


def _states(a: Array) -> dict[LLState, int]:
    assert isinstance(a.bitmap, LocklessBitmap)
    return {s: n for s, n in a.bitmap.counts().items() if n}


def test_create_raid5_like_mdadm(tmp_path: Path) -> None:
    """The last device is a spare with device number raid_devices and slot 2 is empty; the
    array is recorded clean (fixture h's superblocks after the kernel recovered it agree)."""
    paths = _members(tmp_path, 3)
    _create(paths, BitmapKind.LOCKLESS)
    sbs = []
    for p in paths:
        m = open_member(p)
        sbs.append(m.sb)
        m.device.close()
    assert [sb.dev_number for sb in sbs] == [0, 1, 3]
    assert sbs[0].dev_roles[:4] == (0, 1, ROLE_SPARE, ROLE_SPARE)
    assert {sb.resync_offset for sb in sbs} == {MAX_SECTOR}
    assert sbs[0].size % CHUNK == 0 and sbs[0].level == 5 and sbs[0].layout == 2
    with Array.assemble(paths) as a:  # the spare takes slot 2 and is recovered
        assert sorted(d.role for d in a.rdevs if d.role is not None) == [0, 1, 2]
        (stats,) = sync_until_idle(a)
        assert stats.kind == "recovery" and stats.bytes_written == {}  # every chunk Unwritten
        assert all(d.state is RdevState.IN_SYNC for d in a.rdevs)
        assert _states(a) == {LLState.UNWRITTEN: a.bitmap.chunks}  # type: ignore[attr-defined]
    m = open_member(paths[2])
    assert m.sb.dev_roles[:4] == (0, 1, ROLE_SPARE, 2)  # as fixture h after create
    m.device.close()


@pytest.mark.parametrize("bitmap", [BitmapKind.CLASSIC, BitmapKind.NONE])
def test_create_raid5_without_llbitmap_builds_the_spare(bitmap: BitmapKind, tmp_path: Path) -> None:
    paths = _members(tmp_path, 3, garbage=True)
    _create(paths, bitmap)
    with Array.assemble(paths) as a:
        (stats,) = sync_until_idle(a)
        assert stats.kind == "recovery"
        assert stats.bytes_written == {paths[2]: a.dev_sectors * SECTOR}  # all of it
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        data = random.Random(1).randbytes(300 * SECTOR)
        a.write(1000, data)
        assert a.read(1000, 300) == data
        assert run_sync(a, SyncKind.CHECK).mismatches == 0


def test_lazy_parity_first_write_needs_sync_and_uses_reconstruct_write(tmp_path: Path) -> None:
    paths = _members(tmp_path, 4, garbage=True)
    _create(paths, BitmapKind.LOCKLESS)
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        assert isinstance(a.bitmap, LocklessBitmap) and isinstance(a.personality, Raid5Runtime)
        chunk = a.bitmap.chunksize
        row = a.personality.geo.chunk_sectors * 3  # array sectors per stripe row
        # One sector in row 5: its parity is garbage (never built), so a read-modify-write
        # would leave this sector's parity wrong; reconstruct-write makes it right.
        s = 5 * row + 17
        before = a.counters.member_read.copy()
        a.write(s, b"\xa5" * SECTOR)
        read = {k: v - before.get(k, 0) for k, v in a.counters.member_read.items()}
        assert sum(read.values()) == 2 * SECTOR  # the two other data blocks, not the parity
        ms = 5 * CHUNK + 17
        assert _consistent(a, ms, 1)
        assert not _consistent(a, ms + 1, 1)  # the rest of the row still has garbage parity
        states = _states(a)
        assert states[LLState.NEED_SYNC] == CHUNK // chunk  # the row's bitmap chunks
        assert needed_sync(a) is SyncKind.RESYNC
        (stats,) = sync_until_idle(a)
        assert stats.sectors_synced == CHUNK  # exactly the row: the lazy parity build
        assert _consistent(a, 5 * CHUNK, CHUNK)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0  # Unwritten chunks are not checked
        assert a.read(s, 1) == b"\xa5" * SECTOR


def test_read_modify_write_when_it_reads_less(tmp_path: Path) -> None:
    """5 members (4 data): a one-block write reads old data + parity (2) rather than the
    other three data blocks, once the chunk's parity is known valid."""
    paths = _members(tmp_path, 5)
    _create(paths, BitmapKind.LOCKLESS)
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        a.write(0, bytes(range(256)) * 2 * 4 * CHUNK)  # a full row: no reads at all
        assert sum(a.counters.member_read.values()) == 0
        sync_until_idle(a)
        assert a.parity_known(0)
        before = sum(a.counters.member_read.values())
        a.write(3, b"\x11" * SECTOR)
        assert sum(a.counters.member_read.values()) - before == 2 * SECTOR
        assert _consistent(a, 0, CHUNK)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0


def test_degraded_writes_to_unwritten_chunks_complete_and_a_new_member_gets_only_written_chunks(
    tmp_path: Path,
) -> None:
    paths = _members(tmp_path, 3)
    _create(paths, BitmapKind.LOCKLESS)
    rng = random.Random(3)
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        a.fail(0)
        a.remove(0)
        expected = {}
        for s in (0, 5000, 20000):  # never written before: Unwritten chunks, array degraded
            data = rng.randbytes(64 * SECTOR)
            a.write(s, data)
            expected[s] = data
        for s, data in expected.items():
            assert a.read(s, 64) == data
        need = _states(a)[LLState.NEED_SYNC]
        spare = tmp_path / "new.img"
        with open(spare, "wb") as f:
            f.truncate(MEMBER)
        d = a.add_spare(str(spare), force=True)
        (stats,) = sync_until_idle(a)  # (no resync after it: a sync's Endsync does not infect)
        assert d.state is RdevState.IN_SYNC and stats.kind == "recovery"
        assert isinstance(a.bitmap, LocklessBitmap)
        assert stats.bytes_written == {str(spare): need * a.bitmap.chunksize * SECTOR}
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        for s, data in expected.items():
            assert a.read(s, 64) == data
    with Array.assemble([*paths[1:], str(spare)]) as a:
        for s, data in expected.items():
            assert a.read(s, 64) == data


@pytest.mark.parametrize("level", [4, 5])
def test_raid4_and_raid5_random_writes_survive_a_lost_member(level: int, tmp_path: Path) -> None:
    paths = _members(tmp_path, 4)
    _create(paths, BitmapKind.CLASSIC, level=level, assume_clean=True)
    rng = random.Random(level)
    with Array.assemble(paths) as a:
        expected = bytearray(a.read(0, a.array_sectors))
        for _ in range(60):
            n = rng.choice([1, 8, 100, 3 * CHUNK, 7 * CHUNK + 5])
            s = rng.randrange(a.array_sectors - n)
            data = rng.randbytes(n * SECTOR)
            a.write(s, data)
            expected[s * SECTOR : (s + n) * SECTOR] = data
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
    for lost in range(4):
        with Array.assemble(paths[:lost] + paths[lost + 1 :], run=True, readonly=True) as a:
            assert a.read(0, a.array_sectors) == bytes(expected), f"role {lost} missing"
    os.truncate(paths[0], MEMBER)  # keeps the test's files sparse-ish for the next run


def test_create_raid6_lazy_parity_builds_p_and_q(tmp_path: Path) -> None:
    """raid6 is created in sync (mdadm moves no member to a spare), the initial resync skips
    every Unwritten chunk, and the first write builds P and Q of what it touched."""
    paths = _members(tmp_path, 4, garbage=True)
    _create(paths, BitmapKind.LOCKLESS, level=6)
    with Array.assemble(paths) as a:
        (stats,) = sync_until_idle(a)
        assert stats.kind == "resync" and stats.windows_synced == 0 and stats.bytes_written == {}
        row = CHUNK * 2  # array sectors per stripe row (2 data members)
        a.write(3 * row + 5, b"\x5a" * SECTOR)
        assert _states(a)[LLState.NEED_SYNC] == CHUNK // a.bitmap.chunksize  # type: ignore[attr-defined]
        (stats,) = sync_until_idle(a)
        assert stats.sectors_synced == CHUNK  # the row's lazy parity build
        assert run_sync(a, SyncKind.CHECK).mismatches == 0  # (Unwritten rows are not checked)
    for lost in ((0, 1), (1, 3), (2, 3)):
        rest = [p for i, p in enumerate(paths) if i not in lost]
        with Array.assemble(rest, run=True, readonly=True) as b:
            assert b.read(3 * row + 5, 1) == b"\x5a" * SECTOR


RAID6_LAYOUTS = [
    "left-asymmetric", "right-asymmetric", "left-symmetric", "right-symmetric", "parity-first",
    "parity-last", "ddf-zero-restart", "ddf-N-restart", "ddf-N-continue", "left-asymmetric-6",
    "right-asymmetric-6", "left-symmetric-6", "right-symmetric-6", "parity-first-6",
]  # fmt: skip


@pytest.mark.parametrize("layout", RAID6_LAYOUTS)
def test_raid6_writes_in_every_layout_read_back_with_any_two_members_lost(
    layout: str, tmp_path: Path
) -> None:
    """What the write path puts in P and Q is what the reader (whose syndrome order is checked
    against the kernel's images and its slot walk) rebuilds lost members from."""
    paths = _members(tmp_path, 5)
    spec = CreateSpec(
        level=6, raid_devices=5, layout=parse_layout(6, layout), chunk_sectors=16, bitmap=BitmapKind.NONE,
        assume_clean=True, name="p6", minor=2, size=4096, homehost="llraid-test",
    )  # fmt: skip
    create(paths, spec, force=True)
    rng = random.Random(layout)
    with Array.assemble(paths) as a:
        expected = bytearray(a.read(0, a.array_sectors))
        for _ in range(40):
            n = rng.choice([1, 8, 16, 40, 100])
            s = rng.randrange(a.array_sectors - n)
            data = rng.randbytes(n * SECTOR)
            a.write(s, data)
            expected[s * SECTOR : (s + n) * SECTOR] = data
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
    for lost in itertools.combinations(range(5), 2):
        rest = [p for i, p in enumerate(paths) if i not in lost]
        with Array.assemble(rest, run=True, readonly=True) as a:
            assert a.read(0, a.array_sectors) == bytes(expected), lost


def test_proactive_sync_builds_parity_of_every_unwritten_chunk(tmp_path: Path) -> None:
    """Unwritten -> NeedSyncUnwritten -> (sync) CleanUnwritten: parity is valid everywhere
    although nothing was written, so a later first write may read-modify-write."""
    paths = _members(tmp_path, 3, garbage=True)
    _create(paths, BitmapKind.LOCKLESS)
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        assert not a.parity_known(0)
        a.proactive_sync()
        assert _states(a) == {LLState.NEED_SYNC_UNWRITTEN: a.bitmap.chunks}  # type: ignore[attr-defined]
        (stats,) = sync_until_idle(a)
        assert stats.kind == "resync" and stats.sectors_synced == a.dev_sectors
        assert _states(a) == {LLState.CLEAN_UNWRITTEN: a.bitmap.chunks}  # type: ignore[attr-defined]
        assert _consistent(a, 0, a.dev_sectors)
        assert a.parity_known(0)
        a.write(0, b"\x01" * SECTOR)
        assert _states(a)[LLState.DIRTY] >= 1 and LLState.NEED_SYNC not in _states(a)
        assert _consistent(a, 0, CHUNK)


def test_proactive_sync_is_refused_where_it_means_nothing(tmp_path: Path) -> None:
    paths = _members(tmp_path, 3)
    _create(paths, BitmapKind.CLASSIC, assume_clean=True)
    with Array.assemble(paths) as a, pytest.raises(LlraidError, match="lockless"):
        a.proactive_sync()
