"""Interop both ways: llraid-made arrays read by mdadm and dissect.volume; kernel arrays written by llraid."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.create import CreateSpec, create, parse_layout
from llraid.device import SECTOR
from llraid.examine import examine_bitmap, examine_facts
from llraid.fixtures import copy_sparse, pattern
from llraid.format.bitmap import BitmapKind
from llraid.member import open_member
from llraid.sync import run_sync, sync_until_idle
from tests.conftest import BY_NAME

MDADM = shutil.which("mdadm")


def need_mdadm() -> str:
    if MDADM is None:
        if os.environ.get("CI"):
            pytest.fail("mdadm is not installed (scripts/setup --dev installs it as root)")
        pytest.skip("mdadm is not installed")
    return MDADM


def mdadm_facts(args: list[str]) -> tuple[int, dict[str, str]]:
    out = subprocess.run(
        [need_mdadm(), *args], capture_output=True, text=True, env={**os.environ, "TZ": "UTC"}
    )
    facts = {}
    for line in out.stdout.splitlines():
        if " : " in line:
            k, v = line.split(" : ", 1)
            facts[k.strip()] = v
    return out.returncode, facts


def llraid_facts(path: Path, homehost: str) -> dict[str, str]:
    m = open_member(str(path))
    try:
        return {f[0]: f[1] for f in examine_facts(m, homehost) if f is not None}
    finally:
        m.device.close()


def make_array(
    tmp: Path, level: int, layout: str | None, bitmap: BitmapKind, n: int, size_mib: int = 48
) -> list[str]:
    paths = [str(tmp / f"m{i}.img") for i in range(n)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(size_mib << 20)
    spec = CreateSpec(
        level=level,
        raid_devices=n,
        layout=parse_layout(level, layout),
        chunk_sectors=0 if level == 1 else 1024,
        bitmap=bitmap,
        assume_clean=False,
        name="interop",
        minor=2,
        size=None,
        homehost=os.uname().nodename,
    )
    create(paths, spec)
    return paths


def fill(array: Array, seed: int, writes: int = 40) -> dict[int, bytes]:
    """Random writes of known content; returns {sector: 512 bytes} of everything written."""
    rnd = random.Random(seed)
    written: dict[int, bytes] = {}
    for _ in range(writes):
        count = rnd.choice((1, 8, 64, 300))
        sector = rnd.randrange(0, array.array_sectors - count)
        data = rnd.randbytes(count * SECTOR)
        array.write(sector, data)
        for i in range(count):
            written[sector + i] = data[i * SECTOR : (i + 1) * SECTOR]
    return written


CASES = [
    (1, None, BitmapKind.LOCKLESS, 2),
    (1, None, BitmapKind.CLASSIC, 2),
    (1, None, BitmapKind.NONE, 3),
    (10, "n2", BitmapKind.LOCKLESS, 4),
    (10, "f2", BitmapKind.LOCKLESS, 4),
    (10, "o2", BitmapKind.CLASSIC, 4),
    (10, "n2", BitmapKind.NONE, 3),
    (5, None, BitmapKind.LOCKLESS, 3),
    (5, "right-asymmetric", BitmapKind.CLASSIC, 4),
    (4, None, BitmapKind.NONE, 3),
    (6, None, BitmapKind.LOCKLESS, 4),
    (6, "right-asymmetric", BitmapKind.CLASSIC, 5),
]


@pytest.mark.root
@pytest.mark.parametrize(("level", "layout", "bitmap", "n"), CASES)
def test_mdadm_examine_agrees_with_llraid(
    level: int, layout: str | None, bitmap: BitmapKind, n: int, tmp_path: Path
) -> None:
    paths = make_array(tmp_path, level, layout, bitmap, n)
    host = os.uname().nodename
    for state in ("created", "written", "crashed"):
        if state == "written":
            with Array.assemble(paths) as a:
                sync_until_idle(a)
                fill(a, seed=level)
        elif state == "crashed":
            a = Array.assemble(paths)
            a.write(0, b"x" * 4096)
            a.crash()  # superblocks say "active"
        for p in paths:
            rc, theirs = mdadm_facts(["--examine", p])
            assert rc == 0, theirs
            mine = llraid_facts(Path(p), host)
            assert mine == theirs, (state, p)
        if state == "crashed":
            assert theirs["State"] == "active"
    if bitmap is BitmapKind.CLASSIC:
        with loop_device(paths[0]) as dev:  # mdadm -X reads members only as block devices
            rc, theirs = mdadm_facts(["--examine-bitmap", dev])
            assert rc == 0
            m = open_member(dev)
            try:
                mine = {f[0]: f[1] for f in examine_bitmap(m).facts if f is not None}
                assert llraid_facts(Path(dev), host) == mdadm_facts(["--examine", dev])[1]
            finally:
                m.device.close()
            assert mine == theirs


@contextlib.contextmanager
def loop_device(path: str, *, readonly: bool = True) -> Iterator[str]:
    """A loop device over ``path`` (root only; CI runs as root)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        if os.environ.get("CI"):
            pytest.fail("loop devices need root and losetup")
        pytest.skip("loop devices need root")
    out = subprocess.run(
        ["losetup", "-f", "--show", *(["-r"] if readonly else []), path], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"no loop device: {out.stderr.strip()}")
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# raid1 only: dissect.volume misreads md raid5 even for the kernel's own fixture h (wrong size
# and content), so it is no oracle there.
@pytest.mark.parametrize("bitmap", [BitmapKind.LOCKLESS, BitmapKind.CLASSIC, BitmapKind.NONE])
def test_dissect_volume_reads_llraid_raid1(bitmap: BitmapKind, tmp_path: Path) -> None:
    md = pytest.importorskip("dissect.volume.md")
    paths = make_array(tmp_path, 1, None, bitmap, 2)
    with Array.assemble(paths) as a:
        sync_until_idle(a)
        written = fill(a, seed=7)
        size = a.array_bytes
        ours = a.read(0, a.array_sectors)
    fhs = [open(p, "rb") for p in paths]  # noqa: SIM115
    try:
        stream = md.MD(fhs).configurations[0].virtual_disks[0].open()
        theirs = stream.read(size)
    finally:
        for f in fhs:
            f.close()
    assert hashlib.sha256(theirs).digest() == hashlib.sha256(ours).digest()
    s = next(iter(written))
    assert theirs[s * SECTOR : (s + 1) * SECTOR] == written[s]


