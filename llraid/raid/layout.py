"""Pure address mapping of Linux md for raid1, raid10 and raid4/5/6 (spec: LAYOUTS.md §3-§5).

Three address spaces appear here, all counted in 512-byte sectors:

* **array sector** (also "virtual sector", ``vsector``): offset on the md device itself,
  ``0 .. array_sectors``.  This is what a user of the array reads and writes, and what the
  raid1/raid10 bitmaps index.
* **member sector**: offset inside one member's *data area*, ``0 .. dev_sectors``; the
  absolute LBA on the member device is ``sb.data_offset + member_sector``.  The raid4/5
  bitmap indexes this space (one stripe row = the same member sector range on every
  member).
* **role**: which member, by the role number stored in the superblock's ``dev_roles``
  table (kernel "slot"/"disk" number), not by device order on a command line.

Nothing here does I/O or keeps state; every function is a deterministic re-derivation of
what the kernel computes in drivers/md/raid10.c and raid5.c, so both the forward map and
its inverse must agree bit for bit with the kernel for on-disk compatibility.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from llraid.errors import LayoutError

__all__ = [
    "RAID5_LAYOUT_NAMES",
    "RAID6_LAYOUT_NAMES",
    "Raid5Algorithm",
    "Raid5Geometry",
    "Raid6Algorithm",
    "Raid6Geometry",
    "Raid10Geometry",
    "StripeLayout",
    "parse_raid5_layout",
    "parse_raid6_layout",
    "parse_raid10_layout",
    "raid1_array_sectors",
    "raid10_layout_text",
]

# The kernel's chunk checks are against PAGE_SIZE; md arrays are created and moved between
# machines with 4 KiB pages, so that is the value we enforce (8 sectors).
PAGE_SECTORS = 8


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


# --------------------------------------------------------------------------------------
# raid1
# --------------------------------------------------------------------------------------


def raid1_array_sectors(size: int) -> int:
    """Array size of a raid1 with component size ``size`` (= ``sb.size``): every member
    holds a full copy, so array sector == member sector and the sizes are equal."""
    if size < 0:
        raise LayoutError(f"raid1: negative component size {size}")
    return size


# --------------------------------------------------------------------------------------
# raid10
# --------------------------------------------------------------------------------------

_R10_OFFSET_BIT = 1 << 16


def raid10_layout_text(layout: int) -> str:
    """The text mdadm's ``print_r10_layout`` prints for ``layout``, minus its leading space
    (``"near=2"``, ``"far=2"``, ``"offset=2"``, ``"near=2, far=2"``, ``"NO REDUNDANCY"``)."""
    near = layout & 0xFF
    far = (layout >> 8) & 0xFF
    # Mirror mdadm's printf sequence literally so odd words (near=0 ...) print the same.
    out = ""
    sep = ""
    if near != 1:
        out += f"{sep} near={near}"
        sep = ","
    if far != 1:
        out += f"{sep} {'offset' if layout & _R10_OFFSET_BIT else 'far'}={far}"
    if near * far == 1:
        out += "NO REDUNDANCY"
    return out.lstrip(" ")


def parse_raid10_layout(name: str) -> int:
    """mdadm's ``parse_layout_10``: ``nN``/``fN``/``oN`` (1 <= N <= 200) to a layout word."""
    kind, digits = name[:1], name[1:]
    # Only plain ASCII digits: strtoul would also take "+2" or " 2", nobody means those.
    if kind not in ("n", "f", "o") or not digits.isascii() or not digits.isdigit():
        raise LayoutError(f"invalid raid10 layout {name!r} (expected nN, fN or oN)")
    copies = int(digits)
    if not 1 <= copies <= 200:
        raise LayoutError(f"invalid raid10 layout {name!r}: copies must be 1..200")
    if kind == "n":
        return 0x100 + copies
    if kind == "o":
        return _R10_OFFSET_BIT + (copies << 8) + 1
    return (copies << 8) + 1


