"""Proof that nothing is lost: power cuts, failing members and fuzzed input.

* :mod:`llraid.torture.simdev`: simulated member devices (a volatile write cache that a power
  cut resolves, injected faults), plugged in through the array's device opener;
* :mod:`llraid.torture.oracle`: known data and which writes must survive;
* :mod:`llraid.torture.runner`: randomised runs over raid1 / raid10 (n2, f2, o2) / raid5 (3 and
  4 members) / raid4 with no bitmap, the classic bitmap and llbitmap, and their report.

``llraid torture`` calls :func:`run_torture` and prints :func:`format_report` (or ``as_dict()``
with ``--json``).
"""

from llraid.torture.oracle import Oracle, Verdict
from llraid.torture.runner import (
    BITMAPS,
    LEVELS,
    Config,
    RunResult,
    TortureReport,
    format_report,
    run_one,
    run_seed,
    run_torture,
)
from llraid.torture.simdev import (
    CutPlan,
    CutReport,
    Fault,
    InjectedError,
    Layout,
    PowerCutError,
    SimDevice,
    SimWorld,
)

__all__ = [
    "BITMAPS",
    "LEVELS",
    "Config",
    "CutPlan",
    "CutReport",
    "Fault",
    "InjectedError",
    "Layout",
    "Oracle",
    "PowerCutError",
    "RunResult",
    "SimDevice",
    "SimWorld",
    "TortureReport",
    "Verdict",
    "format_report",
    "run_one",
    "run_seed",
    "run_torture",
]
