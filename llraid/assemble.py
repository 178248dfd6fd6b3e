"""Putting members together into an array, as mdadm and md's ``analyze_sbs`` do.

Rules (spec/ONDISK.md 2.3 and 2.5):

* every member must carry the same array UUID and a valid checksum (``force`` overrides the
  checksum and size checks, never the UUID);
* the member with the most events is the freshest; its ``dev_roles`` decide every member's
  role, so a member that the freshest superblock records as faulty or spare is not used;
* a member whose events are more than one behind the freshest is stale ("non-fresh") and its
  data is never read; one the freshest superblock records as faulty is not used either;
* a member that was being recovered (RECOVERY_OFFSET) is in sync only below
  ``recovery_offset``; a replacement is not read from;
* the personality then decides whether the present roles can serve every sector.

Read-only: nothing here writes to a member.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llraid.device import SECTOR
from llraid.errors import AssemblyError, ChecksumError, DirtyDegradedError, FormatError
from llraid.format.bitmap import BitmapSuper
from llraid.format.superblock import ROLE_FAULTY, ROLE_MAX, Feature, Superblock1, format_uuid
from llraid.member import Member
from llraid.raid.base import Personality
from llraid.raid.registry import level_name, personality_for


def check_member(member: Member, *, force: bool = False) -> None:
    """Refuse a member md would refuse: bad checksum, bad structure, device too small."""
    sb = member.sb
    problem = member.checksum_problem
    if problem and not force:
        raise ChecksumError(f"{problem} (use --force to read it anyway)", sb.computed_checksum, sb.sb_csum)
    problems = sb.structural_problems(member.device.sectors)
    if problems and not force:
        raise FormatError(f"{member.path}: {'; '.join(problems)}")


@dataclass
class Slot:
    """An accepted member in its role."""

    member: Member
    role: int
    in_sync_below: int  # member data sectors below this are usable


@dataclass
class Assembly:
    """An assembled array: which member serves which role, and the array's geometry."""

    sb: Superblock1  # the freshest superblock: the array's truth
    personality: Personality
    slots: dict[int, Slot]
    members: list[Member]
    stale: list[Member] = field(default_factory=list)
    spares: list[Member] = field(default_factory=list)
    bitmap_sb: BitmapSuper | None = None
    faulty: list[Member] = field(default_factory=list)
    bitmap_problem: str | None = None  # why the bitmap could not be read, when it was not needed

    @property
    def uuid(self) -> str:
        return format_uuid(self.sb.set_uuid)

    @property
    def array_sectors(self) -> int:
        return self.personality.array_sectors

    @property
    def array_bytes(self) -> int:
        return self.array_sectors * SECTOR

    @property
    def degraded(self) -> bool:
        return any(r not in self.slots for r in range(self.sb.raid_disks))

    @property
    def fully_in_sync(self) -> bool:
        """Every role has a member in sync over the whole component (none still being recovered)."""
        return all(
            r in self.slots and self.slots[r].in_sync_below >= self.sb.size for r in range(self.sb.raid_disks)
        )

    # MemberIO, for the personality
    def available(self, role: int, sector: int, count: int) -> bool:
        slot = self.slots.get(role)
        return slot is not None and sector + count <= slot.in_sync_below

    def read(self, role: int, sector: int, count: int) -> bytes:
        slot = self.slots[role]
        return slot.member.device.pread((slot.member.sb.data_offset + sector) * SECTOR, count * SECTOR)

    def read_sectors(self, sector: int, count: int) -> bytes:
        if sector < 0 or count < 0 or sector + count > self.array_sectors:
            size = self.array_sectors
            raise AssemblyError(
                f"read of sectors {sector}..{sector + count} is outside the array ({size} sectors)"
            )
        return self.personality.read(self, sector, count)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Array bytes ``[offset, offset+length)``, any alignment."""
        if offset < 0 or length < 0 or offset + length > self.array_bytes:
            raise AssemblyError(
                f"read of {length} bytes at {offset} is outside the array ({self.array_bytes} bytes)"
            )
        if length == 0:
            return b""
        first = offset // SECTOR
        last = (offset + length + SECTOR - 1) // SECTOR
        data = self.read_sectors(first, last - first)
        skip = offset - first * SECTOR
        return data[skip : skip + length]

    def iter_bytes(self, offset: int, length: int, piece: int = 1 << 20) -> Iterator[bytes]:
        end = offset + length
        while offset < end:
            n = min(piece, end - offset)
            yield self.read_bytes(offset, n)
            offset += n


def _geometry_key(sb: Superblock1) -> tuple[int, ...]:
    return (sb.level, sb.layout, sb.chunksize, sb.raid_disks, sb.size)


def assemble(members: Sequence[Member], *, force: bool = False, need_bitmap: bool = True) -> Assembly:
    """Validate members and decide roles; see the module docstring for the rules.

    ``need_bitmap=False`` (reading the data): a bitmap that cannot be read is reported in
    ``bitmap_problem`` instead of refusing the array; reads never use the bitmap."""
    if not members:
        raise AssemblyError("no members given")
    for m in members:
        check_member(m, force=force)
    uuids = {m.sb.set_uuid for m in members}
    if len(uuids) > 1:
        desc = ", ".join(f"{m.path} is {format_uuid(m.sb.set_uuid)}" for m in members)
        raise AssemblyError(f"members of different arrays: {desc}")
    by_number: dict[int, Member] = {}
    for m in members:
        other = by_number.get(m.sb.dev_number)
        if other is not None:
            raise AssemblyError(f"{m.path} and {other.path} both claim device number {m.sb.dev_number}")
        by_number[m.sb.dev_number] = m

    fresh = max(members, key=lambda m: m.sb.events)
    ref = fresh.sb
    slots: dict[int, Slot] = {}
    stale: list[Member] = []
    spares: list[Member] = []
    faulty: list[Member] = []
    for m in members:
        role = ref.role_of(m.sb.dev_number)
        if m.sb.events + 1 < ref.events:
            stale.append(m)  # kicked as non-fresh: its data is never used
            continue
        if role == ROLE_FAULTY:
            faulty.append(m)  # the freshest superblock says it failed: never used again
            continue
        if role >= ROLE_MAX or role >= ref.raid_disks:
            spares.append(m)
            continue
        if _geometry_key(m.sb) != _geometry_key(ref):
            raise AssemblyError(
                f"{m.path}: geometry differs from {fresh.path} (level/layout/chunk/disks/size)"
            )
        if m.sb.feature_map & Feature.REPLACEMENT:
            spares.append(m)  # a replacement still being built; its main member serves the role
            continue
        limit = ref.size
        if m.sb.feature_map & Feature.RECOVERY_OFFSET:
            limit = min(limit, m.sb.recovery_offset)
        if role in slots:
            raise AssemblyError(f"{m.path} and {slots[role].member.path} both hold role {role}")
        slots[role] = Slot(m, role, limit)

    personality = personality_for(ref)
    usable = {r for r, s in slots.items() if s.in_sync_below > 0}
    personality.check_roles(usable)

    bitmap_sb = None
    bitmap_problem = None
    if ref.has_bitmap:
        try:
            bitmap_sb = _load_bitmap_sb(fresh, force=force and need_bitmap)
        except FormatError as e:
            if need_bitmap:
                raise
            bitmap_problem = str(e)

    asm = Assembly(ref, personality, slots, list(members), stale, spares, bitmap_sb, faulty, bitmap_problem)
    # md's raid5_run counts a member still being recovered as missing (it is not In_sync): above
    # its recovery offset its blocks, too, can only be rebuilt from parity the crash may have left
    # stale
    if ref.level in (4, 5, 6) and not asm.fully_in_sync and not ref.is_clean and not force:
        raise DirtyDegradedError(
            f"degraded {level_name(ref.level)} that was not shut down cleanly: parity may be stale, so "
            "rebuilt data could be wrong (use --force to read anyway)"
        )
    return asm


def _load_bitmap_sb(member: Member, *, force: bool) -> BitmapSuper | None:
    bsb = member.bitmap_sb
    if bsb is None:
        if force:
            return None
        raise FormatError(f"{member.path}: cannot read the bitmap: {member.bitmap_error}")
    try:
        bsb.check_version()
        if bsb.uuid != member.sb.set_uuid:
            raise FormatError(
                f"bitmap uuid {format_uuid(bsb.uuid)} is not the array's {format_uuid(member.sb.set_uuid)}"
            )
    except FormatError as e:
        if force:
            return None
        raise FormatError(f"{member.path}: {e}") from None
    return bsb
