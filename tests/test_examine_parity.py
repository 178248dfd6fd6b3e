"""``llraid examine`` / ``examine-bitmap`` of the parity fixtures against what mdadm 4.6 printed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.examine import examine_facts
from llraid.member import open_member
from llraid.raid.layout import RAID6_LAYOUT_NAMES
from tests.conftest import PARITY, PARITY_BY_NAME
from tests.test_examine import HOMEHOST, facts, mdadm_output, run

MEMBERS = [(f.name, i) for f in PARITY for i in range(len(f.members))]


@pytest.mark.parametrize(("name", "index"), MEMBERS)
def test_examine_matches_mdadm_line_for_line(
    name: str, index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = unpacked(name)[index]
    expected, status = mdadm_output(PARITY_BY_NAME[name].examine_file(index))
    assert status == 0
    rc, out, err = run(capsys, "examine", "--homehost", HOMEHOST, str(path))
    assert rc == 0 and err == ""
    assert out.splitlines()[1:] == expected[1:]


@pytest.mark.parametrize("index", range(5))
def test_examine_bitmap_classic_raid6(
    index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = PARITY_BY_NAME["j2-raid6-internal-bitmap"]
    path = unpacked(fx.name)[index]
    expected, status = mdadm_output(fx.examine_file(index, "examine_bitmap"))
    rc, out, _ = run(capsys, "examine-bitmap", str(path))
    assert (rc, status) == (0, 0)
    assert out.splitlines()[1:] == expected[1:]


@pytest.mark.parametrize(
    ("name", "index"), [(n, i) for n, i in MEMBERS if PARITY_BY_NAME[n].entry["bitmap"] == "llbitmap"]
)
def test_examine_bitmap_llbitmap_counts(
    name: str, index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """raid5/6 llbitmaps cover member sectors; the state counts equal the kernel-side decoder's
    (k: 992 Dirty after the crash; l: the 16 NeedSync chunks phase 2 wrote while degraded)."""
    fx = PARITY_BY_NAME[name]
    rc, out, _ = run(capsys, "examine-bitmap", str(unpacked(name)[index]))
    assert rc == 0
    mine = facts(out.splitlines())
    m = fx.members[index]
    assert mine["Events"] == str(m["bitmap_events"])
    assert mine["Sync Size"].startswith(str(fx.entry["bitmap_on_disk"]["sync_size_sectors"] // 2))
    counts = dict(ln.rsplit(" ", 1) for ln in out.split("\n\n", 1)[1].splitlines())
    titles = {"unwritten": "Unwritten", "clean": "Clean", "dirty": "Dirty", "need sync": "NeedSync"}
    assert {titles[k]: int(v) for k, v in counts.items() if int(v)} == m["bitmap_state_counts"]


@pytest.mark.parametrize("layout", sorted(RAID6_LAYOUT_NAMES))
def test_raid6_layout_names_are_mdadms_r6layout(layout: int, unpacked: Callable[[str], list[Path]]) -> None:
    # Only left-symmetric has a kernel image; the other names follow mdadm's r6layout table
    # (so layout 16 prints "left-asymmetric-6", which the raid5 table does not have).
    member = open_member(str(unpacked("j1-raid6-llbitmap")[0]))
    try:
        sb = dataclasses.replace(member.sb, layout=layout)
        shown = dict(f for f in examine_facts(dataclasses.replace(member, sb=sb)) if f is not None)
        assert shown["Layout"] == RAID6_LAYOUT_NAMES[layout]
        sb = dataclasses.replace(member.sb, layout=6)
        shown = dict(f for f in examine_facts(dataclasses.replace(member, sb=sb)) if f is not None)
        assert shown["Layout"] == "-unknown-"
    finally:
        member.device.close()
