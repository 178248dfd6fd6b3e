"""Known data and what must survive: the torture workload's oracle.

Every write gets an id (1, 2, ...); each of its sectors holds a pattern made from (run salt,
write id, array sector), so any sector read back names the write it came from, and a sector
that is neither a whole pattern of a write that covered it nor all zeros (never written) is
garbage.

Per array sector the oracle keeps:

* ``floor``: the newest write that was acknowledged *and* durable: written with FUA, or
  acknowledged before a flush that then returned. After a power cut the sector must read
  back as the floor write or a newer write issued to it (acknowledged or not); with no floor,
  as zeros or any write issued to it.
* ``acked`` / ``issued``: the newest acknowledged / issued write. While the power stays on, a
  sector whose newest issued write was acknowledged must read back as exactly that write.
* ``hole``: raid4/5 only, the sectors a forced start of a dirty degraded array exposed to the
  write hole (see :meth:`Oracle.excuse`): until a newer write to them is durable they may read
  back as anything, and are counted as excused instead of checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SECTOR = 512
WORDS = SECTOR // 8
MAGIC = 0x4C4C544F52545552  # "LLTORTUR"
_K = np.arange(WORDS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Verdict:
    """One verification of a range."""

    sectors: int = 0
    required: int = 0  # sectors that had a floor (or, live, an exact expectation)
    verified: int = 0  # of those, read back as required
    lost: int = 0  # required sectors that did not read back as required
    garbage: int = 0  # sectors that are no version ever written there
    unstable: int = 0  # sectors whose version changed against an earlier read
    excused: int = 0  # write-hole sectors not checked (forced dirty degraded raid4/5 start)
    excused_wrong: int = 0  # of those, read back as neither the required version nor a newer one
    first_problem: str | None = None

    def add(self, other: Verdict) -> None:
        self.sectors += other.sectors
        self.required += other.required
        self.verified += other.verified
        self.lost += other.lost
        self.garbage += other.garbage
        self.unstable += other.unstable
        self.excused += other.excused
        self.excused_wrong += other.excused_wrong
        if self.first_problem is None:
            self.first_problem = other.first_problem


class Oracle:
    def __init__(self, sectors: int, salt: int) -> None:
        self.sectors = sectors
        self.salt = np.uint64(salt & 0xFFFF_FFFF_FFFF_FFFF)
        self.floor = np.full(sectors, -1, dtype=np.int64)
        self.acked = np.full(sectors, -1, dtype=np.int64)
        self.issued = np.full(sectors, -1, dtype=np.int64)
        self.seen = np.full(sectors, -2, dtype=np.int64)  # version last read back (-2: none)
        self.hole = np.zeros(sectors, dtype=np.int64)  # excused while floor < hole (0: never)
        self.starts = [0]  # per write id: first array sector (id 0: "zeros")
        self.ends = [0]
        self.unflushed: list[int] = []  # acknowledged, not yet covered by a flush
        self.inflight: set[int] = set()  # issued, not acknowledged (cut short, or failed)
        self.writes_acked = 0
        self.writes_durable = 0
        self.epoch = 1  # first write id since the last power cut

    # ---- data ------------------------------------------------------------------------------

    def _rows(self, wid: npt.NDArray[np.uint64], sector: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        n = len(wid)
        rows = np.empty((n, WORDS), dtype=np.uint64)
        mix = (wid * np.uint64(0xBF58476D1CE4E5B9)) ^ (sector * np.uint64(0x94D049BB133111EB)) ^ self.salt
        rows[:] = mix[:, None] ^ _K[None, :]
        rows[:, 0] = MAGIC
        rows[:, 1] = self.salt
        rows[:, 2] = wid
        rows[:, 3] = sector
        return rows

    def new_write(self, sector: int, count: int) -> tuple[int, bytes]:
        """A new write id and its data; the write counts as issued from now on."""
        wid = len(self.starts)
        self.starts.append(sector)
        self.ends.append(sector + count)
        secs = np.arange(sector, sector + count, dtype=np.uint64)
        data = self._rows(np.full(count, wid, dtype=np.uint64), secs).tobytes()
        self.issued[sector : sector + count] = wid
        self.seen[sector : sector + count] = -2
        self.inflight.add(wid)
        return wid, data

    def acknowledged(self, wid: int, fua: bool) -> None:
        a, b = self.starts[wid], self.ends[wid]
        view = self.acked[a:b]
        np.maximum(view, wid, out=view)
        self.inflight.discard(wid)
        self.writes_acked += 1
        if fua:
            self._durable(wid)
        else:
            self.unflushed.append(wid)

    def _durable(self, wid: int) -> None:
        a, b = self.starts[wid], self.ends[wid]
        view = self.floor[a:b]
        np.maximum(view, wid, out=view)
        self.writes_durable += 1

    def flush_started(self) -> list[int]:
        return list(self.unflushed)

    def flush_done(self, covered: list[int]) -> None:
        """A flush that started when ``covered`` were the unflushed writes has returned."""
        for wid in covered:
            self._durable(wid)
        done = set(covered)
        self.unflushed = [w for w in self.unflushed if w not in done]

    def pending(self) -> list[tuple[int, int]]:
        """``(sector, count)`` of every write not known durable: acknowledged but not flushed, or
        issued and never acknowledged. At a power cut these may have reached some members only."""
        wids = [*self.unflushed, *sorted(self.inflight)]
        return [(self.starts[w], self.ends[w] - self.starts[w]) for w in wids]

    def power_cut(self) -> None:
        """The power went off: nothing read so far is known to stay as it was."""
        self.seen[:] = -2
        self.epoch = len(self.starts)
        self.unflushed.clear()
        self.inflight.clear()

    def excuse(self, sector: int, count: int) -> None:
        """raid4/5's write hole: these sectors' content was only recoverable through parity that a
        crash may have left stale (a dirty degraded array started by force, which md refuses
        without it). They are not checked until a write issued from now on is durable there."""
        view = self.hole[sector : sector + count]
        np.maximum(view, len(self.starts), out=view)
        self.seen[sector : sector + count] = -2

    def everything_durable(self) -> None:
        """A clean stop: every acknowledged write is durable."""
        self.flush_done(self.flush_started())

    # ---- verification ------------------------------------------------------------------------

    def versions(self, sector: int, data: bytes) -> npt.NDArray[np.int64]:
        """Per sector: the write id it holds, 0 for zeros, -1 for garbage."""
        rows = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS)
        n = len(rows)
        secs = np.arange(sector, sector + n, dtype=np.uint64)
        zero = ~rows.any(axis=1)
        wid = rows[:, 2].copy()
        nwrites = len(self.starts)
        plausible = (rows[:, 0] == MAGIC) & (rows[:, 1] == self.salt) & (rows[:, 3] == secs)
        plausible &= (wid >= 1) & (wid < nwrites)
        wid_i = np.where(plausible, wid, 0).astype(np.int64)
        starts = np.asarray(self.starts, dtype=np.int64)[wid_i]
        ends = np.asarray(self.ends, dtype=np.int64)[wid_i]
        si = secs.astype(np.int64)
        plausible &= (starts <= si) & (si < ends)
        exact = plausible & (rows == self._rows(wid, secs)).all(axis=1)
        out = np.where(zero, 0, np.where(exact, wid_i, -1))
        return out.astype(np.int64)

    def check(self, sector: int, data: bytes, *, live: bool, stable: bool = True) -> Verdict:
        """Verify array sectors read back. ``live``: the power has stayed on since the newest
        writes (an acknowledged newest write must read back exactly)."""
        v = self.versions(sector, data)
        n = len(v)
        sl = slice(sector, sector + n)
        floor, acked, issued = self.floor[sl], self.acked[sl], self.issued[sl]
        garbage = v < 0
        # any version issued to the sector at or after the floor (zeros only without a floor)
        ok = ~garbage & np.where(floor >= 0, v >= floor, True)
        ok &= (v == 0) | (v <= issued)
        required = floor >= 0
        hole = self.hole[sl]
        excused = (hole > 0) & (floor < hole)
        if live:
            exact = (acked >= self.epoch) & (acked == issued)
            ok &= np.where(exact, v == acked, True)
            required = required | exact
            excused &= ~(exact & (acked >= hole))  # written since the hole: must read back
        checked = ~excused
        verdict = Verdict(sectors=n)
        verdict.excused = int(excused.sum())
        verdict.excused_wrong = int((excused & ~ok).sum())
        required &= checked
        verdict.garbage = int((garbage & checked).sum())
        verdict.required = int(required.sum())
        verdict.verified = int((required & ok).sum())
        verdict.lost = int((required & ~ok).sum())
        bad_unrequired = int((~required & ~ok & ~garbage & checked).sum())
        verdict.lost += bad_unrequired  # a version older than allowed, though nothing was required
        seen = self.seen[sl].copy()
        changed = (seen != -2) & (seen != v) & checked
        if stable:
            verdict.unstable = int(changed.sum())
        self.seen[sl] = v
        problems = np.flatnonzero((~ok & checked) | (changed if stable else False))
        if len(problems):
            i = int(problems[0])
            verdict.first_problem = (
                f"array sector {sector + i}: read version {int(v[i])}, floor {int(floor[i])}, "
                f"acked {int(acked[i])}, issued {int(issued[i])}, seen before {int(seen[i])}"
            )
        return verdict
