"""Member devices: regular files or block devices, addressed in bytes with pread/pwrite.

A device is opened once and shared; pread/pwrite take no lock, so many threads can do IO on
one member at the same time. Every member IO of llraid goes through these methods (pread,
pwrite, sync), so a test can put a simulated device (volatile cache, injected faults) in place
of a real one.
"""

from __future__ import annotations

import fcntl
import os
import stat
from types import TracebackType

from llraid.errors import DeviceError

SECTOR = 512


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (0, st.st_rdev) if st.st_rdev else (st.st_dev, st.st_ino)


def path_identity(path: str) -> tuple[int, int]:
    """What makes two paths the same device: the block device number, else the inode (paths
    alone do not: every memfd's /proc/self/fd/N resolves to the same name)."""
    try:
        return _identity(os.stat(path))
    except OSError as e:
        raise DeviceError(f"{path}: cannot open: {e.strerror}") from None


def fd_identity(fd: int) -> tuple[int, int]:
    """As :func:`path_identity`, for an open file (standard input or output)."""
    return _identity(os.fstat(fd))


class Device:
    """An open member device. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str, *, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise DeviceError(f"{path}: cannot open: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DeviceError(f"{path}: not a regular file or block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # block devices report 0 in st_size
            if writable:
                # One writer per member: a second llraid (serve, write, sync, create) on a member
                # in use is refused before it writes anything. Readers (examine, cat) take no lock.
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise DeviceError(f"{path}: in use by another llraid process") from None
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or :class:`DeviceError`."""
        if offset < 0 or offset + length > self.size:
            raise DeviceError(
                f"{self.path}: read of {length} bytes at {offset} is past the end ({self.size} bytes)"
            )
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise DeviceError(f"{self.path}: read error at byte {offset}: {e.strerror}") from None
        if len(data) != length:
            raise DeviceError(f"{self.path}: short read at byte {offset}")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, dsync: bool = False) -> None:
        """Write all of ``data`` at ``offset`` (durably first with ``dsync``), or :class:`DeviceError`."""
        if offset < 0 or offset + len(data) > self.size:
            raise DeviceError(
                f"{self.path}: write of {len(data)} bytes at {offset} is past the end ({self.size} bytes)"
            )
        try:
            n = (
                os.pwritev(self.fd, [data], offset, os.RWF_DSYNC)
                if dsync
                else os.pwrite(self.fd, data, offset)
            )
        except OSError as e:
            raise DeviceError(f"{self.path}: write error at byte {offset}: {e.strerror}") from None
        if n != len(data):
            raise DeviceError(f"{self.path}: short write at byte {offset}")

    def sync(self) -> None:
        """Everything written so far is durable (fdatasync), or :class:`DeviceError`."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DeviceError(f"{self.path}: flush failed: {e.strerror}") from None

    def identity(self) -> tuple[int, int]:
        """As :func:`path_identity`, for this open device."""
        return _identity(os.fstat(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Device({self.path!r}, {self.size} bytes)"
