"""The simulated member device: what a power cut keeps, what faults do.

These are the rules the torture runs rely on: an unflushed write may be lost, a flushed or
FUA write never is, each unflushed write is decided on its own (so a later one can survive
an earlier one's loss), an older cached write never lands over a newer durable one, a cut at
op N stops every device of the world at op N, and faults hit only what they name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llraid.device import SECTOR
from llraid.errors import DeviceError, LlraidError
from llraid.torture.simdev import CutPlan, Fault, InjectedError, Layout, PowerCutError, SimDevice, SimWorld

SIZE = 64 * SECTOR


def blank(tmp_path: Path, name: str = "d.img", size: int = SIZE) -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def on_disk(path: str, sector: int, count: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(count * SECTOR)


def fill(byte: int, count: int = 1) -> bytes:
    return bytes([byte]) * (SECTOR * count)


def device(world: SimWorld, path: str) -> SimDevice:
    d = world.opener(path, True)
    assert isinstance(d, SimDevice)
    return d


def test_reads_see_every_write_before_any_flush(tmp_path: Path) -> None:
    path = blank(tmp_path)
    d = device(SimWorld(1), path)
    d.pwrite(0, fill(1, 2))
    d.pwrite(SECTOR, fill(2))
    assert d.pread(0, 2 * SECTOR) == fill(1) + fill(2)
    assert d.fd >= 0 and d.sectors == 64


@pytest.mark.parametrize("survive, expect", [(0.0, 0), (1.0, 7)])
def test_unflushed_writes_are_lost_or_kept_at_a_cut(tmp_path: Path, survive: float, expect: int) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=survive)
    d = device(w, path)
    d.pwrite(3 * SECTOR, fill(7))
    report = w.power_off()
    assert on_disk(path, 3) == fill(expect)
    assert (report.pending, report.survived) == (1, 1 if survive else 0)


def test_flushed_and_fua_writes_always_survive(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=0.0)
    d = device(w, path)
    d.pwrite(0, fill(1))
    d.sync()
    d.pwrite(SECTOR, fill(2), dsync=True)  # FUA: this write only
    d.pwrite(2 * SECTOR, fill(3))  # cached
    w.power_off()
    assert on_disk(path, 0, 3) == fill(1) + fill(2) + fill(0)


def test_fua_makes_only_itself_durable(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=0.0)
    d = device(w, path)
    d.pwrite(0, fill(1))
    d.pwrite(SECTOR, fill(2), dsync=True)
    w.power_off()
    assert on_disk(path, 0, 2) == fill(0) + fill(2)


def test_an_older_cached_write_never_lands_over_a_newer_durable_one(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=1.0)
    d = device(w, path)
    d.pwrite(0, fill(1))  # cached
    d.pwrite(0, fill(2), dsync=True)  # newer, durable
    w.power_off()
    assert on_disk(path, 0) == fill(2)


def test_each_unflushed_write_is_decided_on_its_own(tmp_path: Path) -> None:
    """Over many seeds: a later write survives while an earlier one is lost, and the reverse."""
    outcomes = set()
    for seed in range(40):
        path = blank(tmp_path, f"d{seed}.img")
        w = SimWorld(seed, survive=0.5)
        d = device(w, path)
        d.pwrite(0, fill(1))
        d.pwrite(SECTOR, fill(2))
        w.power_off()
        outcomes.add((on_disk(path, 0) == fill(1), on_disk(path, 1) == fill(2)))
    assert outcomes == {(False, False), (False, True), (True, False), (True, True)}


def test_same_sector_keeps_order_newest_surviving_write_wins(tmp_path: Path) -> None:
    seen = set()
    for seed in range(40):
        path = blank(tmp_path, f"d{seed}.img")
        w = SimWorld(seed, survive=0.5)
        d = device(w, path)
        for b in (1, 2, 3):
            d.pwrite(0, fill(b))
        w.power_off()
        seen.add(on_disk(path, 0)[0])
    assert seen == {0, 1, 2, 3}  # any prefix-free choice, but always one whole version


def test_torn_multi_sector_write_keeps_whole_sectors(tmp_path: Path) -> None:
    mixed = False
    for seed in range(30):
        path = blank(tmp_path, f"d{seed}.img")
        w = SimWorld(seed, survive=1.0, tear=1.0)
        d = device(w, path)
        d.pwrite(0, fill(9, 8))
        w.power_off()
        got = on_disk(path, 0, 8)
        sectors = {got[i * SECTOR : (i + 1) * SECTOR] for i in range(8)}
        assert sectors <= {fill(9), fill(0)}
        mixed |= len(sectors) == 2
    assert mixed


def test_unaligned_write_is_a_read_modify_write_of_whole_sectors(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=1.0)
    d = device(w, path)
    d.pwrite(0, fill(5), dsync=True)
    d.pwrite(100, b"x" * 10)
    assert d.pread(100, 10) == b"x" * 10
    w.power_off()
    assert on_disk(path, 0)[100:110] == b"x" * 10 and on_disk(path, 0)[:100] == fill(5)[:100]


def test_cut_at_op_n_stops_every_device(tmp_path: Path) -> None:
    a, b = blank(tmp_path, "a.img"), blank(tmp_path, "b.img")
    w = SimWorld(1, cut=CutPlan("any", 3), survive=0.0)
    da, db = device(w, a), device(w, b)
    da.pwrite(0, fill(1))
    da.sync()  # op 2: durable
    with pytest.raises(PowerCutError):
        db.pwrite(0, fill(2))  # op 3: the cut (the write itself may or may not land)
    assert w.dead and w.cut_report is not None and w.cut_report.op == 3
    for dev in (da, db):
        with pytest.raises(DeviceError):
            dev.pread(0, SECTOR)
        with pytest.raises(LlraidError):
            dev.sync()
    assert on_disk(a, 0) == fill(1) and on_disk(b, 0) == fill(0)


def test_cut_at_the_nth_op_of_a_kind(tmp_path: Path) -> None:
    path = blank(tmp_path, size=128 * SECTOR)
    lay = Layout(sb_start=8 * SECTOR, sb_end=16 * SECTOR, bitmap_start=16 * SECTOR, data_start=64 * SECTOR)
    w = SimWorld(1, layout=lay, cut=CutPlan("sb", 2), survive=1.0)
    d = device(w, path)
    d.pwrite(64 * SECTOR, fill(1))  # data
    d.pwrite(8 * SECTOR, fill(2))  # sb 1
    d.pwrite(16 * SECTOR, fill(3))  # bitmap
    with pytest.raises(PowerCutError):
        d.pwrite(8 * SECTOR, fill(4))  # sb 2
    assert w.cut_report is not None and w.cut_report.kind == "sb"
    assert w.by_kind == {"any": 4, "sb": 2, "bitmap": 1, "data": 1, "sync": 0}
    assert on_disk(path, 8) == fill(4)  # survive=1.0: even the write at the cut landed


def test_cut_during_a_flush(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, cut=CutPlan("sync", 1), survive=0.0)
    d = device(w, path)
    d.pwrite(0, fill(1))
    with pytest.raises(PowerCutError):
        d.sync()
    assert on_disk(path, 0) == fill(0)  # the flush did not complete


def test_volatile_state_belongs_to_the_path_not_the_handle(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1, survive=0.0)
    d = device(w, path)
    d.pwrite(0, fill(1))
    d.close()  # closing does not flush
    again = device(w, path)
    assert again.pread(0, SECTOR) == fill(1)
    w.power_off()
    assert on_disk(path, 0) == fill(0)


def test_faults_hit_only_their_range_kind_and_count(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1)
    d = device(w, path)
    w.add_fault(path, Fault("read", 4 * SECTOR, 8 * SECTOR, hits=2))
    d.pread(0, 4 * SECTOR)
    d.pwrite(4 * SECTOR, fill(1))
    for _ in range(2):
        with pytest.raises(InjectedError):
            d.pread(7 * SECTOR, SECTOR)
    assert d.pread(7 * SECTOR, SECTOR) == fill(0)  # two hits, then it is gone
    w.add_fault(path, Fault("write", 0, SECTOR))
    with pytest.raises(InjectedError):
        d.pwrite(0, fill(1))
    d.pwrite(SECTOR, fill(1))
    w.add_fault(path, Fault("sync"))
    with pytest.raises(InjectedError):
        d.sync()
    w.clear_faults(path)
    d.sync()


def test_vanish_after_some_ops_and_slow_io(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1)
    d = device(w, path)
    w.add_fault(path, Fault("vanish"), in_ops=2)
    d.pread(0, SECTOR)
    d.pwrite(0, fill(1))
    with pytest.raises(InjectedError):
        d.pread(0, SECTOR)
    w.clear_faults()
    w.add_fault(path, Fault("slow", delay=0.001, hits=3))
    for _ in range(4):
        d.pread(0, SECTOR)
    assert w.states[path].faults[0].fired == 3


def test_logging_records_ops(tmp_path: Path) -> None:
    path = blank(tmp_path)
    w = SimWorld(1)
    d = device(w, path)
    w.set_logging(True)
    d.pwrite(SECTOR, fill(1))
    d.pread(0, SECTOR)
    d.sync()
    assert w.states[path].log == [("write", SECTOR, SECTOR), ("read", 0, SECTOR), ("sync", 0, 0)]
    w.set_logging(False)
    assert w.states[path].log is None
