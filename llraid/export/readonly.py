"""What ``llraid serve`` assembles: an :class:`~llraid.array.Array`, or for ``--readonly`` raid4/5
(which llraid reads but does not write) a read-only array over the read-only assembly.

The raid4/5 array is an ``Array`` so that the service (status, detail, members, stop) treats it
like any other; only the IO differs: reads go through the raid5 personality (the data chunk,
or the XOR of the rest of the stripe when its member is missing), and nothing is ever written.
No bitmap is loaded: reads do not need one.
"""

from __future__ import annotations

from collections.abc import Sequence

from llraid.array import Array, IOFailure, Rdev, RdevState
from llraid.assemble import Assembly, assemble
from llraid.errors import AssemblyError
from llraid.member import Member, open_member

PARITY_LEVELS = (4, 5)


class _MemberReader:
    """The personality's view of the array's members (MemberIO)."""

    def __init__(self, array: Array) -> None:
        self.array = array

    def available(self, role: int, sector: int, count: int) -> bool:
        return self.array.available(role, sector, count)

    def read(self, role: int, sector: int, count: int) -> bytes:
        d = self.array.by_role(role)
        assert d is not None  # the personality asks available() first
        return self.array.read_member(d, sector, count)


class ReadOnlyParityArray(Array):
    """raid4/raid5, read-only."""

    def read(self, sector: int, count: int) -> bytes:
        self._check_range(sector, count)
        try:
            return self.personality.read(_MemberReader(self), sector, count)
        except AssemblyError as e:  # too few members for this stripe
            raise IOFailure(str(e)) from None

    def discard(self, sector: int, count: int) -> None:
        raise IOFailure("array is read-only")

    def flush(self) -> None:
        pass  # nothing is ever written


def assemble_for_serving(paths: Sequence[str], *, run: bool, force: bool, readonly: bool) -> Array:
    if readonly:
        members: list[Member] = []
        try:
            for p in paths:
                members.append(open_member(p))
            asm = assemble(members, force=force)
            if asm.sb.level in PARITY_LEVELS:
                return _parity_array(asm, run=run)
        except BaseException:
            for m in members:
                m.device.close()
            raise
        for m in members:
            m.device.close()
    return Array.assemble(paths, run=run, force=force, readonly=readonly)


def _parity_array(asm: Assembly, *, run: bool) -> ReadOnlyParityArray:
    """The assembly's members in their roles, as :meth:`Array.assemble` would place them."""
    ref = asm.sb
    rdevs: list[Rdev] = []
    for role, slot in sorted(asm.slots.items()):
        if slot.in_sync_below >= ref.size:
            rdevs.append(Rdev(slot.member, RdevState.IN_SYNC, role))
        else:  # a recovery that stopped part way: in sync below where it got to
            rdevs.append(Rdev(slot.member, RdevState.RECOVERING, role, slot.in_sync_below))
    rdevs += [Rdev(m, RdevState.SPARE, None) for m in asm.spares]
    for m in asm.stale + asm.faulty:
        m.device.close()
    missing = [r for r in range(ref.raid_disks) if r not in asm.slots]
    if missing and not run:  # (the caller closes every member)
        raise AssemblyError(
            f"array would start degraded ({ref.raid_disks - len(missing)} of {ref.raid_disks} members, "
            f"roles {missing} missing); use --run to start it anyway"
        )
    return ReadOnlyParityArray(ref, rdevs, readonly=True)
