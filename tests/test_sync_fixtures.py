"""Syncs of the kernel-made crash and stale-member fixtures leave the bitmap as the kernel did.

The fixtures' ``boot2-reassemble`` runs record the kernel's ``llbitmap/bits`` after its resync
(e, e2) or recovery (f) and the on-disk states after its clean stop. A sync must not turn
Unwritten chunks (no data) into written ones: before the fix, llraid's Endsync infected the
whole 512-chunk block of the synced chunk (e2: 496 Unwritten / 512 Clean instead of 1007 / 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.fixtures import copy_sparse
from llraid.format.llbitmap import LLState
from llraid.sync import sync_until_idle
from tests.conftest import BY_NAME
from tests.test_array import chunks_in, llbitmap

FAR = 1e18  # a daemon run "much later": every page has been idle long enough


def _copies(unpacked: Callable[[str], list[Path]], name: str, dest: Path) -> list[str]:
    dest.mkdir()
    return [str(copy_sparse(p, dest / p.name)) for p in unpacked(name)]


def _kernel_bits(name: str, stage: str) -> str:
    return (BY_NAME[name].dir / "boot2-reassemble" / stage / "sysfs_llbitmap_bits.txt").read_text()


def _kernel_runs_after_stop(name: str, member: int) -> list[list[object]]:
    path = BY_NAME[name].dir / "boot2-reassemble" / "ondisk-after-stop" / f"mddump_m{member}.json"
    runs: list[list[object]] = json.loads(path.read_text())[0]["bitmap"]["runs"]
    return runs


def _runs(array: Array) -> list[list[object]]:
    bm = llbitmap(array)
    out: list[list[object]] = []
    for c in range(bm.chunks):
        title = LLState(bm.state(c)).title
        if out and out[-1][2] == title:
            out[-1][1] = c + 1
        else:
            out.append([c, c + 1, title])
    return out


@pytest.mark.parametrize("name", ["e-raid1-llbitmap-crash", "e2-raid1-llbitmap-crash-single-write"])
def test_resync_of_crash_fixture_leaves_kernel_bits(
    name: str, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    paths = _copies(unpacked, name, tmp_path / "m")
    array = Array.assemble(paths, bitmap_threads=False)
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-1-assembled")
    need = chunks_in(array, LLState.NEED_SYNC)
    (stats,) = sync_until_idle(array)
    assert stats.kind == "resync" and stats.completed
    assert stats.sectors_synced == len(need) * llbitmap(array).chunksize
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-2-after-resync")
    assert chunks_in(array, LLState.DIRTY) == need  # exactly the synced chunks, no neighbours
    llbitmap(array).daemon_work(now=FAR)
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-3-settled")
    array.stop()
    with Array.assemble(paths, bitmap_threads=False) as again:
        assert _runs(again) == _kernel_runs_after_stop(name, 0)
        assert again.read(0, again.array_sectors) == BY_NAME[name].expected_content()


def test_recovery_of_stale_member_fixture_leaves_kernel_bits(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    """f: m1 is stale; re-added, exactly the 25 NeedSync chunks are recovered and become Dirty.
    Before the fix the Endsync after the recovery (array whole again) infected 512 Clean chunks."""
    name = "f-raid1-llbitmap-degraded-stale-member"
    m0, m1 = _copies(unpacked, name, tmp_path / "m")
    array = Array.assemble([m0], run=True, bitmap_threads=False)
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-1-assembled")
    need = chunks_in(array, LLState.NEED_SYNC)
    array.re_add(m1)
    (stats,) = sync_until_idle(array)
    assert stats.kind == "recovery" and stats.completed
    assert stats.bytes_written == {m1: len(need) * llbitmap(array).chunksize * 512}
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-2-after-recovery")
    assert chunks_in(array, LLState.DIRTY) == need
    llbitmap(array).daemon_work(now=FAR)
    assert array.bitmap.bits_view() == _kernel_bits(name, "live-3-settled")
    array.stop()
    with Array.assemble([m0, m1], bitmap_threads=False) as again:
        assert _runs(again) == _kernel_runs_after_stop(name, 1)
        assert again.read(0, again.array_sectors) == BY_NAME[name].expected_content()
