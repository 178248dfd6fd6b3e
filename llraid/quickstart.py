"""``llraid quickstart`` (README command (a)): a raid10 with the lockless bitmap on four member
files in one directory, created on the first run and assembled on later runs, served over NBD.

The first run checks what it can before it makes anything (the member size against the array's
minimum, the file-size limit and the file system's free space, the socket path's length) and, if
it still fails before the array is served, removes exactly the files and directories it made.
A later run that finds the member files incomplete or broken says what it found and how to go
on; it never removes anything itself. Members are private to their owner (0600), and so is a
data directory quickstart makes (0700). The connection help is printed once the array is served,
with commands that run as printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import resource
import shlex
import shutil
import stat
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llraid import logs
from llraid.create import (
    CreateSpec,
    create,
    default_homehost,
    describe,
    minimum_member_sectors,
    parse_layout,
    show_bytes,
)
from llraid.device import SECTOR
from llraid.errors import LlraidError
from llraid.format.bitmap import BitmapKind

if TYPE_CHECKING:
    from llraid.array import Array
    from llraid.export.service import Service

MEMBERS = 4
DEFAULT_MEMBER_BYTES = 256 << 20
SOCKET_NAME = "array.nbd"
SUN_PATH_MAX = 107  # bytes in a unix socket path: sun_path holds 108 with the NUL
MAX_FILE_BYTES = (1 << 63) - 1  # off_t


class QuickstartError(LlraidError):
    """A quickstart that cannot go on; the message says what to do instead."""


def spec() -> CreateSpec:
    """The array command (a) makes: raid10 n2 on four members, 512K chunks, lockless bitmap."""
    return CreateSpec(
        level=10, raid_devices=MEMBERS, layout=parse_layout(10, "n2"), chunk_sectors=1024,
        bitmap=BitmapKind.LOCKLESS, assume_clean=False, name="quickstart", minor=2, size=None,
        homehost=default_homehost(),
    )  # fmt: skip


def llraid_command() -> str:
    """How a shell runs this llraid, for the commands the banner prints.

    ``llraid`` itself is usually not on PATH (it lives in the virtualenv), so the banner names
    the script this process was started from, or the one next to this interpreter."""
    candidates = [sys.argv[0]] if os.path.basename(sys.argv[0]) == "llraid" else []
    candidates.append(os.path.join(os.path.dirname(sys.executable), "llraid"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            path = os.path.abspath(c)
            found = shutil.which("llraid")
            if found and os.path.samefile(found, path):
                return "llraid"
            return shlex.quote(path)
    return f"{shlex.quote(sys.executable)} -m llraid.cli"


@dataclass
class Made:
    """What this run created, in creation order: undone if the run fails before serving."""

    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    served: bool = False  # from then on the array may hold data: nothing is removed

    def undo(self) -> str:
        """Remove what was made; returns the note for the error message."""
        for p in reversed(self.files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):  # not empty: something else was put there
                os.rmdir(d)
        what = [f"{len(self.files)} member file{'s' if len(self.files) != 1 else ''}"] if self.files else []
        what += [f"directory {self.dirs[0]}"] if self.dirs else []
        return f"; removed what this run made ({' and '.join(what)})" if what else ""


@dataclass(frozen=True)
class Layout:
    data: str
    paths: list[str]
    socket: str
    command: str

    @classmethod
    def of(cls, data: str) -> Layout:
        data = os.path.abspath(data)
        paths = [os.path.join(data, f"member{i}.img") for i in range(MEMBERS)]
        return cls(data, paths, os.path.join(data, SOCKET_NAME), llraid_command())

    @property
    def uri(self) -> str:
        # percent-encoded: libnbd and qemu refuse a URI with a space, '#', '?' or '&' in the path
        return f"nbd+unix:///?socket={urllib.parse.quote(self.socket, safe='/')}"

    def shell(self, *words: str) -> str:
        return " ".join([self.command, *(shlex.quote(w) for w in words)])


def _ensure_dir(data: str, made: Made) -> None:
    if os.path.lexists(data) and not os.path.isdir(data):
        raise QuickstartError(f"--data {data} is not a directory")
    missing: list[str] = []
    d = data
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise QuickstartError(f"cannot make {data}: {d} is not a directory")
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except OSError as e:
            raise QuickstartError(f"cannot make {d}: {e.strerror}") from None
        made.dirs.append(d)
        os.chmod(d, 0o700)  # whatever the umask: the members' directory is private


def _check_first_run(lay: Layout, member_bytes: int, s: CreateSpec) -> None:
    """Everything that can be known before a member file is made."""
    if len(os.fsencode(lay.socket)) > SUN_PATH_MAX:
        raise QuickstartError(
            f"the socket path {lay.socket} is longer than a unix socket allows ({SUN_PATH_MAX} bytes): "
            "choose a shorter --data"
        )
    low = minimum_member_sectors(s) * SECTOR
    if member_bytes < low:
        raise QuickstartError(
            f"--member-size {show_bytes(member_bytes)} is too small: a {describe(s)} with the lockless "
            f"bitmap needs at least {show_bytes(low)} per member"
        )
    if member_bytes > MAX_FILE_BYTES:
        raise QuickstartError(f"--member-size {show_bytes(member_bytes)} is larger than any file can be")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and member_bytes > limit:
        raise QuickstartError(
            f"--member-size {show_bytes(member_bytes)} is over this process's file-size limit "
            f"(ulimit -f: {show_bytes(limit)})"
        )
    st = os.statvfs(lay.data)
    free = st.f_bavail * st.f_frsize
    if MEMBERS * member_bytes > free:
        # sparse members would take the space only as the array is written, and fail then
        raise QuickstartError(
            f"{MEMBERS} members of {show_bytes(member_bytes)} need {show_bytes(MEMBERS * member_bytes)}; "
            f"the file system of {lay.data} has {show_bytes(free)} free"
        )


def _make_members(lay: Layout, member_bytes: int, made: Made) -> None:
    for p in lay.paths:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise QuickstartError(f"cannot make {p}: {e.strerror}") from None
        made.files.append(p)
        try:
            os.fchmod(fd, 0o600)  # the array's data: the owner's alone, whatever the umask
            os.ftruncate(fd, member_bytes)
        except OSError as e:
            raise QuickstartError(f"cannot make {p} of {show_bytes(member_bytes)}: {e.strerror}") from None
        finally:
            os.close(fd)


class Found(enum.Enum):
    """A member file as a later run finds it."""

    MISSING = "is missing"
    EMPTY = "holds no data"  # holes only: made by a first run that did not finish
    FOREIGN = "holds data but no md superblock"
    DAMAGED = "is damaged"
    MEMBER = "is a member"


@dataclass(frozen=True)
class Probe:
    path: str
    found: Found
    why: str = ""  # DAMAGED: what is wrong

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def text(self) -> str:
        return f"{self.name} {self.found.value}" + (f" ({self.why})" if self.why else "")


def _has_data(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # unreadable: assume it matters
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return size > 0 and os.lseek(fd, 0, os.SEEK_DATA) < size
    except OSError as e:
        return e.errno != errno.ENXIO  # ENXIO: nothing but holes
    finally:
        os.close(fd)


def probe(path: str) -> Probe:
    from llraid.assemble import check_member
    from llraid.errors import NotMdMemberError
    from llraid.member import open_member

    if not os.path.lexists(path):
        return Probe(path, Found.MISSING)
    if not _has_data(path):
        return Probe(path, Found.EMPTY)
    try:
        member = open_member(path)
    except NotMdMemberError:
        return Probe(path, Found.FOREIGN)
    except LlraidError as e:
        return Probe(path, Found.DAMAGED, str(e).removeprefix(f"{path}: "))
    try:
        check_member(member)
    except LlraidError as e:
        return Probe(path, Found.DAMAGED, str(e).removeprefix(f"{path}: "))
    finally:
        member.device.close()
    return Probe(path, Found.MEMBER)


def _start_problem(paths: Sequence[str], *, run: bool) -> str | None:
    """Why the array on ``paths`` cannot start (as ``serve --run`` if ``run``); None if it can.

    Read-only: nothing is written to find out."""
    from llraid.array import Array

    try:
        Array.assemble(paths, run=run, readonly=True).stop()
    except LlraidError as e:
        return str(e)
    return None


def diagnose(lay: Layout, cause: str | None) -> str:
    """What a later run found, and how to go on from there (one line). Removes nothing."""
    found = [probe(p) for p in lay.paths]
    present = [p for p in found if p.found is not Found.MISSING]
    if all(p.found is Found.EMPTY for p in present):
        files = " ".join(shlex.quote(p.path) for p in present)
        return (
            f"{lay.data} holds {len(present)} of the {MEMBERS} member files, none with any data: a first "
            f"run that did not finish. Nothing to recover; to start afresh: rm {files}"
        )
    members = [p for p in found if p.found is Found.MEMBER]
    lost = [p for p in found if p.found is not Found.MEMBER]
    if not members:
        return (
            f"{lay.data}: {', '.join(p.text() for p in present)}: not an array quickstart made? Move "
            "the files away or choose another --data"
        )
    examine = lay.shell("examine", *(p.path for p in present))
    if not lost:
        if _start_problem(lay.paths, run=False) is None:
            # not degraded, not damaged: most likely served already
            return f"{cause} (is it served already? {lay.command} status)"
        head = f"{cause}; " if cause else ""
    else:
        head = f"{lay.data}: {', '.join(p.text() for p in lost)}; "
    why_not = _start_problem([p.path for p in members], run=True)
    if why_not is not None:
        return f"{head}the array cannot start from what is left ({why_not}); to look closer: {examine}"
    serve = lay.shell("serve", "--run", "--socket", lay.socket, *(p.path for p in members))
    return (
        f"{head}quickstart does not start a degraded array. To serve it with the {len(members)} "
        f"member{'s' if len(members) != 1 else ''} there: {serve}; then make a new empty file of "
        f"{os.path.getsize(members[0].path)} bytes (mode 0600) for each lost one and {lay.command} add it; "
        f"to look closer: {examine}"
    )


def _tighten(paths: Sequence[str]) -> None:
    """Members an earlier llraid made 0644: any local user could read the array's data."""
    for p in paths:
        st = os.stat(p)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and stat.S_ISREG(st.st_mode):
            os.chmod(p, mode & 0o700)
            print(
                f"llraid: {p} was open to other users (mode {mode:04o}): now {mode & 0o700:04o}", flush=True
            )


