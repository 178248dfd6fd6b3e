"""``llraid serve`` as a running array: clean and unclean stops, bitmap-driven resync and recovery,
and the control commands (detail, status, fail, remove, re-add, bits, metadata, get/set, sync, stop).

Every server is a subprocess (``python -m llraid.cli serve``) with its own ``$LLRAID_RUNTIME_DIR``;
the control commands are run through the real command line. The on-disk state is read with
``mdadm --examine`` (superblock State) and what ``llraid examine --json`` / ``examine-bitmap
--json`` print (chunk states).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from llraid.array import Array
from llraid.errors import LlraidError
from llraid.export import nbd
from llraid.export.service import control_request
from llraid.sync import sync_until_idle
from tests.export.conftest import (
    NbdClient,
    Served,
    ServeFactory,
    bitmap_on_disk,
    examine_state,
    llraid,
    make_members,
    mdadm_state,
    need_tool,
)

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 64 * KiB  # llbitmap chunk of these arrays (sync space bytes)


def bits(text: str) -> dict[str, int]:
    """The sysfs-like ``bits`` text as a dict."""
    out = {}
    for line in text.strip().splitlines():
        label, _, n = line.rpartition(" ")
        out[label] = int(n)
    return out


def wait_for(cond: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metadata_digest(members: list[str]) -> list[str]:
    """Hash of everything before the data area (superblock, bitmap, bad-block log) per member."""
    out = []
    for m in members:
        with open(m, "rb") as f:
            out.append(hashlib.sha256(f.read(2 * MiB)).hexdigest())
    return out


def written(s: Served, member: str) -> int:
    """Bytes the running array wrote to ``member`` so far (NBD writes and syncs)."""
    n: int = s.detail()["counters"]["member_written"].get(member, 0)
    return n


def settled(s: Served, timeout: float = 60) -> dict[str, Any]:
    """Wait until every member is in sync, nothing needs a sync and no sync runs; the detail."""
    deadline = time.monotonic() + timeout
    while True:
        d = s.detail()
        if (
            d["sync"]["action"] == "idle"
            and all(m["state"] == "in_sync" for m in d["members"])
            and bits(d["bits"])["need sync"] == 0
            and d["resync_offset"] is None
        ):
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"the array did not settle: {d['sync']} {d['members']}")
        time.sleep(0.05)


@pytest.fixture
def members(tmp_path: Path) -> list[str]:
    return make_members(tmp_path)


# ---- clean stop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigint", "stop"])
def test_clean_stop_marks_clean_and_flushes_bitmap(serve: ServeFactory, members: list[str], how: str) -> None:
    need_tool("mdadm")
    s = serve(members)
    llraid(s.rundir, "set", "safe_mode_delay", "60")  # stay "active" after the writes below
    llraid(s.rundir, "set", "daemon_sleep", "600")  # and keep Dirty chunks Dirty
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, random.Random(1).randbytes(MiB))  # chunks 0..15
        c.write(40 * MiB, b"\x77" * MiB)  # chunks 640..655 (another bitmap block)
        c.flush()
        c.request(nbd.CMD_TRIM, 40 * MiB, MiB)  # back to Unwritten: a lazy bitmap change
    for m in members:
        assert mdadm_state(m) == "active"
    # a bitmap block (512 chunks) with two changes in flight is "infected": all of it is Dirty,
    # so blocks 0 and 1 are Dirty but for the 16 trimmed chunks
    running = bits(s.ctl("bits"))
    assert running["dirty"] == 1024 - 16 and running["unwritten"] == 1984 - 1024 + 16
    # Unwritten is written lazily: the trim is not on disk yet, so the stop has something to flush
    assert bitmap_on_disk(members[0])["bits"]["dirty"] == 1024
    files = sorted(p.name for p in s.rundir.iterdir())
    assert len(files) == 3 and {Path(f).suffix for f in files} == {".nbd", ".ctl", ".json"}

    if how == "stop":
        assert llraid(s.rundir, "stop").stdout.strip() == "stopping"
        assert s.wait_exit() == 0
    else:
        assert s.signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT) == 0
    assert "llraid: stopped cleanly" in "".join(s.lines), s.log()
    assert list(s.rundir.iterdir()) == []  # socket, control socket and registry entry removed

    for m in members:
        assert mdadm_state(m) == "clean"
        assert examine_state(m)["State"] == "clean"
        on_disk = bitmap_on_disk(m)["bits"]
        # flushed: the trim reached the disk, and a clean stop cleans the Dirty chunks
        assert on_disk["clean"] == 1024 - 16 and on_disk["unwritten"] == 1984 - 1024 + 16, on_disk
        assert on_disk["dirty"] == on_disk["need sync"] == 0

    # serving again needs no resync at all
    s2 = serve(members)
    time.sleep(0.6)  # the md thread looks every safe_mode_delay / 2
    d = s2.detail()
    assert d["sync"]["last"] is None and d["sync"]["action"] == "idle"
    assert d["state"] == "clean" and d["resync_offset"] is None
    with NbdClient(s2.socket_path) as c:
        c.connect()
        assert c.read(0, MiB) == random.Random(1).randbytes(MiB)
    assert s2.signal(signal.SIGTERM) == 0


# ---- SIGKILL during writes: resync of exactly what the bitmap marks ---------------------------------------


def test_sigkill_during_fio_resyncs_only_dirty_chunks(
    serve: ServeFactory, members: list[str], tmp_path: Path
) -> None:
    fio = need_tool("fio")
    need_tool("mdadm")
    s = serve(members)
    settled(s)
    job = subprocess.Popen(
        [
            fio,
            "--name=crash",
            "--ioengine=nbd",
            f"--uri={s.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=16m",
            "--size=8m",
            "--iodepth=16",
            "--time_based",
            "--runtime=20",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: s.detail()["nbd"]["bytes_written"] > 4 * MiB, what="fio writes")
        assert bits(s.ctl("bits"))["dirty"] > 0
        s.kill9()
        assert job.wait(timeout=30) != 0  # fio lost its server mid-run
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    for m in members:
        assert mdadm_state(m) == "active"  # unclean
    on_disk = bitmap_on_disk(members[0])
    dirty = on_disk["bits"]["dirty"] + on_disk["bits"]["need sync"]
    assert 0 < dirty < on_disk["chunks"]
    # only the bitmap block holding the written chunks (16..24 MiB = chunks 256..383) is Dirty
    assert all(state == "Unwritten" for first, end, state in on_disk["runs"] if first >= 512)

    # the registry still names the dead server: status ignores it, and a new serve takes over
    assert len(list(s.rundir.glob("*.json"))) == 1
    assert "exporttest:exp" not in llraid(s.rundir, "status").stdout
    out = llraid(s.rundir, "detail", check=False)
    assert out.returncode == 1 and "no running array" in out.stderr

    s2 = serve(members)
    sync = s2.wait_sync(lambda st: st["last"] is not None, what="resync after the crash")
    last = sync["last"]
    assert last["kind"] == "resync" and last["completed"]
    assert last["windows_synced"] == dirty
    assert last["sectors_synced"] * 512 == dirty * CHUNK
    assert last["windows_skipped"] == on_disk["chunks"] - dirty
    assert sum(last["bytes_read"].values()) == 2 * dirty * CHUNK  # both copies of each chunk, nothing else
    d = s2.detail()
    assert bits(d["bits"])["need sync"] == 0 and d["resync_offset"] is None
    for m in members:
        assert mdadm_state(m) in ("clean", "active")

    s2.ctl("sync", "check")
    sync = s2.wait_sync(lambda st: st["last"]["kind"] == "check", what="check")
    assert sync["last"]["completed"] and sync["last"]["mismatch_cnt"] == 0
    assert llraid(s2.rundir, "stop").returncode == 0
    assert s2.wait_exit() == 0
    for m in members:
        assert mdadm_state(m) == "clean"


def test_sigterm_during_fio_is_clean(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    """Stopping under load: requests in flight are cut off between requests, every acknowledged
    write is on the members, the superblocks say clean and the next start needs no resync."""
    fio = need_tool("fio")
    need_tool("mdadm")
    s = serve(members)
    settled(s)
    job = subprocess.Popen(
        [
            fio,
            "--name=load",
            "--ioengine=nbd",
            f"--uri={s.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64m",
            "--numjobs=2",
            "--offset_increment=60m",
            "--iodepth=16",
            "--time_based",
            "--runtime=20",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: s.detail()["nbd"]["bytes_written"] > 4 * MiB, what="fio writes")
        t0 = time.monotonic()
        assert s.signal(signal.SIGTERM) == 0, s.log()
        assert time.monotonic() - t0 < 10
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert "Traceback" not in s.log()
    for m in members:
        assert mdadm_state(m) == "clean"
        b = bitmap_on_disk(m)["bits"]
        assert b["dirty"] == b["need sync"] == 0
    s2 = serve(members)
    time.sleep(0.6)
    assert s2.detail()["sync"]["last"] is None  # nothing to resync
    s2.ctl("sync", "check")
    last = s2.wait_sync(lambda st: st["last"] is not None)["last"]
    assert last["kind"] == "check" and last["completed"] and last["mismatch_cnt"] == 0
    assert s2.signal(signal.SIGTERM) == 0


def test_stop_during_recovery_resumes_where_it_stopped(serve: ServeFactory, members: list[str]) -> None:
    m1 = members[1]
    s = serve(members)
    rd = s.rundir
    data = random.Random(12).randbytes(8 * MiB)
    with NbdClient(s.socket_path) as c:
        c.connect()
        llraid(rd, "fail", m1)
        llraid(rd, "remove", m1)
        c.write(16 * MiB, data)  # degraded: m1 misses its 4 MiB of it
    # m1 holds the even 512 KiB chunks of the pair m0/m1: array 16..24 MiB is member 8..12 MiB
    llraid(rd, "set", "sync_speed_max", "2M")  # 2 MiB/s
    llraid(rd, "re-add", m1)
    wait_for(
        lambda: s.detail()["members"][-1]["recovery_offset"] * 512 > 9 * MiB,
        what="a recovery in progress",
    )
    assert s.signal(signal.SIGTERM) == 0
    facts = examine_state(m1)
    assert "Recovery Offset" in facts, facts
    offset = int(facts["Recovery Offset"].split()[0]) * 512
    assert 9 * MiB < offset < 12 * MiB

    s2 = serve(members)
    settled(s2)
    assert written(s2, m1) == 12 * MiB - offset  # resumed at the offset, not restarted
    with NbdClient(s2.socket_path) as c:
        c.connect()
        llraid(rd, "fail", members[0])  # m1 alone serves the data of the pair m0/m1
        assert c.read(16 * MiB, len(data)) == data
    assert s2.signal(signal.SIGTERM) == 0


# ---- control commands ------------------------------------------------------------------------------------


def test_detail_status_bits_metadata(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    rd = s.rundir
    text = llraid(rd, "detail").stdout
    for want in ("Raid Level : raid10", "Raid Devices : 4", "State : clean", "Bitmap : lockless", s.uri):
        assert want in text, text
    assert text.count("in_sync") == 4
    d = json.loads(llraid(rd, "detail", "--json").stdout)
    assert d["array_bytes"] == 124 * MiB and d["slots"] == "UUUU" and d["degraded"] is False
    assert d["layout"] == 0x102 and d["chunk_sectors"] == 1024 and d["pid"] == s.pid
    assert [m["path"] for m in d["members"]] == members
    assert stat.S_IMODE(os.stat(s.control).st_mode) == 0o600  # the control socket: owner only
    (entry,) = s.rundir.glob("*.json")
    info = json.loads(entry.read_text())
    assert info["pid"] == s.pid and info["nbd_uri"] == s.uri and info["control"] == s.control
    assert info["members"] == members

    status = llraid(rd, "status").stdout.splitlines()
    assert status[0] == "Personalities : [raid1] [raid10]"
    assert status[1] == "exporttest:exp : active raid10 m0.img[0] m1.img[1] m2.img[2] m3.img[3]"
    assert status[2].split() == ["126976", "blocks", "[4/4]", "[UUUU]", s.uri]
    assert status[3].split() == ["bitmap:", "lockless", "state:", "clean"]

    assert (
        bits(llraid(rd, "bits").stdout)
        == bits(s.ctl("bits"))
        == {
            "unwritten": 1984,
            "clean": 0,
            "dirty": 0,
            "need sync": 0,
            "syncing": 0,
            "need sync unwritten": 0,
            "syncing unwritten": 0,
            "clean unwritten": 0,
        }
    )
    meta = llraid(rd, "metadata").stdout
    assert meta.startswith("chunksize 128\nchunkshift 7\nchunks 1984\noffset 8\n")


def test_get_and_set(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    rd = s.rundir
    assert llraid(rd, "set", "daemon_sleep", "7").stdout.strip() == "daemon_sleep 7"
    assert float(llraid(rd, "get", "daemon_sleep").stdout) == 7.0
    assert "daemon_sleep 7\n" in s.ctl("metadata")
    assert s.ctl("set", "barrier_idle", "2.5") == "barrier_idle 2.5"
    assert float(s.ctl("get", "barrier_idle")) == 2.5
    assert s.ctl("set", "safe_mode_delay", "0.5") == "safe_mode_delay 0.5"
    assert float(s.ctl("get", "safe_mode_delay")) == 0.5
    assert s.ctl("set", "sync_speed_max", "0") == "sync_speed_max 0"
    out = llraid(rd, "set", "daemon_sleep", "0", check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "llraid: daemon_sleep: '0' is out of range (0.01..86400 seconds)\n"
    for args, msg in [
        (["daemon_sleep", "-3"], "must not be negative"),
        (["barrier_idle", "soon"], "not a number"),
        (["no_such_knob", "1"], "unknown setting"),
    ]:
        with pytest.raises(LlraidError, match=msg):
            s.ctl("set", *args)
    with pytest.raises(LlraidError, match="unknown setting"):
        s.ctl("get", "no_such_knob")
    assert float(s.ctl("get", "daemon_sleep")) == 7.0  # the bad sets changed nothing
    assert s.signal(signal.SIGTERM) == 0
    # daemon_sleep is recorded in the bitmap superblock
    assert bitmap_on_disk(members[0])["daemon_sleep"] == 7


def test_control_channel_rejects_bad_requests(
    serve: ServeFactory, members: list[str], tmp_path: Path
) -> None:
    s = serve(members)
    not_a_member = tmp_path / "other.img"
    not_a_member.write_bytes(bytes(4096))
    (tmp_path / "foreign").mkdir()
    foreign = make_members(tmp_path / "foreign", level=1, n=2, size_mib=8)
    for raw in (b"not json\n", b"[1, 2]\n", b'{"args": []}\n', b'{"cmd": "detail", "args": 5}\n', b"\n"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(s.control)
        sock.sendall(raw)
        reply = json.loads(sock.makefile("rb").readline())
        sock.close()
        assert reply["ok"] is False and "bad request" in reply["error"], (raw, reply)
    for cmd, args, msg in [
        ("frobnicate", [], "unknown command"),
        ("fail", [], "takes one argument"),
        ("fail", ["a", "b"], "takes one argument"),
        ("fail", [str(not_a_member)], "no member"),
        ("remove", [members[0]], "fail it first"),
        ("set", ["daemon_sleep"], "set takes a name and a value"),
        ("re-add", [foreign[0]], "belongs to array"),
        ("sync", ["resync"], "sync takes check, repair, idle or proactive"),
    ]:
        with pytest.raises(LlraidError, match=msg):
            control_request(s.control, cmd, args, timeout=10)
    # a client that connects and says nothing does not block the others
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(s.control)
    try:
        assert s.detail()["slots"] == "UUUU"
    finally:
        idle.close()
    assert s.alive()


def test_sync_check_repair_idle(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    rd = s.rundir
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, random.Random(2).randbytes(8 * MiB))
    assert llraid(rd, "sync", "check").stdout.strip() == "check started"
    last = s.wait_sync(lambda st: st["last"] and st["last"]["kind"] == "check")["last"]
    assert last["completed"] and last["mismatch_cnt"] == 0
    # check reads only what the bitmap says can hold data (block 0: chunks 0..511 = 32 MiB)
    assert last["sectors_synced"] * 512 == 512 * CHUNK

    # a difference behind the array's back: check counts it, repair fixes it
    with open(members[1], "r+b") as f:
        f.seek(2 * MiB + 4096)  # data offset 2 MiB; m1 mirrors m0 (raid10 n2)
        f.write(b"\xff" * 4096)
    llraid(rd, "sync", "check")
    last = s.wait_sync(lambda st: st["last"]["kind"] == "check" and st["last"]["mismatch_cnt"] > 0)["last"]
    assert last["mismatch_cnt"] == 128  # md counts the whole 64 KiB window
    llraid(rd, "sync", "repair")
    last = s.wait_sync(lambda st: st["last"]["kind"] == "repair")["last"]
    assert last["completed"] and last["repaired_sectors"] == 128
    llraid(rd, "sync", "check")
    last = s.wait_sync(lambda st: st["last"]["kind"] == "check" and st["last"]["mismatch_cnt"] == 0)["last"]
    assert last["completed"]

    # a slow check can be watched and stopped
    llraid(rd, "set", "sync_speed_max", "4M")  # 4 MiB/s (a bare number is KiB/s, as md's)
    llraid(rd, "sync", "check")
    wait_for(lambda: s.detail()["sync"]["action"] == "check" and s.detail()["sync"]["done"] > 0, what="check")
    status = llraid(rd, "status").stdout
    assert "check = " in status and "%" in status, status
    assert "Check Status" in llraid(rd, "detail").stdout
    out = llraid(rd, "sync", "repair", check=False)
    assert out.returncode == 1 and "is running" in out.stderr
    assert llraid(rd, "sync", "idle").stdout.strip() == "idle"
    sync = s.detail()["sync"]
    assert sync["action"] == "idle" and sync["last"]["kind"] == "check"
    assert sync["last"]["completed"] is False
    assert llraid(rd, "sync", "idle").stdout.strip() == "idle"  # idle when idle: nothing to do

    # SIGTERM while a (slow) check runs: the check stops, the stop is clean
    llraid(rd, "sync", "check")
    wait_for(lambda: s.detail()["sync"]["done"] > 0, what="the second check")
    t0 = time.monotonic()
    assert s.signal(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    for m in members:
        assert mdadm_state(m) == "clean"


# ---- fail / remove / re-add -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "n", "m1_share"), [(10, 4, 512 * KiB), (1, 2, MiB)], ids=["raid10", "raid1"]
)
def test_fail_and_re_add_recovers_only_degraded_writes(
    serve: ServeFactory, tmp_path: Path, level: int, n: int, m1_share: int
) -> None:
    members = make_members(tmp_path, level=level, n=n)
    m0, m1 = members[0], members[1]
    s = serve(members)
    rd = s.rundir
    llraid(rd, "set", "daemon_sleep", "0.3")
    llraid(rd, "set", "barrier_idle", "0.2")
    a = random.Random(10).randbytes(4 * MiB)
    b = random.Random(11).randbytes(MiB)
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, a)
        # the daemon cleans the chunks once they are idle: Clean chunks need no recovery
        wait_for(lambda: bits(s.ctl("bits"))["dirty"] == 0, what="the bitmap daemon")

        assert llraid(rd, "fail", m1).stdout.strip() == f"set {m1} faulty"
        d = s.detail()
        assert d["degraded"] and d["slots"] == ("U_UU" if n == 4 else "U_")
        assert [m["state"] for m in d["members"]][1] == "faulty"
        assert d["faults"] == [{"member": m1, "reason": "failed by request"}]
        status = llraid(rd, "status").stdout
        assert "m1.img[1](F)" in status and f"[{n}/{n - 1}]" in status
        out = llraid(rd, "re-add", m1, check=False)  # still in the array: remove it first
        assert out.returncode == 1 and out.stderr.startswith("llraid: ")
        assert s.detail()["members"][1]["state"] == "faulty"
        assert llraid(rd, "remove", m1).stdout.strip() == f"removed {m1}"
        assert mdadm_state(m0) in ("clean", "active")

        c.write(40 * MiB, b)  # degraded writes: NeedSync, m1 misses them
        assert bits(s.ctl("bits"))["need sync"] == 16
        m1_before = written(s, m1)
        assert llraid(rd, "re-add", m1).stdout.strip() == f"re-added {m1} as role 1"
        d = settled(s)
        # m1 got exactly its part of the degraded writes, nothing of what it already had
        assert written(s, m1) - m1_before == m1_share
        last = d["sync"]["last"]
        if level == 10:
            # the recovery synced m1's 8 chunks; the other 8 (mirrored on m2/m3, which never left)
            # are resynced right after it, and only they
            assert last["kind"] == "resync" and last["completed"]
            assert last["windows_synced"] == 8 and last["bytes_written"] == {}
        else:
            assert last["kind"] == "recovery" and last["completed"] and last["member"] == m1
            assert last["bytes_written"] == {m1: m1_share}

        # m1 really holds everything: with m0 failed, it serves both regions alone. (Wait for the
        # daemon first: the end of the sync made whole bitmap blocks Dirty, and Dirty chunks of
        # a failed member are recovered too.)
        wait_for(lambda: bits(s.ctl("bits"))["dirty"] == 0, what="the bitmap daemon")
        llraid(rd, "fail", m0)
        assert c.read(0, len(a)) == a
        assert c.read(40 * MiB, MiB) == b
        llraid(rd, "remove", m0)
        m0_before = written(s, m0)
        llraid(rd, "re-add", m0)
        d = settled(s)
        assert written(s, m0) == m0_before  # nothing was written while it was out
        assert d["sync"]["last"]["kind"] == "recovery" and d["sync"]["last"]["member"] == m0
    llraid(rd, "sync", "check")
    last = s.wait_sync(lambda st: st["last"]["kind"] == "check")["last"]
    assert last["completed"] and last["mismatch_cnt"] == 0
    assert s.signal(signal.SIGTERM) == 0
    for m in members:
        assert mdadm_state(m) == "clean"


def test_io_during_fail_re_add_and_check(serve: ServeFactory, members: list[str], tmp_path: Path) -> None:
    """fio writes and verifies while a member fails, comes back, recovers, and a check runs."""
    fio = need_tool("fio")
    s = serve(members)
    rd = s.rundir
    m1 = members[1]
    job = subprocess.Popen(
        [
            fio,
            "--name=busy",
            "--ioengine=nbd",
            f"--uri={s.uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=24m",
            "--numjobs=2",
            "--offset_increment=48m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: s.detail()["nbd"]["bytes_written"] > 2 * MiB, what="fio writes")
        llraid(rd, "fail", m1)
        time.sleep(0.2)
        llraid(rd, "remove", m1)
        time.sleep(0.2)
        llraid(rd, "re-add", m1)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err
    res = json.loads(out[out.index("{") :])
    for j in res["jobs"]:
        assert j["error"] == 0 and j["read"]["io_bytes"] == 24 * MiB
    s.wait_sync(
        lambda st: all(m["state"] == "in_sync" for m in s.detail()["members"]), what="recovery", timeout=60
    )
    llraid(rd, "sync", "check")
    last = s.wait_sync(lambda st: st["last"]["kind"] == "check")["last"]
    assert last["completed"] and last["mismatch_cnt"] == 0
    assert s.detail()["nbd"]["errors"] == 0
    assert s.signal(signal.SIGTERM) == 0


# ---- several arrays, choosing one --------------------------------------------------------------------------


def test_two_arrays_in_one_runtime_dir(serve: ServeFactory, tmp_path: Path) -> None:
    one = make_members(tmp_path, prefix="a", name="one")
    two = make_members(tmp_path, level=1, n=2, prefix="b", name="two")
    s1 = serve(one)
    s2 = serve(two)
    rd = s1.rundir
    status = llraid(rd, "status").stdout
    assert (
        "exporttest:one : active raid10" in status
        and "exporttest:two : active raid1 b0.img[0] b1.img[1]" in status
    )
    assert "[2/2] [UU]" in status and "[4/4] [UUUU]" in status
    out = llraid(rd, "detail", check=False)
    assert out.returncode == 1 and "2 arrays are running" in out.stderr
    uuid2 = s2.detail()["uuid"]
    d = json.loads(llraid(rd, "detail", "--json", "--array", uuid2[:8]).stdout)
    assert d["uuid"] == uuid2 and d["level"] == "raid1"
    d = json.loads(llraid(rd, "detail", "--json", "--array", "exporttest:one").stdout)
    assert d["level"] == "raid10"
    d = json.loads(llraid(rd, "detail", "--json", "--array", s2.control).stdout)
    assert d["uuid"] == uuid2
    llraid(rd, "stop", "--array", uuid2)
    assert s2.wait_exit() == 0
    assert json.loads(llraid(rd, "detail", "--json").stdout)["level"] == "raid10"  # one left
    assert s1.alive()


# ---- regressions: each of these failed when written (bugs found by these tests) ---------------------


def test_array_by_short_name(serve: ServeFactory, tmp_path: Path) -> None:
    """``--array two`` chooses the array named ``host:two`` (cli._find_array once compared the
    short form of the query with the full name of the array, so it never matched)."""
    s = serve(make_members(tmp_path, name="two"))
    d = json.loads(llraid(s.rundir, "detail", "--json", "--array", "two").stdout)
    assert d["name"] == "exporttest:two"


def test_member_path_relative_to_the_callers_directory(
    serve: ServeFactory, members: list[str], tmp_path: Path
) -> None:
    """A member path on the command line is relative to the caller's directory, not the
    server's (cli.cmd_control once sent it verbatim and the server resolved it in its cwd)."""
    s = serve(members, cwd=tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    out = llraid(s.rundir, "fail", "../m1.img", cwd=sub, check=False)
    assert out.returncode == 0, out.stderr
    assert s.detail()["members"][1]["state"] == "faulty"


def test_second_serve_of_a_running_array_leaves_it_alone(serve: ServeFactory, members: list[str]) -> None:
    """A second ``serve`` of a running array is refused before it writes anything (it once
    assembled the array, found the socket in use, and "stopped" it: superblocks rewritten with
    events + 1 under the running server)."""
    s = serve(members)
    llraid(s.rundir, "set", "safe_mode_delay", "600")
    llraid(s.rundir, "set", "daemon_sleep", "600")
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, b"\x01" * MiB)
        c.flush()
    before = metadata_digest(members)
    out = subprocess.run(
        [sys.executable, "-m", "llraid.cli", "serve", *members],
        capture_output=True,
        text=True,
        env={**os.environ, "LLRAID_RUNTIME_DIR": str(s.rundir)},
        timeout=60,
    )
    assert out.returncode == 1 and "in use" in out.stderr
    assert metadata_digest(members) == before, "the refused serve wrote to the members"
    assert s.alive() and s.detail()["slots"] == "UUUU"


