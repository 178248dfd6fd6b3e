"""``llraid create``: mdadm 4.6's defaults, its refusals, and byte equality with a kernel fixture.

The expected geometry is the table of mdadm's rules worked out for 64 MiB, 1 GiB and 8 GiB
members (metadata 1.2; raid1 on 2 members, raid10 n2 on 4, 512 KiB chunk). Refusals must leave
every member exactly as it was: each is hashed before and after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.create import CreateError, CreateSpec, create, parse_layout
from llraid.errors import LlraidError
from llraid.format.bitmap import BITMAP_MAGIC, BitmapFlag, BitmapKind, BitmapSuper
from llraid.format.superblock import MAX_SECTOR, MD_SB_MAGIC, ROLE_SPARE, Superblock1, parse_uuid
from llraid.member import open_member

MiB = 1 << 20
GiB = 1 << 30
SECTOR = 512
I1_UUID = "b92419f3:b637ffe5:8e9c2b36:e91b9545"
CHUNK_64M = 64 << 20  # mdadm's smallest automatic classic bitmap chunk (bytes)


def members(directory: Path, sizes: list[int], prefix: str = "m") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        p = directory / f"{prefix}{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


def spec(
    level: int = 1,
    disks: int = 2,
    *,
    layout: str | None = None,
    bitmap: BitmapKind = BitmapKind.LOCKLESS,
    assume_clean: bool = False,
    chunk_sectors: int | None = None,
    name: str = "t",
    homehost: str | None = "host",
    minor: int = 2,
    size: int | None = None,
    uuid: bytes | None = None,
) -> CreateSpec:
    if chunk_sectors is None:
        chunk_sectors = 0 if level == 1 else 1024
    return CreateSpec(
        level=level,
        raid_devices=disks,
        layout=parse_layout(level, layout) if level in (1, 10) else 0,
        chunk_sectors=chunk_sectors,
        bitmap=bitmap,
        assume_clean=assume_clean,
        name=name,
        minor=minor,
        size=size,
        homehost=homehost,
        uuid=uuid,
    )


def digest(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(4 * MiB):
                h.update(block)
        out.append(h.hexdigest())
    return out


def read_sb(path: str) -> Superblock1:
    m = open_member(path)
    try:
        return m.sb
    finally:
        m.device.close()


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def bitmap_super(path: str) -> BitmapSuper:
    sb = read_sb(path)
    return BitmapSuper.parse(read_at(path, (sb.super_offset + sb.bitmap_offset) * SECTOR, 256))


# ---- defaults vs mdadm (notes 2.5) ---------------------------------------------------------------

# member bytes -> (raid1 data_offset, raid1 size, raid10 data_offset, raid10 size), sectors
MDADM_TABLE = {
    64 * MiB: (2048, 129024, 4096, 126976),
    1 * GiB: (4096, 2093056, 4096, 2093056),
    8 * GiB: (18432, 16758784, 18432, 16758784),
}


@pytest.mark.parametrize("bitmap", list(BitmapKind), ids=lambda b: b.value)
@pytest.mark.parametrize("level", [1, 10], ids=["raid1x2", "raid10n2x4"])
@pytest.mark.parametrize("member_bytes", list(MDADM_TABLE), ids=["64M", "1G", "8G"])
def test_defaults_match_mdadm(tmp_path: Path, member_bytes: int, level: int, bitmap: BitmapKind) -> None:
    disks = 2 if level == 1 else 4
    paths = members(tmp_path, [member_bytes] * disks)
    sbs = create(paths, spec(level, disks, bitmap=bitmap))
    r1_off, r1_size, r10_off, r10_size = MDADM_TABLE[member_bytes]
    data_offset, size = (r1_off, r1_size) if level == 1 else (r10_off, r10_size)
    dev_sectors = member_bytes // SECTOR
    for i, (path, returned) in enumerate(zip(paths, sbs, strict=True)):
        sb = read_sb(path)
        assert sb == returned
        assert sb.checksum_ok and not sb.structural_problems(dev_sectors)
        assert (sb.data_offset, sb.size, sb.data_size) == (data_offset, size, dev_sectors - data_offset)
        assert sb.super_offset == 8 and sb.minor_version == 2
        assert (sb.level, sb.raid_disks) == (level, disks)
        assert sb.layout == (0 if level == 1 else 0x102)
        assert sb.chunksize == (0 if level == 1 else 1024)
        assert sb.events == 0 and sb.resync_offset == 0  # not --assume-clean: md resyncs first
        assert sb.max_dev == 128 and sb.dev_number == i
        assert sb.dev_roles == tuple(range(disks)) + (ROLE_SPARE,) * (128 - disks)
        assert sb.set_name == "host:t"
        assert sb.recovery_offset == 0 and sb.devflags == 0 and sb.bblog_shift == 0
        assert sb.logical_block_size == 0 and not any(sb.pad3) and sb.pad0 == 0
        assert sb.ctime == sb.utime
        if bitmap is BitmapKind.NONE:
            assert (sb.feature_map, sb.bitmap_offset) == (0, 0)
        else:
            assert (sb.feature_map, sb.bitmap_offset) == (1, 8)
        if bitmap is BitmapKind.LOCKLESS:
            # llraid keeps the bad-block log out of the llbitmap area (state bytes may run
            # 1 KiB past the 256 reserved sectors), and below the data.
            assert sb.bblog_size == 8
            assert sb.bblog_offset >= 8 + 256 + 2
            assert sb.super_offset + sb.bblog_offset + sb.bblog_size <= sb.data_offset
        else:
            assert (sb.bblog_offset, sb.bblog_size) == (16, 8)
    assert len({read_sb(p).device_uuid for p in paths}) == disks
    assert len({read_sb(p).set_uuid for p in paths}) == 1

    if bitmap is BitmapKind.NONE:
        return
    sync_size = size if level == 1 else size * disks // 2
    for path in paths:
        bsb = bitmap_super(path)
        assert bsb.magic == BITMAP_MAGIC and bsb.uuid == read_sb(path).set_uuid
        assert (bsb.events, bsb.events_cleared, bsb.sync_size) == (0, 0, sync_size)
        assert (bsb.daemon_sleep, bsb.write_behind, bsb.nodes) == (5, 0, 0)
        assert bsb.chunksize == CHUNK_64M
        if bitmap is BitmapKind.CLASSIC:
            assert (bsb.version, bsb.state, bsb.sectors_reserved) == (4, 0, 0)
        else:
            assert (bsb.version, bsb.state, bsb.sectors_reserved) == (6, int(BitmapFlag.FIRST_USE), 256)
        # mdadm's initial bits: all set, up to calc_bitmap_size(4096)
        bits = -(-sync_size * SECTOR // CHUNK_64M)
        area = -(-((bits + 7) // 8 + 256) // 4096) * 4096
        sb = read_sb(path)
        raw = read_at(path, (sb.super_offset + sb.bitmap_offset) * SECTOR, area)
        assert raw[256:] == b"\xff" * (area - 256)


@pytest.mark.parametrize("bitmap", list(BitmapKind), ids=lambda b: b.value)
def test_assume_clean(tmp_path: Path, bitmap: BitmapKind) -> None:
    paths = members(tmp_path, [64 * MiB] * 2)
    create(paths, spec(bitmap=bitmap, assume_clean=True))
    for p in paths:
        assert read_sb(p).resync_offset == MAX_SECTOR
    if bitmap is BitmapKind.LOCKLESS:
        assert bitmap_super(paths[0]).state == int(BitmapFlag.FIRST_USE | BitmapFlag.CLEAN)
    elif bitmap is BitmapKind.CLASSIC:
        assert bitmap_super(paths[0]).state == 0  # bits still all set: md loads them as not needed


def test_lockless_bitmap_never_reaches_the_bad_block_log(tmp_path: Path) -> None:
    """8 GiB raid10 members: the largest llbitmap (1 KiB header + 130928 states) of the table."""
    paths = members(tmp_path, [8 * GiB] * 4)
    create(paths, spec(10, 4, bitmap=BitmapKind.LOCKLESS))
    marker = b"BBLOG-MARKER-" * 315
    marker = marker[: 8 * SECTOR]
    sb = read_sb(paths[0])
    bblog_at = (sb.super_offset + sb.bblog_offset) * SECTOR
    for p in paths:
        with open(p, "r+b") as f:
            os.pwrite(f.fileno(), marker, bblog_at)
    with Array.assemble(paths, bitmap_threads=False) as array:
        assert array.bitmap.kind is BitmapKind.LOCKLESS
        array.write(0, bytes(range(256)) * 16)
        array.write(array.array_sectors - 8, b"\x5a" * 4096)
    for p in paths:
        assert read_at(p, bblog_at, len(marker)) == marker


def test_explicit_size_and_raid1_rounding(tmp_path: Path) -> None:
    paths = members(tmp_path, [64 * MiB] * 2)
    create(paths, spec(size=100_001))  # 50000 KiB -> whole 64 KiB: 49984 KiB
    assert read_sb(paths[0]).size == 49984 * 2
    paths = members(tmp_path / "r10", [64 * MiB] * 4)
    create(paths, spec(10, 4, size=100_001))  # raid10: whole chunks (512 KiB)
    assert read_sb(paths[0]).size == (50000 // 512 * 512) * 2


def test_members_of_different_sizes_use_the_smallest(tmp_path: Path) -> None:
    paths = members(tmp_path, [80 * MiB, 64 * MiB])
    create(paths, spec(bitmap=BitmapKind.NONE))
    first, second = read_sb(paths[0]), read_sb(paths[1])
    assert first.size == second.size == 129024
    assert first.data_offset == second.data_offset == 2048
    assert (first.data_size, second.data_size) == (80 * 2048 - 2048, 64 * 2048 - 2048)


def test_metadata_1_1(tmp_path: Path) -> None:
    paths = members(tmp_path, [64 * MiB] * 2)
    create(paths, spec(minor=1, bitmap=BitmapKind.CLASSIC))
    sb = read_sb(paths[0])
    assert (sb.super_offset, sb.minor_version, sb.data_offset, sb.size) == (0, 1, 2048, 129024)
    assert (sb.bitmap_offset, sb.bblog_offset) == (8, 16)


def test_name_and_homehost() -> None:
    from llraid.create import array_name

    assert array_name("data", "box") == b"box:data".ljust(32, b"\0")
    assert array_name("other:data", "box") == b"other:data".ljust(32, b"\0")
    assert array_name("n" * 25, "homehost") == b"n" * 25 + bytes(7)  # would not fit: name only
    assert array_name("data", None) == b"data".ljust(32, b"\0")
    with pytest.raises(CreateError):
        array_name("x" * 33, None)


def test_given_uuid_is_used_and_random_ones_differ(tmp_path: Path) -> None:
    uuid = parse_uuid(I1_UUID)
    a = members(tmp_path / "a", [64 * MiB] * 2)
    b = members(tmp_path / "b", [64 * MiB] * 2)
    c = members(tmp_path / "c", [64 * MiB] * 2)
    create(a, spec(uuid=uuid))
    create(b, spec())
    create(c, spec())
    assert {read_sb(p).set_uuid for p in a} == {uuid}
    assert read_sb(b[0]).set_uuid != read_sb(c[0]).set_uuid != uuid


# ---- refusals: nothing written ---------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> list[str]:
    return members(tmp_path, [16 * MiB] * 2)


def refused(paths: list[str], s: CreateSpec, match: str, *, force: bool = False) -> None:
    before = digest(paths)
    with pytest.raises(LlraidError, match=match):
        create(paths, s, force=force)
    assert digest(paths) == before


def test_refuses_existing_md_superblock_unless_forced(pair: list[str]) -> None:
    first = create(pair, spec(name="old"))
    refused(pair, spec(name="new"), "md superblock")
    refused([pair[1], pair[0]], spec(name="new", bitmap=BitmapKind.NONE), "md superblock")
    second = create(pair, spec(name="new"), force=True)
    assert read_sb(pair[0]).set_name == "host:new"
    assert first[0].set_uuid != second[0].set_uuid


def test_force_wipes_superblocks_of_other_minor_versions(tmp_path: Path) -> None:
    paths = members(tmp_path, [16 * MiB] * 2)
    create(paths, spec(minor=1, bitmap=BitmapKind.NONE))
    assert int.from_bytes(read_at(paths[0], 0, 4), "little") == MD_SB_MAGIC
    refused(paths, spec(minor=2), "md superblock")
    create(paths, spec(minor=2), force=True)
    for p in paths:
        assert int.from_bytes(read_at(p, 0, 4), "little") != MD_SB_MAGIC  # the 1.1 copy is gone
        assert read_sb(p).minor_version == 2


def test_refuses_ext4_signature_unless_forced(pair: list[str]) -> None:
    with open(pair[1], "r+b") as f:
        os.pwrite(f.fileno(), b"\x53\xef", 1080)
    refused(pair, spec(), "ext2/3/4")
    create(pair, spec(), force=True)
    assert read_sb(pair[1]).dev_number == 1


@pytest.mark.parametrize(
    ("sizes", "s", "match"),
    [
        ([1 * MiB, 1 * MiB], spec(), "too small"),
        ([16 * MiB, 1 * MiB], spec(), "too small"),
        ([16 * MiB, 16 * MiB], spec(size=40 * 2048), "larger than the members"),
        ([16 * MiB] * 3, spec(), "3 devices given for 2"),
        ([16 * MiB], spec(), "1 devices given for 2"),
        ([16 * MiB] * 2, spec(chunk_sectors=1024), "chunk size is forbidden"),
        ([16 * MiB] * 4, spec(10, 4, chunk_sectors=1000), "power of two"),
        ([16 * MiB] * 4, spec(10, 4, chunk_sectors=4), "power of two"),
        ([16 * MiB] * 2, spec(10, 2, layout="n3"), "3 copies"),
        ([16 * MiB] * 2, spec(5, 2, chunk_sectors=1024), "at least 3"),
        ([16 * MiB] * 3, spec(0, 3, chunk_sectors=1024), "raid0 is not supported"),
        ([16 * MiB] * 2, spec(minor=1), "1.2"),
        ([16 * MiB] * 2, spec(minor=0, bitmap=BitmapKind.NONE), "1.0"),
    ],
    ids=[
        "tiny",
        "one-tiny",
        "size-too-big",
        "too-many",
        "too-few",
        "raid1-chunk",
        "chunk-not-pow2",
        "chunk-too-small",
        "layout-needs-more-disks",
        "raid5-too-few",
        "raid0",
        "lockless-needs-1.2",
        "metadata-1.0",
    ],
)
def test_refuses_unusable_requests_writing_nothing(
    tmp_path: Path, sizes: list[int], s: CreateSpec, match: str
) -> None:
    refused(members(tmp_path, sizes), s, match)
    refused(members(tmp_path / "f", sizes), s, match, force=True)  # force overrides none of these


def test_refuses_the_same_device_twice(tmp_path: Path) -> None:
    (p,) = members(tmp_path, [16 * MiB])
    refused([p, p], spec(), "twice")
    link = tmp_path / "link.img"
    link.symlink_to(p)
    refused([p, str(link)], spec(), "twice")


@pytest.fixture
def memfds() -> Iterator[Callable[[str], str]]:
    fds: list[int] = []

    def make(name: str) -> str:
        fd = os.memfd_create(name)
        os.ftruncate(fd, 16 * MiB)
        fds.append(fd)
        return f"/proc/self/fd/{fd}"

    yield make
    for fd in fds:
        os.close(fd)


def test_create_on_memfds(memfds: Callable[[str], str]) -> None:
    paths = [memfds("llraid-a"), memfds("llraid-b")]
    create(paths, spec())
    assert [read_sb(p).dev_number for p in paths] == [0, 1]


def test_create_on_memfds_with_the_same_name(memfds: Callable[[str], str]) -> None:
    """Every memfd named "member" resolves to "/memfd:member (deleted)": not the same device."""
    paths = [memfds("member"), memfds("member")]
    create(paths, spec())
    assert [read_sb(p).dev_number for p in paths] == [0, 1]


# ---- byte equality with mdadm's own output (fixture i1) ------------------------------------------


def test_create_matches_fixture_i1(tmp_path: Path, unpacked: Callable[[str], list[Path]]) -> None:
    """i1: ``mdadm --create --level=1 -n2 --bitmap=lockless --assume-clean --homehost=mdvm
    --name=i1 --uuid=...`` on two 64 MiB disks; the kernel never rewrote either superblock."""
    fixture = [str(p) for p in unpacked("i1-raid1-llbitmap-assume-clean-nowrite")]
    paths = members(tmp_path, [64 * MiB] * 2)
    ours = create(
        paths,
        spec(
            name="i1",
            homehost="mdvm",
            assume_clean=True,
            bitmap=BitmapKind.LOCKLESS,
            uuid=parse_uuid(I1_UUID),
        ),
    )
    ignored = {"ctime", "utime", "device_uuid", "sb_csum", "bblog_offset"}
    for mine, theirs_path, path in zip(ours, fixture, paths, strict=True):
        theirs = read_sb(theirs_path)
        assert read_sb(path) == mine
        a, b = dataclasses.asdict(mine), dataclasses.asdict(theirs)
        assert {k: v for k, v in a.items() if k not in ignored} == {
            k: v for k, v in b.items() if k not in ignored
        }
        assert theirs.bblog_offset == 16  # mdadm: inside the 128 KiB llbitmap area
        assert mine.bblog_offset >= 8 + 256 + 2
        assert mine.super_offset + mine.bblog_offset + mine.bblog_size <= mine.data_offset
        # the whole 512-byte superblock, once the ignored fields are made equal
        same = dataclasses.replace(
            mine, ctime=theirs.ctime, utime=theirs.utime, device_uuid=theirs.device_uuid, bblog_offset=16
        ).with_checksum()
        assert same.build() == read_at(theirs_path, 8 * SECTOR, 512)
        at = (theirs.super_offset + theirs.bitmap_offset) * SECTOR
        assert read_at(path, at, 256) == read_at(theirs_path, at, 256)


# ---- the command line: bad arguments get one line naming the problem, nothing written ---------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from llraid.cli import main

    rc = main(list(argv))
    err = capsys.readouterr().err
    if rc:
        assert err.startswith("llraid: ") and err.count("\n") == 1, err
    return rc, err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--level", "10", "--chunk", "0"], "chunk size must be a power of two from 4K to 512G, not 0 bytes"),
        (["--level", "10", "--chunk", "3K"], "power of two from 4K to 512G, not 3072 bytes"),
        (["--level", "10", "--chunk", "1000B"], "not 1000 bytes"),
        (["--level", "10", "--chunk", "1T"], "not 1099511627776 bytes"),
        (["--level", "10", "-n", "0"], "invalid number of raid devices: 0"),
        (["--level", "1", "-n", "-2"], "invalid number of raid devices: -2"),
        (
            ["--level", "10", "--size", "1"],
            "--size 1024 bytes (1K) is below the minimum: a raid10 (near=2, 512K",
        ),
        (["--level", "10", "--size", "0"], "needs at least 524288 bytes (512K) per member"),
        (
            ["--level", "10", "--layout", "f2", "--size", "512K"],
            "needs at least 1048576 bytes (1M) per member",
        ),
        (["--level", "1", "--size", "63K"], "a raid1 needs at least 65536 bytes (64K) per member"),
        (["--level", "10", "--chunk", "64K", "--size", "63K"], "(near=2, 64K chunks)"),
        (["--level", "5", "--chunk", "0"], "chunk size must be a power of two from 4K to 512G, not 0 bytes"),
        (
            ["--level", "6", "--size", "1"],
            "a raid6 (512K chunks) needs at least 524288 bytes (512K) per member",
        ),
    ],
    ids=[
        "chunk-0",
        "chunk-3K",
        "chunk-1000B",
        "chunk-1T",
        "n-0",
        "n-neg",
        "size-1",
        "size-0",
        "size-f2",
        "size-raid1",
        "size-chunk64",
        "raid5-chunk-0",
        "raid6-size-1",
    ],
)
def test_cli_refuses_bad_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    paths = members(tmp_path, [16 * MiB] * (2 if "1" in args[:2] else 4))
    before = digest(paths)
    rc, err = cli(capsys, "create", *args, *paths)
    assert rc == 1 and match in err
    assert digest(paths) == before


def test_cli_one_device_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (p,) = members(tmp_path, [16 * MiB])
    rc, err = cli(capsys, "create", "--level", "1", p)
    assert rc == 1 and "unusual number of drives" in err and "--force" in err
    rc, err = cli(capsys, "create", "--level", "10", "--force", p)
    assert rc == 1 and "a raid10 with 2 copies (near=2) needs at least 2 raid devices, not 1" in err
    assert cli(capsys, "create", "--level", "1", "--force", p)[0] == 0


def test_cli_too_few_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = members(tmp_path, [16 * MiB] * 3)
    rc, err = cli(capsys, "create", "--level", "10", "--layout", "n3", "-n", "2", *paths[:2])
    assert rc == 1 and "a raid10 with 3 copies (near=3) needs at least 3 raid devices, not 2" in err
    rc, err = cli(capsys, "create", "--level", "6", *paths)
    assert rc == 1 and "raid6 needs at least 4 raid devices, not 3" in err


def test_too_small_member_is_named_with_its_size_and_the_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = members(tmp_path, [16 * MiB, 16 * MiB, 0, 16 * MiB])
    rc, err = cli(capsys, "create", "--level", "10", *paths)
    assert rc == 1
    assert (
        f"{paths[2]} is too small: 0 bytes; a raid10 (near=2, 512K chunks) needs at least 2621440 bytes"
        in err
    )
    paths = members(tmp_path / "b", [16 * MiB, 1 * MiB])
    rc, err = cli(capsys, "create", "--level", "1", *paths)
    assert rc == 1 and f"{paths[1]} is too small: 1048576 bytes (1M); a raid1 needs at least 1114112" in err


@pytest.mark.parametrize(
    "s",
    [
        spec(),
        spec(10, 4),
        spec(10, 4, layout="f2"),
        spec(10, 4, layout="o2", chunk_sectors=128),
        spec(10, 3, layout="n3", chunk_sectors=8),
        spec(5, 3),
        spec(6, 4, chunk_sectors=8),
        spec(4, 3, assume_clean=True),
    ],
    ids=["raid1", "raid10n2", "raid10f2", "raid10o2-64K", "raid10n3-4K", "raid5", "raid6-4K", "raid4"],
)
def test_minimum_member_size_is_exact(tmp_path: Path, s: CreateSpec) -> None:
    """The minimum create reports is the smallest member it accepts, and the array it makes works."""
    from llraid.create import minimum_member_sectors

    low = minimum_member_sectors(s) * SECTOR
    refused(members(tmp_path / "low", [low - SECTOR] * s.raid_devices), s, "too small")
    paths = members(tmp_path / "ok", [low] * s.raid_devices)
    create(paths, s)
    with Array.assemble(paths, bitmap_threads=False) as a:
        assert a.array_bytes > 0
        a.write(0, b"\x5a" * a.array_bytes)
        assert a.read(0, a.array_sectors) == b"\x5a" * a.array_bytes
