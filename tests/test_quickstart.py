"""README command (a): ``llraid quickstart`` creates on first run, assembles afterwards, serves."""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from llraid.cli import main
from llraid.export.service import control_request, running_arrays
from llraid.member import open_member


def start(data: Path, tmp: Path, *extra: str, umask: int = 0o022) -> tuple[subprocess.Popen[str], list[str]]:
    """A quickstart in its own process, read up to the end of its banner."""
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp / "run")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llraid.cli",
            "quickstart",
            "--data",
            str(data),
            "--member-size",
            "64M",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: os.umask(umask),
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "stops cleanly, as Ctrl-C here does" in line:
            return proc, lines
    proc.wait()
    raise AssertionError("".join(lines))


def quickstart(data: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A quickstart expected to refuse: it must end by itself."""
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp / "run")}
    return subprocess.run(
        [sys.executable, "-m", "llraid.cli", "quickstart", "--data", str(data), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)  # no banner, nothing else
    assert p.stderr.startswith("llraid: ") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr


def running_arrays_in(rundir: Path) -> list[dict[str, Any]]:
    os.environ["LLRAID_RUNTIME_DIR"] = str(rundir)
    try:
        return running_arrays()
    finally:
        del os.environ["LLRAID_RUNTIME_DIR"]


def nbd_size(sock: str) -> int:
    """Export size through a minimal fixed-newstyle handshake (NBD_OPT_GO)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
        while True:
            _magic, _opt, rtype, length = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
            data = s.recv(length, socket.MSG_WAITALL) if length else b""
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                return int(struct.unpack(">Q", data[2:10])[0])
            if rtype == 1:
                raise AssertionError("no export info")


def printed(lines: list[str], word: str) -> str:
    """The shell command the banner prints for ``llraid WORD``."""
    (line,) = [ln for ln in lines if ln.split("#")[0].rstrip().endswith(f" {word}")]
    return line.split("#")[0].strip()


def test_quickstart_creates_then_assembles(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, lines = start(data, tmp_path)
    try:
        out = "".join(lines)
        assert "created raid10" in out and "nbdinfo 'nbd+unix:///?socket=" in out
        assert out.index("created raid10") < out.index("assembled from 4 of 4") < out.index("serving")
        assert out.index("serving") < out.index("connect with")  # help only once the array is up
        assert nbd_size(str(data / "array.nbd")) == 4 * (64 << 20 >> 20) // 2 * (1 << 20) - (4 << 20)
        # private: members 0600, the directory quickstart made 0700 (the umask was 022)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert {stat.S_IMODE((data / f"member{i}.img").stat().st_mode) for i in range(4)} == {0o600}
        # The initial resync is immediate with llbitmap (every chunk Unwritten): wait for it.
        (info,) = running_arrays_in(tmp_path / "run")
        deadline = time.monotonic() + 20
        while control_request(info["control"], "detail")["resync_offset"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the commands it prints run as printed (llraid is not on PATH: the venv's bin is named)
        env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"}
        status = subprocess.run(printed(lines, "status"), shell=True, capture_output=True, text=True, env=env)
        assert status.returncode == 0 and "quickstart : active raid10" in status.stdout, status
        stop = subprocess.run(printed(lines, "stop"), shell=True, capture_output=True, text=True, env=env)
        assert stop.returncode == 0, stop
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped cleanly" in rest
    member = open_member(str(data / "member0.img"))
    member.device.close()
    assert member.sb.is_clean and member.sb.level == 10 and member.sb.raid_disks == 4
    proc, lines = start(data, tmp_path, "--member-size", "1G")  # second run: the same array, assembled
    try:
        out = "".join(lines)
        assert "created" not in out and "--member-size ignored" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("member_size", "match"),
    [
        ("1K", "--member-size 1024 bytes (1K) is too small: a raid10 (near=2, 512K chunks) with the lockless "
         "bitmap needs at least 2621440 bytes (2.5M) per member"),
        ("0", "needs at least 2621440 bytes (2.5M)"),
        ("2621439B", "--member-size 2621439 bytes (2.4M) is too small"),
        ("100000T", "the file system of"),
        ("99999999999T", "is larger than any file can be"),
    ],
    ids=["1K", "0", "one-byte-short", "more-than-free", "larger-than-off_t"],
)  # fmt: skip
def test_first_run_checks_the_member_size_before_making_anything(
    tmp_path: Path, member_size: str, match: str
) -> None:
    data = tmp_path / "a" / "data"
    line = one_error_line(quickstart(data, tmp_path, "--member-size", member_size))
    assert match in line and f"removed what this run made (directory {tmp_path / 'a'})" in line
    assert list(tmp_path.iterdir()) == []  # not even the directories


def test_first_run_within_the_file_size_limit(tmp_path: Path) -> None:
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp_path / "run")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llraid.cli",
            "quickstart",
            "--data",
            str(tmp_path / "d"),
            "--member-size",
            "4M",
        ],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY)),
        timeout=60,
    )
    assert "over this process's file-size limit (ulimit -f: 1048576 bytes (1M))" in one_error_line(p)
    assert not (tmp_path / "d").exists()


def test_data_that_is_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep me")
    assert f"--data {f} is not a directory" in one_error_line(quickstart(f, tmp_path))
    assert f"cannot make {f / 'sub'}: {f} is not a directory" in one_error_line(
        quickstart(f / "sub", tmp_path)
    )
    long = tmp_path / ("x" * (110 - len(str(tmp_path))))
    assert "longer than a unix socket allows" in one_error_line(quickstart(long, tmp_path))
    assert sorted(tmp_path.iterdir()) == [f] and f.read_text() == "keep me"


