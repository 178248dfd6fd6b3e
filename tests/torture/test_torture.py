"""Randomised torture runs: power cuts, member faults, then proof that nothing is lost.

Each configuration (raid1, raid10 n2/f2/o2, raid5 on 3 and 4 members, raid4 x no bitmap /
classic / llbitmap) gets a few seeded runs of each mode. A run fails on any
acknowledged-and-flushed (or FUA) write that does not read back, any garbage, any read that
changes when resync runs, copies that still differ (raid4/5: parity that is still inconsistent)
after resync/recovery (direct comparison and ``check``), an llbitmap chunk Clean on disk while its
copies differ or its parity is inconsistent, a resync outside the chunks llbitmap marked, or any
unexpected engine error.

The harness is also shown to have teeth: with flushes that do nothing, with resync switched off,
with raid5 parity never updated or with llbitmap's state written after the data, the same runs
report lost data, differing copies, inconsistent parity and bitmap states that lie.
"""

from __future__ import annotations

import pytest

import llraid.sync
import llraid.torture.runner as runner
from llraid.array import Array
from llraid.bitmap.lockless import LocklessBitmap
from llraid.errors import LlraidError
from llraid.raid.base import ArrayIO
from llraid.raid.parity import Block, Raid5Runtime
from llraid.torture import BITMAPS, LEVELS, Config, Oracle, format_report, run_one, run_torture

CONFIGS = [Config(lv, bm) for lv in LEVELS for bm in BITMAPS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_power_cuts(cfg: Config) -> None:
    for seed in range(6):
        r = run_one(1000 + seed, cfg, mode="cut")
        assert r.ok, r.summary()
        assert r.verdict.sectors == r.verdict.verified + (r.verdict.sectors - r.verdict.required)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_member_faults(cfg: Config) -> None:
    for seed in range(3):
        r = run_one(2000 + seed, cfg, mode="fault")
        assert r.ok, r.summary()


def test_report_covers_every_kind_of_cut_phase_and_fault() -> None:
    report = run_torture(60, 7)
    assert report.ok, format_report(report)
    d = report.as_dict()
    for key in ("runs", "cuts", "faults", "bytes_verified", "bytes_lost", "mismatches"):
        assert key in d
    assert d["runs"] == 60 and d["bytes_lost"] == 0 and d["mismatches"] == 0
    assert d["bytes_verified"] > 0 and d["cuts"] >= 60
    assert {"sb", "bitmap", "data", "sync", "end"} <= set(d["cut_kinds"])
    assert {"workload", "resync", "recovery", "flush", "mark-clean"} <= set(d["cut_phases"])
    assert len(set(runner.FAULT_KINDS) & set(d["fault_kinds"])) >= 5
    assert d["unflushed_writes_lost"] > 0  # the cuts did throw cached writes away
    assert len(d["by_config"]) == len(CONFIGS)
    text = format_report(report)
    assert "OK: nothing lost" in text and "60 runs" in text


def test_runs_are_reproducible_from_their_seed() -> None:
    cfg = Config("raid10f2", "lockless")
    a, b = run_one(31337, cfg), run_one(31337, cfg)
    assert a.summary() == b.summary()
    assert [(c.op, c.kind, c.phase, c.pending, c.survived) for c in a.cuts] == [
        (c.op, c.kind, c.phase, c.pending, c.survived) for c in b.cuts
    ]


def test_unknown_level_or_bitmap_is_refused() -> None:
    with pytest.raises(LlraidError):
        run_torture(1, 1, levels=["raid6"])
    with pytest.raises(LlraidError):
        run_torture(1, 1, bitmaps=["bogus"])


def test_flushes_that_do_nothing_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Array, "flush", lambda self: None)
    report = run_torture(24, 3, mode="cut")
    assert report.bytes_lost > 0, format_report(report)


def test_a_missing_resync_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "needed_sync", lambda array: None)
    monkeypatch.setattr(llraid.sync, "needed_sync", lambda array: None)
    report = run_torture(24, 5, mode="cut", levels=["raid1"], bitmaps=["none"])
    assert report.mismatches > 0 or report.unstable_sectors > 0, format_report(report)


@pytest.mark.slow
def test_many_runs() -> None:
    report = run_torture(240, 99)
    assert report.ok, format_report(report)
    assert report.cuts >= 300


def test_a_missing_parity_resync_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "needed_sync", lambda array: None)
    monkeypatch.setattr(llraid.sync, "needed_sync", lambda array: None)
    report = run_torture(12, 5, mode="cut", levels=["raid5"], bitmaps=["none"])
    assert report.mismatches > 0 and report.check_mismatches > 0, format_report(report)


def _parity_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deliberately broken engine: raid4/5 writes data, and never the parity."""
    write = Raid5Runtime._write

    def data_only(self: Raid5Runtime, io: ArrayIO, role: int, ms: int, block: Block, fua: bool) -> None:
        if role != self.row(ms >> self.geo.chunk_shift).parity:
            write(self, io, role, ms, block, fua)

    monkeypatch.setattr(Raid5Runtime, "_write", data_only)


def test_parity_that_is_never_updated_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    _parity_never_written(monkeypatch)
    cut = run_torture(9, 3, mode="cut", levels=["raid5"])
    assert cut.mismatches > 0 and cut.check_mismatches > 0, format_report(cut)
    # a failed member's blocks are rebuilt from the stale parity: flushed data reads back wrong
    fault = run_torture(9, 3, mode="fault", levels=["raid5"])
    assert fault.bytes_lost > 0 and fault.bytes_garbage > 0, format_report(fault)


def test_llbitmap_state_written_after_the_data_is_caught_for_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """(c) for raid4/5: without the bitmap made durable before the member writes, a cut leaves
    chunks Clean or Unwritten on disk over data whose parity a torn write made inconsistent."""
    monkeypatch.setattr(LocklessBitmap, "unplug", lambda self: None)
    report = run_torture(12, 3, mode="cut", levels=["raid5", "raid4"], bitmaps=["lockless"])
    assert report.clean_while_differing > 0, format_report(report)


def test_the_write_hole_excuses_only_its_sectors_until_a_durable_rewrite() -> None:
    o = Oracle(64, 1)
    w, _ = o.new_write(0, 16)
    o.acknowledged(w, fua=True)
    o.power_cut()
    o.excuse(0, 8)  # a forced dirty degraded start: sectors 0..7 could only be rebuilt from parity
    junk = bytes([0xAB]) * (16 * 512)
    v = o.check(0, junk, live=False)
    assert (v.excused, v.excused_wrong) == (8, 8)
    assert (v.required, v.lost, v.garbage) == (8, 8, 8)  # sectors 8..15 are checked as always
    w2, _ = o.new_write(0, 4)
    o.acknowledged(w2, fua=True)  # durable again: checked again
    v = o.check(0, junk, live=False)
    assert (v.excused, v.required, v.lost) == (4, 12, 12)
