"""raid4/5/6 read-write through the running array: kernel-made images take writes, crash
resync, degraded writes and re-add, and parity stays consistent under concurrent writers."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.array import Array, Rdev, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.device import SECTOR
from llraid.fixtures import Fixture, copy_sparse
from llraid.format.llbitmap import LLState
from llraid.sync import run_sync, sync_until_idle
from tests.conftest import BY_NAME, PARITY_BY_NAME


def _copies(name: str, unpacked: Callable[[str], list[Path]], tmp: Path) -> list[str]:
    return [str(copy_sparse(p, tmp / p.name)) for p in unpacked(name)]


def _fixture(name: str) -> Fixture:
    return BY_NAME[name] if name in BY_NAME else PARITY_BY_NAME[name]


def _random_writes(a: Array, expected: bytearray, rng: random.Random, count: int) -> None:
    """Writes of every shape: single sectors, inside one chunk, across chunks and rows."""
    for _ in range(count):
        n = rng.choice([1, 7, 8, 64, 1000, 1024, 2048, 3001])
        s = rng.randrange(a.array_sectors - n)
        data = rng.randbytes(n * SECTOR)
        a.write(s, data)
        expected[s * SECTOR : (s + n) * SECTOR] = data


def _states(a: Array) -> dict[LLState, int]:
    bm = a.bitmap
    assert isinstance(bm, LocklessBitmap)
    return {st: n for st, n in bm.counts().items() if n}


def test_h_takes_writes_and_parity_stays_consistent(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = _fixture("h-raid5-llbitmap")
    paths = _copies(fx.name, unpacked, tmp_path)
    expected = bytearray(fx.expected_content())
    with Array.assemble(paths) as a:
        assert a.read(0, a.array_sectors) == bytes(expected)
        _random_writes(a, expected, random.Random(5), 200)
        assert a.read(0, a.array_sectors) == bytes(expected)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
    with Array.assemble(paths) as a:  # what reached the members, read back after a clean stop
        assert a.read(0, a.array_sectors) == bytes(expected)


def test_h_degraded_writes_then_re_add_recovers_only_what_changed(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = _fixture("h-raid5-llbitmap")
    paths = _copies(fx.name, unpacked, tmp_path)
    expected = bytearray(fx.expected_content())
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        a.bitmap.flush()  # every chunk Clean: the degraded writes below are what NeedSync counts
        a.fail(1)
        a.remove(1)
        rng = random.Random(9)
        for _ in range(20):  # small writes: the data of the missing member is rebuilt or kept
            n = rng.choice([1, 8, 100])
            s = rng.randrange(a.array_sectors - n)
            data = rng.randbytes(n * SECTOR)
            a.write(s, data)
            expected[s * SECTOR : (s + n) * SECTOR] = data
        assert a.read(0, a.array_sectors) == bytes(expected)  # reads reconstruct role 1
        need = _states(a).get(LLState.NEED_SYNC, 0)
        assert 0 < need < 992
        d = a.re_add(paths[1])
        stats = sync_until_idle(a)
        assert d.state is RdevState.IN_SYNC
        assert isinstance(a.bitmap, LocklessBitmap)
        chunk_bytes = a.bitmap.chunksize * SECTOR
        assert sum(st.bytes_written.get(paths[1], 0) for st in stats) == need * chunk_bytes
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        assert a.read(0, a.array_sectors) == bytes(expected)


def test_k_crash_resyncs_exactly_the_marked_chunks(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = _fixture("k-raid5-llbitmap-crash")
    paths = _copies(fx.name, unpacked, tmp_path)
    with Array.assemble(paths) as a:
        states = _states(a)
        assert states == {LLState.NEED_SYNC: 992}  # as the kernel's own reassembly found
        (stats,) = sync_until_idle(a)
        assert stats.kind == "resync" and stats.completed
        assert stats.sectors_synced == 992 * 128
        content = a.read(0, a.array_sectors)
        assert hashlib.sha256(content).hexdigest() == fx.entry["md_sha256"]
        assert run_sync(a, SyncKind.CHECK).mismatches == 0


def test_l_stale_member_re_add_recovers_only_the_degraded_writes(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = _fixture("l-raid5-llbitmap-degraded-stale-member")
    paths = _copies(fx.name, unpacked, tmp_path)
    stale = paths[fx.entry["failed_member"]]
    with Array.assemble(paths, run=True) as a:  # the stale member is kicked
        assert a.is_degraded()
        assert _states(a)[LLState.NEED_SYNC] == 16
        content = a.read(0, a.array_sectors)
        assert hashlib.sha256(content).hexdigest() == fx.entry["md_sha256"]
        a.re_add(stale)
        (stats,) = sync_until_idle(a)
        assert stats.kind == "recovery" and stats.completed
        assert stats.bytes_written == {stale: 16 * 128 * SECTOR}
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        assert a.read(0, a.array_sectors) == content


def test_concurrent_writers_sharing_stripes_keep_parity(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    """15 threads write interleaved 4 KiB blocks of the same stripe rows (read-modify-write and
    reconstruct-write racing on one parity block) while the bitmap daemon runs."""
    fx = _fixture("h-raid5-llbitmap")
    paths = _copies(fx.name, unpacked, tmp_path)
    expected = bytearray(fx.expected_content())
    # 15 threads: the blocks at the same member sectors of one row (128 blocks apart) belong to
    # different threads, so their parity updates race.
    nthreads, span = 15, 8 * 2048  # 8 MiB of the array, every block owned by one thread
    errors: list[BaseException] = []
    with Array.assemble(paths) as a:
        a.bitmap.daemon_sleep = 0.01
        real_read = a.read_member

        def slow_read(d: Rdev, ms: int, n: int) -> bytes:
            time.sleep(0.0003)  # widen the window between reading old parity and writing new
            return real_read(d, ms, n)

        a.read_member = slow_read  # type: ignore[method-assign,assignment]

        def writer(t: int) -> None:
            rng = random.Random(t)
            try:
                for _ in range(150):
                    block = rng.randrange(span // 8 // nthreads) * nthreads + t
                    n = rng.choice([1, 8])
                    data = rng.randbytes(n * SECTOR)
                    a.write(block * 8, data)
                    expected[block * 8 * SECTOR : (block * 8 + n) * SECTOR] = data
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert a.read(0, a.array_sectors) == bytes(expected)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0


@pytest.mark.parametrize("name", ["j1-raid6-llbitmap", "j2-raid6-internal-bitmap"])
def test_raid6_fixtures_take_writes_lose_two_members_and_get_them_back(
    name: str, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = _fixture(name)
    paths = _copies(fx.name, unpacked, tmp_path)
    expected = bytearray(fx.expected_content())
    rng = random.Random(6)
    with Array.assemble(paths) as a:
        assert a.read(0, a.array_sectors) == bytes(expected)
        _random_writes(a, expected, rng, 80)
        assert a.read(0, a.array_sectors) == bytes(expected)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        sync_until_idle(a)
        a.bitmap.flush()
        for role in (1, 3):  # any two: data, P and Q rotate over every member
            a.fail(role)
            a.remove(role)
        _random_writes(a, expected, rng, 30)  # doubly degraded: both lost blocks rebuilt from P+Q
        assert a.read(0, a.array_sectors) == bytes(expected)
        for p in (paths[1], paths[3]):
            a.re_add(p)
        stats = sync_until_idle(a)
        assert [s.kind for s in stats] == ["recovery"]
        if isinstance(a.bitmap, LocklessBitmap):  # only the rows written while they were away
            assert stats[0].sectors_synced < a.dev_sectors
        assert all(d.state is RdevState.IN_SYNC for d in a.rdevs)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
        assert a.read(0, a.array_sectors) == bytes(expected)
    for lost in ((0, 1), (2, 3)):
        rest = [p for i, p in enumerate(paths) if i not in lost]
        with Array.assemble(rest, run=True, readonly=True) as a:
            assert a.read(0, a.array_sectors) == bytes(expected)