def test_failure_before_serving_removes_only_what_the_run_made(tmp_path: Path) -> None:
    (tmp_path / "notadir").write_text("")
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp_path / "notadir" / "run")}  # the service cannot start
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for data, made in (
        (mine, "4 member files"),
        (tmp_path / "new" / "data", f"4 member files and directory {tmp_path / 'new'}"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "llraid.cli", "quickstart", "--data", str(data), "--member-size", "8M"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        line = one_error_line(p)
        assert "Not a directory" in line and f"removed what this run made ({made})" in line
    assert sorted(tmp_path.iterdir()) == [mine, tmp_path / "notadir"]
    assert [x.name for x in mine.iterdir()] == ["notes.txt"]
    # and so a later run starts afresh instead of tripping over leftovers
    proc, lines = start(mine, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert "created raid10" in "".join(lines)


def test_interrupted_first_run_removes_its_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import llraid.quickstart

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the superblocks are being written

    monkeypatch.setattr(llraid.quickstart, "create", interrupted)
    data = tmp_path / "data"
    assert main(["quickstart", "--data", str(data), "--member-size", "8M"]) == 130
    assert not data.exists()
    assert capsys.readouterr().out == ""


def make_array(data: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A raid10 n2 on four 8 MiB member files, as quickstart names them."""
    data.mkdir(parents=True)
    paths = [str(data / f"member{i}.img") for i in range(4)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(8 << 20)
        os.chmod(p, 0o600)
    assert main(["create", "--level", "10", "--assume-clean", *paths]) == 0
    capsys.readouterr()
    return paths


def test_leftovers_of_an_unfinished_first_run(tmp_path: Path) -> None:
    """What older versions left: empty member files that stopped every later run."""
    for name, files in (("tiny", {f"member{i}.img": 1024 for i in range(4)}), ("zero", {"member0.img": 0})):
        data = tmp_path / name
        data.mkdir()
        for f, size in files.items():
            with open(data / f, "wb") as fh:
                fh.truncate(size)
        line = one_error_line(quickstart(data, tmp_path))
        assert (
            f"holds {len(files)} of the 4 member files, none with any data: a first run that did not finish"
            in line
        )
        assert line.rstrip().endswith("rm " + " ".join(str(data / f) for f in files))
        assert {f.name: f.stat().st_size for f in data.iterdir()} == files  # it removes nothing itself


def test_a_lost_member_gets_the_degraded_start_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    paths = make_array(data, capsys)
    Path(paths[2]).unlink()
    line = one_error_line(quickstart(data, tmp_path))
    assert f"{data}: member2.img is missing; quickstart does not start a degraded array" in line
    command = line.split("there: ")[1].split("; then")[0]
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(
        shlex.split(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        for out in proc.stdout:
            if "control socket" in out:
                break
        assert nbd_size(str(data / "array.nbd")) == 12 << 20  # served, degraded
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    # the other half of the same mirror pair lost too: no way to start, and it says why
    with open(paths[3], "r+b") as f:
        f.write(bytes(1 << 20))
    line = one_error_line(quickstart(data, tmp_path))
    assert "member2.img is missing, member3.img holds data but no md superblock" in line
    assert "the array cannot start from what is left (too few members" in line  # a mirror pair is gone


def test_a_damaged_member_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    paths = make_array(data, capsys)
    os.truncate(paths[3], 4 << 20)
    line = one_error_line(quickstart(data, tmp_path))
    assert "member3.img is damaged (device has 8192 sectors, data needs 16384)" in line
    assert f"serve --run --socket {data / 'array.nbd'} {paths[0]} {paths[1]} {paths[2]};" in line


def test_members_open_to_others_are_made_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    paths = make_array(data, capsys)
    for p in paths:
        os.chmod(p, 0o644)  # what quickstart made before
    proc, lines = start(data, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert f"llraid: {paths[0]} was open to other users (mode 0644): now 0600\n" in lines
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in paths} == {0o600}


def test_a_data_path_that_needs_quoting(tmp_path: Path) -> None:
    data = tmp_path / "it's a d&t#a?"
    proc, lines = start(data, tmp_path)
    try:
        (line,) = [ln for ln in lines if ln.strip().startswith("nbdinfo ")]
        (uri,) = shlex.split(line)[1:]
        query = urllib.parse.urlsplit(uri).query
        assert urllib.parse.parse_qs(query) == {"socket": [str(data / "array.nbd")]}
        nbdinfo = shutil.which("nbdinfo")
        if nbdinfo:  # the real client takes the URI as printed
            assert (
                subprocess.run([nbdinfo, "--size", uri], capture_output=True, text=True).stdout
                == f"{124 << 20}\n"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


@pytest.mark.root
def test_small_and_read_only_file_systems(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M,mode=0755", "tmpfs", str(fs)], check=True)
    try:
        line = one_error_line(quickstart(fs / "data", tmp_path, "--member-size", "4M"))
        assert "4 members of 4194304 bytes (4M) need 16777216 bytes (16M); the file system of" in line
        (fs / "data").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        line = one_error_line(quickstart(fs / "data", tmp_path, "--member-size", "1M"))
        assert "is too small" in line  # the size is checked first
        line = one_error_line(quickstart(fs / "data", tmp_path, "--member-size", "3M"))
        assert line == f"llraid: cannot make {fs / 'data' / 'member0.img'}: Read-only file system\n"
        assert list((fs / "data").iterdir()) == []
    finally:
        subprocess.run(["umount", str(fs)], check=True)
