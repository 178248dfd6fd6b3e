"""The write-intent bitmap interface the array engine talks to (md's ``bitmap_operations``).

Three implementations sit behind it and the array never asks which one it has:

* :class:`NoBitmap` (``none``): nothing is tracked, so every sync covers everything;
* ``classic`` (:mod:`llraid.bitmap.classic`): md's 16-bit counter per chunk under one lock;
* ``lockless`` (:mod:`llraid.bitmap.lockless`): llbitmap, one state byte per chunk.

Addresses are sectors in the bitmap's own space (raid1: member sectors; raid10: array sectors;
raid4/5: member sectors of whole stripe rows, see spec/LAYOUTS.md 2.4); the array maps requests
before calling.

The write protocol every implementation honours (data safety):

1. ``need = start_write(off, n)`` before any member data IO for the range;
2. if ``need``: ``unplug()``, which returns only when every bitmap change the write depends on
   is durable on every healthy member;
3. data IO;
4. ``end_write(off, n)`` after the data IO completed (successfully or not).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

from llraid.format.bitmap import BitmapKind


class SyncKind(enum.Enum):
    """Why the sync thread is walking the array (md's MD_RECOVERY_* flags)."""

    RESYNC = "resync"  # after an unclean shutdown: make copies agree
    RECOVERY = "recovery"  # rebuild a member (re-added or new)
    CHECK = "check"  # user request: compare, count mismatches
    REPAIR = "repair"  # user request: compare and rewrite

    @property
    def requested(self) -> bool:
        """A user-requested pass (md's MD_RECOVERY_REQUESTED)."""
        return self in (SyncKind.CHECK, SyncKind.REPAIR)


class BitmapHost(Protocol):
    """What a bitmap needs to know about the array it serves."""

    @property
    def level(self) -> int: ...

    def is_degraded(self) -> bool: ...

    def request_sync(self) -> None:
        """Chunks now need a resync (or, raid456, a lazy recovery): wake the sync thread."""
        ...


def flush_host(host: object) -> None:
    """Make every completed data write durable before a "copies agree" state is recorded.

    Member caches are volatile: a Clean chunk (or a cleared classic bit) written to one member
    while another member's completed writes to that chunk are still in its cache would, after a
    power cut, hide copies that differ. Hosts that can flush their members provide
    ``flush_members()``; simple test hosts need not."""
    flush = getattr(host, "flush_members", None)
    if flush is not None:
        flush()


class Bitmap(ABC):
    kind: ClassVar[BitmapKind]

    # ---- lifecycle -----------------------------------------------------------------------

    @abstractmethod
    def load(self) -> None:
        """Turn what was on disk into what must be synced (after assembly, before IO)."""

    @abstractmethod
    def flush(self) -> None:
        """Clean everything that can be cleaned and write the whole bitmap (array stop)."""

    def start_daemon(self) -> None:
        """Run :meth:`daemon_work` in the background every ``daemon_sleep``."""

    def close(self) -> None:
        """Stop the background daemon (does not flush)."""

    def daemon_work(self) -> None:
        """One daemon pass: clean idle chunks."""

    # ---- IO path -------------------------------------------------------------------------

    @abstractmethod
    def start_write(self, offset: int, sectors: int) -> bool:
        """Mark the range as being written; True if :meth:`unplug` is needed before data IO."""

    @abstractmethod
    def end_write(self, offset: int, sectors: int) -> None:
        """The data IO of a range passed to :meth:`start_write` has completed."""

    def start_discard(self, offset: int, sectors: int) -> bool:
        """Discard: whole chunks inside the range hold no data any more."""
        return False

    def end_discard(self, offset: int, sectors: int) -> None:
        pass

    @abstractmethod
    def unplug(self) -> None:
        """Make every pending bitmap change durable on every healthy member."""

    # ---- sync ----------------------------------------------------------------------------

    def skip_sync_blocks(self, offset: int, kind: SyncKind) -> int:
        """Sectors from ``offset`` the sync thread may skip without asking (0 = ask)."""
        return 0

    @abstractmethod
    def start_sync(self, offset: int, degraded: bool) -> tuple[bool, int]:
        """``(must_sync, sectors)``: whether the range from ``offset`` must be synced, and
        how many sectors that answer covers."""

    def end_sync(self, offset: int) -> None:
        """The sync stopped early at ``offset``: what was being synced must be retried."""

    def close_sync(self) -> None:
        """The sync finished."""

    def cond_end_sync(self, sector: int, force: bool = False) -> None:
        """Checkpoint: everything below ``sector`` is synced."""

    def blocks_synced(self, offset: int) -> bool:
        """raid456: parity of the chunk at ``offset`` is known to be valid."""
        return True

    def start_recovery(self) -> None:
        """A recovery of a member that is not guided by the bitmap (a new member) starts."""

    def proactive_sync(self) -> bool:
        """raid456: mark every never-written chunk for a parity build now (False: this bitmap
        keeps no such chunks)."""
        return False

    def covers_since(self, events: int) -> bool:
        """True if every write since the array's event count was ``events`` is recorded here,
        so a member that left at that count needs only what the bitmap marks (re-add)."""
        return False

    # ---- metadata and views --------------------------------------------------------------

    def update_sb(self, events: int) -> None:
        """Rewrite the bitmap superblock with the array's new event count."""

    @property
    def daemon_sleep(self) -> float:
        return 0.0

    @daemon_sleep.setter
    def daemon_sleep(self, seconds: float) -> None:
        raise ValueError("this bitmap has no daemon")

    def area_image(self) -> bytes:
        """The bitmap area as it should be on a member joining the array now."""
        return b""

    def bits_view(self) -> str:
        return "no bitmap\n"

    def metadata_view(self) -> str:
        return "no bitmap\n"


class NoBitmap(Bitmap):
    """``none``: no write intent is recorded, so any sync must cover the whole array."""

    kind = BitmapKind.NONE

    def load(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def start_write(self, offset: int, sectors: int) -> bool:
        return False

    def end_write(self, offset: int, sectors: int) -> None:
        pass

    def unplug(self) -> None:
        pass

    def start_sync(self, offset: int, degraded: bool) -> tuple[bool, int]:
        return True, 1024  # md's answer without a bitmap: sync it, in 512 KiB steps
