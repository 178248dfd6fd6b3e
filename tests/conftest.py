"""Shared test fixtures: the kernel-made member images, unpacked once per session.

The images are read in place from ``../shared/fixtures`` (or ``$LLRAID_FIXTURES``) and
decompressed into a session temp dir as sparse files; tests never change them. The raid5/raid6
set in ``../shared/fixtures-parity`` (or ``$LLRAID_FIXTURES_PARITY``) is kept out of ``ALL``, so
tests that iterate the first set are unaffected; ``unpacked`` serves both. A test that
needs to damage a member makes its own copy with :func:`llraid.fixtures.copy_sparse`.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.fixtures import Fixture, load_fixtures, load_parity_fixtures

os.environ["TZ"] = "UTC"  # mdadm printed the fixtures' times in the VM's UTC
time.tzset()

# A runaway allocation (a fuzzed size taken at face value) must fail the test with MemoryError,
# not make the kernel's OOM killer end the whole run.
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
if _hard == resource.RLIM_INFINITY or _hard > 16 << 30:
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, _hard))

ALL = load_fixtures()
BY_NAME = {f.name: f for f in ALL}
MEMBERS = [(f.name, i) for f in ALL for i in range(len(f.members))]
PARITY = load_parity_fixtures()
PARITY_BY_NAME = {f.name: f for f in PARITY}


@pytest.fixture(scope="session")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[Path]]:
    root = tmp_path_factory.mktemp("fixtures")
    cache: dict[str, list[Path]] = {}

    def get(name: str) -> list[Path]:
        if name not in cache:
            fx = BY_NAME[name] if name in BY_NAME else PARITY_BY_NAME[name]
            cache[name] = fx.unpack(root / name)
        return cache[name]

    return get


def fixture(name: str) -> Fixture:
    return BY_NAME[name]
