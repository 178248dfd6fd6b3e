"""Read-only assembly (``llraid cat``) of every kernel-made fixture, whole and degraded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.assemble import assemble
from llraid.cli import main
from llraid.errors import AssemblyError
from llraid.fixtures import SECTOR, decode_sector
from llraid.member import open_member
from tests.conftest import ALL, BY_NAME

NAMES = [f.name for f in ALL]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_cat_whole_array_matches_kernel(
    name: str, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = BY_NAME[name]
    out = tmp_path / "array.bin"
    assert main(["cat", *map(str, unpacked(name)), "-o", str(out)]) == 0
    assert out.stat().st_size == fx.array_sectors * SECTOR
    assert sha256_file(out) == fx.entry["md_sha256"]
    data = out.read_bytes()
    # Independently of the hash: every written sector decodes to its own tag and number.
    last: dict[int, int] = {}
    for w in fx.writes:
        for s in range(w.start_sector, w.start_sector + w.sectors):
            last[s] = w.tag
    for s, tag in last.items():
        assert decode_sector(data[s * SECTOR : (s + 1) * SECTOR]) == (tag, s)
    assert (
        data.count(0)
        == len(data)
        - 512 * len(last)
        + sum(  # everything else reads as zeros
            data[s * SECTOR : (s + 1) * SECTOR].count(0) for s in last
        )
    )


@pytest.mark.parametrize(
    ("name", "missing"),
    [(f.name, i) for f in ALL for i in range(len(f.members)) if not f.entry.get("failed_member")],
)
def test_cat_with_one_member_missing(
    name: str, missing: int, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = BY_NAME[name]
    paths = [str(p) for i, p in enumerate(unpacked(name)) if i != missing]
    out = tmp_path / "array.bin"
    assert main(["cat", *paths, "-o", str(out)]) == 0
    assert sha256_file(out) == fx.entry["md_sha256"]


def test_stale_member_is_never_read(unpacked: Callable[[str], list[Path]]) -> None:
    fx = BY_NAME["f-raid1-llbitmap-degraded-stale-member"]
    m0, m1 = (open_member(str(p)) for p in unpacked(fx.name))
    try:
        asm = assemble([m1, m0])
        assert asm.stale == [m1] and set(asm.slots) == {0}
        phase2 = [w for w in fx.writes if w.tag & 0xFFFF == 2]
        assert phase2
        for w in phase2:
            start = w.start_sector * SECTOR
            got = asm.read_bytes(start, w.sectors * SECTOR)
            assert decode_sector(got[:SECTOR]) == (w.tag, w.start_sector)
            # The stale member really holds other data there, so reading it would be caught.
            stale = m1.device.pread((m1.sb.data_offset + w.start_sector) * SECTOR, SECTOR)
            assert decode_sector(stale) != (w.tag, w.start_sector)
    finally:
        m0.device.close()
        m1.device.close()


def test_only_the_stale_member_is_refused_when_told_so(unpacked: Callable[[str], list[Path]]) -> None:
    # Given alone, m1 records m0 as in sync with it (events 2), so nothing can tell it is stale:
    # mdadm would assemble it too. But with m0 present it must lose.
    m0, m1 = (open_member(str(p)) for p in unpacked("f-raid1-llbitmap-degraded-stale-member"))
    try:
        assert assemble([m0]).sb.events == 7
        assert assemble([m0, m1]).slots[0].member is m0
    finally:
        m0.device.close()
        m1.device.close()


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 1), (511, 2), (10001 * 512 + 7, 3001 * 512), (524288 - 5, 10), (0, 0)]
)
def test_cat_ranges_any_alignment(
    offset: int, length: int, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    for name in ("b-raid10n2-llbitmap", "g1-raid10f2-llbitmap", "h-raid5-llbitmap", "a-raid1-llbitmap"):
        fx = BY_NAME[name]
        expected = fx.expected_content()[offset : offset + length]
        out = tmp_path / f"{name}.bin"
        argv = [
            "cat",
            *map(str, unpacked(name)),
            "--offset",
            str(offset),
            "--length",
            str(length),
            "-o",
            str(out),
        ]
        assert main(argv) == 0
        assert out.read_bytes() == expected


def test_raid5_reads_missing_data_through_parity(unpacked: Callable[[str], list[Path]]) -> None:
    fx = BY_NAME["h-raid5-llbitmap"]
    members = [open_member(str(p)) for p in unpacked(fx.name)]
    try:
        asm = assemble(members[1:])
        assert asm.degraded and 0 not in asm.slots
        # Array sector 0 lives on role 0 (left-symmetric stripe 0), so it must be rebuilt.
        assert asm.read_bytes(0, 4 * SECTOR) == fx.expected_content()[: 4 * SECTOR]
    finally:
        for m in members:
            m.device.close()


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("b-raid10n2-llbitmap", [2, 3]),  # both copies of chunk 0 (roles 0 and 1) are gone
        ("g1-raid10f2-llbitmap", [0, 1]),  # f2: chunk 2 lives on roles 2 and 3 only
        ("h-raid5-llbitmap", [0]),
    ],
)
def test_too_few_members(name: str, keep: list[int], unpacked: Callable[[str], list[Path]]) -> None:
    paths = unpacked(name)
    members = [open_member(str(paths[i])) for i in keep]
    try:
        with pytest.raises(AssemblyError, match="too few members"):
            assemble(members)
    finally:
        for m in members:
            m.device.close()


def test_cat_out_of_range(unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    paths = list(map(str, unpacked("a-raid1-llbitmap")))
    size = BY_NAME["a-raid1-llbitmap"].array_sectors * SECTOR
    assert main(["cat", *paths, "--offset", str(size - 1), "--length", "2", "-o", "/dev/null"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llraid: ") and err.count("\n") == 1
    assert f"--length 2 at offset {size - 1} runs past the end of the array ({size} bytes): at most 1" in err
    # far past the end: the offset is what is wrong (no negative room in the message)
    assert main(["cat", *paths, "--offset", "99999999999999999999999T", "-o", "/dev/null"]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"llraid: offset {99999999999999999999999 << 40} is past the end of the array ({size} bytes)\n"
    )