@dataclass(frozen=True)
class Raid10Geometry:
    """One raid10 geometry (kernel ``struct geom`` plus ``conf->dev_sectors``).

    Build it with :meth:`from_superblock`; the plain constructor trusts its arguments
    except for the few checks the arithmetic itself needs.
    """

    raid_disks: int
    chunk_sectors: int
    near: int
    far: int
    offset: bool
    far_set_size: int
    dev_sectors: int
    stride: int
    array_sectors: int
    chunk_shift: int = field(init=False, repr=False, compare=False)
    chunk_mask: int = field(init=False, repr=False, compare=False)
    # Far sets: when raid_disks is not a multiple of far_set_size the last set absorbs the
    # remainder, and both maps special-case it.
    _uneven_sets: bool = field(init=False, repr=False, compare=False)
    _last_set_start: int = field(init=False, repr=False, compare=False)
    _last_set_size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.chunk_sectors):
            raise LayoutError(f"raid10: chunk size {self.chunk_sectors} is not a power of two")
        if self.raid_disks < 1 or self.near < 1 or self.far < 1:
            raise LayoutError("raid10: raid_disks, near and far must all be at least 1")
        if not 1 <= self.far_set_size <= self.raid_disks:
            raise LayoutError(f"raid10: far set size {self.far_set_size} out of range")
        setattr_ = object.__setattr__  # frozen dataclass: derived fields are set once here
        setattr_(self, "chunk_shift", self.chunk_sectors.bit_length() - 1)
        setattr_(self, "chunk_mask", self.chunk_sectors - 1)
        setattr_(self, "_uneven_sets", self.raid_disks % self.far_set_size != 0)
        setattr_(self, "_last_set_start", (self.raid_disks // self.far_set_size - 1) * self.far_set_size)
        setattr_(self, "_last_set_size", self.far_set_size + self.raid_disks % self.far_set_size)

    @classmethod
    def from_superblock(cls, layout: int, raid_disks: int, chunk_sectors: int, size: int) -> Raid10Geometry:
        """Geometry from ``sb.layout``, ``sb.raid_disks``, ``sb.chunksize`` and ``sb.size``,
        validated as the kernel's ``setup_geo``/``setup_conf`` do and sized as
        ``calc_sectors``/``raid10_size`` do."""
        if layout < 0 or layout >> 19:
            raise LayoutError(f"raid10: layout {layout:#x} has bits 19-31 set (or is negative)")
        if chunk_sectors < PAGE_SECTORS or not _is_power_of_two(chunk_sectors):
            raise LayoutError(
                f"raid10: chunk size {chunk_sectors} sectors must be at least {PAGE_SECTORS} and a power of 2"
            )
        if raid_disks < 1:
            raise LayoutError(f"raid10: invalid raid_disks {raid_disks}")
        if size < 0:
            raise LayoutError(f"raid10: negative component size {size}")
        nc = layout & 0xFF
        fc = (layout >> 8) & 0xFF
        fo = bool(layout & _R10_OFFSET_BIT)
        copies = nc * fc
        if not 2 <= copies <= raid_disks:
            raise LayoutError(
                f"raid10: unsupported layout {layout:#x}: near={nc} far={fc} gives {copies} "
                f"copies, need 2..{raid_disks} (raid_disks)"
            )
        variant = layout >> 17
        if variant == 0:
            far_set_size = raid_disks
        elif variant == 1:
            # The buggy "improved" layout; the kernel only warns when far_set_size < fc.
            far_set_size = raid_disks // fc
        elif variant == 2:
            far_set_size = fc * nc
        else:
            raise LayoutError(f"raid10: layout {layout:#x} has invalid far-set variant {variant}")

        shift = chunk_sectors.bit_length() - 1
        # calc_sectors: chunks of the array, then chunks used per member (rounded up).
        array_chunks = ((size >> shift) // fc) * raid_disks // nc
        used_chunks = -(-(array_chunks * copies) // raid_disks)
        stride = chunk_sectors if fo else (used_chunks // fc) << shift
        return cls(
            raid_disks=raid_disks,
            chunk_sectors=chunk_sectors,
            near=nc,
            far=fc,
            offset=fo,
            far_set_size=far_set_size,
            dev_sectors=used_chunks << shift,
            stride=stride,
            array_sectors=array_chunks << shift,
        )

    @property
    def copies(self) -> int:
        """Copies of every array sector (near * far)."""
        return self.near * self.far

    def find_phys(self, vsector: int) -> list[tuple[int, int]]:
        """Array sector -> ``copies`` pairs ``(role, member sector)`` in the kernel's slot
        order (``__raid10_find_phys``): near copies of the first far group first, each
        followed by its far copies."""
        if not 0 <= vsector < self.array_sectors:
            raise LayoutError(f"raid10: array sector {vsector} outside 0..{self.array_sectors}")
        shift = self.chunk_shift
        nc = self.near
        fc = self.far
        disks = self.raid_disks
        stripe, dev = divmod((vsector >> shift) * nc, disks)
        if self.offset:
            stripe *= fc  # each stripe row is followed by its fc-1 offset-copy rows
        base = (vsector & self.chunk_mask) + (stripe << shift)
        out: list[tuple[int, int]] = []
        for _ in range(nc):
            out.append((dev, base))
            if fc > 1:
                d = dev
                s = base
                fss = self.far_set_size
                for _f in range(1, fc):
                    set_no = d // fss
                    d += nc
                    if self._uneven_sets and d > self._last_set_start:
                        d = (d - self._last_set_start) % self._last_set_size + self._last_set_start
                    else:
                        d = d % fss + fss * set_no
                    s += self.stride
                    out.append((d, s))
            dev += 1
            if dev >= disks:
                dev = 0
                base += self.chunk_sectors  # near copies wrapped into the next chunk row
        return out

    def find_virt(self, sector: int, role: int) -> int:
        """Member sector of ``role`` -> array sector (``raid10_find_virt``).

        Member sectors in an incomplete last row map to ``>= array_sectors``; callers
        (recovery) must skip those, as the kernel does.
        """
        if not 0 <= role < self.raid_disks:
            raise LayoutError(f"raid10: role {role} outside 0..{self.raid_disks - 1}")
        if not 0 <= sector < self.dev_sectors:
            raise LayoutError(f"raid10: member sector {sector} outside 0..{self.dev_sectors}")
        nc = self.near
        dev = role
        set_size = self.far_set_size
        set_start = (dev // set_size) * set_size
        if self._uneven_sets and dev >= self._last_set_start:
            set_size = self._last_set_size
            set_start = self._last_set_start
        offset = sector & self.chunk_mask
        if self.offset:
            chunk, fcopy = divmod(sector >> self.chunk_shift, self.far)
            dev -= fcopy * nc
            if dev < set_start:
                dev += set_size
        else:
            # Walk back one far copy per stride, undoing the +nc device rotation each time.
            stride = self.stride
            while sector >= stride:
                sector -= stride
                if dev < nc + set_start:
                    dev += set_size - nc
                else:
                    dev -= nc
            chunk = sector >> self.chunk_shift
        vchunk = (chunk * self.raid_disks + dev) // nc
        return (vchunk << self.chunk_shift) + offset


# --------------------------------------------------------------------------------------
# raid4 / raid5
# --------------------------------------------------------------------------------------


class Raid5Algorithm(IntEnum):
    """raid5 parity placement (``sb.layout`` for level 5; kernel ``ALGORITHM_*``)."""

    LEFT_ASYMMETRIC = 0
    RIGHT_ASYMMETRIC = 1
    LEFT_SYMMETRIC = 2
    RIGHT_SYMMETRIC = 3
    PARITY_0 = 4
    PARITY_N = 5


RAID5_LAYOUT_NAMES: dict[int, str] = {
    0: "left-asymmetric",
    1: "right-asymmetric",
    2: "left-symmetric",
    3: "right-symmetric",
    4: "parity-first",
    5: "parity-last",
}


_LAYOUT_ALIASES = {"la": 0, "ra": 1, "ls": 2, "rs": 3, "default": 2}


def _parse_layout_name(level: int, names: dict[int, str], name: str) -> int:
    key = name.strip().lower()
    for value, text in names.items():
        if key == text.lower():
            return value
    if key in _LAYOUT_ALIASES:
        return _LAYOUT_ALIASES[key]
    raise LayoutError(f"unknown raid{level} layout {name!r} (known: {', '.join(names.values())})")


def parse_raid5_layout(name: str) -> int:
    """mdadm's raid5 layout names (``left-symmetric``, ``ls``, ...) -> ``sb.layout``."""
    return _parse_layout_name(5, RAID5_LAYOUT_NAMES, name)


# Plain ints for the hot path: comparing against IntEnum members is measurably slower.
_LA = int(Raid5Algorithm.LEFT_ASYMMETRIC)
_RA = int(Raid5Algorithm.RIGHT_ASYMMETRIC)
_LS = int(Raid5Algorithm.LEFT_SYMMETRIC)
_RS = int(Raid5Algorithm.RIGHT_SYMMETRIC)
_P0 = int(Raid5Algorithm.PARITY_0)
_PN = int(Raid5Algorithm.PARITY_N)


@dataclass(frozen=True)
class Raid5Geometry:
    """One raid4/raid5 geometry (one parity member per stripe row).

    raid4 keeps parity on the last member whatever ``sb.layout`` says, so a raid4 geometry
    always carries ``Raid5Algorithm.PARITY_N``.
    """

    raid_disks: int
    chunk_sectors: int
    algorithm: Raid5Algorithm
    level: int
    dev_sectors: int
    array_sectors: int
    chunk_shift: int = field(init=False, repr=False, compare=False)
    chunk_mask: int = field(init=False, repr=False, compare=False)
    _data_disks: int = field(init=False, repr=False, compare=False)
    _alg: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.level not in (4, 5):
            raise LayoutError(f"raid5 geometry: level {self.level} is not 4 or 5")
        if not _is_power_of_two(self.chunk_sectors):
            raise LayoutError(f"raid{self.level}: chunk size {self.chunk_sectors} is not a power of two")
        if self.raid_disks < 2:
            raise LayoutError(f"raid{self.level}: need at least 2 members, got {self.raid_disks}")
        setattr_ = object.__setattr__  # frozen dataclass: derived fields are set once here
        setattr_(self, "chunk_shift", self.chunk_sectors.bit_length() - 1)
        setattr_(self, "chunk_mask", self.chunk_sectors - 1)
        setattr_(self, "_data_disks", self.raid_disks - 1)
        setattr_(self, "_alg", _PN if self.level == 4 else int(self.algorithm))

    @classmethod
    def from_superblock(
        cls, level: int, layout: int, raid_disks: int, chunk_sectors: int, size: int
    ) -> Raid5Geometry:
        """Geometry from the superblock, validated as raid5.c ``setup_conf`` does and sized
        as ``raid5_size`` does (component size rounded down to a whole chunk)."""
        if level == 6:
            raise LayoutError("raid6 has two parity blocks per stripe: use Raid6Geometry")
        if level not in (4, 5):
            raise LayoutError(f"raid5 geometry: level {level} is not 4 or 5")
        if level == 5:
            try:
                algorithm = Raid5Algorithm(layout)
            except ValueError:
                raise LayoutError(f"raid5: layout {layout} not supported (valid: 0..5)") from None
        else:
            algorithm = Raid5Algorithm.PARITY_N  # raid4 ignores sb.layout
        if chunk_sectors <= 0 or chunk_sectors % PAGE_SECTORS or not _is_power_of_two(chunk_sectors):
            raise LayoutError(
                f"raid{level}: invalid chunk size {chunk_sectors} sectors "
                f"(must be a power of 2 and a multiple of {PAGE_SECTORS})"
            )
        if raid_disks < 2:
            raise LayoutError(f"raid{level}: need at least 2 members, got {raid_disks}")
        if size < 0:
            raise LayoutError(f"raid{level}: negative component size {size}")
        dev_sectors = size & ~(chunk_sectors - 1)
        return cls(
            raid_disks=raid_disks,
            chunk_sectors=chunk_sectors,
            algorithm=algorithm,
            level=level,
            dev_sectors=dev_sectors,
            array_sectors=dev_sectors * (raid_disks - 1),
        )

    @property
    def data_disks(self) -> int:
        return self._data_disks

    def parity_role(self, stripe: int) -> int:
        """Role holding parity in stripe row ``stripe`` (member sectors
        ``stripe * chunk_sectors ..``)."""
        alg = self._alg
        if alg in (_LA, _LS):
            return self._data_disks - stripe % self.raid_disks
        if alg in (_RA, _RS):
            return stripe % self.raid_disks
        if alg == _P0:
            return 0
        return self._data_disks  # PARITY_N and raid4

    def compute_sector(self, r: int) -> tuple[int, int, int]:
        """Array sector -> ``(data role, parity role, member sector)``
        (``raid5_compute_sector``)."""
        if not 0 <= r < self.array_sectors:
            raise LayoutError(f"raid{self.level}: array sector {r} outside 0..{self.array_sectors}")
        shift = self.chunk_shift
        n = self.raid_disks
        stripe, dd = divmod(r >> shift, self._data_disks)
        alg = self._alg
        if alg == _LS:  # the default layout first
            pd = self._data_disks - stripe % n
            dd = (pd + 1 + dd) % n
        elif alg == _LA:
            pd = self._data_disks - stripe % n
            if dd >= pd:
                dd += 1
        elif alg == _RA:
            pd = stripe % n
            if dd >= pd:
                dd += 1
        elif alg == _RS:
            pd = stripe % n
            dd = (pd + 1 + dd) % n
        elif alg == _P0:
            pd = 0
            dd += 1
        else:  # PARITY_N, raid4
            pd = self._data_disks
        return dd, pd, (stripe << shift) + (r & self.chunk_mask)

    def compute_blocknr(self, member_sector: int, role: int) -> int | None:
        """Member sector of ``role`` -> array sector (``raid5_compute_blocknr``); ``None``
        when ``role`` holds the parity of that stripe row."""
        if not 0 <= role < self.raid_disks:
            raise LayoutError(f"raid{self.level}: role {role} outside 0..{self.raid_disks - 1}")
        if not 0 <= member_sector < self.dev_sectors:
            raise LayoutError(
                f"raid{self.level}: member sector {member_sector} outside 0..{self.dev_sectors}"
            )
        stripe = member_sector >> self.chunk_shift
        pd = self.parity_role(stripe)
        if role == pd:
            return None
        i = role
        alg = self._alg
        if alg in (_LA, _RA):
            if i > pd:
                i -= 1
        elif alg in (_LS, _RS):
            if i < pd:
                i += self.raid_disks
            i -= pd + 1
        elif alg == _P0:
            i -= 1
        return ((stripe * self._data_disks + i) << self.chunk_shift) + (member_sector & self.chunk_mask)

    def bitmap_range(self, start: int, length: int) -> tuple[int, int]:
        """Array range ``[start, start + length)`` -> member range ``[mstart, mend)`` of whole
        stripe rows that the bitmap must cover (``raid5_bitmap_sector``, LAYOUTS §5.5)."""
        if start < 0 or length < 0 or start + length > self.array_sectors:
            raise LayoutError(
                f"raid{self.level}: array range [{start}, {start + length}) outside 0..{self.array_sectors}"
            )
        width = self.chunk_sectors * self._data_disks  # array sectors per stripe row
        # A row-aligned array sector k * width maps to member sector k * chunk on every
        # member, so rounding to rows and mapping reduces to this.
        first_row = start // width
        end_row = -(-(start + length) // width)
        return first_row << self.chunk_shift, end_row << self.chunk_shift


# --------------------------------------------------------------------------------------
# raid6
# --------------------------------------------------------------------------------------


class Raid6Algorithm(IntEnum):
    """raid6 P/Q placement (``sb.layout`` for level 6; kernel ``ALGORITHM_*``)."""

    LEFT_ASYMMETRIC = 0
    RIGHT_ASYMMETRIC = 1
    LEFT_SYMMETRIC = 2
    RIGHT_SYMMETRIC = 3
    PARITY_0 = 4
    PARITY_N = 5
    ROTATING_ZERO_RESTART = 8
    ROTATING_N_RESTART = 9
    ROTATING_N_CONTINUE = 10
    LEFT_ASYMMETRIC_6 = 16
    RIGHT_ASYMMETRIC_6 = 17
    LEFT_SYMMETRIC_6 = 18
    RIGHT_SYMMETRIC_6 = 19
    PARITY_0_6 = 20

    @property
    def is_ddf(self) -> bool:
        """The three DDF layouts, whose Q takes the blocks in a different order (§5.4)."""
        return 8 <= self.value <= 10


# mdadm's r6layout names (the first name map_num finds for each value).
RAID6_LAYOUT_NAMES: dict[int, str] = {
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


def parse_raid6_layout(name: str) -> int:
    """mdadm's raid6 layout names (the raid5 ones, the ``-6`` and the DDF ones) -> ``sb.layout``."""
    return _parse_layout_name(6, RAID6_LAYOUT_NAMES, name)


@dataclass(frozen=True)
class StripeLayout:
    """Where the blocks of one raid6 stripe row live, and their places in the Q syndrome.

    ``Q = sum over k of g^slots[k] * D_k`` where ``D_k`` is the row's logical data block ``k``
    (array order), held by role ``data_roles[k]``.
    """

    p_role: int
    q_role: int
    data_roles: tuple[int, ...]
    slots: tuple[int, ...]
    syndrome_disks: int  # length of the slot sequence: data_disks, or raid_disks for DDF
    _index: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = [-1] * (len(self.data_roles) + 2)
        for k, role in enumerate(self.data_roles):
            index[role] = k
        object.__setattr__(self, "_index", tuple(index))

    def data_index(self, role: int) -> int | None:
        """Logical data block held by ``role`` in this row (``None``: it holds P or Q)."""
        k = self._index[role]
        return None if k < 0 else k

    @property
    def slot_roles(self) -> tuple[int | None, ...]:
        """The role at each syndrome slot, in slot order (``None``: a DDF slot that is empty
        because P or Q sits there; it counts as zeros)."""
        out: list[int | None] = [None] * self.syndrome_disks
        for role, slot in zip(self.data_roles, self.slots, strict=True):
            out[slot] = role
        return tuple(out)


_R6_FIXED = (Raid6Algorithm.PARITY_0, Raid6Algorithm.PARITY_N, Raid6Algorithm.PARITY_0_6)
_R6_ROTATE_N_MINUS_1 = (
    Raid6Algorithm.LEFT_ASYMMETRIC_6,
    Raid6Algorithm.RIGHT_ASYMMETRIC_6,
    Raid6Algorithm.LEFT_SYMMETRIC_6,
    Raid6Algorithm.RIGHT_SYMMETRIC_6,
)


def _raid6_placement(alg: Raid6Algorithm, n: int, stripe: int) -> tuple[int, int, list[int]]:
    """(P role, Q role, role of each logical data block) of stripe row ``stripe``: the level 6
    branch of ``raid5_compute_sector`` evaluated for every data index of the row."""
    A = Raid6Algorithm
    ks = range(n - 2)
    if alg in (A.LEFT_ASYMMETRIC, A.RIGHT_ASYMMETRIC, A.ROTATING_ZERO_RESTART, A.ROTATING_N_RESTART):
        if alg is A.LEFT_ASYMMETRIC:
            pd = n - 1 - stripe % n
        elif alg is A.ROTATING_N_RESTART:
            pd = n - 1 - (stripe + 1) % n  # left-asymmetric shifted so row 0 is D D D P Q
        else:  # right-asymmetric and ROTATING_ZERO_RESTART place blocks alike
            pd = stripe % n
        if pd == n - 1:  # Q D D D P: Q wraps round to the first member
            return pd, 0, [k + 1 for k in ks]
        return pd, pd + 1, [k + 2 if k >= pd else k for k in ks]  # D D P Q D
    if alg in (A.LEFT_SYMMETRIC, A.RIGHT_SYMMETRIC):
        pd = n - 1 - stripe % n if alg is A.LEFT_SYMMETRIC else stripe % n
        return pd, (pd + 1) % n, [(pd + 2 + k) % n for k in ks]
    if alg is A.PARITY_0:
        return 0, 1, [k + 2 for k in ks]
    if alg is A.PARITY_N:
        return n - 2, n - 1, list(ks)
    if alg is A.ROTATING_N_CONTINUE:  # left-symmetric with Q just before P
        pd = n - 1 - stripe % n
        return pd, (pd + n - 1) % n, [(pd + 1 + k) % n for k in ks]
    # The "_6" layouts: the raid5 layout of the same name over the first n-1 members, Q on the last.
    m = n - 1
    if alg in (A.LEFT_ASYMMETRIC_6, A.RIGHT_ASYMMETRIC_6):
        pd = n - 2 - stripe % m if alg is A.LEFT_ASYMMETRIC_6 else stripe % m
        return pd, n - 1, [k + 1 if k >= pd else k for k in ks]
    if alg in (A.LEFT_SYMMETRIC_6, A.RIGHT_SYMMETRIC_6):
        pd = n - 2 - stripe % m if alg is A.LEFT_SYMMETRIC_6 else stripe % m
        return pd, n - 1, [(pd + 1 + k) % m for k in ks]
    return 0, n - 1, [k + 1 for k in ks]  # PARITY_0_6


def _syndrome_slots(
    n: int, pd: int, qd: int, data_roles: list[int], ddf: bool
) -> tuple[tuple[int, ...], int]:
    """(slot of each logical data block, number of slots), as ``set_syndrome_sources`` lays
    the blocks out for the Q computation.

    The kernel walks the members once round, starting at ``raid6_d0``, and hands out slots
    with ``raid6_idx_to_slot``:

    * md layouts: the walk starts just after Q (at member 0 when Q is the last member), P and
      Q get no slot, and the data members are numbered 0, 1, ... in walk order. For the
      symmetric layouts that is the array order; for the asymmetric ones it is not (the data
      after Q come first).
    * DDF layouts: the walk starts at member 0 and every member's position is its slot, P's
      and Q's included, which are then left empty (zeros); so the slot of a data block is its
      role, and there are ``raid_disks`` slots.
    """
    if ddf:
        return tuple(data_roles), n
    start = 0 if qd == n - 1 else qd + 1
    walk = [(start + i) % n for i in range(n)]
    slot_of = {role: slot for slot, role in enumerate(r for r in walk if r not in (pd, qd))}
    return tuple(slot_of[r] for r in data_roles), n - 2


@dataclass(frozen=True)
class Raid6Geometry:
    """One raid6 geometry: two parity blocks per stripe row, P (XOR) and Q (Reed-Solomon).

    Build it with :meth:`from_superblock`. Placement repeats every ``raid_disks`` rows (every
    ``raid_disks - 1`` for the ``_6`` layouts), so one period of :class:`StripeLayout` is
    computed up front and every lookup is an index into it.
    """

    raid_disks: int
    chunk_sectors: int
    algorithm: Raid6Algorithm
    dev_sectors: int
    array_sectors: int
    chunk_shift: int = field(init=False, repr=False, compare=False)
    chunk_mask: int = field(init=False, repr=False, compare=False)
    _rows: tuple[StripeLayout, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.chunk_sectors):
            raise LayoutError(f"raid6: chunk size {self.chunk_sectors} is not a power of two")
        if self.raid_disks < 3:
            raise LayoutError(f"raid6: need at least 3 members, got {self.raid_disks}")
        n = self.raid_disks
        alg = Raid6Algorithm(self.algorithm)
        if alg in _R6_FIXED:
            period = 1
        elif alg in _R6_ROTATE_N_MINUS_1:
            period = n - 1
        else:
            period = n
        rows = []
        for s in range(period):
            pd, qd, data = _raid6_placement(alg, n, s)
            slots, syndrome_disks = _syndrome_slots(n, pd, qd, data, alg.is_ddf)
            rows.append(StripeLayout(pd, qd, tuple(data), slots, syndrome_disks))
        setattr_ = object.__setattr__  # frozen dataclass: derived fields are set once here
        setattr_(self, "chunk_shift", self.chunk_sectors.bit_length() - 1)
        setattr_(self, "chunk_mask", self.chunk_sectors - 1)
        setattr_(self, "_rows", tuple(rows))

    @classmethod
    def from_superblock(cls, layout: int, raid_disks: int, chunk_sectors: int, size: int) -> Raid6Geometry:
        """Geometry from ``sb.layout``, ``sb.raid_disks``, ``sb.chunksize`` and ``sb.size``,
        validated as raid5.c ``setup_conf`` does (``algorithm_valid_raid6``) and sized as
        ``raid5_size`` does for two parity members."""
        try:
            algorithm = Raid6Algorithm(layout)
        except ValueError:
            raise LayoutError(f"raid6: layout {layout} not supported (valid: 0..5, 8..10, 16..20)") from None
        if chunk_sectors <= 0 or chunk_sectors % PAGE_SECTORS or not _is_power_of_two(chunk_sectors):
            raise LayoutError(
                f"raid6: invalid chunk size {chunk_sectors} sectors "
                f"(must be a power of 2 and a multiple of {PAGE_SECTORS})"
            )
        # mdadm creates raid6 with 4 or more members; the kernel's arithmetic only needs a
        # data member, so an array it would run is not refused here.
        if raid_disks < 3:
            raise LayoutError(f"raid6: need at least 3 members, got {raid_disks}")
        if size < 0:
            raise LayoutError(f"raid6: negative component size {size}")
        dev_sectors = size & ~(chunk_sectors - 1)
        return cls(
            raid_disks=raid_disks,
            chunk_sectors=chunk_sectors,
            algorithm=algorithm,
            dev_sectors=dev_sectors,
            array_sectors=dev_sectors * (raid_disks - 2),
        )

    @property
    def level(self) -> int:
        return 6

    @property
    def data_disks(self) -> int:
        return self.raid_disks - 2

    def stripe(self, stripe: int) -> StripeLayout:
        """Placement and syndrome order of stripe row ``stripe`` (member sectors
        ``stripe * chunk_sectors ..``)."""
        return self._rows[stripe % len(self._rows)]

    def compute_sector(self, r: int) -> tuple[int, int, int, int]:
        """Array sector -> ``(data role, P role, Q role, member sector)``
        (``raid5_compute_sector``)."""
        if not 0 <= r < self.array_sectors:
            raise LayoutError(f"raid6: array sector {r} outside 0..{self.array_sectors}")
        stripe, k = divmod(r >> self.chunk_shift, self.raid_disks - 2)
        row = self._rows[stripe % len(self._rows)]
        return row.data_roles[k], row.p_role, row.q_role, (stripe << self.chunk_shift) + (r & self.chunk_mask)

    def compute_blocknr(self, member_sector: int, role: int) -> int | None:
        """Member sector of ``role`` -> array sector (``raid5_compute_blocknr``); ``None``
        when ``role`` holds P or Q of that stripe row."""
        if not 0 <= role < self.raid_disks:
            raise LayoutError(f"raid6: role {role} outside 0..{self.raid_disks - 1}")
        if not 0 <= member_sector < self.dev_sectors:
            raise LayoutError(f"raid6: member sector {member_sector} outside 0..{self.dev_sectors}")
        stripe = member_sector >> self.chunk_shift
        k = self._rows[stripe % len(self._rows)].data_index(role)
        if k is None:
            return None
        chunk = stripe * (self.raid_disks - 2) + k
        return (chunk << self.chunk_shift) + (member_sector & self.chunk_mask)

    def bitmap_range(self, start: int, length: int) -> tuple[int, int]:
        """Array range -> member range ``[mstart, mend)`` of whole stripe rows that the bitmap
        must cover (``raid5_bitmap_sector``, LAYOUTS §5.5); as for raid5."""
        if start < 0 or length < 0 or start + length > self.array_sectors:
            raise LayoutError(
                f"raid6: array range [{start}, {start + length}) outside 0..{self.array_sectors}"
            )
        width = self.chunk_sectors * (self.raid_disks - 2)
        first_row = start // width
        end_row = -(-(start + length) // width)
        return first_row << self.chunk_shift, end_row << self.chunk_shift
