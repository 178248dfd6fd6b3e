"""The ``llraid`` command line (mdadm-like).

Every failure that bad input can cause is an :class:`~llraid.errors.LlraidError`; ``main``
turns it into one ``llraid: ...`` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

from llraid.assemble import Assembly, assemble, check_member
from llraid.errors import LlraidError
from llraid.examine import examine_bitmap, examine_bitmap_text, examine_json, examine_text
from llraid.member import Member, open_member

EXIT_ERROR = 1


def _size(text: str) -> int:
    """Bytes from '4096', '64K', '1M', '2G', '1T' (binary units, as mdadm)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "S": 512}
    t = text.strip().upper().removesuffix("IB")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num, 0) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return value


def _default_homehost() -> str | None:
    return os.environ.get("LLRAID_HOMEHOST") or socket.gethostname() or None


@contextlib.contextmanager
def open_members(paths: Sequence[str]) -> Iterator[list[Member]]:
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
    with open_members(args.devices) as members:
        yield assemble(members, force=args.force)


def cmd_cat(args: argparse.Namespace) -> int:
    with _assembled(args) as asm:
        size = asm.array_bytes
        offset = args.offset
        length = size - offset if args.length is None else args.length
        if offset > size or offset + length > size:
            raise LlraidError(f"range {offset}+{length} is outside the array ({size} bytes)")
        for m in asm.stale:
            _error(f"{m.path} is stale (events {m.sb.events} < {asm.sb.events}): not used")
        if args.output:
            with open(args.output, "wb") as f:
                _copy(asm, offset, length, f)
        else:
            _copy(asm, offset, length, sys.stdout.buffer)
    return 0


def _copy(asm: Assembly, offset: int, length: int, out: IO[bytes]) -> None:
    for piece in asm.iter_bytes(offset, length):
        out.write(piece)
    out.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    from llraid.demo import run_demo

    return run_demo(args.fixture, args.workdir)


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

    cat = sub.add_parser("cat", help="write the array's data (read-only assembly)")
    cat.add_argument("devices", nargs="+", metavar="DEV")
    cat.add_argument("--offset", type=_size, default=0, help="start byte in the array (K/M/G suffixes)")
    cat.add_argument("--length", type=_size, default=None, help="bytes to write (default: to the end)")
    cat.add_argument("-o", "--output", help="write to FILE instead of standard output")
    cat.add_argument("--force", action="store_true", help="accept bad checksums / unclean degraded raid5")
    cat.set_defaults(func=cmd_cat)

    demo = sub.add_parser("demo", help="examine and read a kernel-made fixture array")
    demo.add_argument("--fixture", default="b-raid10n2-llbitmap", help="fixture name (default: %(default)s)")
    demo.add_argument(
        "--workdir", default=None, help="where to unpack the member images (default: a temp dir)"
    )
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
