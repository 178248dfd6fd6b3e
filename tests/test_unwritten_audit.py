"""The Unwritten audit: chunks marked Unwritten whose copies hold data (the kernel's discard bug).

A kernel-made array can have live data in chunks its bitmap marks Unwritten (a discard ending
inside a chunk marked the whole chunk). Every sync skips Unwritten chunks, so ``check`` reports
0 and a new member is recovered without that data. The audit reads exactly those chunks;
repair marks the ones holding data NeedSync and the resync makes their copies agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.cli import main
from llraid.errors import LlraidError
from llraid.export.service import Service
from llraid.format.bitmap import BitmapKind
from llraid.format.llbitmap import DATA_OFFSET, LLState
from llraid.sync import needed_sync, run_sync, sync_until_idle
from tests.test_array import (
    LOCKLESS,
    NONE,
    R10_N2,
    RAID1_2,
    SECTOR,
    Geo,
    assemble,
    blob,
    chunks_in,
    clean_bitmap,
    damage,
    differing,
    member_dir,
    new_array,
    read_sb,
    spare_file,
)

CS = 128  # llbitmap chunk of these 64 MiB members (sectors)


@pytest.fixture
def mdir(tmp_path: Path) -> Iterator[Path]:
    yield from member_dir(tmp_path)


def hide(paths: list[str], chunks: list[int]) -> None:
    """The kernel's discard bug, by hand: mark written chunks Unwritten on every member."""
    for p in paths:
        sb = read_sb(p)
        at = (sb.super_offset + sb.bitmap_offset) * SECTOR + DATA_OFFSET
        with open(p, "r+b") as f:
            for c in chunks:
                os.pwrite(f.fileno(), bytes([LLState.UNWRITTEN]), at + c)


def array_with_hidden_data(mdir: Path, geo: Geo) -> tuple[list[str], bytes]:
    """Chunks 0..3 written; 1 and 2 then marked Unwritten behind llraid's back."""
    paths = new_array(mdir, geo, LOCKLESS)
    data = blob("live", 4 * CS * SECTOR)
    with assemble(paths) as array:
        array.write(0, data)
        clean_bitmap(array)
    hide(paths, [1, 2])
    return paths, data


@pytest.mark.parametrize("geo", [RAID1_2, R10_N2], ids=str)
def test_audit_finds_what_check_skips_and_repair_fixes_it(mdir: Path, geo: Geo) -> None:
    paths, data = array_with_hidden_data(mdir, geo)
    array = assemble(paths)
    assert {1, 2} <= chunks_in(array, LLState.UNWRITTEN)
    damage(array, 2 * CS + 8, b"\xcc" * SECTOR)  # chunk 2's copies differ too
    unwritten = chunks_in(array, LLState.UNWRITTEN)

    check = run_sync(array, SyncKind.CHECK)
    assert check.completed and check.mismatches == 0  # the hidden chunks are skipped

    audit = run_sync(array, SyncKind.CHECK, unwritten=True)
    assert audit.completed and audit.unwritten_audited == len(unwritten)
    assert [(u.chunk, u.sector, u.nonzero, u.differ) for u in audit.unwritten] == [
        (1, CS, True, False),
        (2, 2 * CS, True, True),
    ]
    assert audit.mismatches == CS and audit.bytes_written == {} and audit.marked_need_sync == 0
    assert chunks_in(array, LLState.UNWRITTEN) == unwritten  # a check changes no state
    d = audit.as_dict()["unwritten_audit"]
    assert d["chunks_with_data"] == 2 and d["chunks"][0]["offset"] == CS * SECTOR

    repair = run_sync(array, SyncKind.REPAIR, unwritten=True)
    assert repair.marked_need_sync == 2
    assert chunks_in(array, LLState.NEED_SYNC) == {1, 2}
    assert needed_sync(array) is SyncKind.RESYNC
    (resync,) = sync_until_idle(array)
    assert resync.completed and resync.sectors_synced == 2 * CS
    assert not differing(array, 0, 4 * CS)
    assert chunks_in(array, LLState.UNWRITTEN) == unwritten - {1, 2}
    assert run_sync(array, SyncKind.CHECK, unwritten=True).unwritten == []
    assert run_sync(array, SyncKind.CHECK).mismatches == 0
    array.stop()

    # a new member now gets the data: replace the second copy, then lose the first one
    with assemble(paths) as array:
        assert {1, 2}.isdisjoint(chunks_in(array, LLState.UNWRITTEN, LLState.NEED_SYNC))  # durable
        old = array.by_role(1)
        assert old is not None
        array.fail(old)
        array.remove(old)
        array.add_spare(spare_file(mdir))
        (recovery,) = sync_until_idle(array)
        assert recovery.kind == "recovery" and recovery.completed
        first = array.by_role(0)
        assert first is not None
        array.fail(first)
        assert array.read(0, 4 * CS) == data


