"""Random NBD request streams (valid and invalid, sequential and pipelined) against the server.

The server runs in-process in front of a small raid10 (or raid1) array. A shadow copy of the
array content follows every valid write, WRITE_ZEROES and TRIM (trimmed bytes become "don't care"
until written again). After each stream:

* every valid request succeeded and every read returned the shadow's bytes;
* every invalid request got an NBD error other than EIO (EIO would mean the request reached the
  array, which then refused it), and changed nothing;
* requests the server must hang up on (bad magic, an over-long write, NBD_CMD_DISC) closed the
  connection; a client that vanished mid-request left no partial write;
* no connection handler crashed, the server accepts a fresh connection, the whole array equals the
  shadow, and no member write went outside a member's data area.

At the end ``run_sync(CHECK)`` finds every copy identical.
"""

from __future__ import annotations

import os
import random
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.export import nbd
from llraid.sync import run_sync
from tests.export.conftest import InProcServer, NbdClient, guard_member_writes, make_members

R, W, DISC, FL, TRIM, WZ = (
    nbd.CMD_READ,
    nbd.CMD_WRITE,
    nbd.CMD_DISC,
    nbd.CMD_FLUSH,
    nbd.CMD_TRIM,
    nbd.CMD_WRITE_ZEROES,
)
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
KiB = 1 << 10


@dataclass(frozen=True)
class Op:
    cmd: int
    flags: int
    offset: int
    length: int
    valid: bool
    seed: int = 0
    magic: int = nbd.REQUEST_MAGIC

    def payload(self) -> bytes:
        if self.cmd != W:
            return b""
        return random.Random(self.seed).randbytes(self.length)


def ops_for(size: int) -> st.SearchStrategy[Op]:
    sectors = size // 512
    u64 = st.integers(0, (1 << 64) - 1)
    u32 = st.integers(0, (1 << 32) - 1)

    @st.composite
    def valid(draw: st.DrawFn) -> Op:
        kind = draw(st.sampled_from([R, R, W, W, WZ, TRIM, FL]))
        fua = FUA if draw(st.booleans()) else 0
        if kind == FL:
            return Op(FL, fua, 0, 0, True)
        if kind == R:
            length = draw(st.integers(1, 256 * KiB))
            return Op(R, fua, draw(st.integers(0, size - length)), length, True)
        n = draw(st.integers(1, 256 if kind == W else 8192))
        start = draw(st.integers(0, sectors - n))
        flags = fua | (NO_HOLE if kind == WZ and draw(st.booleans()) else 0)
        return Op(kind, flags, start * 512, n * 512, True, seed=draw(st.integers(0, 1 << 30)))

    @st.composite
    def invalid(draw: st.DrawFn) -> Op:
        what = draw(st.sampled_from(["cmd", "flags", "range", "align", "zero", "flush", "huge"]))
        seed = draw(st.integers(0, 1 << 30))
        if what == "cmd":
            cmd = draw(st.sampled_from([5, 7, 8, 9, 10, 11, 100, 0x7FFF, 0xFFFF]))
            return Op(cmd, draw(st.integers(0, 0xFFFF)), draw(u64), draw(u32), False)
        if what == "flags":
            cmd = draw(st.sampled_from([R, W, TRIM, WZ, FL]))
            bad = draw(
                st.sampled_from([4, 8, 32, 64, 0x100, 0x8000, FAST_ZERO] + ([NO_HOLE] if cmd != WZ else []))
            )
            if cmd == FL:
                return Op(FL, bad, 0, 0, False)
            n = draw(st.integers(1, 64))
            start = draw(st.integers(0, sectors - n))
            return Op(cmd, bad | (FUA if draw(st.booleans()) else 0), start * 512, n * 512, False, seed)
        if what == "range":
            cmd = draw(st.sampled_from([R, W, TRIM, WZ]))
            length = draw(st.integers(1, 64)) * 512
            offset = draw(
                st.one_of(st.integers(size - length + 1, size + 8 * KiB), u64.filter(lambda o: o > size))
            )
            if cmd != R:
                offset -= offset % 512 if draw(st.booleans()) else 0
                offset = max(offset, size - length + 512)
            return Op(cmd, 0, offset, length, False, seed)
        if what == "align":
            cmd = draw(st.sampled_from([W, TRIM, WZ]))
            offset = draw(st.integers(0, size - 128 * KiB))
            length = draw(st.integers(1, 64 * KiB))
            if offset % 512 == 0 and length % 512 == 0:
                length += draw(st.integers(1, 511))
            return Op(cmd, 0, offset, length, False, seed)
        if what == "zero":
            cmd = draw(st.sampled_from([R, W, TRIM, WZ]))
            return Op(cmd, 0, draw(st.integers(0, sectors - 1)) * 512, 0, False)
        if what == "flush":
            return Op(FL, 0, draw(st.integers(0, size)), draw(st.integers(1, 1 << 20)), False)
        return Op(R, 0, 0, draw(st.integers(nbd.MAX_REQUEST + 1, (1 << 32) - 1)), False)

    return st.one_of(valid(), valid(), invalid())


