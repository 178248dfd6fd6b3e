"""``llraid serve``: a running array, its NBD export and its control channel.

One process per array. The array, the NBD server and the control server share one asyncio
loop; blocking administration (fail, re-add, sync) runs in worker threads, the md thread does
safe mode and the resync/recovery md would start, the bitmap has its own daemon.

Files in the runtime directory (``$LLRAID_RUNTIME_DIR``, else ``/run/llraid`` for root, else
``$XDG_RUNTIME_DIR/llraid``, else ``/tmp/llraid-$UID``), named after the array UUID:

* ``<uuid>.nbd``  the NBD socket (unless ``--listen`` or ``--socket`` say otherwise)
* ``<uuid>.ctl``  the control socket: one JSON request per connection, one JSON reply
* ``<uuid>.json`` who serves what (pid, sockets, members), for ``llraid status``

The runtime directory is trusted only if it is a real directory owned by the caller with no
access for group or others (as ssh-agent, tmux and systemd demand of theirs): in a shared
``/tmp`` another user could otherwise create it first and plant a registry entry or socket that
captures ``stop`` or forges ``status``. Both ends of the control socket also check who is on
the other side (``SO_PEERCRED``): the same user or root, nobody else.

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
import re
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llraid.array import Array, Rdev, RdevState
from llraid.bitmap.base import NoBitmap, SyncKind
from llraid.device import path_identity
from llraid.errors import LlraidError
from llraid.export.nbd import NbdServer
from llraid.format.superblock import MAX_SECTOR
from llraid.sync import SyncStats, needed_sync, run_sync
from llraid.tunables import tunable

log = logging.getLogger("llraid.serve")

CONTROL_LIMIT = 64 * 1024  # bytes in one control request line; real requests are < 1 KiB
MD_POLL_MAX = 1.0  # the md thread looks at least this often (a new setting, a needed sync)
# commands that change the array: refused when it is served read-only
_WRITING = frozenset({"fail", "remove", "re-add", "add", "replace"})


def runtime_dir() -> Path:
    env = os.environ.get("LLRAID_RUNTIME_DIR")
    if env:
        if not os.path.isabs(env):  # server and clients run in different directories
            raise LlraidError(f"LLRAID_RUNTIME_DIR must be an absolute path, not {env!r}")
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/llraid")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative path is to be ignored
        return Path(xdg) / "llraid"
    return Path(f"/tmp/llraid-{os.getuid()}")


def _trusted(uid: int) -> bool:
    """Whom we talk to and whose files we believe: ourselves and root."""
    return uid in (os.geteuid(), 0)


def check_private_dir(path: Path) -> None:
    """Refuse a runtime directory others can use or replace (lstat: a symlink is refused too)."""
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise LlraidError(f"runtime directory {path} is a symbolic link: refusing it (remove it)")
    if not stat.S_ISDIR(st.st_mode):
        raise LlraidError(f"runtime directory {path} is not a directory: refusing it (remove it)")
    if st.st_uid != me:
        raise LlraidError(
            f"runtime directory {path} belongs to uid {st.st_uid}, not to you (uid {me}): refusing it "
            "(remove it, or set LLRAID_RUNTIME_DIR to a directory of yours)"
        )
    if st.st_mode & 0o077:
        raise LlraidError(
            f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can use it, "
            f"refusing it (chmod 700 {path})"
        )


def prepare_runtime_dir(path: Path | None = None) -> Path:
    """Create the runtime directory (0700) if needed and check that it is private."""
    path = path or runtime_dir()
    with contextlib.suppress(OSError):  # if it matters, the mkdir below says why
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask; it is ours, just made
    except FileExistsError:
        pass
    except OSError as e:
        raise LlraidError(f"cannot create runtime directory {path}: {e.strerror}") from None
    try:
        check_private_dir(path)
    except OSError as e:
        raise LlraidError(f"cannot use runtime directory {path}: {e.strerror}") from None
    return path


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


_STATUS_NAME = re.compile(r"(.+)\[([0-9]+|-)\](?:\([FSR]\))?", re.ASCII)


def find_member(rdevs: list[Rdev], name: str, serving: Callable[[int], Rdev | None]) -> Rdev:
    """The member ``name`` means, in any form ``status`` or ``detail`` print: a path (the caller
    made it absolute), a basename, a role number, or ``basename[role]`` as in ``m1.img[1](F)``.
    ``serving(role)`` is the member serving a role (not its replacement being built)."""

    def role_of(r: int) -> list[Rdev]:
        d = serving(r)
        if d is not None:
            return [d]
        return [d for d in rdevs if d.role == r and d.state is RdevState.FAULTY]  # failed, not removed

    hits: list[Rdev] = []
    status = _STATUS_NAME.fullmatch(name)
    if status:
        base, role = status.group(1), status.group(2)
        hits = [
            d
            for d in rdevs
            if os.path.basename(d.path) == base and (str(d.role) if d.role is not None else "-") == role
        ]
    if "/" in name:
        same = [d for d in rdevs if os.path.abspath(d.path) == os.path.normpath(name)]
        if not same and os.path.exists(name):
            want = path_identity(name)
            same = [d for d in rdevs if d.device.fd >= 0 and d.device.identity() == want]
        hits += [d for d in same if d not in hits]
    else:
        hits += [d for d in rdevs if os.path.basename(d.path) == name and d not in hits]
        if name.isascii() and name.isdigit():
            hits += [d for d in role_of(int(name)) if d not in hits]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        by_role = sorted(rdevs, key=lambda d: (d.role is None, d.role or 0))
        known = ", ".join(_status_name(d) for d in by_role)
        shown = name if len(name) <= 256 else name[:256] + "..."
        raise LlraidError(f"no member {shown!r} in this array (members: {known})")
    raise LlraidError(
        f"{name!r} is ambiguous: it names {' and '.join(d.path for d in hits)}; use the full path"
    )


def _status_name(d: Rdev) -> str:
    return f"{os.path.basename(d.path)}[{'-' if d.role is None else d.role}]"


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
            target=self._run_logged, args=(kind, unwritten), name=f"llraid-{kind.value}", daemon=True
        )
        self.thread.start()

    def _run_logged(self, kind: SyncKind, unwritten: bool) -> None:
        """A sync the user asked for, in its own thread: a failure is one log line (``detail``
        shows how far it got), not a thread traceback."""
        try:
            self.run(kind, unwritten)
        except Exception as e:
            log.error("%s stopped: %s: %s", kind.value, type(e).__name__, e)

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self.uri = ""
        self.ready = False  # on_ready ran: the array was served (a stop before that is an abort)
        self.md_error: str | None = None  # why the md thread gave up, if it did
        self._md_stop = threading.Event()
        self._md_thread: threading.Thread | None = None
        # members this array had (path -> last role), so `re-add NAME` finds one that left
        self._former: dict[str, int | None] = {}
        self._note_members()

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Service], None] | None = None) -> None:
        """Serve until SIGTERM, SIGINT or ``stop``; every file made here is removed on the way out,
        whatever the way out is (a signal during startup, a failed bind, a failed stop)."""
        prepare_runtime_dir(self.rundir)
        self._stop = asyncio.Event()
        self._loop = loop = asyncio.get_running_loop()
        # First of all: from here on a Ctrl-C is a stop request, not a KeyboardInterrupt that
        # could land between creating a file and recording it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        made: list[str] = []
        control: asyncio.base_events.Server | None = None
        try:
            if self.listen is not None:
                host, port = self.listen
                port = await self.nbd.listen_tcp(host, port)
                shown = f"[{host}]" if ":" in host else host
                self.uri = f"nbd://{shown}:{port}/{self.nbd.name}"
            else:
                assert self.socket_path is not None
                _unlink_stale(self.socket_path)
                await self.nbd.listen_unix(self.socket_path)
                made.append(self.socket_path)
                self.uri = f"nbd+unix:///{self.nbd.name}?socket={self.socket_path}"
            _unlink_stale(self.control_path)
            control = await asyncio.start_unix_server(
                self._control, path=self.control_path, limit=CONTROL_LIMIT
            )
            made.append(self.control_path)
            os.chmod(self.control_path, 0o600)
            made.append(str(self.info_path))
            self._write_info()
            self._md_thread = threading.Thread(target=self._md_loop, name="llraid-md", daemon=True)
            self._md_thread.start()
            if not self._stop.is_set():  # interrupted while starting: never say "serving"
                self.ready = True
                if on_ready:
                    on_ready(self)
            await self._stop.wait()
        finally:
            try:
                if control is not None:
                    control.close()
                await self.nbd.close()
                await loop.run_in_executor(None, self._shutdown)
            finally:
                for p in made:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
        if self.md_error is not None:
            raise LlraidError(f"stopped: the md thread failed: {self.md_error}")

    def request_stop(self) -> None:
        """From any thread: stop serving (as SIGTERM does)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: stopped anyway
                self._loop.call_soon_threadsafe(self._stop.set)

    def _shutdown(self) -> None:
        self._md_stop.set()
        self.syncer.close()
        if self._md_thread is not None:
            self._md_thread.join()
        self.array.stop()

    def _md_period(self) -> float:
        return min(self.array.safe_mode_delay / 2, MD_POLL_MAX)

    def _md_loop(self) -> None:
        """Safe mode and the syncs md starts by itself (resync after a crash, recovery).

        An error in one round is logged and the next round runs (a member may have failed in
        between); the loop itself never ends on one. If it ends anyway, the array must not go
        on without safe mode and automatic resync: the service stops cleanly."""
        last = ""  # the error of the previous round: a lasting one is logged once, not every round
        try:
            while not self._md_stop.wait(self._md_period()):
                try:
                    self.array.try_mark_clean()
                    if not self.syncer.lock.locked() and needed_sync(self.array) is not None:
                        self.syncer.run(None)
                    last = ""
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    if error != last:
                        log.error("md thread: %s (retrying)", error)
                    last = error
        except BaseException as e:
            self.md_error = f"{type(e).__name__}: {e}"
            log.error("md thread failed (%s): stopping the array", self.md_error)
            self.request_stop()

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
            sock = writer.get_extra_info("socket")
            pid, uid, _ = peer_credentials(sock)
            if not _trusted(uid):
                # the socket is 0600 in a 0700 directory; this only matters if someone opened it up
                log.warning("control connection from uid %d (pid %d) refused", uid, pid)
                reply: dict[str, Any] = {
                    "ok": False,
                    "error": f"permission denied for uid {uid}",
                }
            else:
                reply = await self._request(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        bad = 'bad request: want {"cmd": "...", "args": ["...", ...]} on one line'
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
        except ValueError:  # asyncio's LimitOverrunError: no newline within CONTROL_LIMIT
            log.warning("control request longer than %d bytes refused", CONTROL_LIMIT)
            return {"ok": False, "error": f"bad request: longer than {CONTROL_LIMIT} bytes"}
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            return {"ok": False, "error": bad}
        cmd = req.get("cmd") if isinstance(req, dict) else None
        args = req.get("args", []) if isinstance(req, dict) else None
        if (
            not isinstance(cmd, str)
            or not isinstance(args, list)
            or not all(isinstance(a, str) for a in args)
        ):
            return {"ok": False, "error": bad}
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._dispatch, cmd, args)
        except LlraidError as e:
            return {"ok": False, "error": str(e)}
        except UnicodeError:  # a name with a lone surrogate: no file can have it
            return {"ok": False, "error": "bad request: a name that is not a valid file name"}
        except Exception as e:
            log.exception("control command %s", cmd)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if cmd == "stop":
            assert self._stop is not None
            self._stop.set()
        return {"ok": True, "result": result}

    def _note_members(self) -> None:
        for d in self.array.rdevs:
            self._former[d.path] = d.role

    def _member(self, name: str) -> Rdev:
        return find_member(self.array.rdevs, name, self.array.by_role)

    def _former_member(self, name: str) -> str:
        """The path of a member that left the array, by the name ``status`` gave it; else the
        name itself (the caller made paths absolute)."""
        if "/" in name:
            return name
        present = {d.path for d in self.array.rdevs}
        gone = {p: r for p, r in self._former.items() if p not in present}
        status = _STATUS_NAME.fullmatch(name)
        hits: list[str] = []
        if status:  # m1.img[1] as status showed it
            base, role = status.group(1), status.group(2)
            hits = [p for p, r in gone.items() if os.path.basename(p) == base and role == str(r)]
        if not hits:  # a basename, or the role it had
            hits = [
                p
                for p, r in gone.items()
                if os.path.basename(p) == name or (name.isascii() and name.isdigit() and r == int(name))
            ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise LlraidError(f"{name!r} is ambiguous: it names {' and '.join(hits)}; use the full path")
        return name

    def _dispatch(self, cmd: str, args: list[str]) -> Any:
        a = self.array
        self._note_members()

        def one() -> str:
            if len(args) != 1:
                raise LlraidError(f"{cmd} takes one argument")
            return args[0]

        if a.readonly and (cmd in _WRITING or (cmd == "sync" and args[:1] != ["idle"])):
            raise LlraidError(f"{cmd}: the array is served read-only")
        if cmd == "detail":
            return self.detail()
        if cmd == "status":
            return self.status()
        if cmd == "fail":
            d = a.fail(self._member(one()))
            return f"set {d.path} faulty"
        if cmd == "remove":
            d = self._member(one())
            a.remove(d)
            return f"removed {d.path}"
        if cmd == "re-add":
            d = a.re_add(self._former_member(one()))
            return f"re-added {d.path} as role {d.role}"
        if cmd == "add":
            d = a.add_spare(one())
            return f"added {d.path}" + (f" into role {d.role}" if d.role is not None else " as a spare")
        if cmd == "replace":
            if len(args) != 2:
                raise LlraidError("replace takes the member to replace and the new device")
            d = a.replace(self._member(args[0]), args[1])
            return f"replacing role {d.role} with {d.path}"
        if cmd == "bits":
            return a.bitmap.bits_view()
        if cmd == "metadata":
            return a.bitmap.metadata_view()
        if cmd == "get":
            return self._get(one())
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

    # ---- settings (md's sysfs files) ---------------------------------------------------------------

    def _bitmap_setting(self, name: str) -> None:
        """Refuse a bitmap setting this array's bitmap does not have."""
        bm = self.array.bitmap
        if isinstance(bm, NoBitmap):
            if self.array.sb.has_bitmap:  # read-only raid4/5: served without loading it
                raise LlraidError(f"{name}: the bitmap is not loaded (the array is served read-only)")
            raise LlraidError(f"{name}: this array has no bitmap")
        if name == "barrier_idle" and not hasattr(bm, "barrier_idle"):
            raise LlraidError(f"barrier_idle: only the lockless bitmap has it (this one is {bm.kind.value})")

    def _value(self, name: str) -> float:
        bm = self.array.bitmap
        if name in ("daemon_sleep", "barrier_idle"):
            self._bitmap_setting(name)
            return float(bm.daemon_sleep if name == "daemon_sleep" else bm.barrier_idle)  # type: ignore[attr-defined]
        if name == "safe_mode_delay":
            return self.array.safe_mode_delay
        return float(self.syncer.speed_limit or 0)  # sync_speed_max

    def _get(self, name: str) -> str:
        t = tunable(name)
        return t.show(self._value(name))

    def _set(self, name: str, text: str) -> str:
        """Validate everything first; only then change one thing (and undo it if recording it fails)."""
        t = tunable(name)
        value = t.parse(text)
        if name == "daemon_sleep" and self.array.readonly:
            raise LlraidError("daemon_sleep: the array is served read-only (it is recorded on disk)")
        old = self._value(name)  # also refuses a setting this array does not have
        bm = self.array.bitmap
        if name == "daemon_sleep":
            bm.daemon_sleep = value
            try:
                self.array.update_sb()  # the new period is recorded in the bitmap superblock
            except BaseException:
                bm.daemon_sleep = old
                raise
        elif name == "barrier_idle":
            bm.barrier_idle = value  # type: ignore[attr-defined]
        elif name == "safe_mode_delay":
            self.array.safe_mode_delay = value
        else:
            self.syncer.speed_limit = value or None
        return f"{name} {t.show(value)}"

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
    """Remove a socket left by a killed server, but never steal a live one, and never remove
    anything that is not a socket (``--socket`` may name any path)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LlraidError(f"{path} exists and is not a socket: not replacing it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise LlraidError(f"{path} is in use by a running server")


def _check_control_socket(path: str) -> None:
    """Talk only to a control socket that we or root made (the registry could be stale)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise LlraidError(f"cannot talk to {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise LlraidError(f"{path} is not a socket: refusing to use it")
    if not _trusted(st.st_uid):
        raise LlraidError(f"{path} belongs to uid {st.st_uid}, not to you or root: refusing to use it")


def control_request(path: str, cmd: str, args: list[str] | None = None, timeout: float = 600) -> Any:
    """Send one control command to a running ``llraid serve``; returns its result."""
    _check_control_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        pid, uid, _ = peer_credentials(s)
        if not _trusted(uid):  # checked before a word is sent: a stop must not reach a stranger
            raise LlraidError(
                f"{path} is served by uid {uid} (pid {pid}), not by you or root: refusing to use it"
            )
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
    except (ValueError, RecursionError):
        raise LlraidError(f"no valid reply from {path}") from None
    if not isinstance(reply, dict):
        raise LlraidError(f"no valid reply from {path}")
    if not reply.get("ok"):
        raise LlraidError(str(reply.get("error")))
    return reply.get("result")


def running_arrays() -> list[dict[str, Any]]:
    """Registry entries of live servers (stale entries of dead processes are ignored, and so is
    anything that neither we nor root wrote). The directory must be private (see the module)."""
    out: list[dict[str, Any]] = []
    d = runtime_dir()
    try:
        check_private_dir(d)
    except FileNotFoundError:
        return out  # nothing was ever served here
    except OSError as e:
        raise LlraidError(f"cannot use runtime directory {d}: {e.strerror}") from None
    for p in sorted(d.glob("*.json")):
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or not _trusted(st.st_uid):
                continue
            info = json.loads(p.read_bytes())
            if not isinstance(info, dict) or not all(
                isinstance(info.get(k), str) for k in ("uuid", "name", "control")
            ):
                continue
            pid = info.get("pid")
            if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1, 0) would "find" a process group
                continue
            os.kill(pid, 0)
        except (ValueError, RecursionError, OSError):
            continue
        out.append(info)
    return out
