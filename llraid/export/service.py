"""``llraid serve``: a running array, its NBD export and its control channel.

One process per array. The array, the NBD server and the control server share one asyncio
loop; blocking administration (fail, re-add, sync) runs in worker threads, the md thread does
safe mode and the resync/recovery md would start, the bitmap has its own daemon.

Files in the runtime directory (``$LLRAID_RUNTIME_DIR``, else ``/run/llraid`` for root, else
``$XDG_RUNTIME_DIR/llraid``, else ``/tmp/llraid-$UID``), named after the array UUID:

* ``<uuid>.nbd``  the NBD socket (unless ``--listen`` or ``--socket`` say otherwise)
* ``<uuid>.ctl``  the control socket: one JSON request per connection, one JSON reply
* ``<uuid>.json`` who serves what (pid, sockets, members), for ``llraid status``

Stopping: SIGTERM, SIGINT or the ``stop`` command close the NBD server between requests, flush,
stop the array cleanly (bitmap flushed, superblocks marked clean) and remove the files. SIGKILL
leaves the superblocks "active" and the bitmap as it was on disk: the next ``serve`` resyncs
exactly what the bitmap marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llraid.array import Array, RdevState
from llraid.bitmap.base import SyncKind
from llraid.errors import LlraidError
from llraid.export.nbd import NbdServer
from llraid.format.superblock import MAX_SECTOR
from llraid.sync import SyncStats, needed_sync, run_sync

log = logging.getLogger("llraid.serve")


def runtime_dir() -> Path:
    env = os.environ.get("LLRAID_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/llraid")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "llraid"
    return Path(f"/tmp/llraid-{os.getuid()}")


class SyncRunner:
    """One sync at a time, in a thread, with progress md-style (md's sync_action/sync_completed)."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.kind: str = "idle"
        self.done = 0
        self.total = 0
        self.started = 0.0
        self.last: SyncStats | None = None
        self.thread: threading.Thread | None = None
        self.speed_limit: float | None = None
        self.closed = False

    def _progress(self, kind: str, done: int, total: int) -> None:
        self.kind, self.done, self.total = kind, done, total

    def run(self, kind: SyncKind | None, unwritten: bool = False) -> SyncStats | None:
        with self.lock:
            if self.closed:
                return None
            kind = kind or needed_sync(self.array)
            if kind is None:
                return None
            self.stop.clear()
            if self.closed:  # close() ran after the first check: its stop must not be lost
                self.stop.set()
                return None
            self.kind, self.done, self.total, self.started = kind.value, 0, 0, time.monotonic()
            try:
                self.last = run_sync(
                    self.array, kind, stop=self.stop, progress=self._progress, speed_limit=self.speed_limit,
                    unwritten=unwritten,
                )  # fmt: skip
            finally:
                self.kind, self.done, self.total = "idle", 0, 0  # the result is in ``last``
            return self.last

    def start(self, kind: SyncKind, unwritten: bool = False) -> None:
        if self.lock.locked():
            raise LlraidError(f"a {self.kind} is running; 'sync idle' stops it")
        self.thread = threading.Thread(
            target=self.run, args=(kind, unwritten), name=f"llraid-{kind.value}", daemon=True
        )
        self.thread.start()

    def interrupt(self) -> None:
        """Stop the running sync (md's sync_action idle); the md thread may start another."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def close(self) -> None:
        """Stop for good: the running sync ends and no new one starts."""
        self.closed = True  # before the stop event: run() checks it after clearing the event
        self.interrupt()

    def status(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started if self.kind != "idle" else 0.0
        return {
            "action": self.kind,
            "done": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else None,
            "elapsed": round(elapsed, 1),
            "last": self.last.as_dict() if self.last else None,
        }


class Service:
    def __init__(
        self,
        array: Array,
        *,
        socket_path: str | None = None,
        listen: tuple[str, int] | None = None,
        readonly: bool = False,
        name: str = "",
    ) -> None:
        self.array = array
        self.rundir = runtime_dir()
        self.uuid = array.uuid.replace(":", "")
        self.socket_path = socket_path if listen is None else None
        if self.socket_path is None and listen is None:
            self.socket_path = str(self.rundir / f"{self.uuid}.nbd")
        self.listen = listen
        self.control_path = str(self.rundir / f"{self.uuid}.ctl")
        self.info_path = self.rundir / f"{self.uuid}.json"
        self.nbd = NbdServer(array, name=name, readonly=readonly, description=f"llraid {array.uuid}")
        self.syncer = SyncRunner(array)
        self._stop: asyncio.Event | None = None
        self.uri = ""
        self._md_stop = threading.Event()
        self._md_thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Service], None] | None = None) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.listen is not None:
            host, port = self.listen
            port = await self.nbd.listen_tcp(host, port)
            shown = f"[{host}]" if ":" in host else host
            self.uri = f"nbd://{shown}:{port}/{self.nbd.name}"
        else:
            assert self.socket_path is not None
            _unlink_stale(self.socket_path)
            await self.nbd.listen_unix(self.socket_path)
            self.uri = f"nbd+unix:///{self.nbd.name}?socket={self.socket_path}"
        _unlink_stale(self.control_path)
        control = await asyncio.start_unix_server(self._control, path=self.control_path)
        os.chmod(self.control_path, 0o600)
        self._write_info()
        self._md_thread = threading.Thread(target=self._md_loop, name="llraid-md", daemon=True)
        self._md_thread.start()
        if on_ready:
            on_ready(self)
        try:
            await self._stop.wait()
        finally:
            control.close()
            await self.nbd.close()
            await loop.run_in_executor(None, self._shutdown)
            for p in (self.control_path, self.socket_path, str(self.info_path)):
                if p:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)

    def _shutdown(self) -> None:
        self._md_stop.set()
        self.syncer.close()
        if self._md_thread is not None:
            self._md_thread.join()
        self.array.stop()

    def _md_loop(self) -> None:
        """Safe mode and the syncs md starts by itself (resync after a crash, recovery)."""
        while not self._md_stop.wait(self.array.safe_mode_delay / 2):
            try:
                self.array.try_mark_clean()
                if not self.syncer.lock.locked() and needed_sync(self.array) is not None:
                    self.syncer.run(None)
            except Exception:
                log.exception("md thread")

    def _write_info(self) -> None:
        info = {
            "uuid": self.array.uuid,
            "name": self.array.sb.set_name,
            "pid": os.getpid(),
            "nbd_uri": self.uri,
            "nbd_socket": self.socket_path,
            "control": self.control_path,
            "members": [d.path for d in self.array.rdevs],
        }
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.info_path)

    # ---- control channel -------------------------------------------------------------------------

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                req = json.loads(line)
                cmd = str(req["cmd"])
                args = [str(a) for a in req.get("args", [])]
            except (ValueError, KeyError, TypeError):
                reply: dict[str, Any] = {
                    "ok": False,
                    "error": 'bad request: want {"cmd": ..., "args": [...]}',
                }
            else:
                try:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(None, self._dispatch, cmd, args)
                    reply = {"ok": True, "result": result}
                    if cmd == "stop":
                        assert self._stop is not None
                        self._stop.set()
                except LlraidError as e:
                    reply = {"ok": False, "error": str(e)}
                except Exception as e:
                    log.exception("control command %s", cmd)
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _dispatch(self, cmd: str, args: list[str]) -> Any:
        a = self.array

        def one() -> str:
            if len(args) != 1:
                raise LlraidError(f"{cmd} takes one argument")
            return args[0]

        if cmd == "detail":
            return self.detail()
        if cmd == "status":
            return self.status()
        if cmd == "fail":
            a.fail(one())
            return f"set {one()} faulty"
        if cmd == "remove":
            a.remove(one())
            return f"removed {one()}"
        if cmd == "re-add":
            d = a.re_add(os.path.abspath(one()))
            return f"re-added {d.path} as role {d.role}"
        if cmd == "add":
            d = a.add_spare(os.path.abspath(one()))
            return f"added {d.path}" + (f" into role {d.role}" if d.role is not None else " as a spare")
        if cmd == "replace":
            if len(args) != 2:
                raise LlraidError("replace takes the member to replace and the new device")
            d = a.replace(
                os.path.abspath(args[0]) if not args[0].isdigit() else int(args[0]), os.path.abspath(args[1])
            )
            return f"replacing role {d.role} with {d.path}"
        if cmd == "bits":
            return a.bitmap.bits_view()
        if cmd == "metadata":
            return a.bitmap.metadata_view()
        if cmd == "get":
            return str(self._tunable(one()))
        if cmd == "set":
            if len(args) != 2:
                raise LlraidError("set takes a name and a value")
            return self._set(args[0], args[1])
        if cmd == "sync":
            action, flags = (args[0], args[1:]) if args else ("", [])
            if action == "idle" and not flags:
                self.syncer.interrupt()
                return "idle"
            if action == "proactive" and not flags:
                self.array.proactive_sync()  # the md thread starts the parity build
                return "proactive parity build requested"
            if action not in ("check", "repair") or any(f != "--unwritten" for f in flags):
                raise LlraidError(
                    "sync takes check, repair, idle or proactive (check and repair: --unwritten)"
                )
            self.syncer.start(SyncKind(action), unwritten=bool(flags))
            return f"{action}{' of Unwritten chunks' if flags else ''} started"
        if cmd == "stop":
            return "stopping"
        raise LlraidError(f"unknown command {cmd!r}")

    def _tunable(self, name: str) -> float:
        bm = self.array.bitmap
        if name == "daemon_sleep":
            return bm.daemon_sleep
        if name == "barrier_idle" and hasattr(bm, "barrier_idle"):
            return float(bm.barrier_idle)
        if name == "safe_mode_delay":
            return self.array.safe_mode_delay
        if name == "sync_speed_max":
            return self.syncer.speed_limit or 0.0
        raise LlraidError(f"unknown or unsupported setting {name!r}")

    def _set(self, name: str, value: str) -> str:
        try:
            v = float(value)
        except ValueError:
            raise LlraidError(f"{name} needs a number, not {value!r}") from None
        if v <= 0 and name != "sync_speed_max":
            raise LlraidError(f"{name} must be positive")
        self._tunable(name)  # validates the name
        bm = self.array.bitmap
        if name == "daemon_sleep":
            bm.daemon_sleep = v
            self.array.update_sb()  # the new period is recorded in the bitmap superblock
        elif name == "barrier_idle":
            bm.barrier_idle = v  # type: ignore[attr-defined]
        elif name == "safe_mode_delay":
            self.array.safe_mode_delay = v
        elif name == "sync_speed_max":
            self.syncer.speed_limit = v or None
        return f"{name} {value}"

    def status(self) -> dict[str, Any]:
        a = self.array
        slots = []
        for r in range(a.raid_disks):
            d = a.by_role(r)
            slots.append("U" if d is not None and d.state is RdevState.IN_SYNC else "_")
        return {
            "uuid": a.uuid,
            "name": a.sb.set_name,
            "level": f"raid{a.level}",
            "state": "clean" if a.in_sync else "active",
            "degraded": a.is_degraded(),
            "array_bytes": a.array_bytes,
            "members": [
                {"path": d.path, "role": d.role, "state": d.state.value, "recovery_offset": d.recovery_offset}
                for d in a.rdevs
            ],
            "slots": "".join(slots),
            "raid_disks": a.raid_disks,
            "bitmap": a.bitmap.kind.value,
            "sync": self.syncer.status(),
            "nbd_uri": self.uri,
            "pid": os.getpid(),
        }

    def detail(self) -> dict[str, Any]:
        a = self.array
        d = self.status()
        last = self.syncer.last
        d.update(
            mismatch_cnt=last.mismatches if last is not None else 0,  # md: from the last sync action
            events=a.events,
            resync_offset=None if a.resync_cp == MAX_SECTOR else a.resync_cp,
            layout=a.sb.layout,
            chunk_sectors=a.sb.chunksize,
            component_sectors=a.sb.size,
            bits=a.bitmap.bits_view(),
            metadata=a.bitmap.metadata_view(),
            faults=[{"member": m, "reason": r} for m, r in a.fault_log],
            counters={
                "member_read": a.counters.member_read,
                "member_written": a.counters.member_written,
                "sb_writes": a.counters.sb_writes,
                "read_errors_corrected": a.counters.read_errors_corrected,
            },
            nbd={
                "connections": self.nbd.stats.connections,
                "requests": self.nbd.stats.requests,
                "errors": self.nbd.stats.errors,
                "bytes_read": self.nbd.stats.bytes_read,
                "bytes_written": self.nbd.stats.bytes_written,
                "flushes": self.nbd.stats.flushes,
            },
        )
        return d


def _unlink_stale(path: str) -> None:
    """Remove a socket left by a killed server, but never steal a live one."""
    import socket

    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise LlraidError(f"{path} is in use by a running server")


def control_request(path: str, cmd: str, args: list[str] | None = None, timeout: float = 600) -> Any:
    """Send one control command to a running ``llraid serve``; returns its result."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, "args": args or []}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise LlraidError(f"cannot talk to {path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise LlraidError(f"no valid reply from {path}") from None
    if not reply.get("ok"):
        raise LlraidError(str(reply.get("error")))
    return reply.get("result")


def running_arrays() -> list[dict[str, Any]]:
    """Registry entries of live servers (stale entries of dead processes are ignored)."""
    out: list[dict[str, Any]] = []
    d = runtime_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            info = json.loads(p.read_text())
            os.kill(int(info["pid"]), 0)
        except (ValueError, KeyError, OSError):
            continue
        out.append(info)
    return out