def test_second_serve_from_another_runtime_dir_is_refused(
    serve: ServeFactory, members: list[str], tmp_path: Path
) -> None:
    """Two servers on the same members are impossible (with another runtime directory a second
    one once came up and served the same member files)."""
    s = serve(members)
    other = Path(tempfile.mkdtemp(prefix="llx", dir="/tmp"))  # short: unix socket paths
    second = Served(members, other, tmp_path)
    try:
        with contextlib.suppress(AssertionError):  # raised if it exits instead of serving
            second.start()
        assert s.alive()
        assert second.proc is not None and second.proc.poll() not in (None, 0), (
            "a second server is running on the same members"
        )
    finally:
        if second.alive():
            second.kill9()  # never let it stop "cleanly" under the first server's feet
        second.reap()
        shutil.rmtree(other, ignore_errors=True)


def test_readonly_serve_of_a_new_array(serve: ServeFactory, members: list[str]) -> None:
    """``serve --readonly`` of a never-started lockless array serves zeros and writes nothing
    (it once failed: the first-use bitmap was written through read-only fds, 'superblock write
    failed: Bad file descriptor')."""
    before = metadata_digest(members)
    try:
        s: Served = serve(members, "--readonly")
        with NbdClient(s.socket_path) as c:
            info = c.connect()
            assert info.flags & nbd.TF_READ_ONLY
            assert c.read(0, 4096) == bytes(4096)
        assert s.signal(signal.SIGTERM) == 0
    finally:
        assert metadata_digest(members) == before, "a read-only serve wrote to the members"


