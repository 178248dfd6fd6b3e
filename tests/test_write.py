"""``llraid write`` streams its input in bounded pieces; ``write`` and ``cat`` never copy between the
array and one of its own members."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llraid.assemble import assemble
from llraid.cli import main
from llraid.member import open_member

MEMORY_LIMIT = 512 << 20  # address space: llraid needs under 300 MiB; the old write read all input


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def without_logs(err: str) -> str:
    """stderr without the array's md-style log lines (``llraid: raid10 NAME: assembled ...``)."""
    return "".join(line for line in err.splitlines(keepends=True) if not re.match(r"llraid: raid\d+ ", line))


def one_error_line(err: str) -> str:
    """The error: the last line; any before it are the array's md-style log lines (assembled,
    stopped), never a traceback."""
    lines = err.splitlines()
    assert err.endswith("\n") and lines and all(line.startswith("llraid: ") for line in lines), err
    assert all(" raid" in line.split(":")[1] for line in lines[:-1]), err  # "llraid: raid10 NAME: ..."
    return lines[-1] + "\n"


def digests(paths: list[str]) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def is_clean(path: str) -> bool:
    member = open_member(path)
    member.device.close()
    return member.sb.is_clean


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def llraid(
    *argv: str, stdin: int | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The command line in its own process, under MEMORY_LIMIT."""
    return subprocess.run(
        [sys.executable, "-m", "llraid.cli", *argv],
        stdin=stdin,
        input=input,
        capture_output=True,
        preexec_fn=limited,
        timeout=120,
    )


def array_bytes(paths: list[str]) -> int:
    members = [open_member(p) for p in paths]
    try:
        return assemble(members).array_bytes
    finally:
        for m in members:
            m.device.close()


@pytest.fixture
def raid10(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A raid10 n2 of four 16 MiB members (a 28 MiB array) holding random bytes everywhere."""
    paths = []
    for i in range(4):
        p = tmp_path / f"m{i}.img"
        with open(p, "wb") as f:
            f.truncate(16 << 20)
        paths.append(str(p))
    assert run(capsys, "create", "--level", "10", "--assume-clean", *paths)[0] == 0
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(array_bytes(paths)))
    assert run(capsys, "write", *paths, "-i", str(fill))[0] == 0
    return paths


def read_array(capsys: pytest.CaptureFixture[str], paths: list[str], out: Path) -> bytes:
    assert run(capsys, "cat", *paths, "-o", str(out))[0] == 0
    return out.read_bytes()


