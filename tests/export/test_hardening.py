"""Hardening of ``llraid serve`` and its control commands (issue 13): settings are validated before
anything changes, the md thread cannot die silently, the runtime directory and the control socket
trust only their owner, members are named as ``status`` names them, every ``--json`` is honoured,
and bad control requests, Ctrl-C at startup and read-only raid5 are handled.

Each test here failed before its fix; the docstrings say how.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llraid.cli as cli
import llraid.export.service as service_mod
from llraid.array import Array
from llraid.cli import main
from llraid.errors import LlraidError
from llraid.export import nbd
from llraid.export.service import Service, control_request, prepare_runtime_dir, runtime_dir
from llraid.fixtures import copy_sparse
from llraid.sync import needed_sync
from tests.conftest import BY_NAME
from tests.export.conftest import (
    NbdClient,
    ServeFactory,
    examine_state,
    llraid,
    llraid_env,
    make_members,
    need_root,
)

MiB = 1 << 20
NOBODY = 65534


@pytest.fixture
def members(tmp_path: Path) -> list[str]:
    return make_members(tmp_path)


def metadata_digest(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(hashlib.sha256(f.read(2 * MiB)).hexdigest())
    return out


def one_line(err: str) -> str:
    assert err.startswith("llraid: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- 1. settings ----


BAD_SETTINGS = [
    ("daemon_sleep", "inf"),
    ("daemon_sleep", "nan"),
    ("daemon_sleep", "1e300"),
    ("daemon_sleep", "-1"),
    ("daemon_sleep", "0"),
    ("daemon_sleep", "100000"),
    ("daemon_sleep", ""),
    ("safe_mode_delay", "1e308"),
    ("safe_mode_delay", "nan"),
    ("safe_mode_delay", "0"),
    ("barrier_idle", "nan"),
    ("barrier_idle", "-0.5"),
    ("sync_speed_max", "-1"),
    ("sync_speed_max", "inf"),
    ("sync_speed_max", "0.1"),
    ("sync_speed_max", "5T"),
    ("sync_speed_max", "lots"),
]


def test_bad_settings_are_refused_and_change_nothing(serve: ServeFactory, members: list[str]) -> None:
    """Every setting is validated before anything changes. (``set daemon_sleep inf`` once printed
    an OverflowError but stored the value: every NBD write failed with EIO from then on,
    ``metadata`` failed, and ``stop`` exited with an error leaving stale runtime files;
    ``safe_mode_delay 1e308`` killed the md thread; nan and negative values were accepted.)"""
    s = serve(members)
    rd = s.rundir
    before = {
        name: llraid(rd, "get", name).stdout for name in ("daemon_sleep", "barrier_idle", "safe_mode_delay")
    }
    before["sync_speed_max"] = llraid(rd, "get", "sync_speed_max").stdout
    for name, value in BAD_SETTINGS:
        out = llraid(rd, "set", name, value, check=False)
        assert out.returncode == 1 and out.stdout == "", (name, value, out)
        one_line(out.stderr)
        with pytest.raises(LlraidError):  # the server refuses it too (a client that skips the check)
            s.ctl("set", name, value)
    assert {name: llraid(rd, "get", name).stdout for name in before} == before
    assert s.detail()["sync"]["action"] == "idle"
    # the array works as before: writes, the metadata view, a clean stop that removes its files
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, b"\x11" * MiB)
        c.flush()
        assert c.read(0, MiB) == b"\x11" * MiB
    assert "daemon_sleep " + before["daemon_sleep"] in llraid(rd, "metadata").stdout
    assert llraid(rd, "stop").stdout == "stopping\n"
    assert s.wait_exit() == 0
    assert list(rd.iterdir()) == []
    assert "Traceback" not in s.log()


def test_settings_in_mds_units(serve: ServeFactory, members: list[str]) -> None:
    """sync_speed_max is KiB/s as md's (it was bytes/s, and '2M' was refused)."""
    s = serve(members)
    rd = s.rundir
    assert llraid(rd, "set", "sync_speed_max", "2M").stdout == "sync_speed_max 2048\n"
    assert llraid(rd, "get", "sync_speed_max").stdout == "2048\n"
    assert llraid(rd, "set", "sync_speed_max", "4096").stdout == "sync_speed_max 4096\n"
    assert llraid(rd, "set", "safe_mode_delay", "250ms").stdout == "safe_mode_delay 0.25\n"
    assert llraid(rd, "set", "barrier_idle", "0").stdout == "barrier_idle 0\n"
    assert llraid(rd, "set", "daemon_sleep", "86400").stdout == "daemon_sleep 86400\n"
    assert "daemon_sleep 86400\n" in llraid(rd, "metadata").stdout


