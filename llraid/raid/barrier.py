"""The sync barrier (md raid1/raid10's ``raise_barrier`` / ``wait_barrier``, per bucket).

Writes and sync windows meet here: a sync window is never read or written while a write to
it is in flight, and writes to it wait while it is being synced. Addresses are sectors of the
sync space (the bitmap's space), so writes enter with their bitmap range.
"""

from __future__ import annotations

import threading

BUCKET_SHIFT = 7  # 128 sectors (64 KiB), the llbitmap minimum chunk
BUCKET_SIZE = 1 << BUCKET_SHIFT  # also the sync thread's largest window
NR_BUCKETS = 1024


class SyncBarrier:
    """A lock-free counter per bucket for writers, a flag per bucket for the sync thread.

    Invariant: writers append to ``pending[b]`` and then check ``barrier[b]``; the sync thread
    sets ``barrier[b]`` and then waits for ``pending[b]`` to empty. Whatever the interleaving,
    either the writer sees the barrier and backs off, or the sync thread sees the writer and
    waits. (list.append/pop are atomic under the GIL: no lock on the write path.)
    """

    def __init__(self) -> None:
        self.pending: list[list[None]] = [[] for _ in range(NR_BUCKETS)]
        self.barrier = [False] * NR_BUCKETS
        self.cond = threading.Condition()

    @staticmethod
    def of(sector: int, count: int) -> list[int]:
        """The buckets a range touches (hashed: far apart ranges may share one)."""
        first, last = sector >> BUCKET_SHIFT, (sector + max(count, 1) - 1) >> BUCKET_SHIFT
        if first == last:
            return [first % NR_BUCKETS]
        if last - first + 1 >= NR_BUCKETS:
            return list(range(NR_BUCKETS))
        return sorted({b % NR_BUCKETS for b in range(first, last + 1)})

    def enter(self, buckets: list[int]) -> None:
        """A write starts (md's wait_barrier): waits while a sync holds one of the buckets."""
        for b in buckets:
            pend = self.pending[b]
            while True:
                pend.append(None)
                if not self.barrier[b]:
                    break
                pend.pop()
                with self.cond:
                    self.cond.notify_all()
                    self.cond.wait_for(lambda b=b: not self.barrier[b])  # type: ignore[misc]

    def leave(self, buckets: list[int]) -> None:
        """A write finished (md's allow_barrier)."""
        for b in buckets:
            self.pending[b].pop()
            if self.barrier[b] and not self.pending[b]:
                with self.cond:
                    self.cond.notify_all()

    def raise_barrier(self, buckets: list[int]) -> None:
        """A sync window starts: new writes wait, writes in flight are waited for."""
        for b in buckets:
            self.barrier[b] = True
        with self.cond:
            self.cond.wait_for(lambda: not any(self.pending[b] for b in buckets))

    def lower_barrier(self, buckets: list[int]) -> None:
        for b in buckets:
            self.barrier[b] = False
        with self.cond:
            self.cond.notify_all()
