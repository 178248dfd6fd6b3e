"""``llraid serve`` with real NBD clients: nbdinfo, nbdcopy, qemu-img / qemu-io, fio's nbd engine,
and (as root) nbdfuse + loop + ext4.

Each test starts ``llraid serve`` as a subprocess on a fresh array (raid10 n2 on 4 x 64 MiB
sparse files, lockless bitmap, unless said otherwise) and checks what the client did against the
array itself: after a clean stop the data read offline with ``llraid cat`` is what the client
wrote, and ``llraid sync --mode check`` finds every copy identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llraid.export import nbd
from tests.export.conftest import (
    NbdClient,
    Served,
    ServeFactory,
    llraid,
    make_members,
    mdadm_state,
    need_path,
    need_root,
    need_tool,
)

MiB = 1 << 20
ARRAY_BYTES = 124 * MiB  # raid10 n2, 4 x (64 MiB - 2 MiB data offset)


def run(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stop_and_check(s: Served, members: list[str]) -> None:
    """``llraid stop``: exits 0, members clean, every copy identical (offline check)."""
    out = llraid(s.rundir, "stop", "--array", s.control)
    assert out.stdout.strip() == "stopping"
    assert s.wait_exit() == 0, s.log()
    assert "llraid: stopped cleanly" in "".join(s.lines)
    for m in members:
        assert mdadm_state(m) == "clean"
    check = json.loads(llraid(s.rundir, "sync", "--mode", "check", "--json", *members).stdout)
    assert [p["kind"] for p in check] == ["check"], check  # nothing needed a resync first
    assert check[-1]["mismatch_cnt"] == 0 and check[-1]["completed"]


def cat(rundir: Path, members: list[str], offset: int, length: int) -> bytes:
    """``llraid cat``: the array's bytes read offline from the members."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llraid.cli",
            "cat",
            "--offset",
            str(offset),
            "--length",
            str(length),
            *members,
        ],
        capture_output=True,
        env={**os.environ, "LLRAID_RUNTIME_DIR": str(rundir)},
        timeout=120,
        check=True,
    )
    return out.stdout


@pytest.fixture
def members(tmp_path: Path) -> list[str]:
    return make_members(tmp_path)


# ---- nbdinfo --------------------------------------------------------------------------------------


