"""The offline ``llraid sync``: Ctrl-C stops it cleanly with a checkpoint the next run resumes
from, a live progress bar on a terminal, and md-style log lines on stderr."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.create import create
from llraid.format.superblock import MAX_SECTOR
from tests.test_array import (
    LOCKLESS,
    NONE,
    RAID1_2,
    SECTOR,
    MiB,
    make_spec,
    member_dir,
    member_files,
    read_sb,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mdir(tmp_path: Path) -> Iterator[Path]:
    yield from member_dir(tmp_path)


def llraid_proc(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "llraid.cli", *args], cwd=ROOT, text=True, **kw
    )


def interrupted_sync(paths: list[str], after: float) -> tuple[int, str, str]:
    """``llraid sync`` at 16 MiB/s, SIGINT ``after`` seconds into the resync."""
    p = llraid_proc("sync", "--speed-limit", "16M", *paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = ""
    while "resync started" not in err:  # (the log line comes before the first window)
        line = p.stderr.readline()
        assert line, f"no resync started: {err}"
        err += line
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=60)
    return p.returncode, out, err + rest


def written(doc: dict[str, object]) -> int:
    counts = doc["bytes_written"]
    assert isinstance(counts, dict)
    return sum(counts.values())


def test_ctrl_c_records_the_checkpoint_and_the_next_run_resumes(mdir: Path) -> None:
    """No bitmap: a full resync of 62 MiB at 16 MiB/s (8 s); Ctrl-C after ~1 s."""
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE))
    rc, out, err = interrupted_sync(paths, 1.0)
    assert rc == 130, err
    m = re.search(r"resync interrupted at sector (\d+) of (\d+); checkpoint recorded", err)
    assert m, err
    stopped, total = int(m.group(1)), int(m.group(2))
    assert 0 < stopped < total
    assert f"interrupted at sector {stopped} of {total}" in out
    assert "Traceback" not in err
    assert {read_sb(m).resync_offset for m in paths} == {stopped}  # the stop recorded the checkpoint
    p = llraid_proc("sync", "--json", *paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    (resync,) = json.loads(out)
    assert resync["completed"] and resync["start_sector"] == stopped
    assert resync["bytes_written"] == {paths[1]: (total - stopped) * SECTOR}  # only the remainder
    assert f"resync started at sector {stopped} of {total} (resuming)" in err
    assert all(read_sb(m).resync_offset == MAX_SECTOR for m in paths)


def test_ctrl_c_during_a_bitmap_resync_keeps_what_was_synced(mdir: Path) -> None:
    """llbitmap after a crash: 32 MiB of NeedSync chunks. The chunks synced before Ctrl-C end
    their sync (Endsync, then Clean at the stop); the next run syncs only the others."""
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, LOCKLESS))
    with Array.assemble(paths, bitmap_threads=False) as a:
        assert a.resync_cp == 0
    a = Array.assemble(paths, bitmap_threads=False)
    a.write(0, os.urandom(32 * MiB))
    a.crash()
    rc, out, err = interrupted_sync(paths, 1.0)
    assert rc == 130, err
    first = int(re.findall(r"/m1\.img: read 0 bytes, written (\d+)", out)[0])
    assert 0 < first < 32 * MiB
    p = llraid_proc("sync", "--json", *paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    (resync,) = json.loads(out)
    assert resync["completed"] and written(resync) == 32 * MiB - first  # nothing synced twice


def test_progress_bar_on_a_terminal_only(mdir: Path) -> None:
    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE, size=8 * 2048))  # 8 MiB: a resync of well under a second
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    p = llraid_proc("sync", "--speed-limit", "32M", *paths, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    tty = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        assert ready, tty
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    assert p.stdout is not None
    out = p.stdout.read()
    assert p.wait(timeout=30) == 0
    text = tty.decode(errors="replace")
    assert "resync" in text and "100%" in text and "16384/16384 sectors" in text, text
    assert "resync: done" in out
    # not a terminal, or --json: log lines only, no bar
    p = llraid_proc("sync", "--mode", "check", *paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "%" not in err and "\x1b[" not in err
    assert "data-check started" in err and "data-check done" in err


def test_every_message_once(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI gives the ``llraid`` logger one stderr handler, however often it runs."""
    from llraid.cli import main

    paths = member_files(mdir, 2)
    create(paths, make_spec(RAID1_2, NONE, size=2048))
    for _ in range(2):
        assert main(["sync", "--mode", "check", *paths]) == 0
        err = capsys.readouterr().err
        assert err.count("data-check done") == 1 and err.count("assembled from 2 of 2 members") == 1, err
