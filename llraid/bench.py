"""``llraid bench``: the write-intent bitmaps side by side on llraid's own engine.

The seed's setup: raid10 near=2 over four RAM-backed members (memfd), created ``--assume-clean``;
4 KiB random writes from J writer threads for a fixed time; the same load straight to one member
("raw"). none / classic / lockless are interleaved in every round; the table shows medians over
the rounds and the ratios to none and to raw.

Also measured:

* **fresh**: a new array (llbitmap all Unwritten) on file-backed members, so first writes pay the
  bitmap IO and its ``fdatasync`` - the cost of the write-intent guarantee;
* **nbd**: the same load through ``llraid serve`` with fio's nbd engine (numjobs, iodepth), when
  fio is installed;
* **resync / recovery**: after a crash with x% of the array written since the last clean point,
  and after a re-add with x% written while degraded: bytes synced and seconds per bitmap.
* **raid5**: left-symmetric over three RAM members with 512 KiB chunks (a stripe row holds
  1 MiB of data), created ``--assume-clean``: the same 4 KiB random writes (each one a
  reconstruct-write: one member read, data and parity written), 1 MiB sequential writes
  aligned to whole rows (full stripes: parity from the new data, nothing read), and resync /
  recovery as above; none / classic / lockless interleaved in the same rounds.

Python's GIL serialises the engine, so absolute numbers are far below the kernel's; the ratios
are what compares with the kernel's table (none 6893 MiB/s, lockless 6734 (0.977), classic 1786
(0.259) on raid10 over four RAM disks).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llraid.array import Array
from llraid.bitmap.base import SyncKind
from llraid.create import CreateSpec, create, parse_layout
from llraid.device import SECTOR
from llraid.format.bitmap import BitmapKind
from llraid.sync import run_sync, sync_until_idle

KINDS = (BitmapKind.NONE, BitmapKind.CLASSIC, BitmapKind.LOCKLESS)
IO = 4096
RAID5_DISKS = 3  # with 512 KiB chunks a stripe row is 1 MiB of data: SEQ_IO writes are full stripes
CHUNK_SECTORS = 1024
SEQ_IO = 1 << 20
assert SEQ_IO == CHUNK_SECTORS * SECTOR * (RAID5_DISKS - 1), "sequential writes must be whole stripe rows"


@dataclass
class BenchConfig:
    member_bytes: int = 2 << 30
    threads: int = 64
    iodepth: int = 128
    seconds: float = 3.0
    rounds: int = 3
    fresh_member_bytes: int = 256 << 20
    sync_member_bytes: int = 256 << 20
    dirty_percent: float = 10.0
    nbd: bool = True
    raid5: bool = True
    raid5_member_bytes: int | None = None  # None: member_bytes
    raid5_seconds: float | None = None  # per raid5 measurement; None: seconds

    @classmethod
    def quick(cls) -> BenchConfig:
        # raid5 smaller and shorter still: its members are allocated afresh for every measurement
        return cls(
            member_bytes=512 << 20, threads=16, iodepth=16, seconds=1.0, rounds=3,
            fresh_member_bytes=64 << 20, sync_member_bytes=64 << 20,
            raid5_member_bytes=64 << 20, raid5_seconds=0.4,
        )  # fmt: skip

    @property
    def r5_member_bytes(self) -> int:
        return self.raid5_member_bytes or self.member_bytes

    @property
    def r5_seconds(self) -> float:
        return self.raid5_seconds or self.seconds


@dataclass
class LoadResult:
    kind: str
    ops: int
    seconds: float
    io: int = IO  # bytes per write
    member_read: int | None = None  # bytes the array read from its members meanwhile (raid5)

    @property
    def iops(self) -> float:
        return self.ops / self.seconds

    @property
    def mib_s(self) -> float:
        return self.iops * self.io / (1 << 20)


def medians(results: list[LoadResult], raw: list[LoadResult]) -> dict[str, dict[str, float]]:
    """Median MiB/s and IOPS per bitmap over the rounds, with ratios to none and to raw."""
    out: dict[str, dict[str, float]] = {}
    raw_mib = statistics.median(r.mib_s for r in raw) if raw else 0.0
    for kind in KINDS:
        rs = [r for r in results if r.kind == kind.value]
        if not rs:
            continue
        out[kind.value] = {
            "mib_s": statistics.median(r.mib_s for r in rs),
            "iops": statistics.median(r.iops for r in rs),
        }
    none = out.get("none", {}).get("mib_s", 0.0)
    for v in out.values():
        v["ratio_to_none"] = v["mib_s"] / none if none else 0.0
        v["ratio_to_raw"] = v["mib_s"] / raw_mib if raw_mib else 0.0
    if raw_mib:
        out["raw"] = {
            "mib_s": raw_mib,
            "iops": statistics.median(r.iops for r in raw),
            "ratio_to_none": raw_mib / none if none else 0.0,
            "ratio_to_raw": 1.0,
        }
    return out


@dataclass
class Report:
    config: dict[str, Any]
    machine: dict[str, Any]
    steady: list[LoadResult] = field(default_factory=list)
    raw: list[LoadResult] = field(default_factory=list)
    fresh: list[LoadResult] = field(default_factory=list)
    nbd: list[dict[str, Any]] = field(default_factory=list)
    sync: list[dict[str, Any]] = field(default_factory=list)
    raid5_random: list[LoadResult] = field(default_factory=list)
    raid5_seq: list[LoadResult] = field(default_factory=list)
    raw_seq: list[LoadResult] = field(default_factory=list)  # 1 MiB sequential to one member
    raid5_sync: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """raid10: median MiB/s and IOPS per bitmap, with ratios to none and raw."""
        return medians(self.steady, self.raw)

    def raid5_summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """raid5: the same for 4 KiB random writes (raw: 4 KiB random) and for 1 MiB full-stripe
        sequential writes (raw: 1 MiB sequential)."""
        return {
            "random_4k": medians(self.raid5_random, self.raw),
            "seq_1m": medians(self.raid5_seq, self.raw_seq),
        }

    def as_dict(self) -> dict[str, Any]:
        def loads(rs: list[LoadResult]) -> list[dict[str, Any]]:
            out = []
            for r in rs:
                d = {"kind": r.kind, "ops": r.ops, "seconds": round(r.seconds, 3), "mib_s": round(r.mib_s, 2),
                     "iops": round(r.iops)}  # fmt: skip
                if r.member_read is not None:
                    d["member_bytes_read"] = r.member_read
                out.append(d)
            return out

        def rounded(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
            return {k: {m: round(x, 4) for m, x in v.items()} for k, v in summary.items()}

        doc: dict[str, Any] = {
            "config": self.config,
            "machine": self.machine,
            "summary": rounded(self.summary()),
            "steady_rounds": loads(self.steady),
            "raw_rounds": loads(self.raw),
            "fresh": loads(self.fresh),
            "nbd_fio": self.nbd,
            "sync": self.sync,
        }
        if self.raid5_random or self.raid5_sync:
            r5 = self.raid5_summary()
            doc["raid5"] = {
                "disks": RAID5_DISKS,
                "layout": "left-symmetric",
                "chunk_kib": CHUNK_SECTORS // 2,
                "summary_random_4k": rounded(r5["random_4k"]),
                "summary_seq_1m": rounded(r5["seq_1m"]),
                "random_rounds": loads(self.raid5_random),
                "seq_rounds": loads(self.raid5_seq),
                "raw_seq_rounds": loads(self.raw_seq),
                "sync": self.raid5_sync,
            }
        return doc


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return info


# ---- members ----------------------------------------------------------------------------------------------


class MemMembers:
    """RAM-backed member devices (memfd), addressed as /proc/self/fd/N paths."""

    def __init__(self, n: int, size: int) -> None:
        self.fds = []
        for i in range(n):
            fd = os.memfd_create(f"llraid-bench-{i}")
            os.ftruncate(fd, size)
            # Allocate the RAM now: otherwise the measured writes pay the kernel's first-touch
            # page faults (zeroing), which swamps the RAID code and skews whichever runs first.
            os.posix_fallocate(fd, 0, size)
            self.fds.append(fd)
        self.paths = [f"/proc/self/fd/{fd}" for fd in self.fds]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def make_array(paths: list[str], kind: BitmapKind, *, assume_clean: bool, level: int = 10) -> Array:
    """raid10 n2, or raid5 left-symmetric, with 512 KiB chunks."""
    layout = parse_layout(level, "n2" if level == 10 else None)
    spec = CreateSpec(
        level=level, raid_devices=len(paths), layout=layout, chunk_sectors=CHUNK_SECTORS, bitmap=kind,
        assume_clean=assume_clean, name="bench", minor=2, size=None, homehost=None,
    )  # fmt: skip
    create(paths, spec, force=True)
    array = Array.assemble(paths)
    array.safe_mode_delay = 3600.0  # no clean/dirty flapping inside a measurement
    return array


# ---- loads ------------------------------------------------------------------------------------------------


def random_writes(
    write: Callable[[int, bytes], None], sectors: int, threads: int, seconds: float, seed: int
) -> int:
    """J threads writing 4 KiB at random aligned offsets for ``seconds``; returns ops done."""
    stop = threading.Event()
    counts = [0] * threads
    buf = os.urandom(IO)
    slots = sectors // 8

    def worker(k: int) -> None:
        rnd = random.Random(seed * 1000 + k).randrange
        n = 0
        while not stop.is_set():
            write(rnd(slots) * 8, buf)
            n += 1
        counts[k] = n

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts)


def sequential_writes(
    write: Callable[[int, bytes], None], sectors: int, threads: int, seconds: float, io: int
) -> int:
    """J threads, each writing ``io`` bytes at a time sequentially through its own share of the
    array (wrapping around), for ``seconds``; returns ops done."""
    stop = threading.Event()
    counts = [0] * threads
    buf = os.urandom(io)
    step = io // SECTOR
    slots = sectors // step

    def worker(k: int) -> None:
        first, last = slots * k // threads, slots * (k + 1) // threads
        pos, n = first, 0
        while not stop.is_set():
            write(pos * step, buf)
            n += 1
            pos = pos + 1 if pos + 1 < last else first
        counts[k] = n

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts)


def seq_threads(cfg: BenchConfig) -> int:
    """Writers of the 1 MiB sequential load: a few streams, not the 4 KiB load's crowd."""
    return max(1, min(cfg.threads, 4))


