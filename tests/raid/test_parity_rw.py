"""raid4/5 read-write through the running array: kernel-made images take writes, crash
resync, degraded writes and re-add, and parity stays consistent under concurrent writers."""

from __future__ import annotations

import hashlib
import os
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
from llraid.fixtures import Fixture, copy_sparse, fixtures_dir, load_fixtures
from llraid.format.llbitmap import LLState
from llraid.sync import run_sync, sync_until_idle
from tests.conftest import BY_NAME


def _parity_root() -> Path:
    env = os.environ.get("LLRAID_FIXTURES_PARITY")
    return Path(env) if env else fixtures_dir().parent / "fixtures-parity"


PARITY = {f.name: f for f in load_fixtures(_parity_root())}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Fixture], list[Path]]:
    root = tmp_path_factory.mktemp("parity")
    cache: dict[str, list[Path]] = {}

    def get(fx: Fixture) -> list[Path]:
        if fx.name not in cache:
            cache[fx.name] = fx.unpack(root / fx.name)
        return cache[fx.name]

    return get


def _copies(fx: Fixture, images: Callable[[Fixture], list[Path]], tmp: Path) -> list[str]:
    return [str(copy_sparse(p, tmp / p.name)) for p in images(fx)]


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
    images: Callable[[Fixture], list[Path]], tmp_path: Path
) -> None:
    fx = BY_NAME["h-raid5-llbitmap"]
    paths = _copies(fx, images, tmp_path)
    expected = bytearray(fx.expected_content())
    with Array.assemble(paths) as a:
        assert a.read(0, a.array_sectors) == bytes(expected)
        _random_writes(a, expected, random.Random(5), 200)
        assert a.read(0, a.array_sectors) == bytes(expected)
        assert run_sync(a, SyncKind.CHECK).mismatches == 0
    with Array.assemble(paths) as a:  # what reached the members, read back after a clean stop
        assert a.read(0, a.array_sectors) == bytes(expected)


def test_h_degraded_writes_then_re_add_recovers_only_what_changed(
    images: Callable[[Fixture], list[Path]], tmp_path: Path
) -> None:
    fx = BY_NAME["h-raid5-llbitmap"]
    paths = _copies(fx, images, tmp_path)
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
    images: Callable[[Fixture], list[Path]], tmp_path: Path
) -> None:
    fx = PARITY["k-raid5-llbitmap-crash"]
    paths = _copies(fx, images, tmp_path)
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
    images: Callable[[Fixture], list[Path]], tmp_path: Path
) -> None:
    fx = PARITY["l-raid5-llbitmap-degraded-stale-member"]
    paths = _copies(fx, images, tmp_path)
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
    images: Callable[[Fixture], list[Path]], tmp_path: Path
) -> None:
    """15 threads write interleaved 4 KiB blocks of the same stripe rows (read-modify-write and
    reconstruct-write racing on one parity block) while the bitmap daemon runs."""
    fx = BY_NAME["h-raid5-llbitmap"]
    paths = _copies(fx, images, tmp_path)
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