def test_dev_zero_fills_to_the_end_then_says_so_in_bounded_memory(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = array_bytes(raid10)
    p = llraid("write", *raid10, "--offset", "1M", "-i", "/dev/zero")
    err = p.stderr.decode()
    assert p.returncode == 1, err
    line = one_error_line(err)
    assert "/dev/zero is larger than the array" in line
    assert f"wrote {size - (1 << 20)} bytes at offset {1 << 20}" in line
    data = read_array(capsys, raid10, tmp_path / "out.bin")
    assert any(data[: 1 << 20]) and not any(data[1 << 20 :])
    assert is_clean(raid10[0])  # stopped cleanly despite the refusal


def test_pipe_larger_than_the_array_is_written_up_to_the_end(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = array_bytes(raid10)
    payload = os.urandom(size + (3 << 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llraid.cli", "write", *raid10],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limited,
    )
    assert proc.stdin is not None and proc.stderr is not None

    def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(payload)  # llraid stops reading at the end of the array
            proc.stdin.close()
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    feeder.join()
    line = one_error_line(err)
    assert "standard input is larger than the array" in line and f"wrote {size} bytes at offset 0" in line
    assert read_array(capsys, raid10, tmp_path / "out.bin") == payload[:size]


def test_pipe_that_fits_is_written_whole(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = read_array(capsys, raid10, tmp_path / "before.bin")
    payload = os.urandom(10 << 20)
    p = llraid("write", *raid10, "--offset", "12345", input=payload)
    assert p.returncode == 0
    assert without_logs(p.stderr.decode()) == f"llraid: wrote {len(payload)} bytes at offset 12345\n"
    after = read_array(capsys, raid10, tmp_path / "after.bin")
    assert after == before[:12345] + payload + before[12345 + len(payload) :]


@pytest.mark.parametrize("sparse", [31 << 20, 100 << 30], ids=["31M", "100G-sparse"])
def test_file_too_large_is_refused_before_anything_is_written(
    raid10: list[str], tmp_path: Path, sparse: int
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(sparse)
    before = digests(raid10)
    p = llraid("write", *raid10, "-i", str(big))
    assert p.returncode == 1
    line = one_error_line(p.stderr.decode())
    assert f"holds {sparse} bytes" in line and "nothing written" in line
    assert digests(raid10) == before


def test_file_that_fits_exactly_at_an_offset(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = array_bytes(raid10)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size - 4096))
    assert run(capsys, "write", *raid10, "--offset", "4K", "-i", str(src))[0] == 0
    assert read_array(capsys, raid10, tmp_path / "out.bin")[4096:] == src.read_bytes()
    src.write_bytes(os.urandom(size - 4095))
    before = digests(raid10)
    rc, _, err = run(capsys, "write", *raid10, "--offset", "4K", "-i", str(src))
    assert rc == 1 and f"room for {size - 4096}" in one_error_line(err)
    assert digests(raid10) == before


def test_offset_past_the_end_is_refused(raid10: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    before = digests(raid10)
    rc, _, err = run(capsys, "write", *raid10, "--offset", "1G", "-i", "/dev/null")
    assert rc == 1 and "past the end of the array" in one_error_line(err)
    assert digests(raid10) == before


def test_closed_standard_input(raid10: list[str]) -> None:
    p = subprocess.run(
        ["bash", "-c", 'exec "$0" -m llraid.cli write "$@" <&-', sys.executable, *raid10],
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 1 and "standard input is closed" in one_error_line(p.stderr.decode())


def test_write_and_cat_refuse_a_member_as_their_file(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digests(raid10)
    rc, _, err = run(capsys, "write", *raid10, "-i", raid10[1])
    assert rc == 1 and "is a member of the array" in one_error_line(err)
    link = tmp_path / "link"
    link.symlink_to(raid10[2])
    rc, _, err = run(capsys, "cat", *raid10, "-o", str(link))  # `open(wb)` would truncate it
    assert rc == 1 and f"{link} is {raid10[2]}, a member of the array" in one_error_line(err)
    with open(raid10[3], "ab") as out:  # `llraid cat ... >> member`
        p = subprocess.run(
            [sys.executable, "-m", "llraid.cli", "cat", *raid10], stdout=out, stderr=subprocess.PIPE
        )
    assert p.returncode == 1 and "standard output is" in one_error_line(p.stderr.decode())
    assert digests(raid10) == before


def test_cat_output_file_is_private(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        assert run(capsys, "cat", *raid10, "--length", "1M", "-o", str(out))[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_size == 1 << 20


def test_help_says_what_cat_and_get_take(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "read the array's data to standard output or a file" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["cat", "--help"])
    out = capsys.readouterr().out
    assert "bytes to read" in out and "to write" not in out
    with pytest.raises(SystemExit):
        main(["get", "--help"])
    out = capsys.readouterr().out
    assert "NAME" in out and "DEV" not in out


def test_cat_to_a_full_device_names_it(raid10: list[str]) -> None:
    size = array_bytes(raid10)
    with open("/dev/full", "wb") as full:
        p = subprocess.run(
            [sys.executable, "-m", "llraid.cli", "cat", *raid10],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    line = one_error_line(p.stderr.decode())
    assert p.returncode == 1 and f"standard output: No space left on device, after 0 of {size} bytes" in line


def test_proc_files_are_read_as_streams_and_read_errors_are_named(
    raid10: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc files cannot be sized by seeking to their end: they are read like a pipe
    rc, _, err = run(capsys, "write", *raid10, "-i", "/proc/version")
    version = Path("/proc/version").read_bytes()
    assert rc == 0 and without_logs(err) == f"llraid: wrote {len(version)} bytes at offset 0\n"
    assert read_array(capsys, raid10, tmp_path / "out.bin")[: len(version)] == version
    rc, _, err = run(capsys, "write", *raid10, "-i", "/proc/self/mem")  # offset 0 is never mapped: EIO
    assert rc == 1
    assert "cannot read /proc/self/mem: Input/output error; wrote 0 bytes at offset 0" in one_error_line(err)


def test_interrupted_write_says_how_far_it_got_and_stops_cleanly(raid10: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llraid.cli", "write", *raid10],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limited,
    )
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(os.urandom(5 << 20))  # one whole piece, and the start of the next
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while is_clean(raid10[0]):  # the array is marked active before its first write
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 130
    proc.stdin.close()
    line = one_error_line(err)
    assert line.startswith("llraid: interrupted: wrote ") and "bytes at offset 0" in line
    assert int(line.split()[3]) in (0, 4 << 20)
    assert is_clean(raid10[0])