def test_nbdinfo_size_flags_and_list(serve: ServeFactory, members: list[str]) -> None:
    nbdinfo = need_tool("nbdinfo")
    s = serve(members, "--name", "vol")
    assert re.fullmatch(r"nbd\+unix:///vol\?socket=/tmp/llx\w+/[0-9a-f]{32}\.nbd", s.uri), s.uri
    info = json.loads(run([nbdinfo, "--json", s.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    (exp,) = info["exports"]
    assert exp["export-name"] == "vol"
    assert exp["export-size"] == ARRAY_BYTES == s.detail()["array_bytes"]
    want = {
        "is_read_only": False,
        "can_flush": True,
        "can_fua": True,
        "can_multi_conn": True,
        "can_trim": True,
        "can_zero": True,
        "can_fast_zero": False,
        "can_cache": False,
        "can_df": False,
        "block_size_minimum": 512,
        "block_size_preferred": 4096,
        "block_size_maximum": 32 * MiB,
    }
    assert {k: exp[k] for k in want} == want
    assert exp["description"].startswith("llraid ")
    listed = json.loads(run([nbdinfo, "--list", "--json", s.uri]).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["vol"]
    # the size in bytes, as a shell script would ask for it
    assert run([nbdinfo, "--size", s.uri]).stdout.strip() == str(ARRAY_BYTES)


def test_nbdinfo_readonly_export(serve: ServeFactory, members: list[str], rundir: Path) -> None:
    nbdinfo = need_tool("nbdinfo")
    s = serve(members)  # a first read-write start, then read-only
    stop_and_check(s, members)
    s = serve(members, "--readonly")
    (exp,) = json.loads(run([nbdinfo, "--json", s.uri]).stdout)["exports"]
    assert exp["is_read_only"] is True
    assert exp["can_trim"] is False and exp["can_zero"] is False
    with NbdClient(s.socket_path) as c:
        c.connect()
        assert c.request(nbd.CMD_WRITE, 0, 4096, 0, b"x" * 4096) == (nbd.EPERM, b"")
        assert c.read(0, 4096) == bytes(4096)
    assert s.signal(15) == 0


def test_tcp_listen_on_port_0(serve: ServeFactory, members: list[str]) -> None:
    nbdinfo = need_tool("nbdinfo")
    s = serve(members, "--listen", "127.0.0.1:0")
    m = re.fullmatch(r"nbd://127\.0\.0\.1:(\d+)/", s.uri)
    assert m, s.uri
    port = int(m.group(1))
    assert port > 0
    with NbdClient(("127.0.0.1", port)) as c:
        info = c.connect()
        assert info.size == ARRAY_BYTES
        c.write(MiB, b"tcp!" * 1024)
        assert c.read(MiB, 4096) == b"tcp!" * 1024
        c.flush()
    assert run([nbdinfo, "--size", s.uri]).stdout.strip() == str(ARRAY_BYTES)
    status = llraid(s.rundir, "status").stdout
    assert s.uri in status
    stop_and_check(s, members)
    assert cat(s.rundir, members, MiB, 4096) == b"tcp!" * 1024


# ---- nbdcopy --------------------------------------------------------------------------------------


def test_nbdcopy_roundtrip_64mib(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    nbdcopy = need_tool("nbdcopy")
    s = serve(members)
    src = tmp_path / "src.img"
    data = random.Random(64).randbytes(64 * MiB)
    src.write_bytes(data)
    run([nbdcopy, str(src), s.uri])
    back = tmp_path / "back.img"
    run([nbdcopy, s.uri, str(back)])
    got = back.read_bytes()
    assert len(got) == ARRAY_BYTES
    assert sha(got[: 64 * MiB]) == sha(data)
    assert got[64 * MiB :] == bytes(ARRAY_BYTES - 64 * MiB)
    nbdstats = s.detail()["nbd"]
    assert nbdstats["bytes_written"] >= 64 * MiB and nbdstats["errors"] == 0
    assert nbdstats["connections"] >= 2  # nbdcopy uses several connections (multi-conn)
    stop_and_check(s, members)
    assert sha(cat(s.rundir, members, 0, 64 * MiB)) == sha(data)  # on the members, offline


def test_raid5_nbdcopy_roundtrip_and_readonly(serve: ServeFactory, tmp_path: Path) -> None:
    """A parity array served read-write, then read-only (nothing written, bitmap included)."""
    nbdcopy = need_tool("nbdcopy")
    members = make_members(tmp_path, level=5, n=3, layout=None)
    s = serve(members)
    src = tmp_path / "src.img"
    data = random.Random(5).randbytes(24 * MiB + 4096)
    src.write_bytes(data)
    run([nbdcopy, str(src), s.uri])
    stop_and_check(s, members)
    assert sha(cat(s.rundir, members, 0, len(data))) == sha(data)
    before = [sha(Path(m).read_bytes()) for m in members]
    s = serve(members, "--readonly")
    back = tmp_path / "back.img"
    run([nbdcopy, s.uri, str(back)])
    assert sha(back.read_bytes()[: len(data)]) == sha(data)
    assert s.signal(signal.SIGTERM) == 0
    assert [sha(Path(m).read_bytes()) for m in members] == before


# ---- qemu-img / qemu-io ---------------------------------------------------------------------------------


def test_qemu_img_convert_and_qemu_io(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    qemu_img = need_tool("qemu-img")
    qemu_io = need_tool("qemu-io")
    s = serve(members)
    src = tmp_path / "q.img"
    data = random.Random(5).randbytes(16 * MiB)
    src.write_bytes(data)
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), s.uri])
    cmp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), s.uri])
    assert "Images are identical" in cmp.stdout
    info = json.loads(run([qemu_img, "info", "--output=json", "-f", "raw", s.uri]).stdout)
    assert info["virtual-size"] == ARRAY_BYTES
    script = [
        "read -P 0 100M 1M",  # never written
        "write -P 0x5a 100M 1M",
        "read -P 0x5a 100M 1M",
        "write -P 0xa5 -f 101M 64k",  # FUA
        "write -z 100M 64k",
        "read -P 0 100M 64k",
        "read -P 0x5a 100.0625M 960k",
        "discard 110M 1M",
        "aio_write -P 0x11 112M 4k",
        "aio_flush",
        "read -P 0x11 112M 4k",
        "flush",
    ]
    cmd = [qemu_io, "-f", "raw"]
    for c in script:
        cmd += ["-c", c]
    out = run([*cmd, s.uri])
    assert "verification failed" not in out.stdout + out.stderr, out.stdout
    assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    stop_and_check(s, members)
    assert sha(cat(s.rundir, members, 0, 16 * MiB)) == sha(data)
    assert cat(s.rundir, members, 100 * MiB + 64 * 1024, 4096) == b"\x5a" * 4096
    assert cat(s.rundir, members, 101 * MiB, 4096) == b"\xa5" * 4096


# ---- fio --------------------------------------------------------------------------------------------


def fio_nbd(uri: str, workdir: Path, *args: str, timeout: float = 60) -> dict[str, Any]:
    """fio's nbd engine; run in ``workdir`` (fio may leave verify state files in its cwd)."""
    fio = need_tool("fio")
    cmd = [fio, "--ioengine=nbd", f"--uri={uri}", "--output-format=json", "--verify_state_save=0", *args]
    out = run(cmd, timeout=timeout, cwd=workdir)
    text = out.stdout[out.stdout.index("{") :]
    result: dict[str, Any] = json.loads(text)
    return result