def banner(lay: Layout) -> str:
    u = shlex.quote(lay.uri)
    return f"""llraid: connect with any NBD client:
    nbdinfo {u}
    nbdcopy some.img {u}                 # copy an image into the array
    qemu-img convert -O raw {u} copy.img  # and back out
    qemu-io -f raw {u} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  a kernel block device (root): nbdfuse + loop
    mkdir -p /tmp/llraid-fuse && (nbdfuse /tmp/llraid-fuse/disk {u} &)
    losetup --find --show --direct-io=on /tmp/llraid-fuse/disk    # then mkfs.ext4 / mount it
  from another shell:
    {lay.command} status    # like /proc/mdstat
    {lay.command} detail
    {lay.command} stop      # stops cleanly, as Ctrl-C here does"""


def _start(lay: Layout, member_bytes: int | None, made: Made) -> Array:
    """The array, assembled: created first if the directory holds none of its member files."""
    from llraid.array import Array

    _ensure_dir(lay.data, made)
    present = [p for p in lay.paths if os.path.lexists(p)]
    if not present:
        size = DEFAULT_MEMBER_BYTES if member_bytes is None else member_bytes
        s = spec()
        _check_first_run(lay, size, s)
        _make_members(lay, size, made)
        create(lay.paths, s)
        return Array.assemble(lay.paths)
    if len(present) != MEMBERS:
        raise QuickstartError(diagnose(lay, None))
    if member_bytes is not None and member_bytes != os.path.getsize(lay.paths[0]):
        print(f"llraid: --member-size ignored: {lay.data} already holds the array's members", flush=True)
    try:
        array = Array.assemble(lay.paths)
    except LlraidError as e:
        raise QuickstartError(diagnose(lay, str(e))) from None
    _tighten(lay.paths)  # only once they proved to be the array's members
    return array