def test_settings_an_array_does_not_have(serve: ServeFactory, tmp_path: Path) -> None:
    """daemon_sleep on an array without a bitmap once answered 'ValueError: this bitmap has no
    daemon'; barrier_idle on a classic bitmap an 'unsupported setting' that hid why."""
    from llraid.format.bitmap import BitmapKind

    s = serve(make_members(tmp_path, level=1, n=2, bitmap=BitmapKind.NONE))
    for cmd in (["set", "daemon_sleep", "3"], ["get", "daemon_sleep"], ["get", "barrier_idle"]):
        out = llraid(s.rundir, *cmd, check=False)
        assert out.returncode == 1 and "this array has no bitmap" in one_line(out.stderr)


# ---- the md thread ----


@pytest.fixture
def crashed(tmp_path: Path, rundir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Array]:
    """An array after a crash: a resync for the md thread to start."""
    monkeypatch.setenv("LLRAID_RUNTIME_DIR", str(rundir))
    paths = make_members(tmp_path)
    a = Array.assemble(paths)
    a.write(0, b"\xaa" * MiB)
    a.crash()
    array = Array.assemble(paths)
    assert needed_sync(array) is not None
    try:
        yield array
    finally:
        if not array._closed:
            array.stop()


def serve_in_process(svc: Service, during: Callable[[Service], None]) -> None:
    """Run the service in this (the main) thread; ``during`` runs in another once it serves,
    then a SIGTERM stops it, as it would stop a real server."""
    failed: list[BaseException] = []

    def ready(s: Service) -> None:
        def body() -> None:
            try:
                during(s)
            except BaseException as e:
                failed.append(e)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=body, daemon=True).start()

    asyncio.run(svc.run(on_ready=ready))
    if failed:
        raise failed[0]


def test_md_thread_survives_any_safe_mode_delay(crashed: Array) -> None:
    """The md thread sleeps at most a second between rounds, whatever the delay (a delay of 1e308
    once made its wait raise OverflowError: the thread died, and with it safe mode and the
    automatic resync, while the array went on serving)."""
    crashed.safe_mode_delay = 1e308  # what a caller of the library could still do
    svc = Service(crashed)

    def during(s: Service) -> None:
        deadline = time.monotonic() + 30
        while s.syncer.last is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s._md_thread is not None and s._md_thread.is_alive()
        assert s.syncer.last is not None and s.syncer.last.kind == "resync" and s.syncer.last.completed

    serve_in_process(svc, during)
    assert crashed._closed


