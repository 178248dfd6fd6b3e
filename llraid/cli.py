"""The ``llraid`` command line (mdadm-like).

Every failure that bad input can cause is an :class:`~llraid.errors.LlraidError`; ``main``
turns it into one ``llraid: ...`` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from llraid import logs, units
from llraid.errors import LlraidError

# The heavy modules (numpy through the personalities) are imported where they are used, so that
# `llraid` reaches main()'s KeyboardInterrupt handling within milliseconds of starting: a Ctrl-C
# during a slow import would otherwise print a traceback.
if TYPE_CHECKING:
    from llraid.assemble import Assembly
    from llraid.member import Member

EXIT_ERROR = 1
MEMBER_HELP = "a path, its basename, its role number, or NAME[ROLE] as status prints it"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _size(text: str) -> int:
    """Bytes from '4096', '64K', '1.5M', '2G', '1T', '8S' (binary units, as mdadm)."""
    try:
        return units.parse_size(text)
    except units.UnitError as e:
        raise argparse.ArgumentTypeError(f"not a size: {e.reason}") from None


def _rate(text: str) -> int:
    """Bytes per second from md's KiB/s ('20480') or '20M' (per second)."""
    try:
        return units.parse_rate(text)
    except units.UnitError as e:
        raise argparse.ArgumentTypeError(f"not a rate: {e.reason}") from None


def _level(text: str) -> int:
    from llraid.raid.registry import LEVELS, creatable_names, parse_level

    try:
        level = parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not LEVELS[level].creatable:
        raise argparse.ArgumentTypeError(f"level {text!r} cannot be created ({creatable_names()} can)")
    return level


def _kib_size(text: str) -> int:
    """mdadm sizes: a bare number is KiB."""
    try:
        return units.parse_size(text, bare="K")
    except units.UnitError as e:
        raise argparse.ArgumentTypeError(f"not a size: {e.reason}") from None


def _default_homehost() -> str | None:
    return os.environ.get("LLRAID_HOMEHOST") or socket.gethostname() or None


@contextlib.contextmanager
def open_members(paths: Sequence[str]) -> Iterator[list[Member]]:
    from llraid.member import open_member

    members: list[Member] = []
    try:
        for p in paths:
            members.append(open_member(p))
        yield members
    finally:
        for m in members:
            m.device.close()


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_examine(args: argparse.Namespace) -> int:
    from llraid.examine import examine_json, examine_text

    rc = 0
    out: list[dict[str, Any]] = []
    for path in args.devices:
        try:
            with open_members([path]) as (member,):
                if args.json:
                    out.append(examine_json(member, args.homehost))
                else:
                    sys.stdout.write(examine_text(member, args.homehost))
                if member.checksum_problem and not args.force:
                    _error(member.checksum_problem)
                    rc = EXIT_ERROR
        except LlraidError as e:
            _error(str(e))
            rc = EXIT_ERROR
    if args.json:
        _print_json(out)
    return rc


def cmd_examine_bitmap(args: argparse.Namespace) -> int:
    from llraid.assemble import check_member
    from llraid.examine import examine_bitmap, examine_bitmap_text

    rc = 0
    out: list[dict[str, Any]] = []
    for path in args.devices:
        try:
            with open_members([path]) as (member,):
                check_member(member, force=args.force)
                report = examine_bitmap(member)
                if args.json:
                    out.append(report.data | {"facts": {f[0]: f[1] for f in report.facts if f}})
                else:
                    sys.stdout.write(examine_bitmap_text(report))
        except LlraidError as e:
            _error(str(e))
            rc = EXIT_ERROR
    if args.json:
        _print_json(out)
    return rc


@contextlib.contextmanager
def _assembled(args: argparse.Namespace) -> Iterator[Assembly]:
    from llraid.assemble import assemble

    with open_members(args.devices) as members:
        yield assemble(members, force=args.force, need_bitmap=False)


