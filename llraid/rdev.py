"""A member device in the running array (md's ``md_rdev``) and its state."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from llraid.bitmap.store import BitmapTarget
from llraid.device import SECTOR, Device
from llraid.format.superblock import Superblock1
from llraid.member import Member


class RdevState(enum.Enum):
    IN_SYNC = "in_sync"
    RECOVERING = "recovering"  # has a slot, being rebuilt; valid below recovery_offset
    FAULTY = "faulty"
    SPARE = "spare"


@dataclass
class Rdev:
    """One member device in the running array."""

    member: Member
    state: RdevState
    role: int | None
    recovery_offset: int = 0  # member data sectors already rebuilt (RECOVERING only)
    bitmap_sync: bool = False  # a re-added member: recover only what the bitmap marks
    target: BitmapTarget | None = None
    corrected_reads: int = 0
    replaces: Rdev | None = None  # md's replacement: built while this member still serves

    def __post_init__(self) -> None:
        self.name = self.member.path  # cached: used on every IO for the counters
        self.data_off = self.member.sb.data_offset * SECTOR

    @property
    def path(self) -> str:
        return self.name

    @property
    def device(self) -> Device:
        return self.member.device

    @property
    def sb(self) -> Superblock1:
        return self.member.sb

    @property
    def data_offset_bytes(self) -> int:
        return self.data_off