def test_md_thread_round_errors_are_logged_and_retried(
    crashed: Array, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []
    real = crashed.try_mark_clean

    def flaky() -> bool:
        calls.append(1)
        if len(calls) <= 3:
            raise OverflowError("a bad value" if len(calls) < 3 else "another")
        return real()

    monkeypatch.setattr(crashed, "try_mark_clean", flaky)
    svc = Service(crashed)

    def during(s: Service) -> None:
        deadline = time.monotonic() + 30
        while (len(calls) < 4 or s.syncer.last is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s._md_thread is not None and s._md_thread.is_alive() and len(calls) >= 4
        assert s.syncer.last is not None and s.syncer.last.completed

    with caplog.at_level("ERROR", logger="llraid.serve"):
        serve_in_process(svc, during)
    lines = [r.getMessage() for r in caplog.records if "md thread" in r.getMessage()]
    assert lines == [  # a lasting error once, not once per round
        "md thread: OverflowError: a bad value (retrying)",
        "md thread: OverflowError: another (retrying)",
    ]
    assert all(r.exc_info is None for r in caplog.records)  # one line each, no traceback


def test_md_thread_that_dies_stops_the_service_cleanly(
    crashed: Array, monkeypatch: pytest.MonkeyPatch, rundir: Path
) -> None:
    """If the md thread ends anyway, the array is not left running without it: the service stops
    cleanly, removes its files and says why."""
    svc = Service(crashed)
    monkeypatch.setattr(svc, "_md_period", lambda: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(LlraidError, match="md thread failed: RuntimeError: broken"):
        asyncio.run(svc.run())
    assert crashed._closed and list(rundir.iterdir()) == []


def test_a_failing_stop_still_removes_the_runtime_files(
    crashed: Array, monkeypatch: pytest.MonkeyPatch, rundir: Path
) -> None:
    """A stop that fails (a member gone bad at the last superblock write) reports the error and
    still removes the sockets and the registry entry (they were once left behind: the removal
    came after the stop in the same finally block)."""
    from llraid.array import IOFailure

    real_stop = crashed.stop
    failed: list[bool] = []

    def failing_stop() -> None:
        if not failed:  # once: the fixture's teardown stops it for real
            failed.append(True)
            raise IOFailure("no member's superblock could be written")
        real_stop()

    monkeypatch.setattr(crashed, "stop", failing_stop)
    with pytest.raises(IOFailure, match="no member's superblock"):
        serve_in_process(Service(crashed), lambda s: None)
    assert list(rundir.iterdir()) == []


# ---- 3. the runtime directory and the control socket ----


def run_as(uid: int, fn: Callable[[], str], env: dict[str, str] | None = None) -> str:
    """``fn()`` in a forked child running as ``uid``; what it returned (or raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = fn()
        except BaseException as e:
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode()


@pytest.mark.parametrize("case", ["mode-0777", "mode-0750", "symlink", "not-a-dir"])
def test_unsafe_runtime_dir_is_refused(case: str, members: list[str], tmp_path: Path, rundir: Path) -> None:
    """serve, status and the control commands refuse a runtime directory that others can use, with
    a line that names it and says what is wrong; serve touches no member first. (A mode-0777
    directory was once used as it was.)"""
    d = rundir / "rt"
    if case.startswith("mode-"):
        d.mkdir()
        d.chmod(int(case[5:], 8))
        want = f"runtime directory {d} has mode {case[5:]}: group or others can use it"
    elif case == "symlink":
        (rundir / "real").mkdir(mode=0o700)
        d.symlink_to(rundir / "real")
        want = f"runtime directory {d} is a symbolic link"
    else:
        d.write_text("")
        want = f"runtime directory {d} is not a directory"
    before = metadata_digest(members)
    for args in (["serve", *members], ["status"], ["detail"], ["stop"]):
        out = llraid(d, *args, check=False)
        assert out.returncode == 1 and want in one_line(out.stderr), (args, out)
    assert metadata_digest(members) == before
    if d.is_dir():
        assert list(d.iterdir()) == []


@pytest.mark.parametrize("what", ["file", "symlink", "dir"])
def test_serve_socket_path_is_never_removed_unless_a_socket(
    what: str, members: list[str], tmp_path: Path, rundir: Path
) -> None:
    """``serve --socket PATH`` replaces only a stale socket (it once unlinked whatever was at
    PATH when nothing answered there: a file, or the link to one)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "nbd.sock"
    if what == "file":
        path = victim
    elif what == "symlink":
        path.symlink_to(victim)
    else:
        path.mkdir()
    out = llraid(rundir, "serve", *members, "--socket", str(path), check=False)
    assert out.returncode == 1 and f"{path} exists and is not a socket" in one_line(out.stderr)
    assert victim.read_text() == "precious" and os.path.lexists(path)
    assert list(rundir.iterdir()) == []


def test_relative_runtime_dir_is_refused(tmp_path: Path) -> None:
    """Server and clients run in different directories: a relative LLRAID_RUNTIME_DIR would be two
    different directories (XDG_RUNTIME_DIR, relative, is ignored as its spec says)."""
    env = {**llraid_env(tmp_path), "LLRAID_RUNTIME_DIR": "rt"}
    out = subprocess.run(
        [sys.executable, "-m", "llraid.cli", "status"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 1
    assert "LLRAID_RUNTIME_DIR must be an absolute path, not 'rt'" in one_line(out.stderr)
    assert not (tmp_path / "rt").exists()


def test_runtime_dir_of_another_user_is_refused(members: list[str], rundir: Path) -> None:
    need_root()
    d = rundir / "rt"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    for args in (["serve", *members], ["status"], ["fail", "m1.img"]):
        out = llraid(d, *args, check=False)
        assert out.returncode == 1, out
        assert f"runtime directory {d} belongs to uid {NOBODY}, not to you (uid 0)" in one_line(out.stderr)
    assert list(d.iterdir()) == []


def test_default_tmp_runtime_dir_made_by_someone_else(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR a user's runtime directory is /tmp/llraid-$UID, which anyone can
    create first (it was once accepted, mode 0777 and all)."""
    need_root()
    d = Path(f"/tmp/llraid-{NOBODY}")
    if d.exists() or d.is_symlink():
        pytest.skip(f"{d} exists on this machine")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        d.mkdir()
        d.chmod(0o777)  # made by root, open to all: what an attacker would leave there
        out = run_as(NOBODY, lambda: str(prepare_runtime_dir()), env)
        assert out.startswith("LlraidError: runtime directory /tmp/llraid-65534 belongs to uid 0"), out
        out = run_as(NOBODY, lambda: str(service_mod.running_arrays()), env)
        assert "belongs to uid 0" in out, out
        d.rmdir()
        # absent: it is made private, and then accepted
        assert run_as(NOBODY, lambda: str(prepare_runtime_dir()), env) == str(d)
        st = os.lstat(d)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
        assert run_as(NOBODY, lambda: str(runtime_dir()), env) == str(d)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)


def test_server_refuses_control_from_another_user(serve: ServeFactory, members: list[str]) -> None:
    """The control socket is 0600 in a 0700 directory; should it be opened up anyway, the server
    still answers only its own user and root (SO_PEERCRED)."""
    need_root()
    s = serve(members)
    os.chmod(s.rundir, 0o711)
    os.chmod(s.control, 0o666)
    try:

        def attempt() -> str:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(s.control)
            with contextlib.suppress(BrokenPipeError):  # it may answer and close before we ask
                sock.sendall(b'{"cmd": "stop", "args": []}\n')
            return sock.makefile("rb").readline().decode()

        reply = json.loads(run_as(NOBODY, attempt))
        assert reply == {"ok": False, "error": f"permission denied for uid {NOBODY}"}
    finally:
        os.chmod(s.rundir, 0o700)
    time.sleep(0.3)
    assert s.alive() and s.detail()["slots"] == "UUUU"
    assert f"control connection from uid {NOBODY}" in s.log() and "Traceback" not in s.log()


def test_client_talks_only_to_its_own_user_or_root(tmp_path: Path) -> None:
    """A control socket of another user (a forged registry entry would point at one) gets no
    request: neither when the socket file is theirs, nor when it is root's but they serve it."""
    need_root()
    shared = Path(tempfile.mkdtemp(prefix="llx", dir="/tmp"))
    shared.chmod(0o777)
    path = str(shared / "fake.ctl")
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fake server run by NOBODY: records what it is sent
        try:
            os.close(ready_r)
            os.close(got_r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen()
            srv.settimeout(20)
            os.write(ready_w, b"1")
            conn, _ = srv.accept()
            conn.settimeout(5)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(4096):
                    received += chunk
            os.write(got_w, str(len(received)).encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(LlraidError, match=f"belongs to uid {NOBODY}, not to you or root"):
            control_request(path, "stop", timeout=5)
        os.chown(path, 0, 0)  # the file looks right now; the process behind it does not
        with pytest.raises(
            LlraidError, match=f"is served by uid {NOBODY} \\(pid \\d+\\), not by you or root"
        ):
            control_request(path, "stop", timeout=5)
        with os.fdopen(got_r, "rb") as f:
            assert f.read() == b"0"  # it never saw a byte of the request
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
        shutil.rmtree(shared, ignore_errors=True)


def test_registry_entries_of_others_are_ignored(rundir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries that are not ours, not files, or not well-formed are skipped (a pid of 0 once made
    ``kill(0, 0)`` report a live server)."""
    monkeypatch.setenv("LLRAID_RUNTIME_DIR", str(rundir))
    good = {"uuid": "u", "name": "n", "control": str(rundir / "x.ctl"), "pid": os.getpid()}
    (rundir / "a.json").write_text(json.dumps(good))
    (rundir / "b.json").write_text(json.dumps(good | {"pid": 0}))
    (rundir / "c.json").write_text(json.dumps(good | {"pid": -1}))
    (rundir / "d.json").write_text("[" * 100000)
    (rundir / "e.json").write_bytes(b"\xff\xfe")
    (rundir / "f.json").write_text(json.dumps([1, 2]))
    (rundir / "g.json").mkdir()
    (rundir / "h.json").symlink_to(rundir / "a.json")
    assert service_mod.running_arrays() == [good]
    if os.geteuid() == 0:
        os.chown(rundir / "a.json", NOBODY, NOBODY)
        assert service_mod.running_arrays() == []


# ---- 6. naming members ----


def test_members_by_the_names_status_and_detail_print(
    serve: ServeFactory, members: list[str], tmp_path: Path
) -> None:
    """fail, remove, re-add accept what status/detail print: basename, role, ``name[role](F)``,
    the full path, and a path relative to the caller (``fail m1.img`` from another directory once
    looked for m1.img in the server's directory)."""
    s = serve(members)
    rd = s.rundir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def ok(*args: str) -> str:
        out = llraid(rd, *args, cwd=elsewhere, check=False)
        assert out.returncode == 0, (args, out.stderr)
        return out.stdout.strip()

    def wait_in_sync() -> None:
        deadline = time.monotonic() + 60
        while not all(m["state"] == "in_sync" for m in s.detail()["members"]):
            assert time.monotonic() < deadline, s.detail()["members"]
            time.sleep(0.05)

    m0, m1, m2, m3 = members
    assert ok("fail", "m1.img") == f"set {m1} faulty"
    assert "m1.img[1](F)" in ok("status")
    assert ok("remove", "m1.img[1](F)") == f"removed {m1}"
    assert ok("re-add", "m1.img") == f"re-added {m1} as role 1"
    wait_in_sync()
    assert ok("fail", "2") == f"set {m2} faulty"
    assert ok("remove", "2") == f"removed {m2}"  # role 2 is the failed member until it is removed
    assert ok("re-add", "2") == f"re-added {m2} as role 2"  # the member that had role 2
    wait_in_sync()
    assert ok("fail", m3) == f"set {m3} faulty"
    assert ok("remove", "m3.img[3]") == f"removed {m3}"
    assert ok("re-add", m3) == f"re-added {m3} as role 3"
    wait_in_sync()
    assert ok("fail", "../m0.img") == f"set {m0} faulty"
    assert ok("remove", "m0.img") == f"removed {m0}"
    assert ok("re-add", "m0.img[0]") == f"re-added {m0} as role 0"
    wait_in_sync()
    # a name that is no member, and a file here that is not the member of that name
    (elsewhere / "m1.img").write_bytes(bytes(4096))
    for name, msg in [
        ("zz.img", "no member 'zz.img' in this array (members: m0.img[0], m1.img[1], m2.img[2], m3.img[3])"),
        ("7", "no member '7'"),
        ("m1.img", f"no member '{elsewhere / 'm1.img'}'"),
        ("m1.img[2]", "no member 'm1.img[2]'"),
    ]:
        out = llraid(rd, "fail", name, cwd=elsewhere, check=False)
        assert out.returncode == 1 and msg in one_line(out.stderr), (name, out.stderr)
    assert s.detail()["slots"] == "UUUU"


def test_ambiguous_member_names_are_refused(serve: ServeFactory, tmp_path: Path) -> None:
    paths = make_members(tmp_path, level=1, n=2)
    (tmp_path / "sub").mkdir()
    moved = str(tmp_path / "sub" / "m0.img")
    os.rename(paths[1], moved)  # the superblock does not care where the file is
    s = serve([paths[0], moved])
    out = llraid(s.rundir, "fail", "m0.img", cwd="/", check=False)
    assert out.returncode == 1
    assert f"'m0.img' is ambiguous: it names {paths[0]} and {moved}; use the full path" in one_line(
        out.stderr
    )
    assert s.detail()["slots"] == "UU"
    assert llraid(s.rundir, "fail", "1", cwd="/").stdout == f"set {moved} faulty\n"


def test_member_names_that_look_like_status_names() -> None:
    """A file really named ``disk[1]`` is found by its name, and by ``disk[1][0]`` as status shows
    it; while another member is ``disk`` in role 1, ``disk[1]`` is ambiguous."""
    from types import SimpleNamespace
    from typing import cast

    from llraid.array import Rdev, RdevState
    from llraid.export.service import find_member

    dev = SimpleNamespace(fd=-1)
    a = SimpleNamespace(path="/d/disk[1]", role=0, state=RdevState.IN_SYNC, device=dev)
    b = SimpleNamespace(path="/d/disk", role=1, state=RdevState.IN_SYNC, device=dev)
    rdevs = cast(list[Rdev], [a, b])
    serving = {0: a, 1: b}.get

    def find(name: str) -> object:
        return find_member(rdevs, name, serving)  # type: ignore[arg-type]

    with pytest.raises(LlraidError, match=r"'disk\[1\]' is ambiguous: it names /d/disk and /d/disk\[1\]"):
        find("disk[1]")
    assert find("disk[1][0]") is a
    assert find("disk") is b and find("0") is a and find("/d/disk[1]") is a
    b.role = 2
    serving = {0: a, 2: b}.get
    assert find("disk[1]") is a  # no disk in role 1: the file of that name


# ---- 8. --json everywhere, --version ----


def json_commands() -> set[str]:
    """Every subcommand that has a --json option."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, Any] = sub.choices  # type: ignore[assignment]
    return {
        name
        for name, p in choices.items()
        if any("--json" in a.option_strings for a in p._actions) and len(name) > 1  # not the aliases
    }


def test_every_json_option_is_honoured(serve: ServeFactory, members: list[str]) -> None:
    """bits, metadata, get, set, fail, ... and ``sync check`` once printed text with --json."""
    s = serve(members)
    rd = s.rundir

    def js(*args: str) -> Any:
        out = llraid(rd, *args, "--json")
        return json.loads(out.stdout)

    assert js("detail")["uuid"] == s.detail()["uuid"]
    assert js("status")[0]["slots"] == "UUUU"
    bits = js("bits")
    assert bits["unwritten"] == 1984 and bits["dirty"] == 0 and len(bits) == 8
    assert js("metadata")["chunksize"] == 128
    assert js("get", "daemon_sleep") == {"name": "daemon_sleep", "value": 30}  # llbitmap's default
    assert js("set", "safe_mode_delay", "0.5") == {"name": "safe_mode_delay", "value": 0.5}
    assert js("sync", "check") == {"command": "sync", "result": "check started"}
    s.wait_sync(lambda st: st["last"] is not None)
    assert js("sync", "idle") == {"command": "sync", "result": "idle"}
    assert js("fail", "m1.img") == {"command": "fail", "result": f"set {members[1]} faulty"}
    assert js("remove", members[1]) == {"command": "remove", "result": f"removed {members[1]}"}
    assert js("re-add", members[1]) == {"command": "re-add", "result": f"re-added {members[1]} as role 1"}
    s.wait_sync(lambda st: all(m["state"] == "in_sync" for m in s.detail()["members"]))
    new = [str(Path(members[0]).with_name(f"new{i}.img")) for i in range(2)]
    for p in new:
        os.truncate(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600), 64 * MiB)
    assert js("add", new[0]) == {"command": "add", "result": f"added {new[0]} as a spare"}
    assert js("replace", "m3.img", "--with", new[1]) == {
        "command": "replace",
        "result": f"replacing role 3 with {new[1]}",
    }
    assert js("stop") == {"command": "stop", "result": "stopping"}
    assert s.wait_exit() == 0
    # every command with --json: those above, and the offline ones that have their own tests
    # (examine, examine-bitmap, sync DEV..., bench, torture). A new one must be added here.
    covered = {"detail", "status", "bits", "metadata", "get", "set", "sync", "fail", "remove", "re-add"}
    covered |= {"add", "replace", "stop"}
    assert json_commands() == covered | {"examine", "examine-bitmap", "bench", "torture"}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"llraid {version('llraid')}\n"


# ---- 15. bad control requests, Ctrl-C at startup, read-only raid5 ----


def raw_request(path: str, payload: bytes) -> dict[str, Any]:
    """Send ``payload`` (in a thread: the server may stop reading) and read the one-line reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(payload)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    reply = sock.makefile("rb").readline()
    t.join(30)
    sock.close()
    result: dict[str, Any] = json.loads(reply)
    return result


def test_bad_control_requests_get_a_clean_reply(serve: ServeFactory, members: list[str]) -> None:
    """A 200 MB line once logged a LimitOverrunError traceback; absurdly nested JSON a
    RecursionError one; a lone surrogate in a name a UnicodeEncodeError one."""
    s = serve(members)
    reply = raw_request(s.control, b"x" * (200 * MiB) + b"\n")
    assert reply == {"ok": False, "error": "bad request: longer than 65536 bytes"}
    for payload in (b"[" * 60000 + b"\n", b'{"cmd": "fail", "args": [7]}\n', b'{"cmd": ["stop"]}\n'):
        assert raw_request(s.control, payload)["error"].startswith("bad request: want"), payload
    for cmd in ("fail", "re-add", "add"):
        for name in ("\\ud800", "\\udcff", "/x/\\ud800"):
            payload = f'{{"cmd": "{cmd}", "args": ["{name}"]}}\n'.encode()
            reply = raw_request(s.control, payload)
            assert reply["ok"] is False and "Error:" not in reply["error"], (payload, reply)
    assert s.alive() and s.detail()["slots"] == "UUUU"
    log = s.stderr_path.read_text()
    assert "Traceback" not in log and log.count("control request longer than 65536 bytes refused") == 1


def test_interrupt_before_the_parser_is_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C while the command line is being built (or a module imported) once escaped main()."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["status"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("where", ["nbd-listen", "registry"])
def test_interrupt_during_startup_leaves_no_files(
    where: str,
    members: list[str],
    rundir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while the service starts: exit 130, nothing printed as served, no runtime files, the
    array stopped clean. (A KeyboardInterrupt between creating the sockets and the try/finally
    once left them behind, with a traceback.)"""
    monkeypatch.setenv("LLRAID_RUNTIME_DIR", str(rundir))
    states = [examine_state(m)["State"] for m in members]
    if where == "nbd-listen":
        real_listen = nbd.NbdServer.listen_unix

        async def listen(self: nbd.NbdServer, path: str) -> None:
            await real_listen(self, path)
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler turns it into a stop request
            await asyncio.sleep(0.1)

        monkeypatch.setattr(nbd.NbdServer, "listen_unix", listen)
    else:

        def write_info(self: Service) -> None:
            raise KeyboardInterrupt  # as if it arrived right there, in any form

        monkeypatch.setattr(Service, "_write_info", write_info)
    assert main(["serve", *members]) == 130
    out = capsys.readouterr()
    assert "serving" not in out.out and "Traceback" not in out.err
    assert list(rundir.iterdir()) == []
    assert [examine_state(m)["State"] for m in members] == states  # stopped as it was (not crashed)


def test_sigint_at_any_moment_of_startup(members: list[str], rundir: Path) -> None:
    """A real ``llraid serve`` interrupted at several moments of its startup: never a traceback,
    never a file left behind, exit 130 (or killed by SIGINT before Python handles it, or 0 when
    it was already serving and stopped cleanly). Python's own startup (the site module) is not
    ours to make quiet: the delays start after the time ``llraid --version`` takes to get there."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "llraid.cli", "--version"], check=True, capture_output=True)
    python = 1.5 * (time.monotonic() - t0)
    for delay in (0.0, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2):
        delay += python
        proc = subprocess.Popen(
            [sys.executable, "-m", "llraid.cli", "serve", *members],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=llraid_env(rundir),
            start_new_session=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (130, -signal.SIGINT) or (
            proc.returncode == 0 and "stopped cleanly" in out
        ), (delay, proc.returncode, out, err)
        assert list(rundir.iterdir()) == [], delay
        assert all(examine_state(m)["State"] in ("clean", "active") for m in members)


@pytest.fixture
def raid5(unpacked: Callable[[str], list[Path]], tmp_path: Path) -> list[str]:
    return [str(copy_sparse(p, tmp_path / p.name)) for p in unpacked("h-raid5-llbitmap")]


def read_all(socket_path: str, size: int) -> bytes:
    with NbdClient(socket_path) as c:
        info = c.connect()
        assert info.size == size and info.flags & nbd.TF_READ_ONLY
        data = b"".join(c.read(off, min(4 * MiB, size - off)) for off in range(0, size, 4 * MiB))
        assert c.request(nbd.CMD_WRITE, 0, 512, 0, bytes(512)) == (nbd.EPERM, b"")
    return data


def test_readonly_serve_of_raid5(serve: ServeFactory, raid5: list[str]) -> None:
    """``serve --readonly`` serves raid5 as ``cat`` reads it, whole and degraded (it once refused
    raid5: 'read-write assembly supports raid1 and raid10')."""
    fx = BY_NAME["h-raid5-llbitmap"]
    size = fx.array_sectors * 512
    before = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in raid5]
    s = serve(raid5, "--readonly")
    assert hashlib.sha256(read_all(s.socket_path, size)).hexdigest() == fx.entry["md_sha256"]
    d = s.detail()
    assert d["level"] == "raid5" and d["slots"] == "UUU" and d["array_bytes"] == size
    for cmd in (["fail", "1"], ["sync", "check"], ["set", "daemon_sleep", "3"]):
        out = llraid(s.rundir, *cmd, check=False)
        assert out.returncode == 1 and "served read-only" in one_line(out.stderr), cmd
    assert llraid(s.rundir, "stop").stdout == "stopping\n" and s.wait_exit() == 0
    out = llraid(s.rundir, "serve", *raid5[1:], "--readonly", check=False)
    assert out.returncode == 1 and "use --run" in one_line(out.stderr)
    s = serve(raid5[1:], "--readonly", "--run")  # role 0 missing: its data rebuilt from parity
    assert s.detail()["slots"] == "_UU"
    assert hashlib.sha256(read_all(s.socket_path, size)).hexdigest() == fx.entry["md_sha256"]
    assert s.signal(signal.SIGTERM) == 0
    assert [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in raid5] == before
