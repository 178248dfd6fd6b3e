"""Fuzzed NBD request streams against the server, backed by an array on simulated members.

Each request is sent alone and answered before the next, and the member devices
(:class:`~llraid.torture.simdev.SimDevice`) count every write, so each request is checked on
its own:

* a valid request succeeds; reads return what the valid writes left (a shadow copy);
* an invalid request gets an NBD error, and nothing at all is written to any member;
* a request the server must hang up on (bad magic, a write payload over the limit) closes the
  connection, again with no member write;
* random bytes in place of the handshake or of a request end in a clean close, never in a
  crashed handler, and write nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llraid.array import Array
from llraid.export import nbd
from llraid.export.nbd import NbdServer
from llraid.torture.simdev import SimWorld
from tests.torture.helpers import MiB, new_array

R, W, FL, TRIM, WZ = nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_FLUSH, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Served:
    """An NbdServer on its own loop (a thread), in front of an array on simulated members."""

    def __init__(self, paths: list[str]) -> None:
        self.world = SimWorld(0, survive=1.0)
        self.array = Array.assemble(paths, bitmap_threads=False, opener=self.world.opener)
        self.dir = tempfile.mkdtemp(prefix="llt", dir="/tmp")
        self.sock = str(Path(self.dir) / "s")
        self.errors: list[BaseException] = []
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(self.array, on_error=self.errors.append)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.listen_unix(self.sock))

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def writes(self) -> int:
        with self.world.lock:
            return sum(st.writes for st in self.world.states.values())

    def data_written(self) -> int:
        with self.world.lock:
            return sum(st.bytes_written["data"] for st in self.world.states.values())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.array.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        self.cookie = 0

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def closed(self) -> bool:
        """True when the server closes the connection (EOF) within the timeout."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (TimeoutError, ConnectionResetError):
            return False

    def go(self) -> int:
        magic, _, _ = struct.unpack(">QQH", self.recv(18))
        assert magic == nbd.NBDMAGIC
        self.s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 0))
        size, _flags = struct.unpack(">QH", self.recv(10))
        return int(size)

    def request(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes = b""
    ) -> tuple[int, bytes]:
        self.cookie += 1
        self.s.sendall(
            struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + payload
        )
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and cookie == self.cookie
        data = self.recv(length) if cmd == R and err == 0 else b""
        return int(err), data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.s.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    paths = new_array(tmp_path_factory.mktemp("nbd"), level=1, disks=2, bitmap="lockless", size=4 * MiB)
    s = Served(paths)
    try:
        yield s
    finally:
        s.close()


@dataclass(frozen=True)
class Req:
    cmd: int
    flags: int
    offset: int
    length: int
    valid: bool
    fill: int = 0


def requests(size: int) -> st.SearchStrategy[Req]:
    sectors = size // 512

    @st.composite
    def valid(draw: st.DrawFn) -> Req:
        cmd = draw(st.sampled_from([R, R, W, W, W, FL, TRIM, WZ]))
        if cmd == FL:
            return Req(FL, draw(st.sampled_from([0, FUA])), 0, 0, True)
        n = draw(st.integers(1, 64))
        start = draw(st.integers(0, sectors - n))
        if cmd == R:  # reads need no alignment
            length = draw(st.integers(1, 64 * 512))
            off = draw(st.integers(0, size - length))
            return Req(R, 0, off, length, True)
        flags = draw(st.sampled_from([0, FUA])) | (draw(st.sampled_from([0, NO_HOLE])) if cmd == WZ else 0)
        return Req(cmd, flags, start * 512, n * 512, True, draw(st.integers(1, 255)))

    @st.composite
    def invalid(draw: st.DrawFn) -> Req:
        how = draw(
            st.sampled_from(
                ["cmd", "flags", "unaligned", "bounds", "zero", "flushargs", "fastzero", "nohole"]
            )
        )
        cmd = draw(st.sampled_from([W, WZ, TRIM]))
        off, length, flags = 0, 512, 0
        if how == "cmd":
            cmd = draw(st.sampled_from([5, 7, 8, 9, 100, 0xFFFF]))
        elif how == "flags":
            flags = draw(st.sampled_from([4, 8, 32, 0x8000]))
        elif how == "unaligned":
            off = draw(st.integers(0, size - 1024))
            length = draw(st.integers(1, 1024))
            if off % 512 == 0 and length % 512 == 0:
                length += 1
        elif how == "bounds":
            off = draw(st.sampled_from([size, size - 512, (1 << 63), (1 << 64) - 512]))
            length = 1024 if off == size - 512 else 512
        elif how == "zero":
            length = 0
        elif how == "flushargs":
            cmd, off = FL, 512
        elif how == "fastzero":
            cmd, flags = WZ, FAST_ZERO
        else:
            cmd, flags = W, NO_HOLE
        return Req(cmd, flags, off, length, False, 7)

    return st.one_of(valid(), invalid())