def cmd_cat(args: argparse.Namespace) -> int:
    from llraid.device import fd_identity, path_identity

    # before anything is opened for writing: `-o MEMBER` would truncate the array's own member
    if args.output is not None and os.path.exists(args.output):
        _not_a_member(path_identity(args.output), args.output, args.devices)
    elif args.output is None:
        if sys.stdout is None:
            raise LlraidError("standard output is closed: give a file with -o FILE")
        fd = _fd_of(sys.stdout.buffer)
        if fd is not None:
            _not_a_member(fd_identity(fd), "standard output", args.devices)
    with _assembled(args) as asm:
        size = asm.array_bytes
        offset = args.offset
        if offset > size:
            raise LlraidError(f"offset {offset} is past the end of the array ({size} bytes)")
        length = size - offset if args.length is None else args.length
        if offset + length > size:
            raise LlraidError(
                f"--length {length} at offset {offset} runs past the end of the array ({size} bytes): "
                f"at most {size - offset}"
            )
        for m in asm.stale:
            _error(f"{m.path} is stale (events {m.sb.events} < {asm.sb.events}): not used")
        if asm.bitmap_problem:
            _error(f"warning: {asm.bitmap_problem}; reading the data without it (reads need no bitmap)")
        if args.output:
            # the array's data: private to its owner, like the members
            with open(args.output, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
                _copy(asm, offset, length, f, args.output)
        else:
            _copy(asm, offset, length, sys.stdout.buffer, "standard output")
    return 0


def _copy(asm: Assembly, offset: int, length: int, out: IO[bytes], name: str) -> None:
    done = 0
    try:
        for piece in asm.iter_bytes(offset, length):
            out.write(piece)
            done += len(piece)
        out.flush()
    except BrokenPipeError:
        raise  # a reader such as `head` went away: main() ends quietly
    except OSError as e:  # a full disk, /dev/full: say where and how far it got
        raise LlraidError(f"{name}: {e.strerror or e}, after {done} of {length} bytes") from None


def cmd_create(args: argparse.Namespace) -> int:
    from llraid.create import CreateSpec, create, parse_layout
    from llraid.format.bitmap import BitmapKind
    from llraid.format.superblock import format_uuid, parse_uuid

    if args.chunk is not None and args.level == 1:
        raise LlraidError("specifying chunk size is forbidden for raid1")
    # 0 is a value, not "the default": mdadm refuses it too
    chunk = 0 if args.level == 1 else (512 * 1024 if args.chunk is None else args.chunk)
    if args.level == 10 and (chunk < 4096 or chunk & (chunk - 1)):
        raise LlraidError(f"chunk size must be a power of two from 4K to 512G, not {chunk} bytes")
    minor = {"1.2": 2, "1.1": 1, "1.0": 0, "1": 2, "default": 2}.get(args.metadata)
    if minor is None:
        raise LlraidError(f"unknown metadata version {args.metadata!r} (1.0, 1.1, 1.2)")
    n = len(args.devices) if args.raid_devices is None else args.raid_devices
    if n < 1:
        raise LlraidError(f"invalid number of raid devices: {n}")
    if n == 1 and not args.force:
        raise LlraidError("1 is an unusual number of drives for an array (no redundancy); use --force")
    spec = CreateSpec(
        level=args.level,
        raid_devices=n,
        layout=parse_layout(args.level, args.layout),
        chunk_sectors=chunk // 512,
        bitmap={"lockless": BitmapKind.LOCKLESS, "internal": BitmapKind.CLASSIC, "none": BitmapKind.NONE}[
            args.bitmap
        ],
        assume_clean=args.assume_clean,
        name=args.name,
        minor=minor,
        size=None if args.size is None else args.size // 512,
        homehost=args.homehost or None,
        uuid=parse_uuid(args.uuid) if args.uuid else None,
    )
    sbs = create(args.devices, spec, force=args.force)
    sb = sbs[0]
    print(
        f"llraid: created raid{args.level} {format_uuid(sb.set_uuid)} on {n} member{'s' if n > 1 else ''}, "
        f"{sb.size * 512} bytes each, bitmap {args.bitmap}"
    )
    return 0


WRITE_PIECE = 4 << 20  # bytes read from the input and written at a time: memory stays bounded


def _fd_of(f: IO[bytes]) -> int | None:
    try:
        return f.fileno()
    except (OSError, ValueError):  # a stream without a descriptor (one a test put in place)
        return None


def _known_size(f: IO[bytes]) -> int | None:
    """Bytes left in ``f`` if it is a regular file or block device; None for pipes, ttys, /dev/zero."""
    fd = _fd_of(f)
    if fd is None:
        return None
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return None
    try:
        here = os.lseek(fd, 0, os.SEEK_CUR)
        end = os.lseek(fd, 0, os.SEEK_END)  # block devices report 0 in st_size
        os.lseek(fd, here, os.SEEK_SET)
    except OSError:  # /proc and /sys files: read them as a stream
        return None
    return max(end - here, 0)


def _member_identities(devices: Sequence[str]) -> dict[tuple[int, int], str]:
    from llraid.device import path_identity

    found: dict[tuple[int, int], str] = {}
    for dev in devices:
        with contextlib.suppress(LlraidError):  # a missing member is reported by the assembly
            found[path_identity(dev)] = dev
    return found


def _not_a_member(ident: tuple[int, int], name: str, devices: Sequence[str]) -> None:
    """Refuse to copy between the array and one of its own members: it would overwrite itself."""
    dev = _member_identities(devices).get(ident)
    if dev is not None:
        raise LlraidError(f"{name} is {'' if dev == name else dev + ', '}a member of the array")


def cmd_write(args: argparse.Namespace) -> int:
    from llraid.array import Array
    from llraid.device import fd_identity

    with contextlib.ExitStack() as stack:
        if args.input in (None, "-"):
            if sys.stdin is None:
                raise LlraidError("standard input is closed: give the data with -i FILE")
            src, name = sys.stdin.buffer, "standard input"
        else:
            src, name = stack.enter_context(open(args.input, "rb")), args.input
        fd = _fd_of(src)
        if fd is not None:
            _not_a_member(fd_identity(fd), name, args.devices)
        # Everything that can be refused is refused before the array is started (starting it
        # may already write: bitmap first use, a catch-up of the superblocks).
        with _assembled(args) as asm:
            capacity = asm.array_bytes - args.offset
        if capacity < 0:
            raise LlraidError(f"offset {args.offset} is past the end of the array ({asm.array_bytes} bytes)")
        size = _known_size(src)
        if size is not None and size > capacity:
            raise LlraidError(
                f"{name} holds {size} bytes; at offset {args.offset} the array has room for {capacity} "
                f"(array {asm.array_bytes} bytes): nothing written"
            )
        array = Array.assemble(args.devices, run=args.run, force=args.force)
        written = 0

        def done() -> str:
            return f"wrote {written} bytes at offset {args.offset} (up to byte {args.offset + written})"

        def read(n: int) -> bytes:
            try:
                return src.read(n)
            except OSError as e:
                raise LlraidError(f"cannot read {name}: {e.strerror or e}") from None

        try:
            while written < capacity:
                piece = read(min(WRITE_PIECE, capacity - written))
                if not piece:
                    break
                array.write_bytes(args.offset + written, piece)
                written += len(piece)
            # a stream (pipe, /dev/zero) may go on past the end: one more byte tells
            more = written == capacity and len(read(1)) > 0
            array.flush()
        except KeyboardInterrupt:
            array.stop()
            _error(f"interrupted: {done()}")
            raise
        except (LlraidError, OSError) as e:
            array.stop()
            raise LlraidError(f"{_os_error_text(e)}; {done()}") from None
        except BaseException:
            array.stop()
            raise
        array.stop()
    if more:
        raise LlraidError(
            f"{name} is larger than the array ({asm.array_bytes} bytes): {done()}, the end of the array; "
            "the rest of the input was not written"
        )
    print(f"llraid: wrote {written} bytes at offset {args.offset}", file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from llraid.array import Array
    from llraid.bitmap.base import SyncKind
    from llraid.sync import SyncStats, run_sync, sync_until_idle

    if (
        len(args.devices) == 1
        and args.devices[0] in ("check", "repair", "idle", "proactive")
        and not os.path.exists(args.devices[0])
    ):
        # `llraid sync check|repair|idle`: act on the running array, like md's sync_action
        cargs = [args.devices[0]] + (["--unwritten"] if args.unwritten else [])
        result = _control(args, "sync", cargs)
        if args.json:
            _print_json(_as_json("sync", cargs, result))
        else:
            print(result)
        return 0
    if args.unwritten and args.mode not in ("check", "repair"):
        raise LlraidError("--unwritten audits with --mode check or --mode repair")
    array = Array.assemble(args.devices, run=args.run, force=args.force)
    stop = threading.Event()
    passes: list[SyncStats] = []

    def work(progress: Callable[[str, int, int], None] | None) -> None:
        kw: dict[str, Any] = {"speed_limit": args.speed_limit or None, "stop": stop, "progress": progress}
        passes.extend(sync_until_idle(array, **kw))
        if args.mode == "proactive" and all(p.completed for p in passes):
            array.proactive_sync()  # every Unwritten chunk of a raid4/5/6 gets its parity built
            passes.extend(sync_until_idle(array, **kw))
        if args.mode in ("check", "repair") and all(p.completed for p in passes):
            passes.append(run_sync(array, SyncKind(args.mode), unwritten=args.unwritten, **kw))
            if args.unwritten and passes[-1].completed:
                passes.extend(sync_until_idle(array, **kw))  # the resync of what repair marked

    try:
        with _signals_stop(stop) as caught, _sync_progress(not args.json and sys.stderr.isatty()) as progress:
            _in_worker(functools.partial(work, progress))
    except BaseException:
        array.stop()
        raise
    array.stop()
    if args.json:
        _print_json([p.as_dict() for p in passes])
    else:
        if not passes:
            print("llraid: nothing to sync")
        for st in passes:
            print(_sync_summary(st.as_dict()))
    if caught:
        return 128 + caught[0]  # stopped by Ctrl-C (130) or SIGTERM, checkpoint recorded
    return 0 if all(p.completed for p in passes) else EXIT_ERROR


def _in_worker(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread while this (main) thread only waits for it: the signal handlers
    of :func:`_signals_stop` then never interrupt code holding the locks they take."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=run, name="llraid-sync")
    t.start()
    while t.is_alive():
        t.join(0.2)
    if failed:
        raise failed[0]


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT / SIGTERM set ``stop`` (the sync ends cleanly and records its checkpoint) instead
    of raising in the middle of a window; yields the signals caught. The handler runs in the
    main thread, which must not be inside ``stop``'s own lock then (see :func:`_in_worker`)."""
    import signal

    caught: list[int] = []

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _sync_progress(show: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A live bar per sync pass on stderr (rich, as ``llraid bench``), or None when not shown."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} sectors"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as p:

        def update(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind] = p.add_task(kind, total=total)
            p.update(tasks[kind], completed=done, total=total)

        yield update


def _sync_summary(d: dict[str, Any]) -> str:
    audit = d.get("unwritten_audit")
    stopped = "" if d["completed"] else f" at sector {d['stopped_at_sector']} of {d['end_sector']}"
    lines = [
        f"{d['kind']}{' of Unwritten chunks' if audit else ''}: {'done' if d['completed'] else 'interrupted'}"
        + stopped
        + (f" ({d['member']})" if d["member"] else "")
        + f", {d['windows_synced']} windows synced, {d['windows_skipped']} skipped, {d['seconds']} s"
    ]
    if d["kind"] in ("check", "repair"):
        lines.append(f"  mismatch_cnt {d['mismatch_cnt']}, repaired sectors {d['repaired_sectors']}")
    if audit:
        lines.append(
            f"  {audit['chunks_audited']} Unwritten chunks audited, {audit['chunks_with_data']} hold data"
            + (f", {audit['marked_need_sync']} marked NeedSync" if audit["marked_need_sync"] else "")
        )
        for c in audit["chunks"]:
            what = "data differing between copies" if c["copies_differ"] else "data"
            lines.append(f"  chunk {c['chunk']}: array bytes {c['offset']}+{c['bytes']} hold {what}")
    for path in sorted(set(d["bytes_read"]) | set(d["bytes_written"])):
        lines.append(
            f"  {path}: read {d['bytes_read'].get(path, 0)} bytes, written {d['bytes_written'].get(path, 0)}"
        )
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from llraid.array import Array
    from llraid.export.service import Service, prepare_runtime_dir

    # What happens before the service is up (assembly) is told only if it comes up: a serve
    # that fails says why in one error line.
    listen = _hostport(args.listen) if args.listen else None
    prepare_runtime_dir()  # an unsafe runtime directory is refused before the members are touched
    held = logs.setup()
    held.hold()
    try:
        array = Array.assemble(args.devices, run=args.run, force=args.force, readonly=args.readonly)
    except BaseException:
        held.drop()
        raise
    try:
        service = Service(
            array, socket_path=args.socket, listen=listen, readonly=args.readonly, name=args.name
        )

        def ready(s: Service) -> None:
            held.replay()
            print(
                f"llraid: serving {array.uuid} (raid{array.level}, {array.array_bytes} bytes) at {s.uri}",
                flush=True,
            )
            print(f"llraid: control socket {s.control_path}", flush=True)

        asyncio.run(service.run(on_ready=ready))
    except BaseException:
        try:
            if not array.closed:
                array.stop()
        finally:
            held.drop()  # (a no-op once the service was up: its messages went out as they came)
        raise
    if not service.ready:  # SIGINT or SIGTERM before it served anything: stopped, nothing to say
        return EXIT_INTERRUPTED
    print("llraid: stopped cleanly", flush=True)
    return 0


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise LlraidError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _find_array(which: str | None) -> dict[str, Any]:
    from llraid.export.service import running_arrays

    arrays = running_arrays()
    if which:
        if which.endswith(".ctl") and os.path.exists(which):
            return {"control": which, "uuid": which}
        key = which.replace(":", "")
        hits = [
            a
            for a in arrays
            if a["uuid"].replace(":", "").startswith(key) or which in (a["name"], a["name"].split(":")[-1])
        ]
        if len(hits) == 1:
            return hits[0]
        raise LlraidError(f"no single running array matches {which!r}")
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        raise LlraidError("no running array (start one with: llraid serve DEV...)")
    raise LlraidError(f"{len(arrays)} arrays are running; choose one with --array UUID")


def _control(args: argparse.Namespace, cmd: str, cargs: list[str] | None = None) -> Any:
    from llraid.export.service import control_request

    info = _find_array(getattr(args, "array", None))
    return control_request(info["control"], cmd, cargs)


def _member_arg(name: str) -> str:
    """A member name as the server should see it: a path is the caller's, so it is made absolute
    here (the server runs elsewhere); a bare name that is no file here (``m1.img``, ``1``,
    ``m1.img[1]``) is left for the server to match against the names it shows."""
    if "/" in name or os.path.exists(name):
        return os.path.abspath(name)
    return name


def _new_device(path: str) -> str:
    """A device to bring in (add, replace --with): it must exist here."""
    if not os.path.exists(path):
        raise LlraidError(f"{path}: no such file or device")
    return os.path.abspath(path)


def cmd_control(args: argparse.Namespace) -> int:
    from llraid.tunables import tunable

    cmd = args.control_cmd
    cargs = list(getattr(args, "targets", None) or [])
    if cmd in ("set", "get"):
        t = tunable(args.name)  # checked here too: a bad value is refused with no array running
        if cmd == "set":
            t.parse(args.value)
        cargs = [args.name] + ([args.value] if cmd == "set" else [])
    elif cmd == "add":
        cargs = [_new_device(cargs[0])]
    elif cmd == "re-add":
        cargs = [_member_arg(cargs[0])]
    elif cmd in ("fail", "remove", "replace"):
        cargs = [_member_arg(cargs[0])]
        if cmd == "replace":
            cargs.append(_new_device(args.new))
    result = _control(args, cmd, cargs)
    if args.json:
        _print_json(_as_json(cmd, cargs, result))
    elif cmd == "detail":
        print(_detail_text(result))
    elif isinstance(result, str):
        _print_text(result)
    else:
        _print_json(result)
    return 0


def _as_json(cmd: str, cargs: list[str], result: Any) -> Any:
    """What ``--json`` prints for a control command: the server's data where it sends data, the
    sysfs-like views (bits, metadata) as objects, a setting with its number, else the message."""
    if not isinstance(result, str):
        return result
    if cmd in ("bits", "metadata"):
        return _view_json(result)
    if cmd in ("get", "set"):
        name, _, value = (f"{cargs[0]} {result}" if cmd == "get" else result).partition(" ")
        return {"name": name, "value": _number(value)}
    return {"command": cmd, "result": result}


def _view_json(text: str) -> dict[str, Any]:
    """``name value`` lines (md's sysfs style) as an object; numbers as numbers."""
    body = text.strip()
    if body in ("no bitmap", "bitmap io error"):
        return {"error": body}
    out: dict[str, Any] = {}
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        out[name or value] = _number(value)
    return out


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _print_text(text: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n")


def _detail_text(d: dict[str, Any]) -> str:
    sync = d["sync"]
    lines = [
        f"{'UUID':>16} : {d['uuid']}",
        f"{'Name':>16} : {d['name']}",
        f"{'Raid Level':>16} : {d['level']}",
        f"{'Array Size':>16} : {d['array_bytes']} bytes",
        f"{'Raid Devices':>16} : {d['raid_disks']}",
        f"{'State':>16} : {d['state']}"
        + (", degraded" if d["degraded"] else "")
        + (f", {sync['action']}ing" if sync["action"] != "idle" else ""),
        f"{'Events':>16} : {d['events']}",
        f"{'Bitmap':>16} : {d['bitmap']}",
        f"{'NBD':>16} : {d['nbd_uri']}",
    ]
    if sync["action"] != "idle":
        lines.append(f"{sync['action'].capitalize() + ' Status':>16} : {sync['percent']}% complete")
    lines.append(f"{'Mismatch Cnt':>16} : {d.get('mismatch_cnt', 0)}")
    last = sync.get("last")
    if last:
        audit = last.get("unwritten_audit")
        lines.append(
            f"{'Last Sync':>16} : {last['kind']}{' of Unwritten chunks' if audit else ''} "
            + ("done" if last["completed"] else f"interrupted at sector {last.get('stopped_at_sector')}")
            + f", {last['sectors_synced']} sectors, read {sum(last['bytes_read'].values())} bytes,"
            + f" wrote {sum(last['bytes_written'].values())} bytes, mismatch_cnt {last['mismatch_cnt']}"
            + (f", {audit['chunks_with_data']} Unwritten chunks hold data" if audit else "")
        )
    lines.append("")
    lines.append("    Role   State        Device")
    for m in d["members"]:
        role = "-" if m["role"] is None else str(m["role"])
        lines.append(f"    {role:>4}   {m['state']:<12} {m['path']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from llraid.export.service import control_request, running_arrays

    arrays = running_arrays()
    if args.json:
        out: list[dict[str, Any]] = []
        for info in arrays:
            try:
                out.append(control_request(info["control"], "status", timeout=5))
            except LlraidError as e:
                out.append({"uuid": info["uuid"], "error": f"not answering ({e})"})
        _print_json(out)
        return 0
    print("Personalities : [raid1] [raid10]")
    for info in arrays:
        try:
            s = control_request(info["control"], "status", timeout=5)
        except LlraidError as e:
            print(f"{info['uuid']} : not answering ({e})")
            continue
        members = " ".join(
            f"{os.path.basename(m['path'])}[{m['role'] if m['role'] is not None else '-'}]"
            + ("(F)" if m["state"] == "faulty" else "(S)" if m["state"] == "spare" else "")
            for m in s["members"]
        )
        print(f"{s['name'] or s['uuid']} : active {s['level']} {members}")
        n_up = s["slots"].count("U")
        blocks = s["array_bytes"] // 1024
        print(f"      {blocks} blocks [{s['raid_disks']}/{n_up}] [{s['slots']}]  {s['nbd_uri']}")
        print(f"      bitmap: {s['bitmap']}  state: {s['state']}")
        sync = s["sync"]
        if sync["action"] != "idle" and sync["total"]:
            width = 20
            filled = int(width * sync["done"] / sync["total"])
            bar = "=" * max(filled - 1, 0) + ">" + "." * (width - filled)
            print(f"      [{bar}]  {sync['action']} = {sync['percent']}% ({sync['done']}/{sync['total']})")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The README's main job: a raid10 with the lockless bitmap on four files, served over NBD."""
    from llraid.quickstart import run

    return run(args.data, args.member_size)


def cmd_bench(args: argparse.Namespace) -> int:
    from llraid.bench import BenchConfig, run, seq_threads, svg_plot, table_rows

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.threads:
        cfg.threads = args.threads
    if args.iodepth:
        cfg.iodepth = args.iodepth
    if args.seconds:
        cfg.seconds, cfg.raid5_seconds = args.seconds, None
    if args.rounds:
        cfg.rounds = args.rounds
    if args.member_size:
        cfg.member_bytes, cfg.raid5_member_bytes = args.member_size, None
    cfg.nbd = not args.no_nbd
    cfg.raid5 = not args.no_raid5
    if args.json:
        report = run(cfg)
    else:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Table

        console = Console()
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as p:
            task = p.add_task("starting", total=None)
            report = run(cfg, progress=lambda s: p.update(task, description=s))
        title = (
            f"4 KiB random writes, raid10 n2, 4 RAM members, {cfg.threads} threads (median of {cfg.rounds})"
        )
        t = Table(title=title)
        for col in ("bitmap", "MiB/s", "IOPS", "vs none", "vs raw"):
            t.add_column(col, justify="right")
        for row in table_rows(report.summary()):
            t.add_row(*row)
        console.print(t)
        for r in report.fresh:
            console.print(f"fresh array on files, {r.kind}: {r.mib_s:.1f} MiB/s ({r.iops:.0f} IOPS)")
        for n in report.nbd:
            console.print(f"nbd + fio, {n['kind']}: {n.get('mib_s', '-')} MiB/s {n.get('error', '')}")
        for s in report.sync:
            console.print(
                f"{s['kind']}: {s['dirty_percent']}% written -> resync wrote "
                f"{s['resync_bytes_written']} bytes "
                f"in {s['resync_seconds']} s; recovery wrote {s['recovery_bytes_written']} bytes in "
                f"{s['recovery_seconds']} s (array {s['array_bytes']} bytes)"
            )
        if cfg.raid5:
            r5 = report.raid5_summary()
            titles = {
                "random_4k": f"raid5, 3 RAM members, 512K chunks: 4 KiB random writes, {cfg.threads} threads",
                "seq_1m": "raid5: 1 MiB sequential full-stripe writes, "
                f"{seq_threads(cfg)} threads (raw: 1 MiB sequential to one member)",
            }
            for key, title in titles.items():
                t = Table(title=f"{title} (median of {cfg.rounds})")
                for col in ("bitmap", "MiB/s", "IOPS", "vs none", "vs raw"):
                    t.add_column(col, justify="right")
                for row in table_rows(r5[key]):
                    t.add_row(*row)
                console.print(t)
            for s in report.raid5_sync:
                console.print(
                    f"raid5 {s['kind']}: {s['dirty_percent']}% written -> resync read "
                    f"{s['resync_bytes_read']} bytes, wrote {s['resync_bytes_written']} in "
                    f"{s['resync_seconds']} s; recovery wrote {s['recovery_bytes_written']} bytes in "
                    f"{s['recovery_seconds']} s (array {s['array_bytes']} bytes)"
                )
    if args.plot:
        with open(args.plot, "w") as f:
            f.write(svg_plot(report.summary(), cfg.threads))
    if args.json:
        _print_json(report.as_dict())
    return 0


def cmd_torture(args: argparse.Namespace) -> int:
    from llraid.torture import BITMAPS, LEVELS, format_report, run_torture

    levels = args.level or list(LEVELS)
    bitmaps = args.bitmap or list(BITMAPS)

    def progress(done: int, total: int, last: Any) -> None:
        if not args.json and (done % 50 == 0 or done == total):
            print(f"llraid: torture {done}/{total} runs", file=sys.stderr, flush=True)

    report = run_torture(args.runs, args.seed, levels=levels, bitmaps=bitmaps, progress=progress)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(format_report(report))
    return 0 if not report.failures else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from llraid.demo import run_demo

    return run_demo(args.fixture, args.workdir)


def _os_error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = e.filename or ""
        return f"{where}: {e.strerror}" if where and e.strerror else str(e.strerror or e)
    return str(e)


def _error(msg: str) -> None:
    print(f"llraid: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llraid", description="User-space Linux md RAID with the lockless bitmap."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser("examine", aliases=["E"], help="print a member's md superblock like mdadm --examine")
    ex.add_argument("devices", nargs="+", metavar="DEV")
    ex.add_argument("--json", action="store_true", help="the same facts as JSON")
    ex.add_argument("--force", action="store_true", help="exit 0 even if a checksum is wrong")
    ex.add_argument("--homehost", default=_default_homehost(), help="host name for '(local to host ...)'")
    ex.set_defaults(func=cmd_examine)

    xb = sub.add_parser("examine-bitmap", aliases=["X"], help="print a member's bitmap like mdadm -X")
    xb.add_argument("devices", nargs="+", metavar="DEV")
    xb.add_argument("--json", action="store_true")
    xb.add_argument("--force", action="store_true", help="read despite a bad superblock checksum")
    xb.set_defaults(func=cmd_examine_bitmap)

    cat = sub.add_parser(
        "cat", help="read the array's data to standard output or a file (read-only assembly)"
    )
    cat.add_argument("devices", nargs="+", metavar="DEV")
    cat.add_argument("--offset", type=_size, default=0, help="start byte in the array (K/M/G suffixes)")
    cat.add_argument("--length", type=_size, default=None, help="bytes to read (default: to the end)")
    cat.add_argument(
        "-o", "--output", metavar="FILE", help="write the data to FILE (mode 0600 if new) instead of stdout"
    )
    cat.add_argument("--force", action="store_true", help="accept bad checksums / unclean degraded raid5")
    cat.set_defaults(func=cmd_cat)

    cr = sub.add_parser("create", aliases=["C"], help="create an array (mdadm --create defaults)")
    cr.add_argument("devices", nargs="+", metavar="DEV")
    cr.add_argument(
        "--level", "-l", type=_level, required=True, help="1, 10, 4 or 5 (raid1, mirror, raid5, ...)"
    )
    cr.add_argument("--raid-devices", "-n", type=int, default=None, help="default: the number of devices")
    cr.add_argument(
        "--layout",
        "-p",
        default=None,
        help="raid10: n2 (default), f2, o2, n3, ...; raid5: left-symmetric (default), ...",
    )
    cr.add_argument(
        "--chunk",
        "-c",
        type=_kib_size,
        default=None,
        help="chunk size: a power of two from 4K to 512G (default 512K; K if no unit)",
    )
    cr.add_argument("--bitmap", "-b", choices=["lockless", "internal", "none"], default="lockless")
    cr.add_argument("--assume-clean", action="store_true", help="members already agree: no initial sync")
    cr.add_argument("--name", "-N", default="0", help="array name (default 0, as mdadm for /dev/md0)")
    cr.add_argument("--metadata", "-e", default="1.2", help="1.2 (default) or 1.1")
    cr.add_argument(
        "--size", "-z", type=_kib_size, default=None, help="bytes per member to use (K if no unit)"
    )
    cr.add_argument("--homehost", default=_default_homehost(), help="recorded in the name as HOST:NAME")
    cr.add_argument("--uuid", default=None, help="array UUID (default: random)")
    cr.add_argument("--force", action="store_true", help="overwrite devices that hold md or file system data")
    cr.set_defaults(func=cmd_create)

    wr = sub.add_parser("write", help="write data into the array through the full write path")
    wr.add_argument("devices", nargs="+", metavar="DEV")
    wr.add_argument("--offset", type=_size, default=0, help="start byte in the array (K/M/G suffixes)")
    wr.add_argument(
        "-i",
        "--input",
        default=None,
        metavar="FILE",
        help="read data from FILE (default: standard input); it must fit between --offset and the end",
    )
    wr.add_argument("--run", action="store_true", help="start even if degraded")
    wr.add_argument("--force", action="store_true", help="accept bad checksums")
    wr.set_defaults(func=cmd_write)

    sy = sub.add_parser("sync", help="resync / recover what is needed, or check / repair")
    sy.add_argument("devices", nargs="+", metavar="DEV")
    sy.add_argument(
        "--mode",
        choices=["resync", "check", "repair", "proactive"],
        default="resync",
        help="resync (what is needed), check, repair, or proactive (raid4/5/6 with llbitmap: build "
        "the parity of every never-written chunk now)",
    )
    sy.add_argument(
        "--speed-limit",
        type=_rate,
        default=0,
        help="as md's sync_speed_max: KiB/s, or with K/M/G per second (20M = 20 MiB/s); 0 = no limit",
    )
    sy.add_argument("--json", action="store_true")
    sy.add_argument(
        "--unwritten",
        action="store_true",
        help="with check/repair: audit the chunks marked Unwritten for data (repair marks them for resync)",
    )
    sy.add_argument("--run", action="store_true", help="start even if degraded")
    sy.add_argument("--force", action="store_true", help="accept bad checksums")
    sy.set_defaults(func=cmd_sync)

    sv = sub.add_parser("serve", help="assemble and serve the array over NBD")
    sv.add_argument("devices", nargs="+", metavar="DEV")
    where = sv.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None, help="NBD unix socket (default: in the runtime directory)")
    where.add_argument("--listen", default=None, help="TCP HOST:PORT instead (e.g. 127.0.0.1:10809)")
    sv.add_argument("--name", default="", help="NBD export name (default: empty)")
    sv.add_argument("--run", action="store_true", help="start even if degraded")
    sv.add_argument("--readonly", action="store_true")
    sv.add_argument("--force", action="store_true", help="accept bad checksums")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="running arrays, like /proc/mdstat")
    st.add_argument("--json", action="store_true", help="every running array's status as JSON")
    st.set_defaults(func=cmd_status)

    def control(name: str, cmd: str, help: str, nargs: int | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        if nargs:
            what = "DEV" if cmd == "add" else "MEMBER"
            c.add_argument("targets", nargs=nargs, metavar=what, help=None if cmd == "add" else MEMBER_HELP)
        c.add_argument("--array", default=None, help="UUID (prefix) or name of the running array")
        c.add_argument("--json", action="store_true", help="print the result as JSON")
        c.set_defaults(func=cmd_control, control_cmd=cmd)
        return c

    control("detail", "detail", "the running array, like mdadm --detail")
    control("fail", "fail", "mark a member faulty", 1)
    control("remove", "remove", "remove a faulty or spare member", 1)
    control("re-add", "re-add", "bring back a member that left (bitmap-driven recovery)", 1)
    control("add", "add", "add a new member (spare, or into a free slot)", 1)
    rp = control("replace", "replace", "rebuild a new device into a member's role, then fail the member", 1)
    rp.add_argument("--with", dest="new", required=True, metavar="NEWDEV", help="the device that takes over")
    control("bits", "bits", "the bitmap's sysfs 'bits' view")
    control("metadata", "metadata", "the bitmap's sysfs 'metadata' view")
    control("stop", "stop", "stop the running array cleanly")
    from llraid.tunables import TUNABLES, help_text

    se = control("set", "set", "change a setting of the running array (md's sysfs units)")
    se.formatter_class = argparse.RawDescriptionHelpFormatter
    se.epilog = help_text()
    se.add_argument("name", metavar="NAME", help="a setting (below)")
    se.add_argument("value", metavar="VALUE", help="seconds (0.5, 250ms) or KiB/s (20480, 20M)")
    ge = control("get", "get", "read a setting: " + ", ".join(TUNABLES) + " (seconds or KiB/s)")
    ge.add_argument("name", metavar="NAME")
    sy.add_argument("--array", default=None, help="with check|repair|idle: the running array")

    qs = sub.add_parser(
        "quickstart", help="create (first run) or assemble a raid10 on files in DIR and serve it"
    )
    qs.add_argument(
        "--data", default="data", metavar="DIR", help="directory for the member files (default: ./data)"
    )
    qs.add_argument(
        "--member-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="bytes per member file, on the first run (default 256M, at least 2.5M)",
    )
    qs.set_defaults(func=cmd_quickstart)

    be = sub.add_parser("bench", help="none / classic / lockless side by side (and raw)")
    be.add_argument("--quick", action="store_true", help="smaller and shorter: under a minute")
    be.add_argument("--threads", "-j", type=int, default=None, help="writer threads (default 64)")
    be.add_argument("--iodepth", "-q", type=int, default=None, help="outstanding IOs in the fio/NBD run")
    be.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    be.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    be.add_argument("--member-size", type=_size, default=None, help="bytes per RAM member (default 2G)")
    be.add_argument("--no-nbd", action="store_true", help="skip the fio/NBD run")
    be.add_argument("--no-raid5", action="store_true", help="skip the raid5 rows")
    be.add_argument("--json", action="store_true")
    be.add_argument("--plot", default=None, help="write an SVG bar chart to FILE")
    be.set_defaults(func=cmd_bench)

    to = sub.add_parser("torture", help="randomised power cuts and member faults; proves nothing is lost")
    to.add_argument("--runs", type=int, default=100)
    to.add_argument("--seed", type=int, default=1)
    to.add_argument(
        "--level",
        action="append",
        help="raid1, raid10n2, raid10f2, raid10o2, raid5, raid5x4 or raid4 (repeatable)",
    )
    to.add_argument("--bitmap", action="append", help="none, classic, lockless (repeatable)")
    to.add_argument("--json", action="store_true")
    to.set_defaults(func=cmd_torture)

    demo = sub.add_parser("demo", help="examine and read a kernel-made fixture array")
    demo.add_argument("--fixture", default="b-raid10n2-llbitmap", help="fixture name (default: %(default)s)")
    demo.add_argument(
        "--workdir", default=None, help="where to unpack the member images (default: a temp dir)"
    )
    demo.set_defaults(func=cmd_demo)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llraid")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    # File names that are not UTF-8 reach us as surrogate escapes (argv, os.listdir); print them
    # back as the bytes they were instead of failing with UnicodeEncodeError.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    try:
        parser = build_parser()
        parser.add_argument("--version", action="version", version=f"llraid {_version()}")
        args = parser.parse_args(argv)
        logs.setup()
        rc: int = args.func(args)
        return rc
    except LlraidError as e:
        _error(str(e))
        return EXIT_ERROR
    except BrokenPipeError:
        # A reader such as `head` went away; not an error of ours.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter shutdown quiet
        return 0
    except (OSError, OverflowError) as e:  # e.g. a socket that cannot be bound
        _error(_os_error_text(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
