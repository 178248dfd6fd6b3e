"""The service's threads, in-process: a stop or ``sync idle`` must never be lost.

A race window is widened on purpose by wrapping ``needed_sync`` (as the service module sees it)
with a gate, so the interleaving that is rare in production happens every time here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llraid.export.service as service_mod
from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.export.service import Service
from llraid.sync import needed_sync
from tests.export.conftest import make_members

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def crashed(tmp_path: Path, rundir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Array]:
    """An array assembled after a crash: 512 NeedSync chunks, a resync to do."""
    monkeypatch.setenv("LLRAID_RUNTIME_DIR", str(rundir))
    members = make_members(tmp_path)
    a = Array.assemble(members, bitmap_threads=False)
    a.write(0, b"\xaa" * 4 * MiB)
    a.crash()
    array = Array.assemble(members, bitmap_threads=False)
    assert needed_sync(array) is SyncKind.RESYNC
    try:
        yield array
    finally:
        if not array._closed:
            array.stop()


def test_sync_idle_stops_a_slow_user_check(crashed: Array) -> None:
    """The ordinary case: ``sync idle`` ends a running check promptly."""
    svc = Service(crashed)
    svc.syncer.speed_limit = 256 * KiB  # the check would take minutes
    assert svc._dispatch("sync", ["check"]) == "check started"
    deadline = time.monotonic() + 10
    while svc.syncer.done == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert svc._dispatch("sync", ["idle"]) == "idle"
    assert time.monotonic() - t0 < 5
    assert svc.syncer.last is not None and svc.syncer.last.completed is False


def test_shutdown_while_the_md_thread_starts_a_resync(
    crashed: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = Service(crashed)
    svc.syncer.speed_limit = 64 * KiB  # the resync would take many minutes
    reached, go = threading.Event(), threading.Event()
    real = needed_sync

    def gated(array: Array) -> SyncKind | None:
        kind = real(array)
        if kind is not None and threading.current_thread().name == "llraid-md" and not reached.is_set():
            reached.set()  # the md thread decided to start a sync ...
            go.wait(10)  # ... and a stop arrives right now
        return kind

    monkeypatch.setattr(service_mod, "needed_sync", gated)
    svc._md_thread = threading.Thread(target=svc._md_loop, name="llraid-md", daemon=True)
    svc._md_thread.start()
    assert reached.wait(10)
    stopper = threading.Thread(target=svc._shutdown, name="stopper", daemon=True)
    stopper.start()
    deadline = time.monotonic() + 10
    while not svc.syncer.stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.001)
    go.set()
    stopper.join(3)  # a working stop takes well under a second
    hung = stopper.is_alive()
    if hung:  # release it so the test does not leave a thread syncing for minutes
        while stopper.is_alive():
            svc.syncer.stop.set()
            stopper.join(0.1)
    assert not hung, "the stop waited for the whole resync"
