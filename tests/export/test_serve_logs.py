"""``llraid serve`` says what md would say: every state change once, on stderr.

Before, a restart after kill -9 said nothing of the unclean shutdown or its resync, ``serve
--run`` dropped a stale member silently, a ``sync check`` never reported its result, and
``detail`` kept showing the finished action's progress without a ``mismatch_cnt``.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.cli import _detail_text
from tests.export.conftest import NbdClient, Served, ServeFactory, llraid, llraid_env, make_members

MiB = 1 << 20


@pytest.fixture
def members(tmp_path: Path) -> list[str]:
    return make_members(tmp_path)


def stderr(s: Served) -> str:
    return s.stderr_path.read_text()


def wait_log(s: Served, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (err := stderr(s)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log:\n{s.log()}")
        time.sleep(0.05)
    return err


def once(err: str, *texts: str) -> None:
    for t in texts:
        assert err.count(t) == 1, f"{t!r} {err.count(t)} times:\n{err}"


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_restart_after_kill9_says_unclean_and_resync(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    llraid(s.rundir, "set", "safe_mode_delay", "60")  # stay active: the kill leaves it unclean
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, random.Random(3).randbytes(MiB))
        c.flush()
    s.kill9()
    s2 = serve(members)
    err = wait_log(s2, "resync done")
    tag = "raid10 exporttest:exp"
    once(
        err,
        f"llraid: {tag}: assembled from 4 of 4 members",
        f"llraid: {tag}: not clean (superblocks say active: unclean shutdown, or never synced; "
        "512 chunks dirty in the bitmap: unclean shutdown) -- resync needed",
        f"llraid: {tag}: llbitmap: 512 chunks need sync",
        f"llraid: {tag}: resync started (bitmap-driven: only the chunks the bitmap marks)",
        f"llraid: {tag}: resync done: {512 * 128} sectors",
    )
    assert err.index("assembled") < err.index("resync started") < err.index("resync done")
    assert "Traceback" not in err


def test_sync_check_result_in_log_and_detail(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    wait_log(s, "resync done")  # the initial (empty) resync of the new array
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, random.Random(4).randbytes(MiB))
    d = s.detail()
    assert d["mismatch_cnt"] == 0  # always there
    assert s.ctl("sync", "check") == "check started"
    err = wait_log(s, "data-check done")
    once(err, "data-check started", "data-check done")
    assert "mismatch_cnt 0" in err.split("data-check done", 1)[1].splitlines()[0]
    wait_until(lambda: s.detail()["sync"]["last"]["kind"] == "check", "the check's result")
    d = s.detail()
    sync = d["sync"]
    # finished: progress back to idle, the result in ``last``
    assert (sync["action"], sync["done"], sync["total"], sync["percent"]) == ("idle", 0, 0, None)
    assert sync["last"]["completed"] and sync["last"]["mismatch_cnt"] == 0 and d["mismatch_cnt"] == 0
    text = _detail_text(d)
    assert "    Mismatch Cnt : 0" in text
    assert "       Last Sync : check done, " in text and "mismatch_cnt 0" in text
    out = llraid(s.rundir, "detail").stdout
    assert "Mismatch Cnt : 0" in out and "Last Sync : check done" in out


def test_member_changes_are_logged(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    wait_log(s, "resync done")
    m1 = members[1]
    llraid(s.rundir, "fail", m1)
    err = wait_log(s, "disk failure on")
    once(err, f"disk failure on {m1} (failed by request), disabling device; operation continuing on 3 of 4")
    llraid(s.rundir, "remove", m1)
    wait_log(s, f"removed {m1}")
    llraid(s.rundir, "re-add", m1)
    err = wait_log(s, f"recovery of {m1} done")
    once(
        err,
        f"re-added {m1} as role 1",
        f"bitmap-based recovery of {m1} (role 1) from sector 0",
        f"recovery of {m1} done",
    )
    assert s.signal(15) == 0
    err = stderr(s)
    once(err, "raid10 exporttest:exp: stopped (clean)")


def test_serve_run_kicks_a_stale_member_aloud(serve: ServeFactory, members: list[str]) -> None:
    s = serve(members)
    wait_log(s, "resync done")
    llraid(s.rundir, "fail", members[3])
    llraid(s.rundir, "remove", members[3])
    with NbdClient(s.socket_path) as c:
        c.connect()
        c.write(0, b"\x11" * MiB)  # events move on without members[3]
    assert s.signal(15) == 0
    s2 = serve(members, "--run")
    err = wait_log(s2, "assembled")
    once(err, f"kicking non-fresh {members[3]} from the array (events ")
    once(err, "started degraded: no member for role 3")


def test_quickstart_says_created_then_assembled(tmp_path: Path, rundir: Path) -> None:
    """The first run creates the array, later runs assemble it: and say so."""
    data = tmp_path / "data"

    def run_once(until: str) -> str:
        err_path = tmp_path / f"qs-{time.monotonic_ns()}.err"
        argv = ["quickstart", "--data", str(data), "--member-size", "64M"]
        with open(err_path, "w") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", "llraid.cli", *argv],
                stdout=subprocess.DEVNULL, stderr=err, text=True, env=llraid_env(rundir),
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while until not in err_path.read_text():
                assert p.poll() is None and time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=30) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        return err_path.read_text()

    first = run_once("resync done")
    once(first, "assembled from 4 of 4 members", "resync started", "resync done")
    assert first.rstrip().endswith("stopped (clean)")
    second = run_once("assembled")
    once(second, "llraid: raid10 exporttest:quickstart: assembled from 4 of 4 members (events ")
    assert "not clean" not in second and "resync" not in second