RW_FIXTURES = [
    "a-raid1-llbitmap",
    "b-raid10n2-llbitmap",
    "c-raid10n2-internal-bitmap",
    "d-raid10n2-no-bitmap",
    "e-raid1-llbitmap-crash",
    "f-raid1-llbitmap-degraded-stale-member",
    "g1-raid10f2-llbitmap",
    "g2-raid10o2-llbitmap",
]


@pytest.mark.parametrize("name", RW_FIXTURES)
def test_kernel_arrays_take_writes_and_stay_consistent(
    name: str, unpacked: Callable[[str], list[Path]], tmp_path: Path
) -> None:
    fx = BY_NAME[name]
    paths = [str(copy_sparse(p, tmp_path / p.name)) for p in unpacked(name)]
    expected = bytearray(fx.expected_content())
    degraded = name.startswith("f")
    with Array.assemble(paths, run=degraded) as a:
        sync_until_idle(a)
        written = fill(a, seed=len(name))
        for s, data in written.items():
            expected[s * SECTOR : (s + 1) * SECTOR] = data
        assert a.read(0, a.array_sectors) == bytes(expected)
        if not degraded:
            assert run_sync(a, SyncKind.CHECK).mismatches == 0
    if degraded:  # bring the stale member back: only what it missed is recovered
        with Array.assemble(paths[:1], run=True) as a:
            a.re_add(paths[1])
            sync_until_idle(a)
            assert run_sync(a, SyncKind.CHECK).mismatches == 0
            assert a.read(0, a.array_sectors) == bytes(expected)
    # Every member's superblock is still one mdadm accepts, and llraid reads back what it wrote.
    if MDADM is not None:
        for p in paths:
            rc, facts = mdadm_facts(["--examine", p])
            assert rc == 0 and facts["Checksum"].endswith("correct") and facts["State"] == "clean"
    with Array.assemble(paths) as a:
        assert a.read(0, a.array_sectors) == bytes(expected)
        tag = fx.writes[0]
        first = a.read(tag.start_sector, 1)
        assert first == expected[tag.start_sector * SECTOR : (tag.start_sector + 1) * SECTOR]
    assert pattern(tag.tag, tag.start_sector, 1)  # the fixture pattern generator is exercised


@pytest.mark.root
@pytest.mark.parametrize("bitmap", [BitmapKind.LOCKLESS, BitmapKind.CLASSIC])
def test_block_device_members(bitmap: BitmapKind, tmp_path: Path) -> None:
    """create / assemble / write / read / examine on real block devices (loop devices)."""
    files = []
    for i in range(4):
        p = tmp_path / f"f{i}.img"
        with open(p, "wb") as f:
            f.truncate(48 << 20)
        files.append(str(p))
    with contextlib.ExitStack() as stack:
        devs = [stack.enter_context(loop_device(p, readonly=False)) for p in files]
        spec = CreateSpec(
            level=10, raid_devices=4, layout=parse_layout(10, "o2"), chunk_sectors=1024, bitmap=bitmap,
            assume_clean=False, name="blk", minor=2, size=None, homehost=os.uname().nodename,
        )  # fmt: skip
        create(devs, spec)
        with Array.assemble(devs) as a:
            sync_until_idle(a)
            written = fill(a, seed=99)
        with Array.assemble(devs) as a:
            for s, data in written.items():
                assert a.read(s, 1) == data
            assert run_sync(a, SyncKind.CHECK).mismatches == 0
        for d in devs:
            rc, theirs = mdadm_facts(["--examine", d])
            assert rc == 0 and llraid_facts(Path(d), os.uname().nodename) == theirs
