"""The RAID levels llraid knows: one table that assembly, the running array, create and the
command line all read (md's list of registered personalities)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llraid.errors import AssemblyError
from llraid.format.superblock import Superblock1
from llraid.raid.base import Personality, RuntimePersonality
from llraid.raid.layout import Raid5Geometry, Raid6Geometry, Raid10Geometry
from llraid.raid.parity import Raid5Runtime
from llraid.raid.raid1 import Raid1
from llraid.raid.raid5 import Raid5
from llraid.raid.raid6 import Raid6
from llraid.raid.raid6_rw import Raid6Runtime
from llraid.raid.raid10 import Raid10

LEVEL_NAMES = {
    -4: "multipath",
    -1: "linear",
    0: "raid0",
    1: "raid1",
    4: "raid4",
    5: "raid5",
    6: "raid6",
    10: "raid10",
}


@dataclass(frozen=True)
class Level:
    number: int
    min_disks: int  # mdadm's minimum raid-devices for --create
    creatable: bool
    make: Callable[[Superblock1], Personality]  # read-only assembly
    runtime: Callable[[Superblock1], RuntimePersonality] | None  # the running array (read-write)
    aliases: tuple[str, ...] = ()

    @property
    def writable(self) -> bool:
        return self.runtime is not None

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.number]


def _raid1(sb: Superblock1) -> RuntimePersonality:
    return Raid1(sb.raid_disks, sb.size)


def _raid10(sb: Superblock1) -> RuntimePersonality:
    return Raid10(Raid10Geometry.from_superblock(sb.layout, sb.raid_disks, sb.chunksize, sb.size))


def _raid5_geo(sb: Superblock1) -> Raid5Geometry:
    return Raid5Geometry.from_superblock(sb.level, sb.layout, sb.raid_disks, sb.chunksize, sb.size)


def _raid5(sb: Superblock1) -> Personality:
    return Raid5(_raid5_geo(sb))


def _raid5_rw(sb: Superblock1) -> RuntimePersonality:
    return Raid5Runtime(_raid5_geo(sb))


def _raid6_geo(sb: Superblock1) -> Raid6Geometry:
    return Raid6Geometry.from_superblock(sb.layout, sb.raid_disks, sb.chunksize, sb.size)


def _raid6(sb: Superblock1) -> Personality:
    return Raid6(_raid6_geo(sb))


def _raid6_rw(sb: Superblock1) -> RuntimePersonality:
    return Raid6Runtime(_raid6_geo(sb))


LEVELS: dict[int, Level] = {
    1: Level(1, 2, True, _raid1, _raid1, ("mirror",)),
    10: Level(10, 2, True, _raid10, _raid10),
    4: Level(4, 3, True, _raid5, _raid5_rw),
    5: Level(5, 3, True, _raid5, _raid5_rw),
    6: Level(6, 4, True, _raid6, _raid6_rw),
}


def level_name(level: int) -> str:
    return LEVEL_NAMES.get(level, f"-unknown-{level}")


def _names(pred: Callable[[Level], bool]) -> str:
    names = [lv.name for lv in LEVELS.values() if pred(lv)]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def writable_names() -> str:
    return _names(lambda lv: lv.writable)


def creatable_names() -> str:
    return _names(lambda lv: lv.creatable)


def parse_level(text: str) -> int:
    """A level as mdadm takes it (``5``, ``raid5``, ``mirror``); unknown names raise ValueError."""
    t = text.strip().lower()
    for lv in LEVELS.values():
        if t in (str(lv.number), lv.name, *lv.aliases):
            return lv.number
    raise ValueError(f"unknown RAID level {text!r}")


def personality_for(sb: Superblock1) -> Personality:
    """The personality for a superblock's level and geometry, or :class:`AssemblyError`."""
    lv = LEVELS.get(sb.level)
    if lv is None:
        known = ", ".join(x.name for x in LEVELS.values())
        raise AssemblyError(f"{level_name(sb.level)} is not supported ({known} are)")
    return lv.make(sb)


def runtime_personality(sb: Superblock1) -> RuntimePersonality:
    """The personality the running array uses, or :class:`AssemblyError` for levels it cannot run."""
    lv = LEVELS.get(sb.level)
    if lv is None or lv.runtime is None:
        raise AssemblyError(
            f"read-write assembly supports {writable_names()}; this array is {level_name(sb.level)}"
        )
    return lv.runtime(sb)
