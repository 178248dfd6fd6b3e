"""Engine bugs the torture runs and the fuzzers found, each as the smallest reproduction.

Every one of them is fixed in the engine and stays here as a regression test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llraid.array import Array, RdevState
from llraid.bitmap.base import SyncKind
from llraid.bitmap.lockless import LocklessBitmap
from llraid.device import SECTOR
from llraid.errors import DirtyDegradedError, LlraidError
from llraid.format.superblock import Feature
from llraid.member import open_member
from llraid.raid.parity import Raid5Runtime
from llraid.sync import run_sync, sync_until_idle
from llraid.torture.simdev import CutPlan, Fault, Layout, SimWorld
from tests.torture.helpers import blank, new_array, pattern, poke, rewrite_sb


def assemble(paths: list[str], world: SimWorld | None = None, *, run: bool = False) -> Array:
    return Array.assemble(paths, run=run, bitmap_threads=False, opener=world.opener if world else None)


def mismatches_after_sync(paths: list[str]) -> int:
    with assemble(paths, run=True) as a:
        sync_until_idle(a)
        return run_sync(a, SyncKind.CHECK).mismatches


def test_cut_inside_add_spare_never_makes_the_new_member_in_sync(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): add_spare: a cut after the first superblock of the update that
    gives the new member its slot leaves the member in sync according to the freshest superblock (its
    own, older one says spare, without RECOVERY_OFFSET): an empty member serves reads."""
    paths = new_array(tmp_path, level=1, disks=2, bitmap="none")
    world = SimWorld(0, survive=1.0, layout=Layout.of(paths[0]))
    a = assemble(paths, world)
    a.write(0, pattern(7, 128), fua=True)
    a.fail(0)
    a.remove(0)
    spare = blank(tmp_path / "spare.img")
    # superblock write 1: the spare's own first superblock (durable); 2: the next update, on m1
    world.plan = CutPlan("sb", world.by_kind["sb"] + 2)
    with pytest.raises(LlraidError):
        a.add_spare(spare)
    a.crash()
    with assemble([paths[1], spare], run=True) as b:
        new = next(d for d in b.rdevs if d.path == spare)
        assert new.state is not RdevState.IN_SYNC, "an empty member was assembled as in sync"


def test_cut_while_marking_clean_leaves_no_differing_copies(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): try_mark_clean/update_sb write the clean superblock member by
    member, each after only that member's flush: a cut in between leaves the freshest superblock clean
    beside a member whose acknowledged, unflushed writes were lost; no resync runs and the copies
    differ."""
    paths = new_array(tmp_path, level=1, disks=2, bitmap="none")
    world = SimWorld(0, survive=0.0)  # every unflushed write is lost at the cut
    a = assemble(paths, world)
    a.write(0, pattern(1, 8))
    a.flush()
    a.write(0, pattern(2, 8))  # acknowledged, not flushed
    a.safe_mode_delay = 0.0
    # superblock writes of the clean update: m0 (then m0 is flushed), m1 <- cut
    world.plan = CutPlan("sb", world.by_kind["sb"] + 2)
    with pytest.raises(LlraidError):
        a.try_mark_clean()
    a.crash()
    assert mismatches_after_sync(paths) == 0


def test_lazily_written_clean_state_never_covers_lost_writes(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): llbitmap writes a Dirty->Clean state (lazily, with the next
    block write) member by member, each after only that member's flush: a cut in between leaves a Clean
    chunk on the member the bitmap is read from while another member lost writes to it; it is never
    resynced."""
    paths = new_array(tmp_path, level=1, disks=2, bitmap="lockless")
    world = SimWorld(0, survive=0.0)
    a = assemble(paths, world)
    a.write(0, pattern(1, 8))
    a.flush()
    a.write(0, pattern(2, 8))  # chunk 0 is Dirty already: no bitmap IO, not flushed
    bm = a.bitmap
    assert isinstance(bm, LocklessBitmap)
    bm.daemon_work(now=1e12)  # chunk 0 becomes Clean in memory (written lazily)
    # chunk 5's first write writes the block holding chunk 0's byte: m0 (then m0 is flushed), m1 <- cut
    world.plan = CutPlan("bitmap", world.by_kind["bitmap"] + 2)
    with pytest.raises(LlraidError):
        a.write(5 * bm.chunksize, pattern(3, 8))
    a.crash()
    assert mismatches_after_sync(paths) == 0


