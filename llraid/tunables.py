"""The settings of a running array (``llraid set`` / ``get``): name, unit, range, help.

One table, used by the server to validate a value before anything changes and by the command
line for its help. Units follow md's sysfs files: seconds for the bitmap daemon and safe mode
(``md/safe_mode_delay``, ``llbitmap/daemon_sleep``, ``llbitmap/barrier_idle``), KiB/s for
``md/sync_speed_max``.

The ranges keep every value usable by the threads that read it: the bitmap daemon and the md
thread sleep for these periods (a timeout beyond what ``threading`` accepts would kill them),
the bitmap superblock records ``daemon_sleep`` in whole seconds in a 32-bit field, and the
lower bounds stop a thread from spinning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction

from llraid.errors import LlraidError
from llraid.units import RATE_LIMITS, KiB, Limits, format_number, parse_duration, parse_rate

DAY = 86400


class Kind(enum.Enum):
    DURATION = "seconds"
    RATE = "KiB/s"


@dataclass(frozen=True)
class Tunable:
    name: str
    kind: Kind
    limits: Limits
    help: str

    def parse(self, text: str) -> float:
        """The value in the unit the array uses: seconds, or bytes per second."""
        if self.kind is Kind.RATE:
            return float(parse_rate(text, what=self.name, limits=self.limits))
        return parse_duration(text, what=self.name, limits=self.limits)

    def show(self, value: float) -> str:
        """As md's sysfs shows it: seconds, or KiB/s."""
        return format_number(value / KiB if self.kind is Kind.RATE else value)

    @property
    def range_text(self) -> str:
        if self.kind is Kind.RATE:
            return f"{self.limits.low // KiB}..{self.limits.high // KiB} KiB/s, 0 = no limit"
        return f"{format_number(self.limits.low)}..{format_number(self.limits.high)} s"


TUNABLES: dict[str, Tunable] = {
    t.name: t
    for t in (
        Tunable(
            "daemon_sleep",
            Kind.DURATION,
            Limits(Fraction(1, 100), DAY),
            "bitmap daemon period (recorded in the bitmap superblock in whole seconds)",
        ),
        Tunable(
            "barrier_idle",
            Kind.DURATION,
            Limits(0, DAY),
            "llbitmap: a page idle this long may have its Dirty chunks cleaned",
        ),
        Tunable(
            "safe_mode_delay",
            Kind.DURATION,
            Limits(Fraction(1, 100), DAY),
            "mark the array clean this long after the last write",
        ),
        Tunable(
            "sync_speed_max",
            Kind.RATE,
            RATE_LIMITS,
            "resync/recovery/check speed; K/M/G suffixes (2M = 2048); applies from the next sync",
        ),
    )
}


def tunable(name: str) -> Tunable:
    t = TUNABLES.get(name)
    if t is None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise LlraidError(f"unknown setting {shown!r} (settings: {', '.join(TUNABLES)})")
    return t


def help_text() -> str:
    """The settings, one per line, for ``llraid set --help``."""
    width = max(len(n) for n in TUNABLES)
    lines = ["settings (md's sysfs units: seconds, KiB/s):"]
    for t in TUNABLES.values():
        lines.append(f"  {t.name:<{width}}  {t.range_text}: {t.help}")
    return "\n".join(lines)
