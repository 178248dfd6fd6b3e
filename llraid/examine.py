"""``examine`` and ``examine-bitmap``: the facts mdadm prints, in mdadm's words.

Output is built as a list of :class:`Fact` (key, value) with ``None`` for mdadm's blank lines,
so the text form matches ``mdadm --examine`` / ``mdadm -X`` line for line and the JSON form
carries exactly the same facts. The rules (which lines appear when, how sizes are rounded) are
mdadm 4.6's ``examine_super1``, ``getinfo_super1``, ``human_size`` and ``ExamineBitmap``.

Where mdadm cannot help (it refuses llbitmap in ``-X``), ``examine-bitmap`` prints the
superblock facts and the per-state chunk counts in the kernel's sysfs ``llbitmap/bits`` words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llraid.device import SECTOR
from llraid.errors import FormatError
from llraid.format import classic, llbitmap
from llraid.format.bitmap import BITMAP_MAGIC, BitmapSuper, flag_names
from llraid.format.superblock import (
    MAX_SECTOR,
    ROLE_FAULTY,
    ROLE_JOURNAL,
    ROLE_MAX,
    Feature,
    Superblock1,
    format_uuid,
)
from llraid.member import Member
from llraid.raid.layout import RAID5_LAYOUT_NAMES, RAID6_LAYOUT_NAMES, raid10_layout_text
from llraid.raid.registry import level_name

Fact = tuple[str, str] | None
INT64_MAX = (1 << 63) - 1

# mdadm right-aligns keys to 15 columns, except these two, which are one column short.
_NARROW = {"Device Role", "Array State"}


def human_size(nbytes: int) -> str:
    """mdadm's ``human_size``: " (x.yy MiB x.yy MB)" style suffix, empty below ~5 MB."""
    if nbytes < 5000 * 1024:
        return ""
    if nbytes < 2 << 30:
        cb, cd, units = (nbytes * 200 // (1 << 20) + 1) // 2, (nbytes // 5000 + 1) // 2, ("MiB", "MB")
    elif nbytes < 2 << 40:
        cb, cd, units = (nbytes * 200 // (1 << 30) + 1) // 2, (nbytes // 5_000_000 + 1) // 2, ("GiB", "GB")
    else:
        cb, cd, units = (
            (nbytes * 200 // (1 << 40) + 1) // 2,
            (nbytes // 5_000_000_000 + 1) // 2,
            ("TiB", "TB"),
        )
    return f" ({cb // 100}.{cb % 100:02d} {units[0]} {cd // 100}.{cd % 100:02d} {units[1]})"


def human_chunksize(nbytes: int) -> str:
    """mdadm's ``human_chunksize``: truncated to the largest 1024 power, e.g. "64 MB"."""
    units = ["B", "KB", "MB", "GB", "TB"]
    i = 0
    while nbytes >> 10 and i < len(units) - 1:
        nbytes >>= 10
        i += 1
    return f"{nbytes} {units[i]}"


def md_time(seconds: int) -> str:
    """C ``ctime`` in local time, without the newline, as mdadm prints times."""
    return time.asctime(time.localtime(seconds))


def mdadm_bitmap_bytes(bsb: BitmapSuper | None, boundary: int = 4096) -> int:
    """mdadm's ``calc_bitmap_size``: it always reads ``chunksize`` as bytes, even for llbitmap.

    Reproduced as is because "Unused Space" depends on it (fixtures a/b/h show the effect).
    """
    if bsb is None or bsb.chunksize == 0:
        return 0
    bits = (bsb.sync_size * 512 + bsb.chunksize - 1) // bsb.chunksize
    nbytes = (bits + 7) // 8 + 256
    return -(-nbytes // boundary) * boundary


def unused_space(sb: Superblock1, bsb: BitmapSuper | None, dev_sectors: int) -> tuple[int, int]:
    """``(before, after)`` as mdadm's ``getinfo_super1``; after is u64 (may wrap when too small)."""
    bitmap_offset = sb.bitmap_offset if sb.has_bitmap else 0
    data_size = sb.data_size if sb.level <= 0 else sb.size
    if sb.data_offset < sb.super_offset:  # 1.0: superblock at the end
        before = sb.data_offset
        end = sb.super_offset
        if sb.bblog_offset and sb.bblog_size:
            end = min(end, sb.super_offset + sb.bblog_offset)
        end = min(end, sb.super_offset + bitmap_offset)
        after = end - data_size - sb.data_offset if sb.data_offset + data_size < end else 0
    else:
        earliest = sb.super_offset + 72
        if bitmap_offset > 0:
            earliest = max(earliest, bitmap_offset + mdadm_bitmap_bytes(bsb) // 512)
        if sb.bblog_offset and sb.bblog_size:
            earliest = max(earliest, sb.super_offset + sb.bblog_offset + sb.bblog_size)
        before = sb.data_offset - earliest if earliest < sb.data_offset else 0
        after = (dev_sectors - data_size - sb.data_offset) & MAX_SECTOR
    if before == 0 and after == 0:
        after = 1  # mdadm's sentinel for "nothing to report"
    if sb.role == ROLE_JOURNAL:
        after = (dev_sectors - sb.data_offset) % 8
    return before, after


def array_state_letters(sb: Superblock1) -> tuple[str, bool]:
    """mdadm's "Array State" letters, and whether the role table is inconsistent."""
    extra = -sb.delta_disks if sb.feature_map & Feature.RESHAPE_ACTIVE and sb.delta_disks < 0 else 0
    slots = sb.raid_disks + extra
    letters = []
    inconsistent = False
    for d in range(slots):
        cnt = sum(1 for r in sb.dev_roles if r == d)
        if cnt == 2 and sb.level != 0:
            letters.append("R")
        elif cnt == 1:
            letters.append("A")
        elif cnt == 0:
            letters.append(".")
        else:
            letters.append("?")
            inconsistent = True
    if any(slots < r <= ROLE_MAX for r in sb.dev_roles):
        inconsistent = True
    return "".join(letters), inconsistent


def device_role_text(sb: Superblock1) -> str:
    role = sb.role
    if role >= ROLE_FAULTY:
        return "spare"
    if role == ROLE_JOURNAL:
        return "Journal"
    if sb.feature_map & Feature.REPLACEMENT:
        return f"Replacement device {role}"
    return f"Active device {role}"


def _sizes(sb: Superblock1) -> list[Fact]:
    facts: list[Fact] = [("Avail Dev Size", f"{sb.data_size} sectors{human_size(sb.data_size * 512)}")]
    if sb.level == 0:  # mdadm compares unsigned: negative levels get here too
        return facts
    ddsks, denom = {
        1: (1, 1),
        4: (sb.raid_disks - 1, 1),
        5: (sb.raid_disks - 1, 1),
        6: (sb.raid_disks - 2, 1),
    }.get(sb.level, (0, 1))
    if sb.level == 10:
        ddsks, denom = sb.raid_disks, (sb.layout & 255) * ((sb.layout >> 8) & 255)
    if ddsks and denom:
        asize = (sb.size << 9) * ddsks // denom
        facts.append(("Array Size", f"{asize >> 10} KiB{human_size(asize)}"))
    if sb.size != sb.data_size:
        facts.append(("Used Dev Size", f"{sb.size} sectors{human_size(sb.size << 9)}"))
    return facts


def examine_facts(member: Member, homehost: str | None = None) -> list[Fact]:
    """Every line of ``mdadm --examine`` for one member, in order (``None`` = blank line)."""
    sb = member.sb
    bsb = member.bitmap_sb
    # mdadm drops the bitmap bit (in memory only) when the bitmap header is not this array's.
    bitmap_usable = bsb is not None and bsb.uuid == sb.set_uuid
    feature_map = (
        sb.feature_map if bitmap_usable or not sb.has_bitmap else sb.feature_map & ~Feature.BITMAP_OFFSET
    )
    name = sb.set_name_raw.split(b"\0", 1)[0][:32].decode("utf-8", "replace")
    if homehost and 0 < len(homehost) < 32 and name.startswith(homehost + ":"):
        name += f"  (local to host {homehost})"
    facts: list[Fact] = [
        ("Magic", f"{sb.magic:08x}"),
        ("Version", f"1.{sb.minor_version}"),
        ("Feature Map", f"{feature_map:#x}"),
        ("Array UUID", format_uuid(sb.set_uuid)),
        ("Name", name),
        ("Creation Time", md_time(sb.ctime_seconds)),
        ("Raid Level", level_name(sb.level) if sb.level in _KNOWN_LEVELS else "-unknown-"),
        ("Raid Devices", str(sb.raid_disks)),
        None,
        *_sizes(sb),
    ]
    if sb.data_offset:
        facts.append(("Data Offset", f"{sb.data_offset} sectors"))
    if sb.new_offset and sb.feature_map & Feature.NEW_OFFSET:
        facts.append(("New Offset", f"{sb.data_offset + sb.new_offset} sectors"))
    facts.append(("Super Offset", f"{sb.super_offset} sectors"))
    if sb.feature_map & Feature.RECOVERY_OFFSET:
        facts.append(("Recovery Offset", f"{sb.recovery_offset} sectors"))
    before, after = unused_space(sb, bsb if bitmap_usable else None, member.device.sectors)
    if after != 1 and not sb.feature_map & Feature.NEW_OFFSET:
        tail = (
            f"after={after} sectors"
            if after <= INT64_MAX
            else f"after=-{MAX_SECTOR - after} sectors DEVICE TOO SMALL"
        )
        facts.append(("Unused Space", f"before={before} sectors, {tail}"))
    state = "clean" if sb.is_clean else "active"
    if after > INT64_MAX:
        state += " TRUNCATED DEVICE"
    facts += [("State", state), ("Device UUID", format_uuid(sb.device_uuid)), None]
    if feature_map & Feature.BITMAP_OFFSET:
        facts.append(("Internal Bitmap", f"{sb.bitmap_offset} sectors from superblock"))
    elif feature_map & (Feature.PPL | Feature.MULTIPLE_PPLS):
        raw = sb.bitmap_offset & 0xFFFFFFFF
        facts.append(("PPL", f"{raw >> 16} sectors at offset {raw & 0xFFFF} sectors from superblock"))
    if sb.feature_map & Feature.RESHAPE_ACTIVE:
        facts += _reshape_facts(sb)
    if sb.devflags:
        flags = "".join(n for bit, n in ((1, " write-mostly"), (2, " failfast")) if sb.devflags & bit)
        facts.append(("Flags", flags.strip()))
    facts.append(("Update Time", md_time(sb.utime_seconds)))
    if sb.bblog_size and sb.bblog_offset:
        present = " - bad blocks present." if sb.feature_map & Feature.BAD_BLOCKS else ""
        facts.append(
            (
                "Bad Block Log",
                f"{sb.bblog_size * 512 // 8} entries available at offset {sb.bblog_offset} sectors{present}",
            )
        )
    csum = (
        f"{sb.sb_csum:x} - correct"
        if sb.checksum_ok
        else f"{sb.sb_csum:x} - expected {sb.computed_checksum:x}"
    )
    facts += [("Checksum", csum), ("Events", str(sb.events)), None]
    if sb.level in (5, 6):
        facts.append(("Layout", _parity_layout_name(sb.level, sb.layout)))
    elif sb.level == 10:
        facts.append(("Layout", raid10_layout_text(sb.layout)))
    if sb.level in (0, 4, 5, 6, 10):
        facts.append(("Chunk Size", f"{sb.chunksize // 2}K"))
    elif sb.level == -1:
        facts.append(("Rounding", f"{sb.chunksize // 2}K"))
    letters, _ = array_state_letters(sb)
    facts += [
        None,
        ("Device Role", device_role_text(sb)),
        ("Array State", f"{letters} ('A' == active, '.' == missing, 'R' == replacing)"),
    ]
    return facts


_KNOWN_LEVELS = {-5, -4, -1, 0, 1, 4, 5, 6, 10}


def _parity_layout_name(level: int, layout: int) -> str:
    # mdadm looks raid6 layouts up in its r6layout table (which has the -6 and DDF names).
    names = RAID6_LAYOUT_NAMES if level == 6 else RAID5_LAYOUT_NAMES
    return names.get(layout, "-unknown-")


def _reshape_facts(sb: Superblock1) -> list[Fact]:
    facts: list[Fact] = [
        ("Reshape pos'n", f"{sb.reshape_position // 2}{human_size(sb.reshape_position << 9)}")
    ]
    if sb.delta_disks:
        facts.append(
            ("Delta Devices", f"{sb.delta_disks} ({sb.raid_disks - sb.delta_disks}->{sb.raid_disks})")
        )
    if sb.new_level != sb.level:
        facts.append(("New Level", level_name(sb.new_level)))
    if sb.new_layout != sb.layout:
        if sb.level == 10:
            facts.append(("New Layout", raid10_layout_text(sb.new_layout)))
        else:
            facts.append(("New Layout", _parity_layout_name(sb.level, sb.new_layout)))
    if sb.new_chunk != sb.chunksize:
        facts.append(("New Chunksize", f"{sb.new_chunk // 2}K"))
    facts.append(None)
    return facts


def render(facts: list[Fact], width: int = 15, narrow: frozenset[str] | set[str] = frozenset()) -> str:
    lines = []
    for f in facts:
        if f is None:
            lines.append("")
        else:
            key, value = f
            w = width - 1 if key in narrow else width
            lines.append(f"{key:>{w}} : {value}")
    return "\n".join(lines) + "\n"


def examine_text(member: Member, homehost: str | None = None) -> str:
    return f"{member.path}:\n" + render(examine_facts(member, homehost), narrow=_NARROW)


def superblock_json(sb: Superblock1) -> dict[str, Any]:
    """The raw superblock fields, decoded, for scripts."""
    letters, _ = array_state_letters(sb)
    return {
        "major_version": sb.major_version,
        "minor_version": sb.minor_version,
        "feature_map": sb.feature_map,
        "features": [f.name for f in Feature if sb.feature_map & f],
        "set_uuid": format_uuid(sb.set_uuid),
        "set_name": sb.set_name,
        "ctime": sb.ctime_seconds,
        "level": sb.level,
        "layout": sb.layout,
        "size": sb.size,
        "chunksize": sb.chunksize,
        "raid_disks": sb.raid_disks,
        "bitmap_offset": sb.bitmap_offset,
        "data_offset": sb.data_offset,
        "data_size": sb.data_size,
        "super_offset": sb.super_offset,
        "recovery_offset": sb.recovery_offset,
        "dev_number": sb.dev_number,
        "device_uuid": format_uuid(sb.device_uuid),
        "devflags": sb.devflags,
        "bblog_offset": sb.bblog_offset,
        "bblog_size": sb.bblog_size,
        "utime": sb.utime_seconds,
        "events": sb.events,
        "resync_offset": sb.resync_offset,
        "sb_csum": sb.sb_csum,
        "sb_csum_expected": sb.computed_checksum,
        "checksum_ok": sb.checksum_ok,
        "max_dev": sb.max_dev,
        "logical_block_size": sb.logical_block_size,
        "role": sb.role,
        "dev_roles": list(sb.dev_roles[: max(sb.raid_disks, _last_used_role(sb) + 1)]),
        "array_state": letters,
    }


def _last_used_role(sb: Superblock1) -> int:
    used = [i for i, r in enumerate(sb.dev_roles) if r != 0xFFFF]
    return used[-1] if used else -1


def examine_json(member: Member, homehost: str | None = None) -> dict[str, Any]:
    facts = {f[0]: f[1] for f in examine_facts(member, homehost) if f is not None}
    return {"device": member.path, "facts": facts, "superblock": superblock_json(member.sb)}


# ---- examine-bitmap --------------------------------------------------------------------------

_BITMAP_STATES = {0: "OK", 2: "Out of date"}


@dataclass
class BitmapReport:
    facts: list[Fact]
    data: dict[str, Any]
    text_extra: str = ""


def examine_bitmap(member: Member) -> BitmapReport:
    """Facts of ``mdadm -X`` for classic bitmaps; superblock facts plus state counts for llbitmap."""
    if not member.sb.has_bitmap:
        raise FormatError(f"{member.path} doesn't have bitmap")
    bsb = member.bitmap_sb
    if bsb is None:
        raise FormatError(f"{member.path}: cannot read the bitmap: {member.bitmap_error}")
    facts: list[Fact] = [
        ("Filename", member.path),
        ("Magic", f"{bsb.magic:08x}"),
        ("Version", str(bsb.version)),
    ]
    if bsb.magic != BITMAP_MAGIC:
        raise FormatError(f"{member.path}: invalid bitmap magic {bsb.magic:#x}")
    bsb.check_version()
    common: list[Fact] = [
        ("UUID", format_uuid(bsb.uuid)),
        ("Events", str(bsb.events)),
        ("Events Cleared", str(bsb.events_cleared)),
    ]
    data: dict[str, Any] = {
        "device": member.path,
        "magic": bsb.magic,
        "version": bsb.version,
        "uuid": format_uuid(bsb.uuid),
        "uuid_matches_array": bsb.uuid == member.sb.set_uuid,
        "events": bsb.events,
        "events_cleared": bsb.events_cleared,
        "state": bsb.state,
        "state_flags": flag_names(bsb.state),
        "sync_size": bsb.sync_size,
        "daemon_sleep": bsb.daemon_sleep,
        "write_behind": bsb.write_behind,
        "sectors_reserved": bsb.sectors_reserved,
    }
    write_mode = f"Allow write behind, max {bsb.write_behind}" if bsb.write_behind else "Normal"
    sync = ("Sync Size", f"{bsb.sync_size // 2}{human_size(bsb.sync_size * 512)}")
    if bsb.version == 6:
        return _examine_llbitmap(member, bsb, facts + common, data, write_mode, sync)
    chunks = classic.classic_chunks(bsb)
    bits = classic.parse_bits(member.read_bitmap_area(classic.classic_area_bytes(chunks)), chunks)
    dirty = int(bits.sum())
    facts += [
        *common,
        ("State", _BITMAP_STATES.get(bsb.state, "Unknown")),
        ("Chunksize", human_chunksize(bsb.chunksize)),
        ("Daemon", f"{bsb.daemon_sleep}s flush period"),
        ("Write Mode", write_mode),
        sync,
        ("Bitmap", f"{chunks} bits (chunks), {dirty} dirty ({100.0 * dirty / (chunks or 1):.1f}%)"),
    ]
    data.update(kind="classic", chunksize_bytes=bsb.chunksize, chunks=chunks, dirty=dirty)
    return BitmapReport(facts, data)


def _examine_llbitmap(
    member: Member, bsb: BitmapSuper, facts: list[Fact], data: dict[str, Any], write_mode: str, sync: Fact
) -> BitmapReport:
    geo = llbitmap.geometry_of(bsb)
    states = llbitmap.parse_states(member.read_bitmap_area(geo.used_bytes), geo.chunks)
    counts, invalid = llbitmap.count_states(states)
    flags = flag_names(bsb.state)
    facts += [
        ("State", " ".join(flags) if flags else "OK"),
        ("Chunksize", f"{human_chunksize(geo.chunksize * SECTOR)} ({geo.chunksize} sectors)"),
        ("Daemon", f"{bsb.daemon_sleep}s flush period"),
        ("Write Mode", write_mode),
        sync,
        ("Sectors Reserved", str(bsb.sectors_reserved)),
        ("Bitmap", f"{geo.chunks} chunks (llbitmap), {counts[llbitmap.LLState.DIRTY]} dirty"),
    ]
    extra = llbitmap.bits_text(counts)
    if invalid:
        extra += f"invalid {invalid}\n"
    data.update(
        kind="llbitmap",
        first_use=bool(bsb.state & 0x8),
        chunksize_raw=bsb.chunksize,
        chunksize_sectors=geo.chunksize,
        chunkshift=geo.chunkshift,
        chunks=geo.chunks,
        bits={s.label: counts[s] for s in llbitmap.LLState},
        invalid=invalid,
        runs=[
            [a, b, llbitmap.LLState(v).title if v < llbitmap.STATE_COUNT else v]
            for a, b, v in llbitmap.runs(states)
        ],
    )
    return BitmapReport(facts, data, extra)


def examine_bitmap_text(report: BitmapReport) -> str:
    text = render(report.facts, width=16)
    if report.text_extra:
        text += "\n" + report.text_extra
    return text
