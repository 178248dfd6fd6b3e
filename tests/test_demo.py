"""README command (a) runs ``llraid demo``: it must examine and read a fixture correctly."""

from __future__ import annotations

import pytest

from llraid.cli import main


def test_demo_default_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Raid Level : raid10" in out
    assert "unwritten 1024" in out  # the kernel's llbitmap/bits wording
    assert "-> MATCH" in out


def test_demo_unknown_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--fixture", "zz"]) == 1
    assert "no fixture 'zz'" in capsys.readouterr().err