def test_fuzzed_request_sequences(served: Served) -> None:
    size = served.array.array_bytes

    @FUZZ
    @given(reqs=st.lists(requests(size), min_size=1, max_size=25))
    def run(reqs: list[Req]) -> None:
        c = Client(served.sock)
        try:
            assert c.go() == size
            shadow = bytearray(size)  # what valid writes left, where ``known``
            known = bytearray(size)
            for r in reqs:
                before, data_before = served.writes(), served.data_written()
                payload = (
                    bytes([r.fill]) * r.length if r.cmd == W and (r.valid or r.length <= 1 << 16) else b""
                )
                if r.cmd == W and not payload and not r.valid:
                    continue
                err, data = c.request(r.cmd, r.flags, r.offset, r.length, payload)
                if r.valid:
                    assert err == 0, r
                    span = slice(r.offset, r.offset + r.length)
                    if r.cmd == R:
                        assert len(data) == r.length
                        got = [b for b, k in zip(data, known[span], strict=True) if k]
                        want = [b for b, k in zip(shadow[span], known[span], strict=True) if k]
                        assert got == want, r
                    elif r.cmd == TRIM:
                        known[span] = bytes(r.length)  # trimmed: content no longer defined
                    if r.cmd in (W, WZ):
                        shadow[span] = payload if r.cmd == W else bytes(r.length)
                        known[span] = b"\x01" * r.length
                        copies = 2
                        assert served.data_written() - data_before == r.length * copies, r
                else:
                    assert err != 0, r
                    assert served.writes() == before, f"invalid request {r} wrote to a member"
            served.array.flush()
        finally:
            c.close()
        assert not served.errors

    run()


def test_reads_return_what_valid_writes_left(served: Served) -> None:
    size = served.array.array_bytes
    c = Client(served.sock)
    try:
        c.go()
        for i, off in enumerate(range(0, min(size, 1 << 20), 96 * 1024)):
            blob = bytes([i + 1]) * 4096
            assert c.request(W, FUA if i % 2 else 0, off, 4096, blob)[0] == 0
            assert c.request(R, 0, off, 4096)[1] == blob
            assert c.request(R, 0, off + 100, 50)[1] == blob[:50]
    finally:
        c.close()


@pytest.mark.parametrize("fatal", ["magic", "oversized"])
def test_requests_that_end_the_connection_write_nothing(served: Served, fatal: str) -> None:
    c = Client(served.sock)
    try:
        c.go()
        before = served.writes()
        if fatal == "magic":
            c.s.sendall(struct.pack(">IHHQQI", 0x12345678, 0, W, 1, 0, 512) + bytes(512))
        else:
            c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, W, 1, 0, nbd.MAX_REQUEST + 512))
        assert c.closed()
        assert served.writes() == before
    finally:
        c.close()
    assert not served.errors


def test_random_bytes_close_cleanly_and_write_nothing(served: Served) -> None:
    @FUZZ
    @given(raw=st.binary(max_size=300), after_handshake=st.booleans())
    def run(raw: bytes, after_handshake: bool) -> None:
        c = Client(served.sock)
        try:
            if after_handshake:
                c.go()
            else:
                c.recv(18)
            before = served.writes()
            c.s.sendall(raw)
            c.s.shutdown(socket.SHUT_WR)
            assert c.closed()
            # bytes that happen to form a valid write could write; anything else must not
            if served.writes() != before:
                assert after_handshake and len(raw) >= 28 and raw[:4] == struct.pack(">I", nbd.REQUEST_MAGIC)
        finally:
            c.close()
        assert not served.errors

    run()
