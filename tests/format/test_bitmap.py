"""Bitmap superblock, classic bits and llbitmap states against the kernel-made members."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llraid.errors import FormatError
from llraid.format import classic, llbitmap
from llraid.format.bitmap import BitmapFlag, BitmapKind, BitmapSuper
from llraid.format.llbitmap import LLState, calculate_geometry
from tests.conftest import BY_NAME, MEMBERS

BITMAP_AT = 8192  # sector 16 on every fixture member
WITH_BITMAP = [(n, i) for n, i in MEMBERS if BY_NAME[n].entry["bitmap"] != "none"]


def _area(path: Path, length: int = 131072 + 1024) -> bytes:
    with open(path, "rb") as f:
        f.seek(BITMAP_AT)
        return f.read(length)


@pytest.mark.parametrize(("name", "index"), WITH_BITMAP)
def test_bitmap_super_round_trip(name: str, index: int, unpacked: Callable[[str], list[Path]]) -> None:
    area = _area(unpacked(name)[index])
    sb = BitmapSuper.parse(area)
    assert sb.build() == area[:256]
    on_disk = BY_NAME[name].entry["bitmap_on_disk"]
    m = BY_NAME[name].members[index]
    assert sb.version == on_disk["version"]
    assert sb.events == m["bitmap_events"]
    assert sorted(f.name or "" for f in BitmapFlag if sb.state & f) == sorted(m["bitmap_state_flags"])


@pytest.mark.parametrize(
    ("name", "index"), [x for x in WITH_BITMAP if BY_NAME[x[0]].entry["bitmap"] == "llbitmap"]
)
def test_llbitmap_states_match_kernel(name: str, index: int, unpacked: Callable[[str], list[Path]]) -> None:
    fx = BY_NAME[name]
    area = _area(unpacked(name)[index])
    sb = BitmapSuper.parse(area)
    assert sb.kind is BitmapKind.LOCKLESS
    geo = llbitmap.geometry_of(sb)
    on_disk = fx.entry["bitmap_on_disk"]
    assert (geo.chunksize, geo.chunks) == (on_disk["chunksize_sectors"], on_disk["chunks"])
    states = llbitmap.parse_states(area, geo.chunks)
    counts, invalid = llbitmap.count_states(states)
    assert invalid == 0
    assert {s.title: n for s, n in counts.items() if n} == fx.members[index]["bitmap_state_counts"]
    dump = json.loads((fx.dir / "images-decoded" / f"mddump_m{index}.json").read_text())[0]["bitmap"]
    assert [[a, b, LLState(v).title] for a, b, v in llbitmap.runs(states)] == dump["runs"]
    rebuilt = llbitmap.build_area(sb, states, area[256:1024])
    assert rebuilt == area[: geo.used_bytes]


def test_llbitmap_metadata_view_matches_sysfs(unpacked: Callable[[str], list[Path]]) -> None:
    for name in ("a-raid1-llbitmap", "b-raid10n2-llbitmap", "h-raid5-llbitmap"):
        sb = BitmapSuper.parse(_area(unpacked(name)[0]))
        geo = llbitmap.geometry_of(sb)
        sysfs = (BY_NAME[name].dir / "boot1/live-5-before-stop/sysfs_llbitmap_metadata.txt").read_text()
        mine = f"chunksize {geo.chunksize}\nchunkshift {geo.chunkshift}\nchunks {geo.chunks}\noffset 8\n"
        mine += f"daemon_sleep {sb.daemon_sleep}\n"
        assert sysfs == mine


def test_crash_fixture_bits_text_matches_kernel(unpacked: Callable[[str], list[Path]]) -> None:
    fx = BY_NAME["e-raid1-llbitmap-crash"]
    area = _area(unpacked(fx.name)[0])
    geo = llbitmap.geometry_of(BitmapSuper.parse(area))
    counts, _ = llbitmap.count_states(llbitmap.parse_states(area, geo.chunks))
    assert llbitmap.bits_text(counts) == (fx.dir / "boot1/bits-before-crash.txt").read_text()


def test_first_use_ignores_mdadm_chunksize(unpacked: Callable[[str], list[Path]]) -> None:
    sb = BitmapSuper.parse(_area(unpacked("i1-raid1-llbitmap-assume-clean-nowrite")[0]))
    assert sb.state & BitmapFlag.FIRST_USE and sb.chunksize == 64 << 20
    geo = llbitmap.geometry_of(sb)
    assert (geo.chunksize, geo.chunks) == (128, 1008)
    # Without FIRST_USE the same header would claim 64 MiB chunks.
    assert llbitmap.geometry_of(dataclasses.replace(sb, state=0)).chunks == 1


def test_classic_bits(unpacked: Callable[[str], list[Path]]) -> None:
    fx = BY_NAME["c-raid10n2-internal-bitmap"]
    for index, path in enumerate(unpacked(fx.name)):
        area = _area(path, 4096)
        sb = BitmapSuper.parse(area)
        assert sb.kind is BitmapKind.CLASSIC
        chunks = classic.classic_chunks(sb)
        assert chunks == fx.entry["bitmap_on_disk"]["chunks"] == 2
        bits = classic.parse_bits(area, chunks)
        assert int(bits.sum()) == fx.members[index]["bitmap_dirty_bits"]


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_classic_bit_order_round_trip(bits_list: list[bool]) -> None:
    bits = np.array(bits_list, dtype=np.bool_)
    area = bytes(256) + classic.build_bits(bits)
    assert (classic.parse_bits(area, len(bits)) == bits).all()
    if bits_list[0]:
        assert area[256] & 1  # chunk 0 is the least significant bit


def test_geometry_examples_from_spec() -> None:
    assert calculate_geometry(8_378_368, 256) == llbitmap.Geometry(128, 7, 65_456, 8_378_368)
    assert calculate_geometry(209_582_080, 256).chunksize == 2048
    assert calculate_geometry(2_147_219_456, 256).chunks == 131_056
    g = calculate_geometry(21_474_572_288, 256)
    assert (g.chunksize, g.chunks) == (262_144, 81_919)


@given(st.integers(min_value=1, max_value=1 << 45), st.integers(min_value=1, max_value=2048))
def test_geometry_fits_and_is_minimal(sync_size: int, space: int) -> None:
    g = calculate_geometry(sync_size, space)
    assert g.chunks <= space * 512
    assert g.chunks * g.chunksize >= sync_size
    assert g.chunksize == 128 or -(-sync_size // (g.chunksize // 2)) > space * 512


def test_bad_bitmap_headers() -> None:
    with pytest.raises(FormatError, match="no bitmap superblock"):
        BitmapSuper.parse(bytes(256))
    good = BitmapSuper(0x6D746962, 9, bytes(16), 0, 0, 100, 0, 128, 5, 0, 256, 0, bytes(64), bytes(120))
    with pytest.raises(FormatError, match="unknown bitmap version 9"):
        good.check_version()
    with pytest.raises(FormatError, match="clustered"):
        dataclasses.replace(good, version=5).check_version()
    with pytest.raises(FormatError, match="power of two"):
        llbitmap.geometry_of(dataclasses.replace(good, version=6, chunksize=100))
    with pytest.raises(FormatError, match="power of two"):
        classic.classic_chunks(dataclasses.replace(good, version=4, chunksize=1000))
