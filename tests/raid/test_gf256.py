"""GF(2^8) arithmetic and the raid6 P/Q syndrome: tables against a bitwise reference, and every
recovery inverting the syndrome."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llraid.raid import gf256
from llraid.raid.gf256 import GF_EXP, GF_LOG, MUL_TABLE, Block


def slow_mul(a: int, b: int) -> int:
    """Shift-and-add multiplication reduced by x^8+x^4+x^3+x^2+1, one bit at a time."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return out


def test_mul_table_is_carryless_multiplication_mod_0x11d() -> None:
    a = np.arange(256, dtype=np.int64)[:, None] * np.ones(256, dtype=np.int64)[None, :]
    b = a.T.copy()
    out = np.zeros((256, 256), dtype=np.int64)
    for _ in range(8):  # the same algorithm as slow_mul, on all 65536 pairs at once
        out ^= np.where(b & 1, a, 0)
        b >>= 1
        a <<= 1
        a ^= np.where(a & 0x100, 0x11D, 0)
    assert (out == MUL_TABLE).all()
    assert slow_mul(0x80, 2) == 0x1D and MUL_TABLE[0x80, 2] == 0x1D


def test_generator_has_order_255() -> None:
    powers = [int(v) for v in GF_EXP[:255]]
    assert sorted(powers) == list(range(1, 256))  # g = 2 generates every non-zero element
    assert (GF_EXP[255:510] == GF_EXP[:255]).all()
    for a in range(1, 256):
        assert GF_EXP[GF_LOG[a]] == a
    assert gf256.gf_pow2(8) == 0x1D and gf256.gf_pow2(255) == 1 and gf256.gf_pow2(-1) == 0x8E


def test_inverse() -> None:
    for a in range(1, 256):
        assert gf256.gf_mul(a, gf256.gf_inv(a)) == 1
    for bad in (0, 256, -1):
        with pytest.raises(ZeroDivisionError):
            gf256.gf_inv(bad)


@pytest.mark.parametrize("size", [8, 4096, 13, 1])
def test_block_multiplication(size: int) -> None:
    rng = np.random.default_rng(size)
    block = rng.integers(0, 256, size, dtype=np.uint8)
    assert (gf256.mul_by_g(block) == MUL_TABLE[2][block]).all()
    for c in (0, 1, 2, 3, 0x8E, 0xFF):
        got = gf256.mul_block(block, c)
        assert got.dtype == np.uint8 and got is not block
        assert got.tolist() == [slow_mul(int(v), c) for v in block]


def test_syndrome_is_the_definition() -> None:
    rng = np.random.default_rng(1)
    data = [rng.integers(0, 256, 64, dtype=np.uint8) for _ in range(6)]
    p, q = gf256.gen_syndrome(data)
    assert (p == np.bitwise_xor.reduce(data)).all()
    want = np.zeros(64, dtype=np.uint8)
    for i, d in enumerate(data):
        want ^= gf256.mul_block(d, gf256.gf_pow2(i))
    assert (q == want).all()
    # An empty (None) slot is a block of zeros: it moves the blocks after it to higher powers.
    holes: list[Block | None] = [None, data[0], None, data[1]]
    zeros = np.zeros(64, dtype=np.uint8)
    assert (gf256.q_syndrome(holes) == gf256.q_syndrome([zeros, data[0], zeros, data[1]])).all()
    with pytest.raises(ValueError):
        gf256.p_syndrome([None, None])


@st.composite
def stripes(draw: st.DrawFn) -> tuple[list[Block | None], Block, Block]:
    k = draw(st.integers(1, 14))
    size = draw(st.sampled_from([8, 16, 24, 7, 512]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    data: list[Block | None] = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(k)]
    # DDF stripes leave empty slots (where P and Q sit) in the sequence.
    for hole in draw(st.lists(st.integers(0, k - 1), max_size=2, unique=True)):
        if sum(d is not None for d in data) > 1:
            data[hole] = None
    p, q = gf256.gen_syndrome(data)
    return data, p, q


def same(a: list[Block | None], b: list[Block | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and (x == y).all())
        for x, y in zip(a, b, strict=True)
    )


@settings(max_examples=150, deadline=None)
@given(stripes())
def test_every_recovery_inverts_the_syndrome(stripe: tuple[list[Block | None], Block, Block]) -> None:
    """Lose any one or two blocks of the stripe (data, P, Q) and get all of them back."""
    data, p, q = stripe
    present = [i for i, d in enumerate(data) if d is not None]
    blocks = [*(("D", i) for i in present), ("P", 0), ("Q", 0)]
    for n_lost in (1, 2):
        for lost in itertools.combinations(blocks, n_lost):
            lost_data = [i for kind, i in lost if kind == "D"]
            # A lost slot's entry is never looked at: garbage there must not matter.
            damaged = [np.full_like(p, 0x5A) if i in lost_data else d for i, d in enumerate(data)]
            got = gf256.recover(
                damaged,
                None if ("P", 0) in lost else p,
                None if ("Q", 0) in lost else q,
                lost_data,
            )
            assert same(got.data, data), lost
            assert (got.p == p).all() and (got.q == q).all(), lost


@settings(max_examples=100, deadline=None)
@given(stripes(), st.data())
def test_direct_recoveries(stripe: tuple[list[Block | None], Block, Block], draw: st.DataObject) -> None:
    data, p, q = stripe
    present = [i for i, d in enumerate(data) if d is not None]
    x = draw.draw(st.sampled_from(present))
    garbage = [np.full_like(p, 0xA5) if i == x else d for i, d in enumerate(data)]  # ignored
    assert (gf256.recover_data_from_p(garbage, x, p) == data[x]).all()
    assert (gf256.recover_data_from_q(garbage, x, q) == data[x]).all()
    if len(present) >= 2:
        x, y = sorted(draw.draw(st.lists(st.sampled_from(present), min_size=2, max_size=2, unique=True)))
        dx, dy = gf256.recover_two_data(data, x, y, p, q)
        assert (dx == data[x]).all() and (dy == data[y]).all()


def test_recover_refuses_three_losses_and_bad_slots() -> None:
    data: list[Block | None] = [np.zeros(8, dtype=np.uint8) for _ in range(4)]
    p, q = gf256.gen_syndrome(data)
    with pytest.raises(ValueError, match="more than two"):
        gf256.recover(data, None, q, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        gf256.recover(data, p, q, [4])
    with pytest.raises(ValueError):
        gf256.recover_two_data(data, 1, 1, p, q)