def test_repair_marks_need_sync_durably(mdir: Path) -> None:
    """A crash between the repair's marking and its resync: the next assembly resyncs them."""
    paths, _ = array_with_hidden_data(mdir, RAID1_2)
    array = assemble(paths)
    damage(array, CS + 8, b"\xcc" * SECTOR)
    assert run_sync(array, SyncKind.REPAIR, unwritten=True).marked_need_sync == 2
    array.crash()
    with assemble(paths) as array:
        assert chunks_in(array, LLState.NEED_SYNC) == {1, 2}
        (resync,) = sync_until_idle(array)
        assert resync.sectors_synced == 2 * CS and not differing(array, 0, 4 * CS)


@pytest.mark.parametrize(("bitmap", "kind"), [(NONE, SyncKind.CHECK), (LOCKLESS, SyncKind.RESYNC)])
def test_audit_needs_check_or_repair_and_llbitmap(mdir: Path, bitmap: BitmapKind, kind: SyncKind) -> None:
    paths = new_array(mdir, RAID1_2, bitmap)
    with (
        assemble(paths) as array,
        pytest.raises(LlraidError, match="check or repair of an array with the lockless"),
    ):
        run_sync(array, kind, unwritten=True)


def test_cli_audit(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths, _ = array_with_hidden_data(mdir, RAID1_2)
    assert main(["sync", "--mode", "check", *paths]) == 0
    assert "mismatch_cnt 0" in capsys.readouterr().out
    assert main(["sync", "--mode", "check", "--unwritten", "--json", *paths]) == 0
    (audit,) = json.loads(capsys.readouterr().out)
    assert audit["kind"] == "check" and audit["completed"]
    assert [c["chunk"] for c in audit["unwritten_audit"]["chunks"]] == [1, 2]
    assert main(["sync", "--mode", "check", "--unwritten", *paths]) == 0
    cap = capsys.readouterr()
    assert (
        "2 hold data" in cap.out and f"chunk 1: array bytes {CS * SECTOR}+{CS * SECTOR} hold data" in cap.out
    )
    assert "chunk 1 (array bytes" in cap.err  # and the log says so
    assert main(["sync", "--mode", "repair", "--unwritten", "--json", *paths]) == 0
    audit, resync = json.loads(capsys.readouterr().out)
    assert audit["unwritten_audit"]["marked_need_sync"] == 2
    assert resync["kind"] == "resync" and resync["sectors_synced"] == 2 * CS
    assert main(["sync", "--mode", "check", "--unwritten", "--json", *paths]) == 0
    (audit,) = json.loads(capsys.readouterr().out)
    assert audit["unwritten_audit"]["chunks"] == []
    assert main(["sync", "--mode", "resync", "--unwritten", *paths]) == 1
    assert "--mode check or --mode repair" in capsys.readouterr().err


def test_control_command_audit(mdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``llraid sync check --unwritten`` on a running array: the result lands in ``detail``."""
    monkeypatch.setenv("LLRAID_RUNTIME_DIR", str(tmp_path / "run"))
    paths, _ = array_with_hidden_data(mdir, RAID1_2)
    array = Array.assemble(paths, bitmap_threads=False)
    try:
        svc = Service(array)
        assert svc._dispatch("sync", ["check", "--unwritten"]) == "check of Unwritten chunks started"
        assert svc.syncer.thread is not None
        svc.syncer.thread.join(30)
        d = svc.detail()
        assert d["sync"]["action"] == "idle" and d["sync"]["done"] == 0 and d["sync"]["percent"] is None
        last = d["sync"]["last"]
        assert [c["chunk"] for c in last["unwritten_audit"]["chunks"]] == [1, 2]
        with pytest.raises(LlraidError, match="check, repair, idle or proactive"):
            svc._dispatch("sync", ["idle", "--unwritten"])
    finally:
        array.stop()