def run_raid5(cfg: BenchConfig, kind: BitmapKind, seed: int) -> tuple[LoadResult, LoadResult]:
    """raid5 on RAM members: 4 KiB random writes, then 1 MiB full-stripe sequential writes."""
    mem = MemMembers(RAID5_DISKS, cfg.r5_member_bytes)
    try:
        array = make_array(mem.paths, kind, assume_clean=True, level=5)
        try:
            sectors = array.array_sectors

            def member_read() -> int:
                return sum(array.counters.member_read.values())

            seconds = cfg.r5_seconds
            random_writes(array.write, sectors, cfg.threads, seconds / 3, seed + 7)
            r0, t0 = member_read(), time.perf_counter()
            ops = random_writes(array.write, sectors, cfg.threads, seconds, seed)
            rand = LoadResult(kind.value, ops, time.perf_counter() - t0, member_read=member_read() - r0)
            # full stripes read nothing: member_read stays 0 (the JSON shows it)
            r0, t0 = member_read(), time.perf_counter()
            ops = sequential_writes(array.write, sectors, seq_threads(cfg), seconds, SEQ_IO)
            seq = LoadResult(kind.value, ops, time.perf_counter() - t0, SEQ_IO, member_read() - r0)
            return rand, seq
        finally:
            array.crash()
    finally:
        mem.close()


