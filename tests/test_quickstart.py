"""README command (a): ``llraid quickstart`` creates on first run, assembles afterwards, serves."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llraid.export.service import control_request, running_arrays
from llraid.member import open_member


def start(data: Path, tmp: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "LLRAID_RUNTIME_DIR": str(tmp / "run")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llraid.cli", "quickstart", "--data", str(data), "--member-size", "64M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "serving" in line:
            return proc, lines
    raise AssertionError("".join(lines))


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


def test_quickstart_creates_then_assembles(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, lines = start(data, tmp_path)
    try:
        out = "".join(lines)
        assert "created raid10" in out and "nbdinfo 'nbd+unix:///?socket=" in out
        assert nbd_size(str(data / "array.nbd")) == 4 * (64 << 20 >> 20) // 2 * (1 << 20) - (4 << 20)
        # The initial resync is immediate with llbitmap (every chunk Unwritten): wait for it.
        (info,) = running_arrays_in(tmp_path / "run")
        deadline = time.monotonic() + 20
        while control_request(info["control"], "detail")["resync_offset"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped cleanly" in rest
    member = open_member(str(data / "member0.img"))
    member.device.close()
    assert member.sb.is_clean and member.sb.level == 10 and member.sb.raid_disks == 4
    proc, lines = start(data, tmp_path)  # second run: the same array, assembled
    try:
        assert "created" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
