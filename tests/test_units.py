"""One parser for sizes, rates and durations (llraid.units) and the settings table built on it."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from llraid import units
from llraid.cli import main
from llraid.errors import LlraidError
from llraid.tunables import TUNABLES, tunable
from llraid.units import KiB, Limits, MiB, UnitError, parse_duration, parse_rate, parse_size

SECONDS = Limits(Fraction(1, 100), 86400)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64K", 64 * KiB),
        ("64k", 64 * KiB),
        ("64KiB", 64 * KiB),
        ("1.5M", 3 * MiB // 2),
        ("2G", 2 << 30),
        (" 1T ", 1 << 40),
        ("8S", 4096),
        ("0x1000", 4096),
        ("0", 0),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_size_bare_unit_for_mdadm_options() -> None:
    assert parse_size("64", bare="K") == 64 * KiB
    assert parse_size("64M", bare="K") == 64 * MiB


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("inf", "not a number"),
        ("nan", "not a number"),
        ("1e300", "not a number"),
        ("-1", "must not be negative"),
        ("", "not a number"),
        ("٣", "not a number"),  # a digit to Python's int(), not to us
        ("1_000", "not a number"),
        ("1KB", "unknown unit"),  # ambiguous: 1000 or 1024
        ("0.3", "not a whole number of bytes"),
        ("1" * 100, "not a number"),
        ("12 34", "not a number"),
    ],
)
def test_sizes_refused(text: str, why: str) -> None:
    with pytest.raises(UnitError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("20480", 20480 * KiB),  # md's unit: a bare number is KiB/s
        ("1", KiB),
        ("2M", 2 * MiB),
        ("2M/s", 2 * MiB),
        ("2MiB/s", 2 * MiB),
        ("1G", 1 << 30),
        ("2048B/s", 2048),
        ("0", 0),  # no limit
        ("1.5K", 1536),
    ],
)
def test_rates(text: str, bytes_per_s: int) -> None:
    assert parse_rate(text) == bytes_per_s


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("-1", "must not be negative"),
        ("0.5", "out of range"),  # below 1 KiB/s
        ("100B", "out of range"),
        ("2T", "unknown unit"),  # more than the 1 TiB/s maximum anyway
        ("1048577M", "out of range"),
        ("nan", "not a number"),
        ("inf", "not a number"),
        ("1e3", "not a number"),
        ("0x10", "not a decimal number"),
    ],
)
def test_rates_refused(text: str, why: str) -> None:
    with pytest.raises(UnitError, match=why):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("7", 7.0), ("0.3", 0.3), ("250ms", 0.25), ("2s", 2.0), ("5 s", 5.0), (".5", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, limits=SECONDS) == seconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("inf", "not a number"),
        ("nan", "not a number"),
        ("1e300", "not a number"),
        ("1e308", "not a number"),
        ("-1", "must not be negative"),
        ("0", "out of range"),
        ("0.001", "out of range"),
        ("86401", "out of range"),
        ("2h", "unknown unit"),
        ("0x10", "not a decimal number"),
    ],
)
def test_durations_refused(text: str, why: str) -> None:
    with pytest.raises(UnitError, match=why):
        parse_duration(text, what="x", limits=SECONDS)


def test_every_setting_has_a_unit_a_range_and_help() -> None:
    assert set(TUNABLES) == {"daemon_sleep", "barrier_idle", "safe_mode_delay", "sync_speed_max"}
    assert tunable("sync_speed_max").parse("2M") == 2 * MiB
    assert tunable("sync_speed_max").show(2 * MiB) == "2048"  # shown in KiB/s, as md's sysfs
    assert tunable("daemon_sleep").show(tunable("daemon_sleep").parse("250ms")) == "0.25"
    assert tunable("barrier_idle").parse("0") == 0  # md allows it: idle pages clean at once
    with pytest.raises(LlraidError, match="unknown setting 'x' \\(settings: daemon_sleep, "):
        tunable("x")
    for t in TUNABLES.values():
        assert t.help and t.range_text


def test_help_documents_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["set", "--help"])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for t in TUNABLES.values():
        assert any(line.startswith(f"{t.name} {t.range_text}: ") for line in lines), (t.name, lines)
    with pytest.raises(SystemExit):
        main(["sync", "--help"])
    assert "KiB/s" in capsys.readouterr().out


def test_offline_sync_speed_limit_uses_mds_unit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sync --speed-limit`` and ``set sync_speed_max`` read a value the same way: KiB/s for a
    bare number (the offline option once took bytes/s and the setting refused '2M')."""
    import llraid.array
    import llraid.sync

    seen: list[float | None] = []

    class Stopped:
        def stop(self) -> None:
            pass

    monkeypatch.setattr(llraid.array.Array, "assemble", classmethod(lambda cls, *a, **k: Stopped()))

    def until_idle(array: object, speed_limit: float | None, **_: object) -> list[object]:
        seen.append(speed_limit)
        return []

    monkeypatch.setattr(llraid.sync, "sync_until_idle", until_idle)
    for text in ("4096", "20M"):
        assert main(["sync", str(tmp_path / "m0"), "--speed-limit", text]) == 0
    assert seen == [4096 * KiB, 20 * MiB]
    with pytest.raises(SystemExit) as e:
        main(["sync", str(tmp_path / "m0"), "--speed-limit", "-5"])
    assert e.value.code == 2 and "must not be negative" in capsys.readouterr().err


def test_cli_sizes_use_the_same_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("inf", "-1", "1e300", "0.5"):
        with pytest.raises(SystemExit):
            main(["cat", "x", "--offset", bad])
        assert "not a size" in capsys.readouterr().err
    assert units.parse_size("1.5K") == 1536
