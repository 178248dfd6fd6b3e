"""Microbenchmark: the cost of the bitmap on the write path, none vs classic vs lockless.

Not a test: it prints numbers. Each operation is what the array does around one member write:
``start_write`` (+ ``unplug`` when asked) and ``end_write``, on a random 4 KiB range, from 1 and
from many threads at once, on RAM-backed members (memfd). The bitmaps start with every chunk
written once and durable ("steady state"), which is the case llbitmap makes free: a write to a
Dirty chunk takes no lock and does no IO, while the classic bitmap takes its lock twice.

    python -m llraid.bitmap.microbench [--ops N] [--threads 1,64]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llraid.bitmap.base import Bitmap, NoBitmap
from llraid.bitmap.classic import ClassicBitmap
from llraid.bitmap.lockless import LocklessBitmap
from llraid.bitmap.store import BitmapStore, BitmapTarget
from llraid.device import Device

UUID = bytes(16)
SYNC_SIZE = 128 * 60_000  # 3.7 GiB of array: 60000 llbitmap chunks


class _Host:
    level = 10

    def is_degraded(self) -> bool:
        return False

    def request_sync(self) -> None:
        pass


@dataclass
class Result:
    kind: str
    threads: int
    ops: int
    seconds: float

    @property
    def ns_per_op(self) -> float:
        return self.seconds * 1e9 / self.ops

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def _memfd_members(n: int, area: bytes) -> list[Device]:
    devices = []
    for i in range(n):
        fd = os.memfd_create(f"llraid-bench-{i}")
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, area, 0)
        devices.append(Device(f"/proc/self/fd/{fd}", writable=True))
        os.close(fd)
    return devices


def make_bitmap(kind: str) -> tuple[Bitmap, list[Device]]:
    host = _Host()
    if kind == "none":
        return NoBitmap(), []
    if kind == "lockless":
        sb = LocklessBitmap.new_superblock(UUID, SYNC_SIZE)
        devices = _memfd_members(4, LocklessBitmap.initial_area(sb))
        store = BitmapStore([BitmapTarget(d, 0) for d in devices])
        bm: Bitmap = LocklessBitmap.open(store, host, array_uuid=UUID, sync_size=SYNC_SIZE, events=0)
    else:
        chunk = ClassicBitmap.choose_chunksize(SYNC_SIZE, 256)
        csb = ClassicBitmap.new_superblock(UUID, SYNC_SIZE, chunk)
        devices = _memfd_members(4, ClassicBitmap.initial_area(csb))
        store = BitmapStore([BitmapTarget(d, 0) for d in devices])
        bm = ClassicBitmap.open(
            store, host, array_uuid=UUID, sync_size=SYNC_SIZE, events=0, resync_offset=0xFFFF_FFFF_FFFF_FFFF
        )
    bm.load()
    # Steady state: every chunk written once, its bitmap write durable.
    step = 1 << 16
    for off in range(0, SYNC_SIZE, step):
        if bm.start_write(off, step):
            bm.unplug()
        bm.end_write(off, step)
    return bm, devices


def run(bm: Bitmap, threads: int, ops: int, seed: int = 1) -> float:
    per_thread = max(1, ops // threads)
    barrier = threading.Barrier(threads)
    spans: list[tuple[float, float]] = []

    def work(k: int) -> None:
        rnd = random.Random(seed + k)
        offsets = [rnd.randrange(0, SYNC_SIZE - 8) & ~7 for _ in range(per_thread)]
        start_write, end_write, unplug = bm.start_write, bm.end_write, bm.unplug
        barrier.wait()
        t0 = time.perf_counter()
        for off in offsets:
            if start_write(off, 8):
                unplug()
            end_write(off, 8)
        spans.append((t0, time.perf_counter()))  # list.append is atomic

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    # Wall time from the first thread starting to the last one finishing.
    return max(e for _, e in spans) - min(s for s, _ in spans)


def bench(
    kinds: Sequence[str], thread_counts: Sequence[int], ops: int, out: Callable[[str], None] = print
) -> list[Result]:
    results = []
    for kind in kinds:
        bm, devices = make_bitmap(kind)
        try:
            for threads in thread_counts:
                n = max(1, ops // threads) * threads
                results.append(Result(kind, threads, n, run(bm, threads, n)))
        finally:
            bm.close()
            for d in devices:
                d.close()
    out(f"{'bitmap':<10}{'threads':>8}{'ns/op':>10}{'ops/s':>12}{'vs none':>9}")
    base = {r.threads: r.ns_per_op for r in results if r.kind == "none"}
    for r in results:
        ratio = base.get(r.threads, 0.0) / r.ns_per_op if r.threads in base else float("nan")
        out(f"{r.kind:<10}{r.threads:>8}{r.ns_per_op:>10.0f}{r.ops_per_s:>12.0f}{ratio:>9.2f}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--ops", type=int, default=200_000, help="operations per measurement")
    p.add_argument("--threads", default="1,64", help="comma-separated thread counts")
    p.add_argument("--kinds", default="none,classic,lockless")
    args = p.parse_args(argv)
    bench(args.kinds.split(","), [int(t) for t in args.threads.split(",")], args.ops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
