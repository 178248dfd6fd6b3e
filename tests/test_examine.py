"""``llraid examine`` / ``examine-bitmap`` against what mdadm 4.6 printed for the same images."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.cli import main
from tests.conftest import BY_NAME, MEMBERS

HOMEHOST = "mdvm"  # the fixture VM's host name, so "(local to host mdvm)" appears as there


def mdadm_output(path: Path) -> tuple[list[str], int]:
    """mdadm's lines without the harness' '#' lines, and its exit status."""
    text = path.read_text()
    status = int(re.search(r"^# exit status (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return [ln for ln in text.splitlines() if not ln.startswith("# ")], status


def facts(lines: list[str]) -> dict[str, str]:
    out = {}
    for ln in lines:
        if " : " in ln:
            key, value = ln.split(" : ", 1)
            out[key.strip()] = value
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize(("name", "index"), MEMBERS)
def test_examine_matches_mdadm_line_for_line(
    name: str, index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = unpacked(name)[index]
    expected, status = mdadm_output(BY_NAME[name].examine_file(index))
    assert status == 0
    rc, out, err = run(capsys, "examine", "--homehost", HOMEHOST, str(path))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}:" and expected[0].endswith(":")
    assert lines[1:] == expected[1:]


@pytest.mark.parametrize(("name", "index"), MEMBERS)
def test_examine_json_has_the_same_facts(
    name: str, index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    expected, _ = mdadm_output(BY_NAME[name].examine_file(index))
    rc, out, _ = run(capsys, "examine", "--json", "--homehost", HOMEHOST, str(unpacked(name)[index]))
    assert rc == 0
    (doc,) = json.loads(out)
    assert doc["facts"] == facts(expected[1:])
    m = BY_NAME[name].members[index]
    assert doc["superblock"]["events"] == m["events"] and doc["superblock"]["role"] == m["role"]


@pytest.mark.parametrize("index", range(4))
def test_examine_bitmap_classic_matches_mdadm(
    index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = BY_NAME["c-raid10n2-internal-bitmap"]
    path = unpacked(fx.name)[index]
    expected, status = mdadm_output(fx.examine_file(index, "examine_bitmap"))
    rc, out, _ = run(capsys, "examine-bitmap", str(path))
    assert (rc, status) == (0, 0)
    mine = out.splitlines()
    assert mine[0] == f"        Filename : {path}"
    assert mine[1:] == expected[1:]


def test_examine_bitmap_no_bitmap_is_an_error(
    unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = BY_NAME["d-raid10n2-no-bitmap"]
    path = unpacked(fx.name)[0]
    expected, status = mdadm_output(fx.examine_file(0, "examine_bitmap"))
    rc, out, err = run(capsys, "examine-bitmap", str(path))
    assert status == 1 and rc == 1 and out == ""
    assert expected == ["mdadm: /dev/vda doesn't have bitmap"]
    assert err == f"llraid: {path} doesn't have bitmap\n"


LLBITMAP_MEMBERS = [(n, i) for n, i in MEMBERS if BY_NAME[n].entry["bitmap"] == "llbitmap"]


@pytest.mark.parametrize(("name", "index"), LLBITMAP_MEMBERS)
def test_examine_bitmap_llbitmap(
    name: str, index: int, unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = BY_NAME[name]
    path = unpacked(name)[index]
    rc, out, _ = run(capsys, "examine-bitmap", str(path))
    assert rc == 0
    # What mdadm 4.6 could print before giving up on version 6 agrees.
    mdadm_lines, status = mdadm_output(fx.examine_file(index, "examine_bitmap"))
    assert status == 1
    mdadm_facts = facts(mdadm_lines)
    mine = facts(out.splitlines())
    assert mine["Magic"] == mdadm_facts["Magic"] and mine["Version"] == mdadm_facts["Version"] == "6"
    assert mine["UUID"] == fx.entry["array_uuid"]
    m = fx.members[index]
    assert mine["Events"] == str(m["bitmap_events"])
    # The per-state counts, in the kernel's sysfs wording, equal the kernel-side decoder's.
    counts = dict(ln.rsplit(" ", 1) for ln in out.split("\n\n", 1)[1].splitlines())
    titles = {"unwritten": "Unwritten", "clean": "Clean", "dirty": "Dirty", "need sync": "NeedSync"}
    expected = {titles[k]: int(v) for k, v in counts.items() if int(v)}
    assert expected == m["bitmap_state_counts"]
    assert len(counts) == 8

    rc, out, _ = run(capsys, "examine-bitmap", "--json", str(path))
    (doc,) = json.loads(out)
    assert doc["kind"] == "llbitmap" and doc["chunks"] == fx.entry["bitmap_on_disk"]["chunks"]
    assert {titles[k]: v for k, v in doc["bits"].items() if v} == m["bitmap_state_counts"]


def test_examine_bitmap_crash_fixture_equals_kernel_bits(
    unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = BY_NAME["e-raid1-llbitmap-crash"]
    rc, out, _ = run(capsys, "examine-bitmap", str(unpacked(fx.name)[1]))
    assert rc == 0
    assert out.split("\n\n", 1)[1] == (fx.dir / "boot1/bits-before-crash.txt").read_text()
