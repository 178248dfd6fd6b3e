"""The md v1.x superblock against every kernel-made member, and against damage."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llraid.errors import FormatError, NotMdMemberError
from llraid.format.superblock import (
    MAX_SECTOR,
    Feature,
    Superblock1,
    format_uuid,
    minor_from_super_offset,
    parse_uuid,
    sb1_checksum,
    super_offset_for,
)
from tests.conftest import BY_NAME, MEMBERS

SB_AT = 4096  # all fixtures are metadata 1.2


def _raw_sb(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(SB_AT)
        return f.read(4096)


@pytest.mark.parametrize(("name", "index"), MEMBERS)
def test_round_trip_and_manifest(name: str, index: int, unpacked: Callable[[str], list[Path]]) -> None:
    raw = _raw_sb(unpacked(name)[index])
    sb = Superblock1.parse(raw)
    assert sb.build() == raw[: sb.size_bytes]
    assert sb.checksum_ok
    assert sb1_checksum(raw) == sb.sb_csum
    m = BY_NAME[name].members[index]
    assert sb.dev_number == m["dev_number"]
    assert sb.role == m["role"]
    assert format_uuid(sb.device_uuid) == m["device_uuid"]
    assert sb.events == m["events"]
    assert sb.data_offset == m["data_offset_sectors"]
    assert sb.data_size == m["data_size_sectors"]
    assert sb.super_offset == m["super_offset_sectors"] == 8
    assert format_uuid(sb.set_uuid) == BY_NAME[name].entry["array_uuid"]
    assert sb.set_name == BY_NAME[name].entry["array_name"]
    assert sb.level == BY_NAME[name].entry["level"]
    assert sb.layout == BY_NAME[name].entry["layout"]
    # mdadm writes 0 there; the kernel fills it in on its first update (i1 never had one)
    assert sb.logical_block_size == (0 if sb.events == 0 else 512)
    assert sb.structural_problems(131072) == []


def _fixture_sb(unpacked: Callable[[str], list[Path]]) -> Superblock1:
    return Superblock1.parse(_raw_sb(unpacked("a-raid1-llbitmap")[0]))


def test_checksum_detects_any_changed_field(unpacked: Callable[[str], list[Path]]) -> None:
    sb = _fixture_sb(unpacked)
    damaged = dataclasses.replace(sb, events=sb.events + 1)
    assert not damaged.checksum_ok
    fixed = damaged.with_checksum()
    assert fixed.checksum_ok and fixed.sb_csum != sb.sb_csum
    assert Superblock1.parse(fixed.build()) == fixed


def test_checksum_odd_role_count_and_carry() -> None:
    # An odd max_dev leaves one u16 that is added alone; large words make the sum carry.
    raw = Superblock1.parse(_blank_sb(max_dev=3, fill=0xFFFFFFFF)).build()
    buf = raw[:216] + b"\0" * 4 + raw[220:]
    total = 0
    i = 0
    while len(buf) - i >= 4:  # the spec's loop, written out independently
        total += int.from_bytes(buf[i : i + 4], "little")
        i += 4
    total += int.from_bytes(buf[i:], "little")
    assert len(buf) - i == 2 and total >> 32
    assert sb1_checksum(raw) == ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def _blank_sb(max_dev: int, fill: int = 0) -> bytes:
    head = bytearray(256)
    struct.pack_into("<II", head, 0, 0xA92B4EFC, 1)
    struct.pack_into("<Q", head, 104, fill)  # reshape_position: arbitrary bits for the sum
    struct.pack_into("<Q", head, 144, 8)
    struct.pack_into("<I", head, 220, max_dev)
    return bytes(head) + struct.pack(f"<{max_dev}H", *range(max_dev))


def test_not_md_and_unknown_version() -> None:
    with pytest.raises(NotMdMemberError):
        Superblock1.parse(bytes(4096))
    raw = bytearray(_blank_sb(4))
    struct.pack_into("<I", raw, 4, 2)
    with pytest.raises(FormatError, match="major version 2"):
        Superblock1.parse(bytes(raw))
    with pytest.raises(FormatError, match="truncated"):
        Superblock1.parse(_blank_sb(4)[:100])
    raw = bytearray(_blank_sb(4))
    struct.pack_into("<I", raw, 220, 4000)
    with pytest.raises(FormatError, match="max_dev"):
        Superblock1.parse(bytes(raw))


def test_structural_problems(unpacked: Callable[[str], list[Path]]) -> None:
    sb = _fixture_sb(unpacked)
    assert "device has 100000 sectors" in " ".join(sb.structural_problems(100000))
    bad = dataclasses.replace(sb, feature_map=sb.feature_map | 0x100000, pad0=1)
    problems = " ".join(bad.structural_problems())
    assert "unknown feature bits 0x100000" in problems and "pad0" in problems
    assert bad.features == Feature.BITMAP_OFFSET


def test_locations_and_names() -> None:
    assert super_offset_for(2, 131072) == 8
    assert super_offset_for(1, 131072) == 0
    assert super_offset_for(0, 131072) == 131056
    assert super_offset_for(0, 131077) == 131056  # 4 KiB aligned, 8..12 KiB from the end
    assert [minor_from_super_offset(x) for x in (0, 8, 131056)] == [1, 2, 0]
    assert MAX_SECTOR == 2**64 - 1
    with pytest.raises(FormatError):
        super_offset_for(3, 100)


@given(st.binary(min_size=16, max_size=16))
def test_uuid_text_round_trip(raw: bytes) -> None:
    assert parse_uuid(format_uuid(raw)) == raw


def test_parse_uuid_rejects_garbage() -> None:
    with pytest.raises(FormatError):
        parse_uuid("not-a-uuid")
