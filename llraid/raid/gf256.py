"""raid6 parity math: GF(2^8) with md's polynomial, the P/Q syndrome and every recovery.

md (lib/raid6) works in GF(2^8) reduced by x^8+x^4+x^3+x^2+1 (0x11d) with generator g = 2.
For the data blocks D_0 .. D_{k-1} of a stripe, taken in the kernel's *syndrome slot* order
(see :meth:`llraid.raid.layout.Raid6Geometry.stripe`),

    P = D_0 ^ D_1 ^ ... ^ D_{k-1}
    Q = g^0*D_0 ^ g^1*D_1 ^ ... ^ g^{k-1}*D_{k-1}

Blocks are 1-D ``numpy.uint8`` arrays of equal length; every operation works on whole blocks.
A ``None`` in a data list is a block of zeros: the DDF layouts leave the P and Q positions of
their slot sequence empty (the kernel passes its zero page there), so they contribute nothing.

Multiplication by a constant is a lookup in a 256-entry row of :data:`MUL_TABLE` indexed by
the data bytes (``np.take``); multiplication by g, the inner step of Q, is done on 64-bit words
with shifts and masks, which is several times faster than a lookup.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "GF_EXP",
    "GF_LOG",
    "MUL_TABLE",
    "POLY",
    "Block",
    "RecoveredStripe",
    "gen_syndrome",
    "gf_inv",
    "gf_mul",
    "gf_pow2",
    "mul_block",
    "mul_by_g",
    "p_syndrome",
    "q_syndrome",
    "recover",
    "recover_data_from_p",
    "recover_data_from_q",
    "recover_two_data",
]

Block = npt.NDArray[np.uint8]

POLY = 0x11D


def _tables() -> tuple[Block, npt.NDArray[np.int16], Block]:
    exp = np.zeros(510, dtype=np.uint8)  # doubled, so exp[log a + log b] needs no "mod 255"
    log = np.zeros(256, dtype=np.int16)
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    nonzero = np.arange(1, 256)
    mul = np.zeros((256, 256), dtype=np.uint8)  # row 0 and column 0 stay 0
    mul[1:, 1:] = exp[log[nonzero][:, None] + log[nonzero][None, :]]
    return exp, log, mul


# exp[i] = g^i (i < 510); log[a] for a != 0 (log[0] is meaningless and set to 0);
# MUL_TABLE[c][a] = c*a.
GF_EXP, GF_LOG, MUL_TABLE = _tables()
GF_EXP.flags.writeable = False
GF_LOG.flags.writeable = False
MUL_TABLE.flags.writeable = False

_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH1 = np.uint64(0x0101010101010101)
_REDUCE = np.uint64(POLY & 0xFF)
_ONE = np.uint64(1)
_SEVEN = np.uint64(7)


def gf_mul(a: int, b: int) -> int:
    """a*b in GF(2^8)."""
    return int(MUL_TABLE[a, b])


def gf_pow2(e: int) -> int:
    """g^e for any integer e (negative: the inverse power); g has order 255."""
    return int(GF_EXP[e % 255])


def gf_inv(a: int) -> int:
    """The multiplicative inverse of a non-zero a."""
    if not 0 < a < 256:
        raise ZeroDivisionError(f"GF(2^8): {a} has no inverse")
    return int(GF_EXP[(255 - int(GF_LOG[a])) % 255])


def mul_block(block: Block, c: int) -> Block:
    """c*block, a new array."""
    if c == 0:
        return np.zeros_like(block)
    if c == 1:
        return block.copy()
    return np.take(MUL_TABLE[c], block)


def mul_by_g(block: Block) -> Block:
    """g*block (g = 2), a new array: shift every byte left, reduce the bytes that overflowed."""
    if block.size % 8:
        return np.take(MUL_TABLE[2], block)
    w = block.view(np.uint64)
    out = (w & _LOW7) << _ONE
    out ^= ((w >> _SEVEN) & _HIGH1) * _REDUCE
    return out.view(np.uint8)


def _size(blocks: Sequence[Block | None]) -> int:
    for b in blocks:
        if b is not None:
            return int(b.size)
    raise ValueError("no data block given (all are empty slots)")


def p_syndrome(data: Sequence[Block | None]) -> Block:
    """P: the XOR of the data blocks."""
    p = np.zeros(_size(data), dtype=np.uint8)
    for d in data:
        if d is not None:
            p ^= d
    return p


def q_syndrome(data: Sequence[Block | None]) -> Block:
    """Q: sum of g^i * data[i] (Horner from the highest slot down, as lib/raid6 does)."""
    q = np.zeros(_size(data), dtype=np.uint8)
    for d in reversed(data):
        q = mul_by_g(q)
        if d is not None:
            q ^= d
    return q


def gen_syndrome(data: Sequence[Block | None]) -> tuple[Block, Block]:
    """(P, Q) of the data blocks in slot order."""
    return p_syndrome(data), q_syndrome(data)


def _partial(data: Sequence[Block | None], skip: Collection[int]) -> list[Block | None]:
    return [None if i in skip else d for i, d in enumerate(data)]


def recover_data_from_p(data: Sequence[Block | None], x: int, p: Block) -> Block:
    """data[x] from P and the other data blocks (data[x] itself is ignored)."""
    out = p.copy()
    for i, d in enumerate(data):
        if i != x and d is not None:
            out ^= d
    return out


def recover_data_from_q(data: Sequence[Block | None], x: int, q: Block) -> Block:
    """data[x] from Q and the other data blocks, for when P is lost too:
    Q ^ Q(others) = g^x * D_x, so D_x = g^-x * (Q ^ Q(others))."""
    partial = _partial(data, (x,))
    delta = q_syndrome(partial) ^ q if any(d is not None for d in partial) else q.copy()
    return mul_block(delta, gf_pow2(-x))


def recover_two_data(data: Sequence[Block | None], x: int, y: int, p: Block, q: Block) -> tuple[Block, Block]:
    """(data[x], data[y]) from P and Q and the other data blocks.

    With Pxy = P ^ P(others) = D_x ^ D_y and Qxy = Q ^ Q(others) = g^x D_x ^ g^y D_y:
    D_x = (g^(y-x) * Pxy ^ g^-x * Qxy) / (g^(y-x) ^ 1), and D_y = Pxy ^ D_x.
    """
    if x == y:
        raise ValueError(f"recover_two_data: both lost slots are {x}")
    partial = _partial(data, (x, y))
    if any(d is not None for d in partial):
        pxy = p_syndrome(partial) ^ p
        qxy = q_syndrome(partial) ^ q
    else:
        pxy, qxy = p.copy(), q.copy()
    gyx = gf_pow2(y - x)
    denom = gf_inv(gyx ^ 1)
    a = gf_mul(gyx, denom)  # coefficient of Pxy
    b = gf_mul(gf_pow2(-x), denom)  # coefficient of Qxy
    dx = np.take(MUL_TABLE[a], pxy)
    dx ^= np.take(MUL_TABLE[b], qxy)
    return dx, pxy ^ dx


@dataclass
class RecoveredStripe:
    """A stripe with every lost block rebuilt: data in slot order (empty slots stay None)."""

    data: list[Block | None]
    p: Block
    q: Block


def recover(
    data: Sequence[Block | None], p: Block | None, q: Block | None, lost: Collection[int] = ()
) -> RecoveredStripe:
    """Rebuild up to two lost blocks of a stripe.

    ``lost`` lists the data slots whose contents are unknown (their entries in ``data`` are
    ignored); a lost P or Q is passed as ``None``. Any combination of two is handled: two
    data blocks (P and Q), data + P (Q), data + Q (P), P and/or Q (regenerated from data).
    """
    lost_data = sorted(set(lost))
    for x in lost_data:
        if not 0 <= x < len(data):
            raise ValueError(f"lost slot {x} outside 0..{len(data) - 1}")
    if len(lost_data) + (p is None) + (q is None) > 2:
        raise ValueError("more than two blocks of the stripe are lost")
    out = _partial(data, lost_data)
    if len(lost_data) == 2:
        assert p is not None and q is not None
        x, y = lost_data
        out[x], out[y] = recover_two_data(out, x, y, p, q)
    elif len(lost_data) == 1:
        (x,) = lost_data
        if p is not None:
            out[x] = recover_data_from_p(out, x, p)
        else:
            assert q is not None
            out[x] = recover_data_from_q(out, x, q)
    return RecoveredStripe(
        out,
        p if p is not None else p_syndrome(out),
        q if q is not None else q_syndrome(out),
    )