def test_recovery_does_not_consume_the_resync_of_an_unclean_shutdown(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): recovery (llbitmap) turns the NeedSync chunks it visits into
    Syncing and then Dirty, so the resync that must follow the unclean shutdown skips them, although
    recovery rebuilt only the recovering member's copy: the in-sync copies keep differing."""
    paths = new_array(tmp_path, level=1, disks=3, bitmap="lockless")
    a = assemble(paths)
    a.write(0, pattern(1, 128))
    a.flush()
    a.crash()  # unclean: chunk 0 is Dirty on disk
    poke(paths[2], 0, pattern(9, 1))  # m2 lost a write the others got
    spare = blank(tmp_path / "spare.img")
    with assemble(paths[1:], run=True) as b:  # m0 is gone for good
        b.add_spare(spare)
    assert mismatches_after_sync([*paths[1:], spare]) == 0


def test_a_sector_reads_the_same_whatever_the_request_size(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): raid10 reads check a whole piece against a recovering member's
    recovery_offset, resync windows are 128 sectors: while copies differ after a crash, one sector
    reads back differently depending on the request size, and resync keeps the copy the large read did
    not return."""
    paths = new_array(tmp_path, level=10, disks=4, layout="n2", bitmap="none", chunk=1024)
    with assemble(paths) as a:
        a.write(0, pattern(1, 1024))
    poke(paths[0], 0, pattern(2, 1))  # copies of array sector 0 differ (m0: role 0)
    for p in paths:
        rewrite_sb(p, resync_offset=0)  # unclean shutdown: resync pending
    m0 = paths[0]
    rewrite_sb(m0, feature_map=int(Feature.RECOVERY_OFFSET), recovery_offset=512)
    with assemble(paths) as b:
        small = b.read(0, 1)
        large = b.read(0, 1024)[:512]
        assert small == large


def _set_sectors_reserved(path: str, value: int) -> None:
    m = open_member(path)
    at = m.bitmap_sector * SECTOR
    assert m.bitmap_sb is not None
    new = dataclasses.replace(m.bitmap_sb, sectors_reserved=value)
    m.device.close()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new.build())


def test_bitmap_room_larger_than_the_metadata_area_never_overwrites_data(tmp_path: Path) -> None:
    paths = new_array(tmp_path, level=1, disks=2, bitmap="lockless")
    with assemble(paths) as a:
        a.write(0, pattern(7, 64))
    for p in paths:
        _set_sectors_reserved(p, 4096)  # 2 MiB from sector 16; the data starts at 1 MiB
    try:
        with assemble(paths):
            pass
    except LlraidError:
        return  # refused: fine
    with assemble(paths) as b:
        assert b.read(0, 64) == pattern(7, 64), "the stop wrote the bitmap over the data"


def test_absurd_bitmap_room_is_refused_with_an_llraid_error(tmp_path: Path) -> None:
    paths = new_array(tmp_path, level=1, disks=2, bitmap="lockless")
    for p in paths:
        _set_sectors_reserved(p, 0xFFFF_FFFF)
    with pytest.raises(LlraidError):
        assemble(paths).stop()


def test_cut_at_the_end_of_a_resync_leaves_no_differing_copies(tmp_path: Path) -> None:
    paths = new_array(tmp_path, level=1, disks=2, bitmap="none")
    with assemble(paths) as a:
        a.write(0, pattern(1, 128))
    poke(paths[1], 0, pattern(2, 1))  # copies differ ...
    for p in paths:
        rewrite_sb(p, resync_offset=0)  # ... after an unclean shutdown
    world = SimWorld(0, survive=0.0)
    b = assemble(paths, world)
    # superblock writes of the final update: m0 (then m0 is flushed), m1 <- cut
    world.plan = CutPlan("sb", world.by_kind["sb"] + 2)
    with pytest.raises(LlraidError):
        run_sync(b, SyncKind.RESYNC)
    b.crash()
    assert mismatches_after_sync(paths) == 0


def test_recovery_checkpoint_never_gets_ahead_of_the_recovered_data(tmp_path: Path) -> None:
    paths = new_array(tmp_path, level=1, disks=2, bitmap="none")
    spare = blank(tmp_path / "spare.img")
    world = SimWorld(0, survive_by_region={"sb": 1.0, "data": 0.0}, layout=Layout.of(paths[0]))
    a = assemble(paths, world)
    a.write(0, pattern(1, 256), fua=True)
    a.safe_mode_delay = 0.0
    assert a.try_mark_clean()
    a.fail(1)
    a.remove(1)
    a.add_spare(spare)
    # first recovery checkpoint: m0's superblock, m0's flush, the spare's superblock, its flush <- cut
    world.plan = CutPlan("sync", world.by_kind["sync"] + 2)
    with pytest.raises(LlraidError):
        run_sync(a, SyncKind.RECOVERY, checkpoint_seconds=0.0)
    a.crash()
    assert mismatches_after_sync([paths[0], spare]) == 0


def test_two_interrupted_superblock_updates_still_assemble(tmp_path: Path) -> None:
    paths = new_array(tmp_path, level=10, disks=4, layout="n2", bitmap="none", chunk=128)
    w1 = SimWorld(0, survive=0.0)
    a = assemble(paths, w1)
    a.write(0, pattern(1, 8))
    a.safe_mode_delay = 0.0
    w1.plan = CutPlan("sb", w1.by_kind["sb"] + 2)  # clean update: m0 gets it, m1 is the cut
    with pytest.raises(LlraidError):
        a.try_mark_clean()
    a.crash()
    w2 = SimWorld(1, survive=0.0)
    b = assemble(paths, w2)  # m0 one event ahead of the others: accepted
    w2.plan = CutPlan("sb", w2.by_kind["sb"] + 3)  # dirty update: m0, m1 get it, m2 is the cut
    with pytest.raises(LlraidError):
        b.write(0, pattern(2, 8))
    b.crash()
    with assemble(paths) as c:
        assert c.read(0, 8) in (pattern(1, 8), pattern(2, 8))


def test_a_read_error_while_updating_parity_fails_the_member_not_the_write(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): a raid5 write that had to read a member for its parity
    (reconstruct-write here) failed that member and then failed the whole write ("retry the
    write"), although the array could still take it degraded, as md's second pass over the
    stripe does."""
    paths = new_array(tmp_path, level=5, disks=3, bitmap="none", chunk=16)
    lay = Layout.of(paths[0])
    world = SimWorld(0, survive=1.0, layout=lay)
    a = assemble(paths, world)
    a.write(0, pattern(1, 32), fua=True)  # stripe row 0: both data blocks
    pers = a.personality
    assert isinstance(pers, Raid5Runtime)
    other, _, ms = pers.geo.compute_sector(16)  # the block a write of sectors 0..7 reads
    victim = a.by_role(other)
    assert victim is not None
    lo = lay.data_start + ms * SECTOR
    world.add_fault(victim.path, Fault("read", lo, lo + 16 * SECTOR))
    a.write(0, pattern(2, 8))
    assert victim.state is RdevState.FAULTY
    assert a.read(0, 32) == pattern(2, 8) + pattern(1, 24)
    a.stop()


def test_a_dirty_raid5_with_a_member_still_recovering_is_not_started(tmp_path: Path) -> None:
    """Found by the torture runs (fixed): a raid5 that crashed while a member was being recovered was
    started without --force, because the member had a slot; above its recovery offset its blocks can
    only be rebuilt from parity, and a write torn by the crash leaves that parity stale (the write
    hole), so recovery rebuilt garbage. md counts such a member as missing: "cannot start dirty
    degraded array"."""
    paths = new_array(tmp_path, level=5, disks=3, bitmap="lockless", chunk=16)
    a = assemble(paths)
    a.write(0, pattern(1, 64), fua=True)
    a.fail(2)
    a.remove(2)
    a.write(0, pattern(2, 64), fua=True)  # degraded: role 2 must catch up
    a.re_add(paths[2])
    a.crash()  # unclean, before the recovery ran
    with pytest.raises(DirtyDegradedError):
        assemble(paths, run=True)
    with Array.assemble(paths, run=True, force=True, bitmap_threads=False) as b:
        assert b.read(0, 64) == pattern(2, 64)
        sync_until_idle(b)
        assert run_sync(b, SyncKind.CHECK).mismatches == 0
