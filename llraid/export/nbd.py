"""An NBD server (fixed newstyle, simple replies) in front of an :class:`~llraid.array.Array`.

Protocol subset: handshake with NBD_FLAG_FIXED_NEWSTYLE / NO_ZEROES; options EXPORT_NAME, LIST,
INFO, GO, ABORT (anything else gets NBD_REP_ERR_UNSUP, so clients fall back to simple replies);
commands READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+FUA), DISC.

Design (measured on this machine kind, see ../shared/research/exports.md): requests are handled
inline in the connection's read loop, with no task or thread per request; member IO is plain
pread/pwrite. Only ``fdatasync`` runs in a thread, and FLUSHes are coalesced: one sync round
covers every write acknowledged before it started, on every connection (the array's members
are shared), which is why CAN_MULTI_CONN is advertised.

Every request is checked before it touches the array: magic, command, flags, alignment (512),
bounds and length (``MAX_REQUEST``). A bad request gets an NBD error and the connection goes
on; a request that cannot be skipped safely (bad magic, an oversized write payload) closes the
connection. Nothing here can write a member outside the array: the array checks bounds too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("llraid.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1
TF_READ_ONLY = 2
TF_SEND_FLUSH = 4
TF_SEND_FUA = 8
TF_SEND_TRIM = 32
TF_SEND_WRITE_ZEROES = 64
TF_CAN_MULTI_CONN = 256

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_FAST_ZERO = 16

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
ENOTSUP = 95
ESHUTDOWN = 108

SECTOR = 512
MIN_BLOCK = 512
PREFERRED_BLOCK = 4096
MAX_REQUEST = 32 << 20  # NBD's recommended maximum payload
MAX_OPTION = 4096
_ZEROS = bytes(1 << 20)

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class BlockDevice(Protocol):
    """What the server needs: the array's IO entry points (sector based)."""

    @property
    def array_bytes(self) -> int: ...

    def read(self, sector: int, count: int) -> bytes: ...

    def write(self, sector: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def discard(self, sector: int, count: int) -> None: ...


@dataclass
class ServerStats:
    connections: int = 0
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0  # fdatasync rounds actually run
    flush_requests: int = 0
    by_error: dict[int, int] = field(default_factory=dict)


class _Disconnect(Exception):
    """Close this connection (cleanly, or because the peer broke the protocol)."""


class NbdServer:
    """Serves one export (the array) to any number of connections on one asyncio loop."""

    def __init__(
        self,
        dev: BlockDevice,
        *,
        name: str = "",
        description: str = "llraid array",
        readonly: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.dev = dev
        self.name = name
        self.description = description
        self.readonly = readonly
        self.on_error = on_error
        self.stats = ServerStats()
        self._write_gen = 0  # writes acknowledged so far
        self._durable_gen = 0  # writes known durable (covered by a completed flush round)
        self._flush_running: asyncio.Future[None] | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self.closing = False

    @property
    def transmission_flags(self) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN
        if self.readonly:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    # ---- listening ----------------------------------------------------------------------------

    async def listen_unix(self, path: str) -> None:
        srv = await asyncio.start_unix_server(self.handle, path=path)
        self._servers.append(srv)

    async def listen_tcp(self, host: str, port: int) -> int:
        srv = await asyncio.start_server(self.handle, host=host, port=port)
        self._servers.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every connection (between requests: nothing is half done)."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        for w in list(self._conns):
            w.transport.abort()  # a client that stopped reading must not hold up the stop
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        await self.flush()

    # ---- one connection -------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self._conns.add(writer)
        try:
            if await self._negotiate(reader, writer):
                await self._transmission(reader, writer)
        except (_Disconnect, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:  # never let one client take the server down
            log.exception("nbd connection failed")
            if self.on_error:
                self.on_error(e)
        finally:
            self._conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=5)

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))
        if not cflags & FLAG_FIXED_NEWSTYLE or cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise _Disconnect("client does not speak fixed newstyle")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(await reader.readexactly(_OPT.size))
            if magic != IHAVEOPT:
                raise _Disconnect("bad option magic")
            if length > MAX_OPTION:
                if length > 1 << 20:
                    raise _Disconnect("absurd option length")
                await reader.readexactly(length)
                await self._opt_reply(writer, opt, REP_ERR_TOO_BIG, b"option too long")
                continue
            data = await reader.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") not in ("", self.name):
                    raise _Disconnect("unknown export")  # no way to report an error here
                writer.write(struct.pack(">QH", self.dev.array_bytes, self.transmission_flags))
                if not no_zeroes:
                    writer.write(bytes(124))
                await writer.drain()
                return True
            if opt == OPT_ABORT:
                await self._opt_reply(writer, opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                if data:
                    await self._opt_reply(writer, opt, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                name = self.name.encode()
                await self._opt_reply(writer, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                await self._opt_reply(writer, opt, REP_ACK)
                continue
            if opt in (OPT_INFO, OPT_GO):
                if await self._info(writer, opt, data) and opt == OPT_GO:
                    return True
                continue
            await self._opt_reply(writer, opt, REP_ERR_UNSUP, b"option not supported")

    async def _info(self, writer: asyncio.StreamWriter, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            await self._opt_reply(writer, opt, REP_ERR_INVALID, b"short request")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            await self._opt_reply(writer, opt, REP_ERR_INVALID, b"bad name length")
            return False
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            await self._opt_reply(writer, opt, REP_ERR_INVALID, b"bad information request list")
            return False
        requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        if name not in ("", self.name):
            await self._opt_reply(writer, opt, REP_ERR_UNKNOWN, b"no such export")
            return False
        await self._opt_reply(
            writer,
            opt,
            REP_INFO,
            struct.pack(">HQH", INFO_EXPORT, self.dev.array_bytes, self.transmission_flags),
        )
        if INFO_NAME in requests:
            await self._opt_reply(writer, opt, REP_INFO, struct.pack(">H", INFO_NAME) + self.name.encode())
        if INFO_DESCRIPTION in requests:
            await self._opt_reply(
                writer, opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + self.description.encode()
            )
        await self._opt_reply(
            writer,
            opt,
            REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST),
        )
        await self._opt_reply(writer, opt, REP_ACK)
        return True

    async def _opt_reply(self, writer: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        writer.write(_OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rtype, len(data)) + data)
        await writer.drain()

    # ---- transmission -----------------------------------------------------------------------------

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = self.dev.array_bytes
        while not self.closing:
            magic, flags, cmd, cookie, offset, length = _REQ.unpack(await reader.readexactly(_REQ.size))
            if magic != REQUEST_MAGIC:
                raise _Disconnect("bad request magic")
            self.stats.requests += 1
            if cmd == CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _Disconnect("write payload larger than the advertised maximum")
                payload = await reader.readexactly(length)
            if cmd == CMD_DISC:
                await self.flush()
                return
            err = self._check(cmd, flags, offset, length, size)
            data = b""
            if not err:
                try:
                    if cmd == CMD_READ:
                        data = self._read(offset, length)
                    elif cmd == CMD_WRITE:
                        self.dev.write(offset // SECTOR, payload, fua=bool(flags & CMD_FLAG_FUA))
                        self._write_gen += 1
                        self.stats.bytes_written += length
                    elif cmd == CMD_FLUSH:
                        self.stats.flush_requests += 1
                        await self.flush()
                    elif cmd == CMD_TRIM:
                        self.dev.discard(offset // SECTOR, length // SECTOR)
                    elif cmd == CMD_WRITE_ZEROES:
                        self._write_zeroes(offset, length, bool(flags & CMD_FLAG_FUA))
                except Exception as e:
                    log.warning("request %d at %d+%d failed: %s", cmd, offset, length, e)
                    err = EIO
            if err:
                self.stats.errors += 1
                self.stats.by_error[err] = self.stats.by_error.get(err, 0) + 1
                data = b""
            writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))
            if data:
                writer.write(data)
                self.stats.bytes_read += len(data)
            await writer.drain()  # returns at once unless the client stopped reading

    def _check(self, cmd: int, flags: int, offset: int, length: int, size: int) -> int:
        known = {CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES}
        if cmd not in known:
            return EINVAL
        if flags & ~(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO):
            return EINVAL
        if flags & CMD_FLAG_FAST_ZERO:
            return ENOTSUP if cmd == CMD_WRITE_ZEROES else EINVAL  # zeroing here is never "fast"
        if flags & CMD_FLAG_NO_HOLE and cmd != CMD_WRITE_ZEROES:
            return EINVAL
        if cmd == CMD_FLUSH:
            return EINVAL if offset or length else 0
        if self.readonly and cmd != CMD_READ:
            return EPERM
        if length == 0:
            return EINVAL
        if offset + length > size:
            return EINVAL if cmd == CMD_READ else ENOSPC
        if cmd == CMD_READ and length > MAX_REQUEST:
            return EINVAL
        if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM) and (offset % SECTOR or length % SECTOR):
            return EINVAL  # the advertised minimum block size: no torn read-modify-write
        return 0

    def _read(self, offset: int, length: int) -> bytes:
        first = offset // SECTOR
        last = (offset + length + SECTOR - 1) // SECTOR
        data = self.dev.read(first, last - first)
        skip = offset - first * SECTOR
        return data if skip == 0 and len(data) == length else data[skip : skip + length]

    def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(_ZEROS), end - pos)
            self.dev.write(pos // SECTOR, memoryview(_ZEROS)[:n], fua=fua)
            pos += n
        self._write_gen += 1
        self.stats.bytes_written += length

    async def flush(self) -> None:
        """Every write acknowledged before this call is durable when it returns (all connections)."""
        target = self._write_gen
        loop = asyncio.get_running_loop()
        while self._durable_gen < target:
            running = self._flush_running
            if running is not None:
                await asyncio.shield(running)
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._flush_running = fut
            gen = self._write_gen
            try:
                await loop.run_in_executor(None, self.dev.flush)
                self.stats.flushes += 1
                self._durable_gen = max(self._durable_gen, gen)
            finally:
                self._flush_running = None
                fut.set_result(None)
