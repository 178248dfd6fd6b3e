"""The offline command-line tools end to end: create, write, cat, sync (resync, check, repair), bench."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.cli import main
from llraid.device import SECTOR
from llraid.member import open_member


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def members(tmp: Path, n: int, size: int = 32 << 20) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp / f"m{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize(
    ("level", "layout", "bitmap", "n"),
    [
        ("1", None, "lockless", 2),
        ("10", "f2", "internal", 4),
        ("raid10", "o2", "none", 4),
        ("10", "n3", "lockless", 3),
        ("5", None, "lockless", 3),
        ("raid5", "right-symmetric", "internal", 4),
        ("4", None, "none", 3),
        ("6", None, "lockless", 4),
    ],
)
def test_create_write_cat_sync(
    level: str, layout: str | None, bitmap: str, n: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = members(tmp_path, n)
    args = ["create", "--level", level, "--bitmap", bitmap, "--name", "cli", "--homehost", "h", *paths]
    if layout:
        args += ["--layout", layout]
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and "created raid" in out
    # the initial sync: nothing to copy with llbitmap, everything without a bitmap
    rc, out, _ = run(capsys, "sync", "--json", *paths)
    assert rc == 0
    (initial,) = json.loads(out)
    # raid4/5: mdadm's create leaves the last member a spare that recovery builds
    assert initial["kind"] == ("recovery" if level[-1] in "45" else "resync") and initial["completed"]
    if bitmap == "lockless":
        assert initial["windows_synced"] == 0 and not any(initial["bytes_written"].values())
    data = random.Random(level + bitmap).randbytes(3 << 20)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    rc, _, err = run(capsys, "write", *paths, "--offset", "1M", "-i", str(src))
    assert rc == 0 and "wrote" in err
    out_file = tmp_path / "back.bin"
    assert (
        run(capsys, "cat", *paths, "--offset", "1M", "--length", str(len(data)), "-o", str(out_file))[0] == 0
    )
    assert out_file.read_bytes() == data
    sb = open_member(paths[0])
    sb.device.close()
    assert sb.sb.is_clean  # write stops cleanly
    rc, out, _ = run(capsys, "sync", "--mode", "check", *paths)
    assert rc == 0 and "mismatch_cnt 0" in out


def test_sync_repair_finds_and_fixes_a_damaged_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = members(tmp_path, 2)
    assert run(capsys, "create", "--level", "1", "--assume-clean", "--bitmap", "none", *paths)[0] == 0
    src = tmp_path / "d.bin"
    src.write_bytes(os.urandom(1 << 20))
    assert run(capsys, "write", *paths, "-i", str(src))[0] == 0
    m = open_member(paths[1])
    offset = m.sb.data_offset * SECTOR + 4096
    m.device.close()
    with open(paths[1], "r+b") as f:
        f.seek(offset)
        f.write(b"\xee" * 512)
    rc, out, _ = run(capsys, "sync", "--mode", "check", "--json", *paths)
    assert rc == 0
    assert [p["mismatch_cnt"] for p in json.loads(out) if p["kind"] == "check"] == [128]  # one 64 KiB window
    rc, out, _ = run(capsys, "sync", "--mode", "repair", "--json", *paths)
    (repair,) = [p for p in json.loads(out) if p["kind"] == "repair"]
    assert repair["mismatch_cnt"] == 128 and repair["repaired_sectors"] == 128
    assert repair["bytes_written"] == {paths[1]: 65536}
    rc, out, _ = run(capsys, "sync", "--mode", "check", "--json", *paths)
    assert [p["mismatch_cnt"] for p in json.loads(out) if p["kind"] == "check"] == [0]


def test_sync_after_crash_resyncs_only_marked_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = members(tmp_path, 2, 64 << 20)
    assert run(capsys, "create", "--level", "1", *paths)[0] == 0
    assert run(capsys, "sync", *paths)[0] == 0
    a = Array.assemble(paths, bitmap_threads=False)
    a.write(2048, os.urandom(4096))
    a.crash()
    rc, out, _ = run(capsys, "sync", "--json", *paths)
    assert rc == 0
    (resync,) = json.loads(out)
    assert resync["kind"] == "resync" and resync["windows_synced"] == 1  # one dirty 64 KiB chunk
    assert resync["bytes_written"] == {paths[1]: 65536}


def test_degraded_needs_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = members(tmp_path, 2)
    assert run(capsys, "create", "--level", "1", *paths)[0] == 0
    src = tmp_path / "d.bin"
    src.write_bytes(b"x" * 4096)
    rc, _, err = run(capsys, "write", paths[0], "-i", str(src))
    assert rc == 1 and "--run" in err and err.count("\n") == 1
    assert run(capsys, "write", paths[0], "--run", "-i", str(src))[0] == 0


def test_create_refuses_what_it_should(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = members(tmp_path, 2)
    assert run(capsys, "create", "--level", "1", *paths)[0] == 0
    rc, _, err = run(capsys, "create", "--level", "1", *paths)
    assert rc == 1 and "md superblock" in err and "--force" in err
    assert run(capsys, "create", "--level", "1", "--force", *paths)[0] == 0
    rc, _, err = run(capsys, "create", "--level", "1", "--chunk", "64", "--force", *paths)
    assert rc == 1 and "forbidden" in err
    rc, _, err = run(capsys, "create", "--level", "10", "--layout", "x9", "--force", *paths)
    assert rc == 1 and err.startswith("llraid: ")


def test_bench_json_has_the_promised_keys(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        capsys, "bench", "--quick", "--json", "--no-nbd", "--seconds", "0.2", "--rounds", "1",
        "--threads", "4", "--member-size", "64M",
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out)
    for kind in ("none", "internal", "lockless"):
        row = doc["summary"][kind]
        assert row["mib_s"] > 0 and row["iops"] > 0 and row["ratio_to_none"] > 0
    assert doc["summary"]["none"]["ratio_to_none"] == 1.0
    sync = {s["kind"]: s for s in doc["sync"]}
    # the cost of resync after a crash: llbitmap copies only what was written, none everything
    assert sync["lockless"]["resync_bytes_read"] < sync["none"]["resync_bytes_read"]
    assert all(s["mismatches_after"] == 0 for s in doc["sync"])
    # raid5: both loads per bitmap, full-stripe writes read nothing, the same sync costs
    r5 = doc["raid5"]
    for table in ("summary_random_4k", "summary_seq_1m"):
        for kind in ("none", "internal", "lockless", "raw"):
            assert r5[table][kind]["mib_s"] > 0
    assert all(r["member_bytes_read"] > 0 for r in r5["random_rounds"])  # reconstruct-writes read
    assert all(r["member_bytes_read"] == 0 for r in r5["seq_rounds"])
    sync5 = {s["kind"]: s for s in r5["sync"]}
    assert sync5["lockless"]["resync_bytes_read"] < sync5["none"]["resync_bytes_read"]
    assert sync5["lockless"]["recovery_bytes_written"] < sync5["none"]["recovery_bytes_written"]
    assert all(s["mismatches_after"] == 0 and s["level"] == 5 for s in r5["sync"])


def test_sync_mode_proactive_builds_every_chunks_parity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = members(tmp_path, 3)
    assert run(capsys, "create", "--level", "5", "--name", "p", "--homehost", "h", *paths)[0] == 0
    rc, out, _ = run(capsys, "sync", "--mode", "proactive", "--json", *paths)
    assert rc == 0
    passes = json.loads(out)
    assert [p["kind"] for p in passes] == ["recovery", "resync"]
    with Array.assemble(paths) as a:
        assert a.bitmap.bits_view().splitlines()[-1] == f"clean unwritten {a.bitmap.chunks}"  # type: ignore[attr-defined]
    assert passes[-1]["sectors_synced"] == passes[-1]["end_sector"]
    (tmp_path / "r1").mkdir()
    paths1 = members(tmp_path / "r1", 2)
    assert run(capsys, "create", "--level", "1", "--name", "q", "--homehost", "h", *paths1)[0] == 0
    rc, _, err = run(capsys, "sync", "--mode", "proactive", *paths1)
    assert rc == 1 and "raid4/5/6 only" in err