def run_raw_seq(cfg: BenchConfig) -> LoadResult:
    mem = MemMembers(1, cfg.r5_member_bytes)
    try:
        fd = mem.fds[0]

        def write(sector: int, data: bytes) -> None:
            os.pwrite(fd, data, sector * SECTOR)

        t0 = time.perf_counter()
        sectors = cfg.r5_member_bytes // SECTOR
        ops = sequential_writes(write, sectors, seq_threads(cfg), cfg.r5_seconds, SEQ_IO)
        return LoadResult("raw", ops, time.perf_counter() - t0, SEQ_IO)
    finally:
        mem.close()


def run_steady(cfg: BenchConfig, kind: BitmapKind, seed: int) -> LoadResult:
    mem = MemMembers(4, cfg.member_bytes)
    try:
        array = make_array(mem.paths, kind, assume_clean=True)
        try:
            # Warm up: first writes pay bitmap transitions; the steady state is what is compared.
            random_writes(array.write, array.array_sectors, cfg.threads, cfg.seconds / 3, seed + 7)
            t0 = time.perf_counter()
            ops = random_writes(array.write, array.array_sectors, cfg.threads, cfg.seconds, seed)
            return LoadResult(kind.value, ops, time.perf_counter() - t0)
        finally:
            array.crash()  # nothing to keep: skip the clean stop
    finally:
        mem.close()


