"""Randomised torture runs: power cuts, member faults, then proof that nothing is lost.

Each configuration (raid1, raid10 n2/f2/o2 x no bitmap / classic / llbitmap) gets a few seeded
runs of each mode. A run fails on any acknowledged-and-flushed (or FUA) write that does not read
back, any garbage, any read that changes when resync runs, copies that still differ after
resync/recovery (direct comparison and ``check``), an llbitmap chunk Clean on disk while its copies
differ, a resync outside the chunks llbitmap marked, or any unexpected engine error.

The harness is also shown to have teeth: with flushes that do nothing, or with resync switched
off, the same runs report lost data and differing copies.
"""

from __future__ import annotations

import pytest

import llraid.sync
import llraid.torture.runner as runner
from llraid.array import Array
from llraid.errors import LlraidError
from llraid.torture import BITMAPS, LEVELS, Config, format_report, run_one, run_torture

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
        run_torture(1, 1, levels=["raid5"])
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
