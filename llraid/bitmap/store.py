"""Where a bitmap's bytes live: the same bitmap area on every member.

Reads come from the first healthy member and move on to the next on error; writes go to every
healthy member and are durable (``fdatasync``) before :meth:`BitmapStore.write` returns. A member
whose bitmap IO fails is reported to the array through ``on_error`` (md calls ``md_error`` and
kicks it) and is not used again; only when no member is left does the store raise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llraid.device import Device
from llraid.errors import BitmapIOError, DeviceError


@dataclass
class BitmapTarget:
    """One member's copy of the bitmap area: the device and the area's byte offset on it."""

    device: Device
    offset: int  # bytes from the start of the device
    failed: bool = False

    @property
    def name(self) -> str:
        return self.device.path


ErrorHook = Callable[[BitmapTarget, Exception], None]


class BitmapStore:
    def __init__(
        self, targets: Sequence[BitmapTarget], on_error: ErrorHook | None = None, *, readonly: bool = False
    ) -> None:
        self.targets = list(targets)
        self.on_error = on_error
        self.readonly = readonly  # a read-only array: bitmap changes stay in memory
        self._fail_lock = threading.Lock()  # only taken when a member fails: never on the IO path
        self.writes = 0  # block writes issued, per member (for tests and benchmarks)
        self.syncs = 0

    def healthy(self) -> list[BitmapTarget]:
        return [t for t in self.targets if not t.failed]

    def _fail(self, target: BitmapTarget, err: Exception) -> None:
        with self._fail_lock:
            if target.failed:
                return
            target.failed = True
        if self.on_error is not None:
            self.on_error(target, err)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` in the bitmap area, from the first member that can."""
        for t in self.healthy():
            try:
                return t.device.pread(t.offset + offset, length)
            except DeviceError as e:
                self._fail(t, e)
        raise BitmapIOError("cannot read the bitmap from any member")

    def write(self, pieces: Sequence[tuple[int, bytes]]) -> None:
        """Write ``(offset, data)`` pieces to every healthy member, durably, then return."""
        if not pieces or self.readonly:
            return
        done = 0
        for t in self.healthy():
            try:
                for offset, data in pieces:
                    t.device.pwrite(t.offset + offset, data)
                    self.writes += 1
                t.device.sync()
                self.syncs += 1
                done += 1
            except DeviceError as e:
                self._fail(t, e)
        if not done:
            raise BitmapIOError("cannot write the bitmap to any member")
