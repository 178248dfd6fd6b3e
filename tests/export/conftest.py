"""Helpers for the export tests: arrays on sparse files, ``llraid serve`` subprocesses, an
in-process :class:`~llraid.export.nbd.NbdServer`, and a tiny raw-socket NBD client.

Unix sockets need short paths (108 bytes), so every runtime directory is a fresh ``/tmp/llx*``
directory rather than something under ``tmp_path``.

Tools: a test that needs one skips if it is missing, but fails when ``$CI`` is set (CI installs
them with ``scripts/setup --dev`` and runs as root, so it must run everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llraid.array import Array, Rdev
from llraid.create import CreateSpec, create, parse_layout
from llraid.examine import examine_bitmap, examine_json
from llraid.export import nbd
from llraid.export.nbd import BlockDevice, NbdServer
from llraid.export.service import control_request
from llraid.format.bitmap import BitmapKind
from llraid.member import open_member

CI = bool(os.environ.get("CI"))
HOMEHOST = "exporttest"


# ---- environment -------------------------------------------------------------------------------


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if CI:
            pytest.fail(f"{name} is not installed (scripts/setup --dev installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        if CI:
            pytest.fail("this test needs root, and CI runs as root")
        pytest.skip("needs root")


def need_path(path: str) -> None:
    if not os.path.exists(path):
        if CI:
            pytest.fail(f"{path} is missing")
        pytest.skip(f"{path} is missing")


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short private directory for sockets (``$LLRAID_RUNTIME_DIR`` of the servers)."""
    d = Path(tempfile.mkdtemp(prefix="llx", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- arrays ---------------------------------------------------------------------------------------


def make_members(
    where: Path,
    *,
    level: int = 10,
    n: int = 4,
    size_mib: int = 64,
    layout: str | None = "n2",
    bitmap: BitmapKind = BitmapKind.LOCKLESS,
    assume_clean: bool = False,
    name: str = "exp",
    prefix: str = "m",
) -> list[str]:
    """A new array on ``n`` sparse files (mdadm's defaults unless told otherwise)."""
    paths = [str(where / f"{prefix}{i}.img") for i in range(n)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(size_mib << 20)
    spec = CreateSpec(
        level=level,
        raid_devices=n,
        layout=parse_layout(level, layout if level == 10 else None),
        chunk_sectors=0 if level == 1 else 1024,
        bitmap=bitmap,
        assume_clean=assume_clean,
        name=name,
        minor=2,
        size=None,
        homehost=HOMEHOST,
    )
    create(paths, spec)
    return paths


def guard_member_writes(array: Array, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every member data write outside the member's data area (must stay empty)."""
    bad: list[str] = []
    real = array.write_member

    def checked(d: Rdev, msector: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        if msector < 0 or len(data) % 512 or msector * 512 + len(data) > array.dev_sectors * 512:
            bad.append(f"{d.path}: {len(data)} bytes at member sector {msector}")
        real(d, msector, data, fua=fua)

    monkeypatch.setattr(array, "write_member", checked)
    return bad


# ---- the CLI and `llraid serve` as subprocesses ------------------------------------------------


def llraid_env(rundir: Path) -> dict[str, str]:
    return {**os.environ, "LLRAID_RUNTIME_DIR": str(rundir), "LLRAID_HOMEHOST": HOMEHOST, "TZ": "UTC"}


def llraid(
    rundir: Path, *args: str, cwd: str | Path | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``llraid`` command line (this interpreter, so the venv's llraid)."""
    out = subprocess.run(
        [sys.executable, "-m", "llraid.cli", *args],
        capture_output=True,
        text=True,
        env=llraid_env(rundir),
        cwd=cwd,
        timeout=timeout,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"llraid {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def examine_state(path: str) -> dict[str, str]:
    """``llraid examine --json`` facts of one member."""
    member = open_member(path)
    try:
        facts: dict[str, str] = examine_json(member, HOMEHOST)["facts"]
        return facts
    finally:
        member.device.close()


def bitmap_on_disk(path: str) -> dict[str, Any]:
    """``llraid examine-bitmap --json`` of one member (as the command prints it)."""
    member = open_member(path)
    try:
        report: dict[str, Any] = json.loads(json.dumps(examine_bitmap(member).data))
        return report
    finally:
        member.device.close()


def mdadm_state(path: str) -> str:
    """``State :`` as ``mdadm --examine`` prints it (the independent oracle)."""
    mdadm = need_tool("mdadm")
    out = subprocess.run([mdadm, "--examine", path], capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        k, sep, v = line.partition(" : ")
        if sep and k.strip() == "State":
            return v.strip()
    raise AssertionError(f"mdadm --examine {path} printed no State:\n{out.stdout}\n{out.stderr}")


class Served:
    """One ``llraid serve`` subprocess."""

    def __init__(
        self,
        members: Sequence[str],
        rundir: Path,
        logdir: Path,
        args: Sequence[str] = (),
        cwd: str | Path | None = None,
    ) -> None:
        self.members = list(members)
        self.rundir = rundir
        self.args = list(args)
        self.cwd = cwd
        self.stderr_path = logdir / f"serve-{time.monotonic_ns()}.err"
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self.uri = ""
        self.control = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30) -> Served:
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llraid.cli", "serve", *self.members, *self.args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=llraid_env(self.rundir),
                cwd=self.cwd,
            )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self.control:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"llraid serve did not come up:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"llraid serve exited {self.proc.wait()}:\n{self.log()}")
            if line.startswith("llraid: serving ") and " at " in line:
                self.uri = line.rsplit(" at ", 1)[1].strip()
            elif line.startswith("llraid: control socket "):
                self.control = line.removeprefix("llraid: control socket ").strip()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket_path(self) -> str:
        return self.uri.split("socket=", 1)[1]

    def log(self) -> str:
        err = self.stderr_path.read_text() if self.stderr_path.exists() else ""
        return "stdout:\n" + "".join(self.lines) + "\nstderr:\n" + err[-6000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, cmd: str, *args: str, timeout: float = 60) -> Any:
        return control_request(self.control, cmd, list(args), timeout=timeout)

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = self.ctl("detail")
        return d

    def wait_sync(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = 60, what: str = "sync"
    ) -> dict[str, Any]:
        """Poll ``detail`` until the sync thread is idle and ``done(sync)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            sync: dict[str, Any] = self.detail()["sync"]
            if sync["action"] == "idle" and done(sync):
                return sync
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not finish: {sync}\n{self.log()}")
            time.sleep(0.05)

    def signal(self, sig: int, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"llraid serve ignored signal {sig}:\n{self.log()}") from None

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def reap(self) -> None:
        """Finalizer: whatever state the test left it in, the process is gone afterwards."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


ServeFactory = Callable[..., Served]


@pytest.fixture
def serve(rundir: Path, tmp_path: Path) -> Iterator[ServeFactory]:
    """``serve(members, *args, cwd=None)`` starts ``llraid serve``; all are reaped afterwards."""
    started: list[Served] = []

    def start(members: Sequence[str], *args: str, cwd: str | Path | None = None) -> Served:
        s = Served(members, rundir, tmp_path, args, cwd=cwd)
        started.append(s)
        return s.start()

    try:
        yield start
    finally:
        for s in started:
            s.reap()


# ---- an in-process server --------------------------------------------------------------------------


class InProcServer:
    """An :class:`NbdServer` on its own asyncio loop in a thread, listening on a unix socket."""

    def __init__(self, dev: BlockDevice, path: str, **kw: Any) -> None:
        self.path = path
        self.errors: list[BaseException] = []
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(dev, on_error=self.errors.append, **kw)
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-loop", daemon=True)
        self.thread.start()
        self.call(self.server.listen_unix(path))

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def idle(self) -> None:
        """Wait until the loop has run everything that was ready (a cheap barrier)."""

        async def nop() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        self.call(nop())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---- a raw-socket NBD client --------------------------------------------------------------------------

IHAVEOPT = nbd.IHAVEOPT
REQUEST_MAGIC = nbd.REQUEST_MAGIC


class OptionError(Exception):
    def __init__(self, opt: int, rtype: int, message: bytes) -> None:
        super().__init__(f"option {opt}: reply type {rtype:#x}: {message!r}")
        self.opt = opt
        self.rtype = rtype
        self.message = message


@dataclass
class ExportInfo:
    size: int = 0
    flags: int = 0
    name: bytes | None = None
    description: bytes | None = None
    block_sizes: tuple[int, int, int] | None = None
    replies: list[tuple[int, bytes]] = field(default_factory=list)


class NbdClient:
    """Just enough of the NBD client side to send anything, valid or not, and read the answers."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self._cookie = 0
        self.size = 0
        self.flags = 0

    # plumbing
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the server closed the connection (reads EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # handshake
    def greeting(self) -> int:
        magic, opt, gflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == nbd.NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        return int(gflags)

    def handshake(self, cflags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) -> int:
        gflags = self.greeting()
        self.send(struct.pack(">I", cflags))
        return gflags

    def send_option(self, opt: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.send(struct.pack(">QII", magic, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == nbd.REPLY_MAGIC_OPT, hex(magic)
        return int(opt), int(rtype), self.recv_exact(length)

    def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """Replies to ``opt`` up to its ACK; an error reply raises :class:`OptionError`."""
        out: list[tuple[int, bytes]] = []
        while True:
            ropt, rtype, data = self.option_reply()
            assert ropt == opt, (ropt, opt)
            if rtype & (1 << 31):
                raise OptionError(opt, rtype, data)
            if rtype == nbd.REP_ACK:
                return out
            out.append((rtype, data))

    def info(self, name: str = "", requests: Sequence[int] = (), opt: int = nbd.OPT_GO) -> ExportInfo:
        raw = name.encode()
        body = (
            struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(requests)}H", len(requests), *requests)
        )
        self.send_option(opt, body)
        info = ExportInfo(replies=self.option_replies(opt))
        for rtype, data in info.replies:
            assert rtype == nbd.REP_INFO, rtype
            (kind,) = struct.unpack_from(">H", data)
            if kind == nbd.INFO_EXPORT:
                info.size, info.flags = struct.unpack_from(">QH", data, 2)
            elif kind == nbd.INFO_NAME:
                info.name = data[2:]
            elif kind == nbd.INFO_DESCRIPTION:
                info.description = data[2:]
            elif kind == nbd.INFO_BLOCK_SIZE:
                info.block_sizes = struct.unpack_from(">III", data, 2)
        if opt == nbd.OPT_GO:
            self.size, self.flags = info.size, info.flags
        return info

    def connect(self, name: str = "") -> ExportInfo:
        self.handshake()
        return self.info(name)

    # transmission
    def send_request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
        cookie: int | None = None,
    ) -> int:
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def reply(self) -> tuple[int, int]:
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC, hex(magic)
        return int(err), int(cookie)

    def request(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        cookie = self.send_request(cmd, offset, length, flags, payload)
        err, got = self.reply()
        assert got == cookie, (got, cookie)
        data = self.recv_exact(length) if cmd == nbd.CMD_READ and err == 0 else b""
        return err, data

    def read(self, offset: int, length: int) -> bytes:
        err, data = self.request(nbd.CMD_READ, offset, length)
        assert err == 0, f"read {offset}+{length}: error {err}"
        return data

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        err, _ = self.request(nbd.CMD_WRITE, offset, len(data), nbd.CMD_FLAG_FUA if fua else 0, data)
        assert err == 0, f"write {offset}+{len(data)}: error {err}"

    def flush(self) -> None:
        err, _ = self.request(nbd.CMD_FLUSH, 0, 0)
        assert err == 0, f"flush: error {err}"

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.send_request(nbd.CMD_DISC, 0, 0)
        self.close()
