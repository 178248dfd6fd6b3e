"""The read-only raid6 personality on synthetic members of every layout, with any two missing.

Members are built here from random data with P and Q computed independently of the
personality: Q takes the data in the order of the literal ``set_syndrome_sources`` model in
test_raid6_layout.py. The kernel-made arrays (left-symmetric only) are in test_cat_parity.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from llraid.errors import AssemblyError
from llraid.raid import gf256
from llraid.raid.base import NoCopyError
from llraid.raid.layout import Raid6Algorithm, Raid6Geometry
from llraid.raid.raid6 import Raid6
from tests.raid.test_raid6_layout import kernel_syndrome_sources

SECTOR = 512


@dataclass
class FakeMembers:
    """Member data areas in memory; a role is usable below ``limit[role]`` (absent: not at all)."""

    areas: dict[int, bytearray]
    limit: dict[int, int] = field(default_factory=dict)
    reads: list[int] = field(default_factory=list)

    def available(self, role: int, sector: int, count: int) -> bool:
        return role in self.limit and sector + count <= self.limit[role]

    def read(self, role: int, sector: int, count: int) -> bytes:
        assert self.available(role, sector, count), (role, sector, count)
        self.reads.append(role)
        return bytes(self.areas[role][sector * SECTOR : (sector + count) * SECTOR])

    def without(self, *roles: int) -> FakeMembers:
        return FakeMembers(self.areas, {r: v for r, v in self.limit.items() if r not in roles})


def build(alg: Raid6Algorithm, disks: int, stripes: int, seed: int = 0) -> tuple[Raid6, FakeMembers, bytes]:
    chunk = 8
    geo = Raid6Geometry.from_superblock(alg, disks, chunk, stripes * chunk)
    rng = np.random.default_rng(seed)
    content = rng.integers(0, 256, geo.array_sectors * SECTOR, dtype=np.uint8)
    areas = {r: bytearray(geo.dev_sectors * SECTOR) for r in range(disks)}
    cbytes = chunk * SECTOR
    for s in range(stripes):
        row = geo.stripe(s)
        blocks = {}
        for k, role in enumerate(row.data_roles):
            chunk_no = s * (disks - 2) + k
            blocks[role] = content[chunk_no * cbytes : (chunk_no + 1) * cbytes]
            areas[role][s * cbytes : (s + 1) * cbytes] = blocks[role].tobytes()
        p = np.bitwise_xor.reduce([blocks[r] for r in row.data_roles])
        q = np.zeros(cbytes, dtype=np.uint8)
        for slot, source in enumerate(kernel_syndrome_sources(row, disks, alg.is_ddf)):
            if source is not None:
                q ^= gf256.mul_block(blocks[source], gf256.gf_pow2(slot))
        areas[row.p_role][s * cbytes : (s + 1) * cbytes] = p.tobytes()
        areas[row.q_role][s * cbytes : (s + 1) * cbytes] = q.tobytes()
    io = FakeMembers(areas, dict.fromkeys(range(disks), geo.dev_sectors))
    return Raid6(geo), io, content.tobytes()


@pytest.mark.parametrize("alg", list(Raid6Algorithm))
@pytest.mark.parametrize("disks", [4, 5, 6])
def test_every_layout_reads_with_any_two_members_missing(alg: Raid6Algorithm, disks: int) -> None:
    r6, io, content = build(alg, disks, stripes=2 * disks)
    assert r6.read(io, 0, r6.array_sectors) == content
    for lost in itertools.chain(
        itertools.combinations(range(disks), 1), itertools.combinations(range(disks), 2)
    ):
        assert r6.read(io.without(*lost), 0, r6.array_sectors) == content, lost


def test_unaligned_reads_across_rows_and_chunks() -> None:
    r6, io, content = build(Raid6Algorithm.LEFT_ASYMMETRIC, 6, stripes=7, seed=3)
    degraded = io.without(1, 4)
    for start, count in ((0, 1), (3, 11), (7, 40), (31, 33), (100, r6.array_sectors - 100)):
        want = content[start * SECTOR : (start + count) * SECTOR]
        assert r6.read(degraded, start, count) == want
        assert r6.read(io, start, count) == want


def test_partly_in_sync_member() -> None:
    # Role 2 is in sync only below member sector 20 (as while recovering): above that it must
    # be rebuilt, together with the wholly missing role 0.
    r6, io, content = build(Raid6Algorithm.RIGHT_SYMMETRIC, 5, stripes=10, seed=5)
    io.limit[2] = 20
    del io.limit[0]
    assert r6.read(io, 0, r6.array_sectors) == content


def test_stripe_blocks_reads_only_what_the_rebuild_needs() -> None:
    r6, io, _ = build(Raid6Algorithm.LEFT_SYMMETRIC, 6, stripes=6)
    row = r6.geo.stripe(0)
    d = row.data_roles[1]
    whole = r6.stripe_blocks(io, 0, 8, range(6))
    # One data member lost: the other data and P; Q is not read.
    one = io.without(d)
    got = r6.stripe_blocks(one, 0, 8, [d])
    assert (got[d] == whole[d]).all()
    assert set(one.reads) == (set(row.data_roles) - {d}) | {row.p_role}
    # Data and P lost: Q is used.
    dp = io.without(d, row.p_role)
    got = r6.stripe_blocks(dp, 0, 8, [d, row.p_role, row.q_role])
    for r in (d, row.p_role, row.q_role):
        assert (got[r] == whole[r]).all(), r
    # P and Q lost: regenerated from the data.
    pq = io.without(row.p_role, row.q_role)
    got = r6.stripe_blocks(pq, 3, 4, [row.p_role, row.q_role])
    assert (got[row.p_role] == whole[row.p_role][3 * SECTOR : 7 * SECTOR]).all()
    assert (got[row.q_role] == whole[row.q_role][3 * SECTOR : 7 * SECTOR]).all()
    with pytest.raises(ValueError, match="one stripe row"):
        r6.stripe_blocks(io, 4, 8, [0])


def test_three_missing_is_refused() -> None:
    r6, io, _ = build(Raid6Algorithm.LEFT_SYMMETRIC, 5, stripes=5)
    with pytest.raises(AssemblyError, match="raid6 can lose two members, \\[0, 1, 2\\] are missing"):
        r6.check_roles({3, 4})
    r6.check_roles({2, 3, 4})
    # Present at assembly, but not in sync where the read is: the read fails cleanly.
    io2 = io.without(0, 1)
    io2.limit[2] = 8
    with pytest.raises(NoCopyError, match="missing"):
        r6.read(io2, 0, r6.array_sectors)