def run_raw(cfg: BenchConfig, seed: int) -> LoadResult:
    mem = MemMembers(1, cfg.member_bytes)
    try:
        fd = mem.fds[0]

        def write(sector: int, data: bytes) -> None:
            os.pwrite(fd, data, sector * SECTOR)

        t0 = time.perf_counter()
        ops = random_writes(write, cfg.member_bytes // SECTOR, cfg.threads, cfg.seconds, seed)
        return LoadResult("raw", ops, time.perf_counter() - t0)
    finally:
        mem.close()


def run_fresh(cfg: BenchConfig, kind: BitmapKind, tmp: Path, seed: int) -> LoadResult:
    """A new array on files: llbitmap starts Unwritten, so writes pay durable bitmap IO."""
    d = tmp / f"fresh-{kind.value}"
    d.mkdir()
    paths = [str(d / f"m{i}.img") for i in range(4)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(cfg.fresh_member_bytes)
    array = make_array(paths, kind, assume_clean=False)
    try:
        sync_until_idle(array)
        t0 = time.perf_counter()
        ops = random_writes(array.write, array.array_sectors, cfg.threads, cfg.seconds, seed)
        array.flush()
        return LoadResult(kind.value, ops, time.perf_counter() - t0)
    finally:
        array.stop()
        shutil.rmtree(d, ignore_errors=True)


def run_nbd(cfg: BenchConfig, kind: BitmapKind, tmp: Path) -> dict[str, Any] | None:
    fio = shutil.which("fio")
    if fio is None:
        return None
    mem_dir = tmp / f"nbd-{kind.value}"
    mem_dir.mkdir()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else mem_dir
    paths = [str(shm / f"llraid-bench-{os.getpid()}-{kind.value}-{i}.img") for i in range(4)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(cfg.member_bytes)
    proc = None
    try:
        make_array(paths, kind, assume_clean=True).stop()
        sock = str(mem_dir / "nbd.sock")
        env = {**os.environ, "LLRAID_RUNTIME_DIR": str(mem_dir / "run")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "llraid.cli", "serve", *paths, "--socket", sock],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving" in line:
                break
        else:
            return {"kind": kind.value, "error": "server did not start"}
        jobs = max(1, min(cfg.threads, 8))  # fio jobs are processes: keep the client's cost bounded
        out = subprocess.run(
            [fio, "--name=bench", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", "--rw=randwrite",
             "--bs=4k", f"--numjobs={jobs}", f"--iodepth={max(1, cfg.iodepth // jobs)}", "--time_based",
             f"--runtime={max(1, int(cfg.seconds))}", "--group_reporting", "--output-format=json",
             "--size=100%"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if out.returncode != 0:
            return {"kind": kind.value, "error": out.stderr.strip()[-300:]}
        w = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["write"]  # fio may print notes first
        return {"kind": kind.value, "numjobs": jobs, "iodepth": max(1, cfg.iodepth // jobs),
                "iops": round(w["iops"]), "mib_s": round(w["bw"] / 1024, 2)}  # fmt: skip
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)


def run_sync_costs(cfg: BenchConfig, kind: BitmapKind, tmp: Path, level: int = 10) -> dict[str, Any]:
    """Resync after a crash and recovery after a re-add, with ``dirty_percent`` of the array written
    (in 1 MiB writes: for raid5, whole stripe rows)."""
    d = tmp / f"sync-raid{level}-{kind.value}"
    d.mkdir()
    paths = [str(d / f"m{i}.img") for i in range(4 if level == 10 else RAID5_DISKS)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(cfg.sync_member_bytes)
    result: dict[str, Any] = {"kind": kind.value, "level": level, "dirty_percent": cfg.dirty_percent}
    try:
        array = make_array(paths, kind, assume_clean=False, level=level)
        sync_until_idle(array)
        total = array.array_sectors
        region = int(total * cfg.dirty_percent / 100) // 2048 * 2048
        result["array_bytes"] = total * SECTOR
        result["written_bytes"] = region * SECTOR
        data = os.urandom(1 << 20)
        start = total // 3 // 2048 * 2048
        for s in range(start, start + region, 2048):
            array.write(s, data[: min(2048, start + region - s) * SECTOR])
        array.crash()  # unclean: superblocks say active, bitmap as last flushed

        array = Array.assemble(paths)
        t0 = time.perf_counter()
        stats = run_sync(array, SyncKind.RESYNC)
        result["resync_seconds"] = round(time.perf_counter() - t0, 3)
        result["resync_bytes_written"] = sum(stats.bytes_written.values())
        result["resync_bytes_read"] = sum(stats.bytes_read.values())
        sync_until_idle(array)
        # recovery: a member leaves, x% is written while degraded, it comes back
        array.fail(1)
        array.remove(1)
        for s in range(start, start + region, 2048):
            array.write(s, data[: min(2048, start + region - s) * SECTOR])
        array.re_add(paths[1])
        t0 = time.perf_counter()
        stats = run_sync(array, SyncKind.RECOVERY)
        result["recovery_seconds"] = round(time.perf_counter() - t0, 3)
        result["recovery_bytes_written"] = sum(stats.bytes_written.values())
        check = run_sync(array, SyncKind.CHECK)
        result["mismatches_after"] = check.mismatches
        array.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return result


# ---- the whole run ----------------------------------------------------------------------------------------


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> Report:
    report = Report(config=cfg.__dict__.copy(), machine=machine())
    with tempfile.TemporaryDirectory(prefix="llraid-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for r in range(cfg.rounds):
            for kind in KINDS:  # interleaved: drift on the machine hits every bitmap alike
                progress(f"round {r + 1}/{cfg.rounds}: {kind.value}")
                report.steady.append(run_steady(cfg, kind, seed=r))
            progress(f"round {r + 1}/{cfg.rounds}: raw")
            report.raw.append(run_raw(cfg, seed=r))
        for kind in KINDS:
            progress(f"fresh array on files: {kind.value}")
            report.fresh.append(run_fresh(cfg, kind, tmp, seed=99))
        if cfg.nbd:
            for kind in KINDS:
                progress(f"nbd + fio: {kind.value}")
                res = run_nbd(cfg, kind, tmp)
                if res is not None:
                    report.nbd.append(res)
        for kind in KINDS:
            progress(f"resync and recovery: {kind.value}")
            report.sync.append(run_sync_costs(cfg, kind, tmp))
        if cfg.raid5:
            for r in range(cfg.rounds):
                for kind in KINDS:
                    progress(f"raid5 round {r + 1}/{cfg.rounds}: {kind.value}")
                    rand, seq = run_raid5(cfg, kind, seed=r)
                    report.raid5_random.append(rand)
                    report.raid5_seq.append(seq)
                progress(f"raid5 round {r + 1}/{cfg.rounds}: raw 1 MiB sequential")
                report.raw_seq.append(run_raw_seq(cfg))
            for kind in KINDS:
                progress(f"raid5 resync and recovery: {kind.value}")
                report.raid5_sync.append(run_sync_costs(cfg, kind, tmp, level=5))
    return report


_ORDER = (("none", "none"), ("internal", "classic"), ("lockless", "lockless"), ("raw", "raw"))


def svg_plot(summary: dict[str, dict[str, float]], threads: int) -> str:
    """A small bar chart (median MiB/s per bitmap, and raw), as standalone SVG."""
    rows = [(label, summary[key]) for key, label in _ORDER if key in summary]
    top = max((v["mib_s"] for _, v in rows), default=1.0)
    w, h, bar, gap, left, bottom = 560, 300, 70, 40, 60, 40
    colors = {"none": "#888888", "classic": "#d9822b", "lockless": "#2b7bd9", "raw": "#4caf50"}
    title = (
        f"4 KiB random writes, raid10 n2 on 4 RAM members, {threads} threads (MiB/s, median; ratio to none)"
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{w // 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="black"/>',
    ]
    for i, (label, v) in enumerate(rows):
        x = left + gap + i * (bar + gap)
        bh = (h - bottom - 40) * v["mib_s"] / top
        y = h - bottom - bh
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{bh:.1f}" fill="{colors[label]}"/>')
        text = f"{v['mib_s']:.1f} ({v['ratio_to_none']:.3f})"
        parts.append(f'<text x="{x + bar / 2}" y="{y - 4:.1f}" text-anchor="middle">{text}</text>')
        parts.append(f'<text x="{x + bar / 2}" y="{h - bottom + 16}" text-anchor="middle">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def table_rows(summary: dict[str, dict[str, float]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for key, label in _ORDER:
        if key in summary:
            v = summary[key]
            rows.append(
                (
                    label,
                    f"{v['mib_s']:.1f}",
                    f"{v['iops']:.0f}",
                    f"{v['ratio_to_none']:.3f}",
                    f"{v['ratio_to_raw']:.3f}",
                )
            )
    return rows