def test_fio_randwrite_with_verify(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    need_tool("fio")
    s = serve(members)
    res = fio_nbd(
        s.uri,
        tmp_path,
        "--name=verify",
        "--rw=randwrite",
        "--bs=4k",
        "--size=24m",
        "--offset_increment=32m",
        "--numjobs=2",  # two connections, each on its own 24 MiB
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=0",
    )
    for job in res["jobs"]:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == 24 * MiB
        assert job["read"]["io_bytes"] == 24 * MiB  # the verify pass read everything back
    s.ctl("sync", "check")
    sync = s.wait_sync(lambda st: st["last"] is not None and st["last"]["kind"] == "check")
    assert sync["last"]["completed"] and sync["last"]["mismatch_cnt"] == 0
    d = s.detail()
    assert d["nbd"]["errors"] == 0 and d["faults"] == []
    stop_and_check(s, members)


# ---- nbdfuse + loop + ext4 (root) --------------------------------------------------------------------------


@contextlib.contextmanager
def nbdfuse_loop(uri: str, where: Path) -> Iterator[str]:
    """nbdfuse MNT/disk.img URI + losetup --direct-io=on; torn down in the safe order."""
    nbdfuse = need_tool("nbdfuse")
    fusermount = need_tool("fusermount3")
    losetup = need_tool("losetup")
    mnt = where / "fuse"
    mnt.mkdir()
    pidfile = where / "nbdfuse.pid"
    log = open(where / "nbdfuse.log", "w")  # noqa: SIM115 - closed in finally
    fuse = subprocess.Popen([nbdfuse, "-P", str(pidfile), str(mnt / "disk.img"), uri], stdout=log, stderr=log)
    loop = ""
    problems: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            if fuse.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nbdfuse did not start: {(where / 'nbdfuse.log').read_text()}")
            time.sleep(0.05)
        assert os.path.getsize(mnt / "disk.img") == ARRAY_BYTES
        loop = run([losetup, "--find", "--show", "--direct-io=on", str(mnt / "disk.img")]).stdout.strip()
        assert loop.startswith("/dev/loop"), loop
        yield loop
    finally:
        if loop:
            subprocess.run([losetup, "-d", loop], capture_output=True, timeout=60)
            # the detach completes asynchronously; the FUSE file is busy until it has
            backing = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")
            if not _wait(lambda: not backing.exists(), 20):
                problems.append(f"{loop} still attached")
        if not _wait(lambda: _fusermount_u(fusermount, mnt), 20):
            problems.append(f"fusermount3 -u {mnt} kept failing")
        try:
            fuse.wait(timeout=20)  # nbdfuse exits by itself once unmounted
        except subprocess.TimeoutExpired:
            problems.append("nbdfuse did not exit after the unmount")
            fuse.kill()
            fuse.wait()
        if str(mnt) in Path("/proc/mounts").read_text():
            problems.append("the FUSE mount is still there")
            subprocess.run([fusermount, "-u", "-z", str(mnt)], capture_output=True, timeout=60)
        log.close()
    assert problems == [], problems


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _fusermount_u(fusermount: str, mnt: Path) -> bool:
    if str(mnt) not in Path("/proc/mounts").read_text():
        return True
    return subprocess.run([fusermount, "-u", str(mnt)], capture_output=True, timeout=60).returncode == 0


@pytest.mark.root
def test_nbdfuse_loop_ext4(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    need_root()
    need_path("/dev/fuse")
    need_path("/dev/loop-control")
    mkfs = need_tool("mkfs.ext4")
    fsck = need_tool("fsck.ext4")
    losetup = need_tool("losetup")
    s = serve(members)
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    rnd = random.Random(9)
    files = {f"f{i:03d}.bin": rnd.randbytes(rnd.randrange(1, 256 * 1024)) for i in range(60)}
    files["big.bin"] = rnd.randbytes(16 * MiB)
    with nbdfuse_loop(s.uri, tmp_path) as loop:
        dio = run([losetup, "--list", "--noheadings", "--output", "DIO", loop]).stdout.strip()
        assert dio == "1"
        run([mkfs, "-q", "-F", loop])
        mounted = False
        try:
            run(["mount", loop, str(fsdir)])
            mounted = True
            for name, data in files.items():
                (fsdir / name).write_bytes(data)
            run(["sync", "-f", str(fsdir / "big.bin")])
            run(["umount", str(fsdir)])
            mounted = False
            run([fsck, "-fn", loop])
            run(["mount", "-o", "ro", loop, str(fsdir)])
            mounted = True
            for name, data in files.items():
                assert sha((fsdir / name).read_bytes()) == sha(data), name
            run(["umount", str(fsdir)])
            mounted = False
        finally:
            if mounted:
                subprocess.run(["umount", str(fsdir)], capture_output=True, timeout=60)
    d = s.detail()
    assert d["nbd"]["errors"] == 0 and d["faults"] == []
    assert d["nbd"]["flushes"] > 0  # ext4's journal commits arrived as NBD FLUSH
    stop_and_check(s, members)
    # the file system on the members, read offline, is clean too
    image = tmp_path / "array.img"
    image.write_bytes(cat(s.rundir, members, 0, ARRAY_BYTES))
    run([fsck, "-fn", str(image)])
