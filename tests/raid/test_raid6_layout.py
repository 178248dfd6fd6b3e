"""raid6 geometry (LAYOUTS.md §5) and the kernel's syndrome slot order (drivers/md/raid5.c).

The placement tests check hand-derived grids and an independent transcription of the kernel's
``raid5_compute_blocknr``; the slot-order tests check the geometry against a literal model of
``set_syndrome_sources`` (the walk with ``raid6_d0`` / ``raid6_idx_to_slot``), for every layout
and every stripe. Only left-symmetric has kernel-made images (fixtures j1, j2; see
test_parity_fixtures.py), so for the other layouts this model is the reference.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llraid.errors import LayoutError
from llraid.raid.layout import (
    RAID6_LAYOUT_NAMES,
    Raid5Geometry,
    Raid6Algorithm,
    Raid6Geometry,
    StripeLayout,
)

CHUNK = 1024
DEV = 2097152

A = Raid6Algorithm


def r6(layout: int, disks: int, chunk: int = CHUNK, size: int = DEV) -> Raid6Geometry:
    return Raid6Geometry.from_superblock(layout, disks, chunk, size)


# --------------------------------------------------------------------------------------
# names, validation, sizes
# --------------------------------------------------------------------------------------


def test_layout_numbers_and_mdadm_names() -> None:
    # LAYOUTS.md §5.1 and mdadm's r6layout table (the first name for each value).
    assert RAID6_LAYOUT_NAMES == {
        0: "left-asymmetric",
        1: "right-asymmetric",
        2: "left-symmetric",
        3: "right-symmetric",
        4: "parity-first",
        5: "parity-last",
        8: "ddf-zero-restart",
        9: "ddf-N-restart",
        10: "ddf-N-continue",
        16: "left-asymmetric-6",
        17: "right-asymmetric-6",
        18: "left-symmetric-6",
        19: "right-symmetric-6",
        20: "parity-first-6",
    }
    assert [int(a) for a in Raid6Algorithm] == list(RAID6_LAYOUT_NAMES)
    assert [a for a in Raid6Algorithm if a.is_ddf] == [
        A.ROTATING_ZERO_RESTART,
        A.ROTATING_N_RESTART,
        A.ROTATING_N_CONTINUE,
    ]


@pytest.mark.parametrize(
    ("layout", "disks", "chunk", "size"),
    [
        (6, 5, CHUNK, DEV),  # not an algorithm
        (7, 5, CHUNK, DEV),
        (11, 5, CHUNK, DEV),
        (15, 5, CHUNK, DEV),
        (21, 5, CHUNK, DEV),  # PARITY_N_6 is spelled 5
        (-1, 5, CHUNK, DEV),
        (2, 5, 0, DEV),
        (2, 5, 4, DEV),  # less than a page
        (2, 5, 24, DEV),  # a page multiple, not a power of two
        (2, 2, CHUNK, DEV),  # no room for a data member
        (2, 5, CHUNK, -8),
    ],
)
def test_invalid(layout: int, disks: int, chunk: int, size: int) -> None:
    with pytest.raises(LayoutError):
        r6(layout, disks, chunk, size)


def test_raid5_geometry_refuses_level_6() -> None:
    with pytest.raises(LayoutError, match="Raid6Geometry"):
        Raid5Geometry.from_superblock(6, 2, 5, CHUNK, DEV)


def test_sizes() -> None:
    g = r6(2, 5, size=DEV + 1023)
    assert g.dev_sectors == DEV
    assert g.array_sectors == 3 * DEV  # raid5_size with max_degraded = 2 (LAYOUTS §2.3)
    assert g.data_disks == 3 and g.level == 6
    assert r6(2, 3).array_sectors == DEV


def test_out_of_range_arguments() -> None:
    g = r6(2, 5)
    for bad in (-1, g.array_sectors):
        with pytest.raises(LayoutError):
            g.compute_sector(bad)
    for sector, role in ((-1, 0), (g.dev_sectors, 0), (0, -1), (0, 5)):
        with pytest.raises(LayoutError):
            g.compute_blocknr(sector, role)
    for start, length in ((-1, 2), (0, -1), (g.array_sectors, 1)):
        with pytest.raises(LayoutError):
            g.bitmap_range(start, length)


def test_bitmap_range_is_whole_stripe_rows() -> None:
    g = r6(2, 5)  # width 3072, as the raid5 example of §5.5 with one more member
    assert g.bitmap_range(4000, 100) == (1024, 2048)
    assert g.bitmap_range(0, 3073) == (0, 2048)
    assert g.bitmap_range(3 * DEV - 1, 1) == (DEV - 1024, DEV)


# --------------------------------------------------------------------------------------
# placement grids (array chunk Dk per member, P and Q)
# --------------------------------------------------------------------------------------


def grid(g: Raid6Geometry, stripes: int) -> list[str]:
    rows = []
    for s in range(stripes):
        row = g.stripe(s)
        cells = []
        for role in range(g.raid_disks):
            r = g.compute_blocknr(s * g.chunk_sectors, role)
            if r is None:
                cells.append("P" if role == row.p_role else "Q")
            else:
                cells.append(f"D{r // g.chunk_sectors}")
        rows.append(" ".join(cells))
    return rows


# 5 members. Left-symmetric is LAYOUTS.md §5.3's table; the rest were worked out by hand from
# the §5.2 pseudocode (which agrees with raid5_compute_sector).
GRIDS_5: dict[Raid6Algorithm, list[str]] = {
    A.LEFT_SYMMETRIC: [
        "Q D0 D1 D2 P",
        "D3 D4 D5 P Q",
        "D7 D8 P Q D6",
        "D11 P Q D9 D10",
        "P Q D12 D13 D14",
        "Q D15 D16 D17 P",
    ],
    A.LEFT_ASYMMETRIC: ["Q D0 D1 D2 P", "D3 D4 D5 P Q", "D6 D7 P Q D8", "D9 P Q D10 D11", "P Q D12 D13 D14"],
    A.RIGHT_ASYMMETRIC: ["P Q D0 D1 D2", "D3 P Q D4 D5", "D6 D7 P Q D8", "D9 D10 D11 P Q", "Q D12 D13 D14 P"],
    A.RIGHT_SYMMETRIC: ["P Q D0 D1 D2", "D5 P Q D3 D4", "D7 D8 P Q D6", "D9 D10 D11 P Q", "Q D12 D13 D14 P"],
    A.PARITY_0: ["P Q D0 D1 D2", "P Q D3 D4 D5"],
    A.PARITY_N: ["D0 D1 D2 P Q", "D3 D4 D5 P Q"],
    A.ROTATING_ZERO_RESTART: [
        "P Q D0 D1 D2",
        "D3 P Q D4 D5",
        "D6 D7 P Q D8",
        "D9 D10 D11 P Q",
        "Q D12 D13 D14 P",
    ],
    A.ROTATING_N_RESTART: [
        "D0 D1 D2 P Q",
        "D3 D4 P Q D5",
        "D6 P Q D7 D8",
        "P Q D9 D10 D11",
        "Q D12 D13 D14 P",
    ],
    A.ROTATING_N_CONTINUE: [
        "D0 D1 D2 Q P",
        "D4 D5 Q P D3",
        "D8 Q P D6 D7",
        "Q P D9 D10 D11",
        "P D12 D13 D14 Q",
    ],
    A.LEFT_ASYMMETRIC_6: [
        "D0 D1 D2 P Q",
        "D3 D4 P D5 Q",
        "D6 P D7 D8 Q",
        "P D9 D10 D11 Q",
        "D12 D13 D14 P Q",
    ],
    A.RIGHT_ASYMMETRIC_6: [
        "P D0 D1 D2 Q",
        "D3 P D4 D5 Q",
        "D6 D7 P D8 Q",
        "D9 D10 D11 P Q",
        "P D12 D13 D14 Q",
    ],
    A.LEFT_SYMMETRIC_6: ["D0 D1 D2 P Q", "D4 D5 P D3 Q", "D8 P D6 D7 Q", "P D9 D10 D11 Q", "D12 D13 D14 P Q"],
    A.RIGHT_SYMMETRIC_6: [
        "P D0 D1 D2 Q",
        "D5 P D3 D4 Q",
        "D7 D8 P D6 Q",
        "D9 D10 D11 P Q",
        "P D12 D13 D14 Q",
    ],
    A.PARITY_0_6: ["P D0 D1 D2 Q", "P D3 D4 D5 Q"],
}


@pytest.mark.parametrize("alg", list(Raid6Algorithm))
def test_grids_5_members(alg: Raid6Algorithm) -> None:
    rows = GRIDS_5[alg]
    g = r6(alg, 5)
    assert grid(g, len(rows)) == rows
    for s, row in enumerate(rows):  # and forward: chunk Dk sits where the grid says
        cells = row.split()
        for role, cell in enumerate(cells):
            if cell.startswith("D"):
                k = int(cell[1:])
                assert g.compute_sector(k * CHUNK + 7) == (
                    role,
                    cells.index("P"),
                    cells.index("Q"),
                    s * CHUNK + 7,
                )


def test_4_member_left_symmetric() -> None:
    # The layout of fixture j1: P walks down from the last member, Q follows it round.
    assert grid(r6(A.LEFT_SYMMETRIC, 4), 5) == [
        "Q D0 D1 P",
        "D2 D3 P Q",
        "D5 P Q D4",
        "P Q D6 D7",
        "Q D8 D9 P",
    ]


# --------------------------------------------------------------------------------------
# inverse map against a transcription of raid5_compute_blocknr
# --------------------------------------------------------------------------------------


def kernel_blocknr_index(alg: Raid6Algorithm, n: int, pd: int, qd: int, i: int) -> int | None:
    """The level 6 switch of ``raid5_compute_blocknr``: member ``i`` -> data index in the row."""
    if i in (pd, qd):
        return None
    if alg in (A.LEFT_ASYMMETRIC, A.RIGHT_ASYMMETRIC, A.ROTATING_ZERO_RESTART, A.ROTATING_N_RESTART):
        if pd == n - 1:
            return i - 1
        return i - 2 if i > pd else i
    if alg in (A.LEFT_SYMMETRIC, A.RIGHT_SYMMETRIC):
        if pd == n - 1:
            return i - 1
        return (i + n if i < pd else i) - (pd + 2)
    if alg is A.PARITY_0:
        return i - 2
    if alg is A.PARITY_N:
        return i
    if alg is A.ROTATING_N_CONTINUE:
        if pd == 0:
            return i - 1
        return (i + n if i < pd else i) - (pd + 1)
    if alg in (A.LEFT_ASYMMETRIC_6, A.RIGHT_ASYMMETRIC_6):
        return i - 1 if i > pd else i
    if alg in (A.LEFT_SYMMETRIC_6, A.RIGHT_SYMMETRIC_6):
        return (i + n - 1 if i < pd else i) - (pd + 1)
    return i - 1  # PARITY_0_6


@pytest.mark.parametrize("alg", list(Raid6Algorithm))
@pytest.mark.parametrize("disks", [3, 4, 5, 6, 7, 9])
def test_inverse_matches_kernel_blocknr_and_is_a_bijection(alg: Raid6Algorithm, disks: int) -> None:
    g = r6(alg, disks, chunk=8, size=8 * 3 * disks * (disks - 1) + 5)
    seen = set()
    for r in range(g.array_sectors):
        dd, pd, qd, ms = g.compute_sector(r)
        assert len({dd, pd, qd}) == 3
        seen.add((dd, ms))
    assert len(seen) == g.array_sectors
    for ms in range(0, g.dev_sectors, 3):
        stripe = ms // 8
        row = g.stripe(stripe)
        for role in range(disks):
            got = g.compute_blocknr(ms, role)
            k = kernel_blocknr_index(alg, disks, row.p_role, row.q_role, role)
            if k is None:
                assert got is None
            else:
                assert got == (stripe * (disks - 2) + k) * 8 + ms % 8
                assert g.compute_sector(got) == (role, row.p_role, row.q_role, ms)


@st.composite
def geometries(draw: st.DrawFn) -> Raid6Geometry:
    alg = draw(st.sampled_from(list(Raid6Algorithm)))
    disks = draw(st.integers(3, 20))
    shift = draw(st.integers(3, 12))
    size = (draw(st.integers(1, 1 << 20)) << shift) + draw(st.integers(0, (1 << shift) - 1))
    return Raid6Geometry.from_superblock(alg, disks, 1 << shift, size)


@settings(max_examples=400)
@given(st.data())
def test_round_trip(data: st.DataObject) -> None:
    g = data.draw(geometries())
    r = data.draw(st.integers(0, g.array_sectors - 1))
    dd, pd, qd, ms = g.compute_sector(r)
    assert len({dd, pd, qd}) == 3 and 0 <= ms < g.dev_sectors
    assert ms % g.chunk_sectors == r % g.chunk_sectors
    row = g.stripe(ms >> g.chunk_shift)
    assert (row.p_role, row.q_role) == (pd, qd)
    assert g.compute_blocknr(ms, dd) == r
    assert g.compute_blocknr(ms, pd) is None and g.compute_blocknr(ms, qd) is None


# --------------------------------------------------------------------------------------
# syndrome slot order
# --------------------------------------------------------------------------------------


def kernel_syndrome_sources(row: StripeLayout, disks: int, ddf: bool) -> list[int | None]:
    """Which member lands in each slot of the kernel's source array for gen_syndrome.

    ``set_syndrome_sources`` clears a ``disks + 2`` array of page pointers, then walks every
    member exactly once, starting at ``raid6_d0`` and stepping with ``raid6_next_disk``
    (i + 1, wrapping to 0). ``raid6_d0`` is member 0 for DDF layouts; for md layouts it is the
    member after Q, or member 0 when Q is the last member. For each member
    ``raid6_idx_to_slot`` returns its slot from a running counter: P goes to slot
    ``syndrome_disks`` and Q to ``syndrome_disks + 1``, where ``syndrome_disks`` is
    ``disks - 2`` for md and ``disks`` for DDF; a data member gets the counter's current
    value. The counter advances after every data member (md), or after *every* member,
    P and Q included (DDF), so DDF leaves the P and Q positions of the walk empty. Q is then
    sum over slots s < syndrome_disks of g^s * source[s] (an empty slot counts as zeros).
    This function is a literal model of that loop, kept apart from the implementation.
    """
    syndrome_disks = disks if ddf else disks - 2
    sources: list[int | None] = [None] * (disks + 2)
    d0 = 0 if ddf or row.q_role == disks - 1 else row.q_role + 1
    count = 0
    i = d0
    while True:
        slot = count
        if ddf:
            count += 1
        if i == row.p_role:
            slot = syndrome_disks
        elif i == row.q_role:
            slot = syndrome_disks + 1
        elif not ddf:
            count += 1
        sources[slot] = i
        i = i + 1 if i + 1 < disks else 0
        if i == d0:
            break
    assert sources[syndrome_disks] == row.p_role and sources[syndrome_disks + 1] == row.q_role
    return sources[:syndrome_disks]


@pytest.mark.parametrize("alg", list(Raid6Algorithm))
@pytest.mark.parametrize("disks", [3, 4, 5, 6, 7, 8, 11])
def test_slot_order_is_the_kernels(alg: Raid6Algorithm, disks: int) -> None:
    g = r6(alg, disks)
    for s in range(2 * disks * (disks - 1)):  # more than one period of every layout
        row = g.stripe(s)
        assert row.slot_roles == tuple(kernel_syndrome_sources(row, disks, alg.is_ddf)), (s, row)
        assert row.syndrome_disks == (disks if alg.is_ddf else disks - 2)
        assert sorted(r for r in row.slot_roles if r is not None) == sorted(row.data_roles)
        for k, role in enumerate(row.data_roles):
            assert row.data_index(role) == k
            assert row.slot_roles[row.slots[k]] == role


@pytest.mark.parametrize(
    ("alg", "stripe", "slots"),
    [
        # Worked by hand for 5 members (grids above); slots[k] is the Q power of data block k.
        (A.LEFT_SYMMETRIC, 2, (0, 1, 2)),  # D7 D8 P Q D6: walk from member 4 gives D6 D7 D8
        (A.LEFT_ASYMMETRIC, 0, (0, 1, 2)),  # Q D0 D1 D2 P: walk from member 1
        (A.LEFT_ASYMMETRIC, 1, (0, 1, 2)),  # D3 D4 D5 P Q: Q last, walk from member 0
        (A.LEFT_ASYMMETRIC, 2, (1, 2, 0)),  # D6 D7 P Q D8: walk from member 4 gives D8 D6 D7
        (A.LEFT_ASYMMETRIC, 3, (2, 0, 1)),  # D9 P Q D10 D11: walk from 3 gives D10 D11 D9
        (A.RIGHT_ASYMMETRIC, 1, (2, 0, 1)),  # D3 P Q D4 D5: walk from 3 gives D4 D5 D3
        (A.LEFT_SYMMETRIC_6, 1, (2, 0, 1)),  # D4 D5 P D3 Q: Q last, walk from 0 gives D4 D5 D3
        (A.RIGHT_SYMMETRIC_6, 1, (1, 2, 0)),  # D5 P D3 D4 Q: walk from 0 gives D5 D3 D4
        (A.LEFT_ASYMMETRIC_6, 1, (0, 1, 2)),  # D3 D4 P D5 Q
        (A.PARITY_0, 0, (0, 1, 2)),  # P Q D0 D1 D2: walk from member 2
        (A.ROTATING_N_CONTINUE, 1, (4, 0, 1)),  # DDF: D4 D5 Q P D3, the slot is the member
        (A.ROTATING_ZERO_RESTART, 0, (2, 3, 4)),  # DDF: P Q D0 D1 D2
    ],
)
def test_slot_order_examples(alg: Raid6Algorithm, stripe: int, slots: tuple[int, ...]) -> None:
    assert r6(alg, 5).stripe(stripe).slots == slots


@pytest.mark.parametrize("alg", [A.LEFT_SYMMETRIC, A.RIGHT_SYMMETRIC])
@pytest.mark.parametrize("disks", [4, 5, 8])
def test_symmetric_layouts_take_q_in_array_order(alg: Raid6Algorithm, disks: int) -> None:
    # What the fixtures README says, and why j1/j2 cannot tell the orders apart.
    g = r6(alg, disks)
    for s in range(disks):
        assert g.stripe(s).slots == tuple(range(disks - 2))


def test_asymmetric_layouts_do_not() -> None:
    for alg in (A.LEFT_ASYMMETRIC, A.RIGHT_ASYMMETRIC, A.LEFT_SYMMETRIC_6, A.RIGHT_SYMMETRIC_6):
        g = r6(alg, 5)
        assert any(g.stripe(s).slots != (0, 1, 2) for s in range(5)), alg