TERMINALS = ["disc", "close", "bad_magic", "big_write", "half_write", "torn_header"]


class Shadow:
    def __init__(self, size: int) -> None:
        self.data = np.zeros(size, dtype=np.uint8)
        self.care = np.ones(size, dtype=bool)

    def apply(self, op: Op) -> None:
        a, b = op.offset, op.offset + op.length
        if op.cmd == W:
            self.data[a:b] = np.frombuffer(op.payload(), dtype=np.uint8)
            self.care[a:b] = True
        elif op.cmd == WZ:
            self.data[a:b] = 0
            self.care[a:b] = True
        elif op.cmd == TRIM:
            self.care[a:b] = False  # content unspecified until written again

    def matches(self, offset: int, data: bytes) -> bool:
        got = np.frombuffer(data, dtype=np.uint8)
        want = self.data[offset : offset + len(data)]
        care = self.care[offset : offset + len(data)]
        return bool(np.array_equal(got[care], want[care]))


def run_stream(path: str, shadow: Shadow, ops: list[Op], pipelined: bool, terminal: str) -> None:
    c = NbdClient(path)
    try:
        c.connect()
        errors: list[str] = []

        def send_all() -> None:
            for i, op in enumerate(ops):
                c.send_request(op.cmd, op.offset, op.length, op.flags, op.payload(), cookie=1000 + i)

        sender = threading.Thread(target=send_all) if pipelined else None
        if sender is not None:
            sender.start()
        for i, op in enumerate(ops):
            if sender is None:
                c.send_request(op.cmd, op.offset, op.length, op.flags, op.payload(), cookie=1000 + i)
            err, cookie = c.reply()
            assert cookie == 1000 + i, (cookie, i)
            if op.valid:
                assert err == 0, f"valid {op} failed with {err}"
                if op.cmd == R and not shadow.matches(op.offset, c.recv_exact(op.length)):
                    errors.append(f"{op} read wrong data")
                shadow.apply(op)
            else:
                assert err not in (0, nbd.EIO), f"invalid {op} answered {err}"
        if sender is not None:
            sender.join()
        assert errors == []
        if terminal == "disc":
            c.send_request(DISC, 0, 0)
            assert c.at_eof()
        elif terminal == "bad_magic":
            c.send_request(R, 0, 512, magic=0x12345678)
            assert c.at_eof()
        elif terminal == "big_write":
            c.send_request(W, 0, nbd.MAX_REQUEST + 512, 0, b"\xab" * 4096)
            assert c.at_eof()
        elif terminal == "half_write":
            c.send_request(W, 0, 8192, 0, b"\xcd" * 4096)
        elif terminal == "torn_header":
            c.send(struct.pack(">IHH", nbd.REQUEST_MAGIC, 0, W))
    finally:
        c.close()


@pytest.mark.parametrize(("level", "n", "examples"), [(10, 4, 60), (1, 2, 25)], ids=["raid10", "raid1"])
def test_random_request_streams(
    tmp_path: Path, rundir: Path, monkeypatch: pytest.MonkeyPatch, level: int, n: int, examples: int
) -> None:
    members = make_members(tmp_path, level=level, n=n, size_mib=8, assume_clean=True)
    sizes = [os.path.getsize(p) for p in members]
    array = Array.assemble(members)
    bad_writes = guard_member_writes(array, monkeypatch)
    server = InProcServer(array, str(rundir / "fuzz.sock"))
    size = array.array_bytes
    shadow = Shadow(size)
    try:

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            ops=st.lists(ops_for(size), max_size=24),
            pipelined=st.booleans(),
            terminal=st.sampled_from(TERMINALS),
        )
        def one_stream(ops: list[Op], pipelined: bool, terminal: str) -> None:
            # a failed (shrunk) example may have left the array ahead of the shadow: resync it
            shadow.data[:] = np.frombuffer(array.read(0, size // 512), dtype=np.uint8)
            shadow.care[:] = True
            run_stream(server.path, shadow, ops, pipelined, terminal)
            assert server.errors == []
            with NbdClient(server.path) as fresh:  # the server still takes new connections
                fresh.connect()
                assert shadow.matches(0, fresh.read(0, 64 * KiB))
            assert shadow.matches(0, array.read(0, size // 512)), "array content differs from the shadow"
            assert bad_writes == []

        one_stream()
    finally:
        server.close()
    assert server.errors == []
    assert bad_writes == []
    assert run_sync(array, SyncKind.CHECK).mismatches == 0
    array.stop()
    assert [os.path.getsize(p) for p in members] == sizes
