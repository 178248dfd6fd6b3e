"""Sizes, rates and durations as people type them: one grammar for the command line and the
control socket, exact arithmetic, and a range check before anything uses the value.

* size: ``4096``, ``64K``, ``1.5M``, ``2G``, ``1T``, ``8S`` (512-byte sectors); binary units as
  mdadm's, an optional ``B``/``iB`` (``64KiB``); the result must be a whole number of bytes. A
  bare number means bytes unless the caller says otherwise (mdadm's ``--size``/``--chunk``: KiB).
* rate: md's unit, KiB/s, for a bare number (``/sys/block/mdX/md/sync_speed_max``); ``K``, ``M``,
  ``G`` (optionally ``/s``) scale it; returned in bytes per second.
* duration: seconds, with an optional ``s`` or ``ms``.

Only ASCII decimal digits are numbers here (Python's ``int``/``float`` would also take ``inf``,
``nan``, ``1e300``, ``١٢`` or ``1_000``); exponents are not accepted, so a value is never huge by
accident, and every parser checks its range before returning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from llraid.errors import LlraidError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_BINARY = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}
# every spelling accepted, upper-cased: K, KiB (not KB: that could mean 1000)
SIZE_UNITS = {"B": 1, "S": 512} | _BINARY | {k + "IB": v for k, v in _BINARY.items()}
RATE_UNITS = {
    u + per: v for u, v in ({"B": 1} | SIZE_UNITS).items() if u not in ("S", "T", "TIB") for per in ("", "/S")
}  # bytes per second for each spelling; a bare number is KiB/s (md's unit)
DURATION_UNITS = {"S": Fraction(1), "MS": Fraction(1, 1000)}

# a decimal number (with an optional fraction) or a hex integer, then the unit letters
_NUMBER = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z/]*)\s*", re.ASCII)
_MAX_TEXT = 64  # longer input is refused before any parsing


class UnitError(LlraidError):
    """A size, rate or duration that does not parse or is out of range: ``WHAT: REASON``, where
    the reason quotes the text (the command line puts its own words before the reason)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """An inclusive range, and whether 0 is allowed outside it (e.g. "no limit")."""

    low: Fraction | int
    high: Fraction | int
    zero_ok: bool = False

    def check(self, value: Fraction, what: str, text: str, show: str) -> None:
        if value == 0 and self.zero_ok:
            return
        if not self.low <= value <= self.high:
            extra = " or 0" if self.zero_ok else ""
            raise UnitError(what, f"{text!r} is out of range ({show}{extra})")


def _split(text: str, what: str, *, hex_ok: bool = False) -> tuple[Fraction, str]:
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise UnitError(what, f"{str(text)[:_MAX_TEXT]!r}... is not a number")
    if text.strip().startswith("-"):
        raise UnitError(what, f"{text!r} must not be negative")
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise UnitError(what, f"{text!r} is not a number")
    num = m.group(1)
    if num[:2] in ("0x", "0X"):
        if not hex_ok:
            raise UnitError(what, f"{text!r} is not a decimal number")
        return Fraction(int(num, 16)), m.group(2).upper()
    value = Fraction(num)
    return value, m.group(2).upper()


def parse_size(text: str, *, what: str = "size", bare: str = "B", limits: Limits | None = None) -> int:
    """Bytes. ``bare`` is the unit of a number without one (``"B"``, or ``"K"`` for mdadm's
    ``--size``/``--chunk``)."""
    number, unit = _split(text, what, hex_ok=True)  # offsets are often written in hex
    scale = SIZE_UNITS.get(unit or bare.upper())
    if scale is None:
        raise UnitError(what, f"unknown unit in {text!r} (B, S = 512 B, K, M, G, T)")
    value = number * scale
    if value.denominator != 1:
        raise UnitError(what, f"{text!r} is not a whole number of bytes")
    if limits is not None:
        limits.check(value, what, text, f"{limits.low}..{limits.high} bytes")
    return int(value)


RATE_LIMITS = Limits(KiB, TiB, zero_ok=True)  # 1 KiB/s .. 1 TiB/s, 0 = no limit


def parse_rate(text: str, *, what: str = "rate", limits: Limits = RATE_LIMITS) -> int:
    """Bytes per second from md's KiB/s (bare numbers) or ``K``/``M``/``G`` (per second)."""
    number, unit = _split(text, what)
    scale = RATE_UNITS.get(unit) if unit else KiB
    if scale is None:
        raise UnitError(what, f"unknown unit in {text!r} (KiB/s if none; K, M, G per second)")
    value = number * scale
    limits.check(value, what, text, f"{limits.low // KiB}..{limits.high // KiB} KiB/s")
    return int(value)  # whole bytes/s: a fraction of a byte per second means nothing


def parse_duration(text: str, *, what: str = "duration", limits: Limits) -> float:
    """Seconds (``0.5``, ``2s``, ``250ms``), inside ``limits`` (in seconds)."""
    number, unit = _split(text, what)
    scale = DURATION_UNITS.get(unit) if unit else Fraction(1)
    if scale is None:
        raise UnitError(what, f"unknown unit in {text!r} (seconds; s or ms)")
    value = number * scale
    limits.check(value, what, text, f"{format_number(limits.low)}..{format_number(limits.high)} seconds")
    return float(value)


def format_number(value: float | Fraction | int) -> str:
    """``7`` rather than ``7.0``; ``0.25`` as typed."""
    f = float(value)
    return str(int(f)) if f.is_integer() else repr(f)
