"""The raid5/raid6 geometry and parity math against the kernel-made parity fixtures
(``../shared/fixtures-parity``, its manifest.json): data where the map says, and P and Q of
every stripe row on disk equal to what llraid computes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llraid import fixtures
from llraid.errors import LlraidError
from llraid.fixtures import Fixture, pattern
from llraid.raid import gf256
from llraid.raid.layout import (
    RAID5_LAYOUT_NAMES,
    RAID6_LAYOUT_NAMES,
    Raid5Geometry,
    Raid6Geometry,
)
from tests.conftest import PARITY, PARITY_BY_NAME

RAID6 = [f.name for f in PARITY if f.entry["level"] == 6]
RAID5 = [f.name for f in PARITY if f.entry["level"] == 5]


def test_the_parity_set_is_found_and_kept_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fixtures.fixtures_dir(parity=True).name == "fixtures-parity"
    assert {f.name.split("-")[0] for f in PARITY} == {"j1", "j2", "k", "l"}
    assert RAID6 == ["j1-raid6-llbitmap", "j2-raid6-internal-bitmap"]
    monkeypatch.setenv(fixtures.PARITY_ENV_VAR, str(tmp_path))
    assert fixtures.fixtures_dir(parity=True) == tmp_path
    assert fixtures.fixtures_dir() != tmp_path  # the first set has its own variable
    with pytest.raises(LlraidError, match="LLRAID_FIXTURES_PARITY"):
        fixtures.load_parity_fixtures()


def sb_size(fx: Fixture) -> int:
    dump = json.loads((fx.dir / "images-decoded" / "mddump_m0.json").read_text())
    size: int = dump[0]["superblock"]["size_sectors"]
    return size


def raid6_geometry(fx: Fixture) -> Raid6Geometry:
    e = fx.entry
    return Raid6Geometry.from_superblock(e["layout"], e["raid_devices"], e["chunk_sectors"], sb_size(fx))


def data_areas(fx: Fixture, paths: list[Path], dev_sectors: int) -> dict[int, gf256.Block]:
    """Role -> the member's data area (``dev_sectors`` from data_offset) as bytes."""
    out = {}
    for member, path in zip(fx.members, paths, strict=True):
        with open(path, "rb") as f:
            f.seek(member["data_offset_sectors"] * 512)
            out[member["role"]] = np.frombuffer(f.read(dev_sectors * 512), dtype=np.uint8)
    return out


@pytest.mark.parametrize("name", RAID6)
def test_raid6_geometry_matches_the_kernel(name: str) -> None:
    fx = PARITY_BY_NAME[name]
    g = raid6_geometry(fx)
    assert g.array_sectors == fx.array_sectors
    assert RAID6_LAYOUT_NAMES[fx.entry["layout"]] == fx.entry["layout_text"] == "left-symmetric"


@pytest.mark.parametrize("name", RAID5)
def test_raid5_geometry_matches_the_kernel(name: str) -> None:
    fx = PARITY_BY_NAME[name]
    e = fx.entry
    g = Raid5Geometry.from_superblock(
        e["level"], e["layout"], e["raid_devices"], e["chunk_sectors"], sb_size(fx)
    )
    assert g.array_sectors == fx.array_sectors
    assert RAID5_LAYOUT_NAMES[e["layout"]] == e["layout_text"]


@pytest.mark.parametrize("name", RAID6)
def test_raid6_p_and_q_of_every_stripe_row(name: str, unpacked: Callable[[str], list[Path]]) -> None:
    """Every written sector is where compute_sector says, and every stripe row's P and Q on
    disk are the XOR and the syndrome of its data blocks taken in the row's slot order."""
    fx = PARITY_BY_NAME[name]
    g = raid6_geometry(fx)
    areas = data_areas(fx, unpacked(name), g.dev_sectors)
    for w in fx.writes:
        for s in range(w.start_sector, w.start_sector + w.sectors):
            dd, _, _, ms = g.compute_sector(s)
            assert areas[dd][ms * 512 : (ms + 1) * 512].tobytes() == pattern(w.tag, s, 1), s
    cb = g.chunk_sectors * 512
    nonzero_rows = order_matters = 0
    rows = g.dev_sectors // g.chunk_sectors
    for s in range(rows):
        row = g.stripe(s)
        block = {r: a[s * cb : (s + 1) * cb] for r, a in areas.items()}
        data = [None if r is None else block[r] for r in row.slot_roles]
        p, q = gf256.gen_syndrome(data)
        assert (p == block[row.p_role]).all(), f"P of row {s}"
        assert (q == block[row.q_role]).all(), f"Q of row {s}"
        if q.any():
            nonzero_rows += 1
            # So that this can tell orders apart: the same blocks reversed give another Q.
            order_matters += not (gf256.q_syndrome(data[::-1]) == q).all()
    ends = [s for w in fx.writes for s in (w.start_sector, w.start_sector + w.sectors - 1)]
    written_rows = {g.compute_sector(s)[3] // g.chunk_sectors for s in ends}
    assert nonzero_rows >= len(written_rows) > 1
    assert order_matters == nonzero_rows


@pytest.mark.parametrize("name", ["k-raid5-llbitmap-crash"])
def test_raid5_crash_image_parity_is_consistent(name: str, unpacked: Callable[[str], list[Path]]) -> None:
    # README: the pattern writes completed before the reset; only the bitmap was left Dirty.
    fx = PARITY_BY_NAME[name]
    e = fx.entry
    g = Raid5Geometry.from_superblock(5, e["layout"], e["raid_devices"], e["chunk_sectors"], sb_size(fx))
    areas = data_areas(fx, unpacked(name), g.dev_sectors)
    assert not np.bitwise_xor.reduce(list(areas.values())).any()


def test_raid5_stale_member_differs_only_where_phase_2_wrote(unpacked: Callable[[str], list[Path]]) -> None:
    """l: m1 was failed before phase 2, so its rows are out of date exactly where phase 2 wrote;
    every other row still XORs to zero over all four members."""
    fx = PARITY_BY_NAME["l-raid5-llbitmap-degraded-stale-member"]
    e = fx.entry
    assert e["failed_member"] == 1
    g = Raid5Geometry.from_superblock(5, e["layout"], e["raid_devices"], e["chunk_sectors"], sb_size(fx))
    areas = data_areas(fx, unpacked(fx.name), g.dev_sectors)
    bad = np.bitwise_xor.reduce(list(areas.values())).reshape(-1, 512).any(axis=1)
    phase2: set[int] = set()
    for w in fx.writes:
        if w.tag & 0xFFFF == 2:
            mstart, mend = g.bitmap_range(w.start_sector, w.sectors)
            phase2.update(range(mstart, mend))
    bad_sectors = set(np.flatnonzero(bad).tolist())
    assert bad_sectors and bad_sectors <= phase2
