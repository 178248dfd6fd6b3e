"""The NBD server at the protocol level, with a raw-socket client (no libnbd in between).

The server runs in-process (:class:`NbdServer` on a loop in a thread) in front of a real raid10
array on sparse files. Every test ends with the same checks (in the fixture): no connection
handler crashed (``on_error`` never called), the member files did not grow, and no member data
write landed outside the members' data areas.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.export import nbd
from llraid.sync import run_sync
from tests.export.conftest import (
    InProcServer,
    NbdClient,
    OptionError,
    guard_member_writes,
    make_members,
)

MiB = 1 << 20


@dataclass
class Env:
    array: Array
    server: InProcServer
    members: list[str]
    bad_writes: list[str]

    @property
    def size(self) -> int:
        return self.array.array_bytes

    def client(self) -> NbdClient:
        return NbdClient(self.server.path)

    def connected(self, name: str = "") -> NbdClient:
        c = self.client()
        c.connect(name)
        return c


EnvFactory = Callable[..., Env]


@pytest.fixture
def make_env(tmp_path: Path, rundir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EnvFactory]:
    made: list[tuple[Env, list[int]]] = []

    def make(*, readonly: bool = False, name: str = "", size_mib: int = 24) -> Env:
        where = tmp_path / f"a{len(made)}"
        where.mkdir()
        members = make_members(where, size_mib=size_mib, assume_clean=True)
        if readonly:
            Array.assemble(members).stop()  # started once read-write: real content and bitmap
        array = Array.assemble(members, readonly=readonly)
        bad = guard_member_writes(array, monkeypatch)
        server = InProcServer(array, str(rundir / f"s{len(made)}.sock"), readonly=readonly, name=name)
        env = Env(array, server, members, bad)
        made.append((env, [os.path.getsize(p) for p in members]))
        return env

    try:
        yield make
    finally:
        for env, _ in made:
            env.server.close()
            env.array.stop()
        for env, sizes in made:
            assert env.server.errors == [], f"a connection handler crashed: {env.server.errors!r}"
            assert env.bad_writes == [], f"member writes outside the data area: {env.bad_writes}"
            assert [os.path.getsize(p) for p in env.members] == sizes, "a member file grew"


@pytest.fixture
def env(make_env: EnvFactory) -> Env:
    return make_env()


def still_serves(env: Env, c: NbdClient | None = None) -> None:
    """The connection (or, if None, a fresh one) answers a valid read."""
    if c is None:
        with env.connected() as fresh:
            assert len(fresh.read(0, 4096)) == 4096
    else:
        assert len(c.read(0, 4096)) == 4096


# ---- handshake -------------------------------------------------------------------------------------


def test_go_reports_size_flags_and_block_sizes(env: Env) -> None:
    with env.client() as c:
        gflags = c.handshake()
        assert gflags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        info = c.info("", [nbd.INFO_NAME, nbd.INFO_DESCRIPTION, nbd.INFO_BLOCK_SIZE])
        assert info.size == env.size == 2 * 22 * MiB
        want = (
            nbd.TF_HAS_FLAGS
            | nbd.TF_SEND_FLUSH
            | nbd.TF_SEND_FUA
            | nbd.TF_SEND_TRIM
            | nbd.TF_SEND_WRITE_ZEROES
            | nbd.TF_CAN_MULTI_CONN
        )
        assert info.flags == want
        assert info.name == b""
        assert info.description == b"llraid array"
        assert info.block_sizes == (512, 4096, 32 * MiB)
        c.write(0, b"x" * 512)
        assert c.read(0, 512) == b"x" * 512


def test_info_then_go_on_one_connection(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        info = c.info("", opt=nbd.OPT_INFO)
        assert info.size == env.size
        c.info("")  # GO after INFO: now in transmission
        still_serves(env, c)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_with_and_without_zeroes(env: Env, no_zeroes: bool) -> None:
    cflags = nbd.FLAG_FIXED_NEWSTYLE | (nbd.FLAG_NO_ZEROES if no_zeroes else 0)
    with env.client() as c:
        c.handshake(cflags)
        c.send_option(nbd.OPT_EXPORT_NAME, b"")
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert size == env.size and flags & nbd.TF_HAS_FLAGS
        if not no_zeroes:
            assert c.recv_exact(124) == bytes(124)
        still_serves(env, c)  # the next bytes are exactly the reply: no stray padding


def test_export_name_unknown_closes(make_env: EnvFactory) -> None:
    env = make_env(name="vol")
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_EXPORT_NAME, b"other")
        assert c.at_eof()
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_EXPORT_NAME, b"vol")
        size, _ = struct.unpack(">QH", c.recv_exact(10))
        assert size == env.size


def test_list(make_env: EnvFactory) -> None:
    env = make_env(name="vol")
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_LIST)
        replies = c.option_replies(nbd.OPT_LIST)
        assert replies == [(nbd.REP_SERVER, struct.pack(">I", 3) + b"vol")]
        # LIST with data is invalid, but the session goes on
        c.send_option(nbd.OPT_LIST, b"junk")
        with pytest.raises(OptionError) as e:
            c.option_replies(nbd.OPT_LIST)
        assert e.value.rtype == nbd.REP_ERR_INVALID
        info = c.info("vol", [nbd.INFO_NAME])
        assert info.name == b"vol"
        still_serves(env, c)


@pytest.mark.parametrize("opt", [nbd.OPT_INFO, nbd.OPT_GO])
def test_unknown_export_gets_rep_err_unknown(make_env: EnvFactory, opt: int) -> None:
    env = make_env(name="vol")
    with env.client() as c:
        c.handshake()
        with pytest.raises(OptionError) as e:
            c.info("nope", opt=opt)
        assert e.value.rtype == nbd.REP_ERR_UNKNOWN
        with pytest.raises(OptionError) as e:
            c.info("vol2", opt=opt)
        assert e.value.rtype == nbd.REP_ERR_UNKNOWN
        # the empty name means the default export, and the right name works
        assert c.info("", opt=nbd.OPT_INFO).size == env.size
        c.info("vol")
        still_serves(env, c)


@pytest.mark.parametrize(
    "opt",
    [
        5,  # STARTTLS
        8,  # STRUCTURED_REPLY
        9,  # LIST_META_CONTEXT
        10,  # SET_META_CONTEXT
        11,  # EXTENDED_HEADERS
        0,
        0xDEADBEEF,
    ],
)
def test_unsupported_option_gets_rep_err_unsup(env: Env, opt: int) -> None:
    with env.client() as c:
        c.handshake()
        c.send_option(opt, b"\0\0\0\0")
        with pytest.raises(OptionError) as e:
            c.option_replies(opt)
        assert e.value.rtype == nbd.REP_ERR_UNSUP
        c.info("")  # and the client falls back to what is supported
        still_serves(env, c)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # shorter than name length + request count
        b"\0\0\0\x05ab\0\0",  # name length past the end
        struct.pack(">I", 0) + struct.pack(">H", 3) + b"\0\x01",  # 3 requests announced, 1 sent
        struct.pack(">I", 0) + struct.pack(">HH", 0, 1),  # trailing bytes
        struct.pack(">I", 0xFFFFFFFF) + b"\0\0",
    ],
)
def test_malformed_info_gets_rep_err_invalid(env: Env, body: bytes) -> None:
    with env.client() as c:
        c.handshake()
        for opt in (nbd.OPT_INFO, nbd.OPT_GO):
            c.send_option(opt, body)
            with pytest.raises(OptionError) as e:
                c.option_replies(opt)
            assert e.value.rtype == nbd.REP_ERR_INVALID
        c.info("")
        still_serves(env, c)


def test_long_options(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_GO, b"\0" * 5000)  # longer than the server's limit: refused, skipped
        with pytest.raises(OptionError) as e:
            c.option_replies(nbd.OPT_GO)
        assert e.value.rtype == nbd.REP_ERR_TOO_BIG
        c.info("")
        still_serves(env, c)
    with env.client() as c:
        c.handshake()
        c.send(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 0xFFFFFFFF))  # 4 GiB announced: hang up
        assert c.at_eof()
    still_serves(env)


def test_opt_abort(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_ABORT)
        opt, rtype, data = c.option_reply()
        assert (opt, rtype, data) == (nbd.OPT_ABORT, nbd.REP_ACK, b"")
        assert c.at_eof()
    still_serves(env)


@pytest.mark.parametrize("cflags", [0, nbd.FLAG_NO_ZEROES, nbd.FLAG_FIXED_NEWSTYLE | 4, 0xFFFFFFFF])
def test_bad_client_flags_close(env: Env, cflags: int) -> None:
    with env.client() as c:
        c.handshake(cflags)
        assert c.at_eof()
    still_serves(env)


def test_bad_option_magic_closes(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        c.send_option(nbd.OPT_GO, b"", magic=0x1234)
        assert c.at_eof()
    still_serves(env)


def test_client_vanishes_during_handshake(env: Env) -> None:
    for cut in (0, 2, 4, 10):
        with env.client() as c:
            c.greeting()
            c.send((struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 100))[:cut])
    still_serves(env)


# ---- transmission: every bad request gets an error and the connection goes on -----------------------

R, W, DISC, FL, TRIM, WZ = (
    nbd.CMD_READ,
    nbd.CMD_WRITE,
    nbd.CMD_DISC,
    nbd.CMD_FLUSH,
    nbd.CMD_TRIM,
    nbd.CMD_WRITE_ZEROES,
)
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
SIZE = 2 * 22 * MiB  # the env array: raid10 n2 on 4 x 24 MiB members
END = 1 << 64

BAD = [
    # (id, cmd, flags, offset, length, errno)
    ("read past end", R, 0, SIZE - 512, 1024, nbd.EINVAL),
    ("read at end", R, 0, SIZE, 512, nbd.EINVAL),
    ("read at 2^64-512", R, 0, END - 512, 512, nbd.EINVAL),
    ("read offset+length wraps 2^64", R, 0, END - 512, 1024, nbd.EINVAL),
    ("read of more than the maximum", R, 0, 0, 32 * MiB + 512, nbd.EINVAL),
    ("read of 4 GiB", R, 0, 0, 0xFFFFFFFF, nbd.EINVAL),
    ("read of 0 bytes", R, 0, 0, 0, nbd.EINVAL),
    ("write past end", W, 0, SIZE - 512, 1024, nbd.ENOSPC),
    ("write at 2^64-512", W, 0, END - 512, 512, nbd.ENOSPC),
    ("write unaligned offset", W, 0, 100, 512, nbd.EINVAL),
    ("write unaligned length", W, 0, 512, 100, nbd.EINVAL),
    ("write of 0 bytes", W, 0, 0, 0, nbd.EINVAL),
    ("write with NO_HOLE", W, NO_HOLE, 0, 512, nbd.EINVAL),
    ("write with FAST_ZERO", W, FAST_ZERO, 0, 512, nbd.EINVAL),
    ("write with unknown flag", W, 0x20, 0, 512, nbd.EINVAL),
    ("trim past end", TRIM, 0, SIZE - 512, 1024, nbd.ENOSPC),
    ("trim unaligned", TRIM, 0, 512, 700, nbd.EINVAL),
    ("trim of 0 bytes", TRIM, 0, 0, 0, nbd.EINVAL),
    ("write_zeroes past end", WZ, 0, SIZE, 512, nbd.ENOSPC),
    ("write_zeroes unaligned", WZ, 0, 1, 512, nbd.EINVAL),
    ("write_zeroes with FAST_ZERO", WZ, FAST_ZERO, 0, 512, nbd.ENOTSUP),
    ("write_zeroes with unknown flag", WZ, 0x8000, 0, 512, nbd.EINVAL),
    ("flush with a range", FL, 0, 0, 512, nbd.EINVAL),
    ("flush with an offset", FL, 0, 4096, 0, nbd.EINVAL),
    ("read with DF", R, 4, 0, 512, nbd.EINVAL),
    ("read with REQ_ONE", R, 8, 0, 512, nbd.EINVAL),
    ("CACHE (not advertised)", 5, 0, 0, 512, nbd.EINVAL),
    ("BLOCK_STATUS (not negotiated)", 7, 0, 0, 512, nbd.EINVAL),
    ("unknown command 0x7fff", 0x7FFF, 0, 0, 0, nbd.EINVAL),
    ("unknown command 0xffff", 0xFFFF, 0, 123, 456, nbd.EINVAL),
]


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "errno"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request_gets_error_and_connection_survives(
    env: Env, cmd: int, flags: int, offset: int, length: int, errno: int
) -> None:
    marker = random.Random(1).randbytes(4096)
    with env.connected() as c:
        c.write(0, marker)
        c.write(SIZE - 4096, marker)
        payload = b"\xee" * length if cmd == W else b""
        err, data = c.request(cmd, offset, length, flags, payload)
        assert (err, data) == (errno, b"")
        # the connection goes on, and nothing was written anywhere
        assert c.read(0, 4096) == marker
        assert c.read(SIZE - 4096, 4096) == marker
        c.flush()
    assert env.server.server.stats.errors == 1
    assert env.server.server.stats.by_error == {errno: 1}
    assert env.array.read_bytes(512, 1024) == marker[512:1536]


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (R, FUA, 0, 512),  # FUA is valid on every command once negotiated
        (FL, FUA, 0, 0),
        (TRIM, FUA, 4096, 4096),
        (WZ, NO_HOLE, 4096, 4096),
        (WZ, NO_HOLE | FUA, 0, 3 * MiB + 512),  # more than one internal zero buffer
        (TRIM, 0, 0, SIZE),  # the whole array in one go
        (WZ, 0, 0, SIZE),
        (R, 0, SIZE - 1, 1),  # reads need no alignment
        (R, 0, 3, 1000),
        (R, 0, 0, 32 * MiB),  # exactly the maximum
    ],
)
def test_edge_requests_are_accepted(env: Env, cmd: int, flags: int, offset: int, length: int) -> None:
    with env.connected() as c:
        err, data = c.request(cmd, offset, length, flags)
        assert err == 0
        if cmd == R:
            assert len(data) == length
        still_serves(env, c)


def test_write_read_zero_trim_roundtrip(env: Env) -> None:
    rnd = random.Random(7)
    with env.connected() as c:
        blob = rnd.randbytes(3 * MiB)
        c.write(1 * MiB + 512, blob)
        assert c.read(1 * MiB + 512, len(blob)) == blob
        assert c.read(1 * MiB + 1000, 5000) == blob[488:5488]  # unaligned read inside
        c.write(5 * MiB, blob[: 64 << 10], fua=True)
        assert env.array.read_bytes(5 * MiB, 64 << 10) == blob[: 64 << 10]
        err, _ = c.request(WZ, 2 * MiB, MiB + 4096, FUA)
        assert err == 0
        assert c.read(2 * MiB, MiB + 4096) == bytes(MiB + 4096)
        assert c.read(1 * MiB + 512, MiB - 512) == blob[: MiB - 512]
        assert c.read(3 * MiB + 4096, 512) == blob[2 * MiB + 3584 : 2 * MiB + 4096]
        err, _ = c.request(TRIM, 8 * MiB, 4 * MiB)
        assert err == 0
        full = rnd.randbytes(32 * MiB)  # the advertised maximum write
        c.write(SIZE - 32 * MiB, full)
        assert env.array.read_bytes(SIZE - 32 * MiB, 32 * MiB) == full
        c.flush()
        c.disconnect()
    st = env.server.server.stats
    assert st.errors == 0 and st.flushes >= 1
    assert run_sync(env.array, SyncKind.CHECK).mismatches == 0


def test_oversized_write_closes_without_writing(env: Env) -> None:
    with env.connected() as c:
        c.write(0, b"\x11" * 4096)
        c.send_request(W, 0, 32 * MiB + 512, 0, b"\x22" * 65536)
        assert c.at_eof()
    with env.connected() as c:
        assert c.read(0, 4096) == b"\x11" * 4096


def test_bad_request_magic_closes(env: Env) -> None:
    with env.connected() as c:
        c.send_request(R, 0, 512, magic=0x25609514)
        assert c.at_eof()
    still_serves(env)


def test_client_disconnects_mid_request(env: Env) -> None:
    with env.connected() as c:
        c.write(0, b"\x33" * 65536)
    # a write whose payload never fully arrives is not applied, not even in part
    with env.connected() as c:
        c.send_request(W, 0, 65536, 0, b"\x44" * 30000)
    with env.connected() as c:
        c.send(struct.pack(">IHHQ", nbd.REQUEST_MAGIC, 0, W, 1))  # a torn request header
    # a client that asks for a big read and leaves without reading the answer
    with env.connected() as c:
        c.send_request(R, 0, 16 * MiB)
        c.send_request(R, 0, 16 * MiB)
    time.sleep(0.2)
    env.server.idle()
    with env.connected() as c:
        assert c.read(0, 65536) == b"\x33" * 65536


def test_disc_flushes_and_closes(env: Env) -> None:
    with env.connected() as c:
        c.write(0, b"d" * 4096)
        before = env.server.server.stats.flushes
        c.send_request(DISC, 0, 0)
        assert c.at_eof()
    assert env.server.server.stats.flushes == before + 1


def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    """Many requests in flight on one connection (what fio does at iodepth > 1)."""
    rnd = random.Random(3)
    ops: list[tuple[int, int, int, bytes]] = []
    for i in range(300):
        off = rnd.randrange(0, 256) * 4096
        if i % 3 == 0:
            ops.append((W, off, 4096, rnd.randbytes(4096)))
        elif i % 3 == 1:
            ops.append((R, off, 4096, b""))
        else:
            ops.append((R, SIZE, 512, b""))  # an error in the middle of the stream
    with env.connected() as c:
        cookies: list[int] = []

        def sender() -> None:
            for cmd, off, n, payload in ops:
                cookies.append(c.send_request(cmd, off, n, 0, payload))

        t = threading.Thread(target=sender)
        t.start()
        shadow = {}
        for i, (cmd, off, n, payload) in enumerate(ops):
            err, cookie = c.reply()
            while len(cookies) <= i:
                time.sleep(0.001)
            assert cookie == cookies[i]
            if cmd == W:
                assert err == 0
                shadow[off] = payload
            elif off == SIZE:
                assert err == nbd.EINVAL
            else:
                assert err == 0
                data = c.recv_exact(n)
                if off in shadow:
                    assert data == shadow[off]
        t.join()


def test_readonly_export_refuses_writes(make_env: EnvFactory) -> None:
    env = make_env(readonly=True)
    with env.client() as c:
        c.handshake()
        info = c.info("")
        assert info.flags & nbd.TF_READ_ONLY
        assert not info.flags & (nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES)
        before = c.read(0, 4096)
        assert c.request(W, 0, 4096, 0, b"w" * 4096) == (nbd.EPERM, b"")
        assert c.request(W, 0, 4096, FUA, b"w" * 4096) == (nbd.EPERM, b"")
        assert c.request(TRIM, 0, 4096) == (nbd.EPERM, b"")
        assert c.request(WZ, 0, 4096) == (nbd.EPERM, b"")
        assert c.request(FL, 0, 0) == (0, b"")
        assert c.read(0, 4096) == before
    assert env.array.counters.member_written == {}


def test_server_close_ends_connections(env: Env) -> None:
    c1 = env.connected()
    c2 = env.connected()
    c1.write(0, b"c" * 512)
    env.server.call(env.server.server.close())
    assert c1.at_eof() and c2.at_eof()
    c1.close()
    c2.close()
    assert env.server.server.stats.flushes >= 1


# ---- multi-conn: a flush on any connection covers writes acknowledged on every connection --------------


class SlowFlushDevice:
    """The array, plus a record of which writes a completed flush covers (slow flushes, so they overlap)."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.lock = threading.Lock()
        self.completed = 0  # writes returned so far
        self.durable = 0  # writes covered by a finished flush
        self.flush_calls = 0

    @property
    def array_bytes(self) -> int:
        return self.array.array_bytes

    def read(self, sector: int, count: int) -> bytes:
        return self.array.read(sector, count)

    def write(self, sector: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.array.write(sector, data, fua=fua)
        with self.lock:
            self.completed += 1

    def flush(self) -> None:
        with self.lock:
            snapshot = self.completed
            self.flush_calls += 1
        time.sleep(0.01)
        self.array.flush()
        with self.lock:
            self.durable = max(self.durable, snapshot)

    def discard(self, sector: int, count: int) -> None:
        self.array.discard(sector, count)


def test_multi_conn_flush_covers_other_connections(env: Env, rundir: Path) -> None:
    # With the real array: a write on A, a FLUSH on B runs an fdatasync round; a FLUSH on A
    # afterwards has nothing left to do (A's write is known durable through B's flush).
    a, b = env.connected(), env.connected()
    a.write(0, b"a" * 4096)
    st = env.server.server.stats
    before = st.flushes
    b.flush()
    assert st.flushes == before + 1
    a.flush()
    assert st.flushes == before + 1
    a.close()
    b.close()

    # Under load: 2 writers and 3 flushers on separate connections, slow flushes.
    dev = SlowFlushDevice(env.array)
    srv = InProcServer(dev, str(rundir / "mc.sock"))
    try:
        stop = threading.Event()
        failures: list[str] = []

        def writer(k: int) -> None:
            rnd = random.Random(k)
            with NbdClient(srv.path) as c:
                c.connect()
                while not stop.is_set():
                    c.write(rnd.randrange(0, 1024) * 4096, rnd.randbytes(4096))

        def flusher() -> None:
            with NbdClient(srv.path) as c:
                c.connect()
                for _ in range(25):
                    with dev.lock:
                        need = dev.completed  # every write acknowledged so far (and a few more)
                    c.flush()
                    with dev.lock:
                        if dev.durable < need:
                            failures.append(f"flush returned with {dev.durable} < {need} writes durable")

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        flushers = [threading.Thread(target=flusher) for _ in range(3)]
        for t in threads + flushers:
            t.start()
        for t in flushers:
            t.join(60)
        stop.set()
        for t in threads:
            t.join(60)
        assert failures == []
        fst = srv.server.stats
        assert fst.flush_requests == 75
        assert dev.completed > 0
        assert fst.flushes == dev.flush_calls <= fst.flush_requests
    finally:
        srv.close()
    assert srv.errors == []