def test_readonly_serve_after_a_crash_writes_nothing(serve: ServeFactory, members: list[str]) -> None:
    """After a kill -9, ``serve --readonly`` serves the data, refuses writes, starts no resync and
    writes nothing (the bitmap reload Dirty -> NeedSync stays in memory)."""
    s = serve(members)
    settled(s)  # nothing left from the start: the crash below is the only reason to resync
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, b"\x05" * MiB)
        c.flush()
    s.kill9()
    before = metadata_digest(members)
    data_before = [hashlib.sha256(Path(m).read_bytes()).hexdigest() for m in members]
    r = serve(members, "--readonly")
    with NbdClient(r.socket_path) as c:
        c.connect()
        assert c.read(0, MiB) == b"\x05" * MiB
        assert c.request(nbd.CMD_WRITE, 0, 512, 0, bytes(512)) == (nbd.EPERM, b"")
    time.sleep(0.5)  # give the md thread a chance to (wrongly) start a resync
    assert r.detail()["sync"]["last"] is None
    assert r.signal(signal.SIGTERM) == 0
    assert metadata_digest(members) == before
    assert [hashlib.sha256(Path(m).read_bytes()).hexdigest() for m in members] == data_before


def test_crash_before_the_first_superblock_update(tmp_path: Path) -> None:
    """A new array (mdadm defaults: not --assume-clean), written once and crashed at once (kill -9
    right after `llraid serve` started, before the md thread did anything). The write intent must
    survive: the on-disk bitmap must not still say FIRST_USE, which would reset every chunk to
    Unwritten on the next start, so the resync and even a check would skip the torn chunk. (It
    once did: the array started "active" without writing a superblock, and FIRST_USE stayed on
    disk until the first update_sb.)"""
    members = make_members(tmp_path)
    a = Array.assemble(members, bitmap_threads=False)
    a.write(0, b"\x42" * MiB)  # bitmap: chunk 0 Dirty, durable before the data
    a.crash()
    assert bitmap_on_disk(members[0])["bits"]["dirty"] > 0
    # a torn mirror write: m1 did not get the data m0 got
    with open(members[1], "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x00" * 4096)
    assert bitmap_on_disk(members[0])["first_use"] is False, "the crash left FIRST_USE on disk"
    b = Array.assemble(members, bitmap_threads=False)
    try:
        sync_until_idle(b)
        copies = [b.read_member(d, 0, 8) for d in b.rdevs[:2]]
        assert copies[0] == copies[1], "the resync skipped a chunk the crash left Dirty"
    finally:
        b.stop()