def _serve(lay: Layout, array: Array, made: Made) -> None:
    from llraid.export.service import Service

    def ready(sv: Service) -> None:
        made.served = True
        if made.files:  # first: the creation came before the assembly the held messages tell of
            print(
                f"llraid: created raid10 (n2, lockless bitmap) on {MEMBERS} members in {lay.data}", flush=True
            )
        logs.setup().replay()  # assembly's messages, held back until the array is served
        print(
            f"llraid: serving {array.uuid} (raid{array.level}, {array.array_bytes} bytes) at {lay.uri}\n"
            f"llraid: control socket {sv.control_path}\n{banner(lay)}",
            flush=True,
        )

    try:
        asyncio.run(Service(array, socket_path=lay.socket).run(on_ready=ready))
    finally:
        array.stop()  # a no-op after the service's own clean stop


def run(data: str, member_bytes: int | None) -> int:
    lay = Layout.of(data)
    made = Made()
    # Like serve: what happens before the array is served is told only if it is; a run that
    # fails says why in one error line.
    logs.setup().hold()
    try:
        _serve(lay, _start(lay, member_bytes, made), made)
    except BaseException as e:
        logs.setup().drop()
        if made.served or not (made.files or made.dirs):
            raise
        note = made.undo()  # never served: nothing of anyone's is in what this run made
        if isinstance(e, LlraidError | OSError):
            raise QuickstartError(f"{_error_text(e)}{note}") from None
        raise
    print("llraid: stopped cleanly", flush=True)
    return 0


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)
