"""``llraid cat`` of the kernel-made parity fixtures (``../shared/fixtures-parity``): raid6 whole,
with every member and every pair of members missing; raid5 after a crash and with a stale
member. Every read must hash to the kernel's ``md_sha256``."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.assemble import assemble
from llraid.cli import main
from llraid.errors import AssemblyError
from llraid.fixtures import SECTOR, decode_sector
from llraid.member import open_member
from tests.conftest import PARITY, PARITY_BY_NAME

RAID6 = [f.name for f in PARITY if f.entry["level"] == 6]
J1, J2 = "j1-raid6-llbitmap", "j2-raid6-internal-bitmap"
K = "k-raid5-llbitmap-crash"
L = "l-raid5-llbitmap-degraded-stale-member"


def cat(paths: list[Path], out: Path, *extra: str) -> str:
    assert main(["cat", *map(str, paths), "-o", str(out), *extra]) == 0
    return hashlib.sha256(out.read_bytes()).hexdigest()


def read_hash(paths: list[Path]) -> str:
    """sha256 of the whole array as read-only assembly reads it (no output file to write)."""
    members = [open_member(str(p)) for p in paths]
    try:
        asm = assemble(members)
        h = hashlib.sha256()
        for piece in asm.iter_bytes(0, asm.array_bytes, piece=4 << 20):
            h.update(piece)
        return h.hexdigest()
    finally:
        for m in members:
            m.device.close()


@pytest.mark.parametrize("name", [f.name for f in PARITY])
def test_cat_whole_array_matches_kernel(
    name: str, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = PARITY_BY_NAME[name]
    out = tmp_path / "array.bin"
    assert cat(unpacked(name), out) == fx.entry["md_sha256"]
    assert out.stat().st_size == fx.array_sectors * SECTOR
    # Independently of the hash: every written sector decodes to its last tag and its number.
    data = out.read_bytes()
    last = {s: w.tag for w in fx.writes for s in range(w.start_sector, w.start_sector + w.sectors)}
    for s, tag in last.items():
        assert decode_sector(data[s * SECTOR : (s + 1) * SECTOR]) == (tag, s)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        (n, lost)
        for n in RAID6
        for k in (1, 2)
        for lost in itertools.combinations(range(len(PARITY_BY_NAME[n].members)), k)
    ],
)
def test_raid6_with_members_missing(
    name: str, missing: tuple[int, ...], unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    """Any one or two members gone (data+data, data+P, data+Q or P+Q in each stripe row, as P
    and Q rotate): the rest rebuilds the kernel's content."""
    fx = PARITY_BY_NAME[name]
    paths = [p for i, p in enumerate(unpacked(name)) if i not in missing]
    if len(missing) == 1:
        assert cat(paths, tmp_path / "array.bin") == fx.entry["md_sha256"]  # through the CLI
    else:
        assert read_hash(paths) == fx.entry["md_sha256"]


@pytest.mark.parametrize("name", RAID6)
def test_raid6_three_missing_is_refused(name: str, unpacked: Callable[[str], list[Path]]) -> None:
    members = [open_member(str(p)) for p in unpacked(name)[3:]]
    try:
        with pytest.raises(AssemblyError, match="raid6 can lose two members"):
            assemble(members)
    finally:
        for m in members:
            m.device.close()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (511, 2), (10001 * 512 + 7, 3001 * 512), (524288 - 5, 10), (65536 * 3 - 1, 70000)],
)
@pytest.mark.parametrize("missing", [(), (0,), (1, 2)])
def test_raid6_ranges_any_alignment(
    offset: int, length: int, missing: tuple[int, ...], unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    for name in RAID6:
        fx = PARITY_BY_NAME[name]
        paths = [p for i, p in enumerate(unpacked(name)) if i not in missing]
        out = tmp_path / f"{name}.bin"
        cat(paths, out, "--offset", str(offset), "--length", str(length))
        assert out.read_bytes() == fx.expected_content()[offset : offset + length]


def test_raid5_crash_image_reads_whole_and_degraded(
    unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    """k was reset with every llbitmap chunk Dirty, but after md had written the superblocks
    clean (safe mode), so, as for the kernel, nothing stops a degraded start; the writes had
    completed (README), so parity is consistent and every member can be rebuilt from the rest."""
    fx = PARITY_BY_NAME[K]
    paths = unpacked(K)
    members = [open_member(str(p)) for p in paths]
    try:
        assert all(m.sb.is_clean for m in members)
        assert fx.entry["shutdown"] == "crash"
        assert fx.members[0]["bitmap_state_counts"] == {"Dirty": 992}
    finally:
        for m in members:
            m.device.close()
    for missing in range(3):
        assert read_hash([p for i, p in enumerate(paths) if i != missing]) == fx.entry["md_sha256"]


def test_raid5_stale_member_is_never_read(unpacked: Callable[[str], list[Path]], tmp_path: Path) -> None:
    """l: m1 failed before phase 2. It is kicked as stale, the array reads degraded through
    parity to the kernel's content (with or without m1 given), and m1 really holds other data
    where phase 2 wrote, so reading it would be caught."""
    fx = PARITY_BY_NAME[L]
    paths = unpacked(L)
    assert cat(paths, tmp_path / "a.bin") == fx.entry["md_sha256"]
    assert read_hash([p for i, p in enumerate(paths) if i != 1]) == fx.entry["md_sha256"]
    members = [open_member(str(p)) for p in paths]
    try:
        asm = assemble(members)
        assert asm.stale == [members[1]] and set(asm.slots) == {0, 2, 3}
        phase2 = [w for w in fx.writes if w.tag & 0xFFFF == 2]
        assert phase2
        geo = asm.personality.geo  # type: ignore[attr-defined]
        differs = 0
        for w in phase2:
            got = asm.read_bytes(w.start_sector * SECTOR, w.sectors * SECTOR)
            assert decode_sector(got[:SECTOR]) == (w.tag, w.start_sector)
            for s in range(w.start_sector, w.start_sector + w.sectors):
                dd, _pd, ms = geo.compute_sector(s)
                if dd == 1:
                    stale = members[1].device.pread((members[1].sb.data_offset + ms) * SECTOR, SECTOR)
                    differs += decode_sector(stale) != (w.tag, s)
        assert differs > 0
        # Without m1 any further loss is one too many for raid5.
        for other in (0, 2, 3):
            with pytest.raises(AssemblyError, match="too few members"):
                assemble([m for i, m in enumerate(members) if i != other])
    finally:
        for m in members:
            m.device.close()