@pytest.mark.parametrize(
    "where",
    [
        ["--socket", "/tmp/" + "x" * 120 + ".sock"],  # longer than a unix socket path can be
        ["--socket", "/nonexistent-dir/s.sock"],
        ["--listen", "192.0.2.1:10809"],  # TEST-NET-1: not an address of this host
        ["--listen", "127.0.0.1:99999"],
        ["--listen", "127.0.0.1:BUSY"],  # a port another socket holds
    ],
    ids=["long-socket-path", "socket-dir-missing", "foreign-address", "port-out-of-range", "port-in-use"],
)
def test_serve_on_an_unusable_address_fails_cleanly(
    members: list[str], rundir: Path, where: list[str]
) -> None:
    """One ``llraid: ...`` line and exit 1, the array stopped as it was (the OSError or
    OverflowError of the bind once escaped main() as a traceback)."""
    states = [examine_state(m)["State"] for m in members]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        args = [a.replace("BUSY", str(busy.getsockname()[1])) for a in where]
        out = llraid(rundir, "serve", *members, *args, check=False, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 1
    assert [examine_state(m)["State"] for m in members] == states
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("llraid: ") and out.stderr.count("\n") == 1, out.stderr


def test_stop_with_a_client_that_stopped_reading(serve: ServeFactory, members: list[str]) -> None:
    """A client that stops reading replies cannot hold up a stop (the process once stopped the
    array cleanly and then never exited: NbdServer.handle awaited writer.wait_closed() on a
    transport whose send buffer never drains, inside asyncio.run's final task cancellation)."""
    s = serve(members)
    stalled = NbdClient(s.socket_path)
    try:
        stalled.connect()
        for _ in range(4):  # 128 MiB of replies it never reads: the server's send buffer fills
            stalled.send_request(nbd.CMD_READ, 0, 32 * MiB)
        wait_for(lambda: s.detail()["nbd"]["requests"] >= 1, what="the first request")
        time.sleep(0.3)
        assert llraid(s.rundir, "stop").stdout.strip() == "stopping"  # SIGTERM: the same
        try:
            rc = s.wait_exit(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        assert [mdadm_state(m) for m in members] == ["clean"] * len(members)
        assert rc == 0, "llraid serve did not exit within 5 s of the stop"
    finally:
        stalled.close()
        s.reap()
