"""Bad input: one ``llraid:`` line on stderr, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from llraid.cli import main
from llraid.fixtures import copy_sparse
from llraid.format.superblock import sb1_checksum

SB_AT = 4096
BITMAP_AT = 8192


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(err: str) -> str:
    assert err.startswith("llraid: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch(path: Path, offset: int, data: bytes, *, fix_checksum: bool = False) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if fix_checksum:
            f.seek(SB_AT)
            raw = f.read(4096)
            f.seek(SB_AT + 216)
            f.write(struct.pack("<I", sb1_checksum(raw)))


@pytest.fixture
def raid1(unpacked: Callable[[str], list[Path]], tmp_path: Path) -> list[Path]:
    return [copy_sparse(p, tmp_path / p.name) for p in unpacked("a-raid1-llbitmap")]


def test_not_an_md_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    for cmd in ("examine", "examine-bitmap", "cat"):
        rc, out, err = run(capsys, cmd, str(blank))
        assert rc == 1 and out in ("", "[]\n")
        assert "not an md member" in one_error_line(err)


def test_missing_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "cat", str(tmp_path / "nope.img"))
    assert rc == 1 and "cannot open" in one_error_line(err)


def test_bad_checksum_refused_unless_forced(raid1: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    patch(raid1[0], SB_AT + 32, b"evil")  # the name: checksum no longer matches
    before = [digest(p) for p in raid1]
    rc, out, err = run(capsys, "cat", *map(str, raid1), "-o", "/dev/null")
    assert rc == 1 and out == ""
    line = one_error_line(err)
    found = struct.unpack_from("<I", raid1[0].read_bytes(), SB_AT + 216)[0]
    expected = sb1_checksum(raid1[0].read_bytes()[SB_AT : SB_AT + 4096])
    assert f"checksum is {found:08x}, expected {expected:08x}" in line
    # examine still shows it, mdadm-style, but says so and fails unless --force
    rc, out, err = run(capsys, "examine", str(raid1[0]))
    assert rc == 1 and f"Checksum : {found:x} - expected {expected:x}" in out
    assert "expected" in one_error_line(err)
    assert run(capsys, "examine", "--force", str(raid1[0]))[0] == 0
    assert run(capsys, "cat", "--force", *map(str, raid1), "-o", "/dev/null")[0] == 0
    assert [digest(p) for p in raid1] == before  # nothing was written to a member


def test_truncated_device(raid1: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    with open(raid1[1], "r+b") as f:
        f.truncate(32 << 20)
    rc, _, err = run(capsys, "cat", *map(str, raid1), "-o", "/dev/null")
    assert rc == 1 and "data needs" in one_error_line(err)
    rc, out, _ = run(capsys, "examine", str(raid1[1]))
    assert rc == 0 and "State : clean TRUNCATED DEVICE" in out and "DEVICE TOO SMALL" in out
    tiny = raid1[1].with_name("tiny.img")
    tiny.write_bytes(bytes(4096))
    rc, _, err = run(capsys, "examine", str(tiny))
    assert rc == 1 and "truncated" in one_error_line(err)


def test_members_of_different_arrays(
    unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    a0 = unpacked("a-raid1-llbitmap")[0]
    e1 = unpacked("e-raid1-llbitmap-crash")[1]
    rc, _, err = run(capsys, "cat", str(a0), str(e1), "-o", "/dev/null")
    assert rc == 1 and "members of different arrays" in one_error_line(err)


def test_unknown_superblock_version(raid1: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    patch(raid1[0], SB_AT + 4, struct.pack("<I", 2), fix_checksum=True)
    for cmd in ("examine", "cat"):
        rc, _, err = run(capsys, cmd, str(raid1[0]))
        assert rc == 1 and "unknown md superblock major version 2" in one_error_line(err)


def test_unknown_bitmap_version(
    raid1: list[Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bitmap superblock llraid cannot read is refused where the bitmap matters; ``cat`` reads
    the data anyway, with a warning (reads never use the bitmap; it once refused unless --force)."""
    good = tmp_path / "good.bin"
    assert run(capsys, "cat", *map(str, raid1), "-o", str(good))[0] == 0
    patch(raid1[0], BITMAP_AT + 4, struct.pack("<I", 9))
    patch(raid1[1], BITMAP_AT + 4, struct.pack("<I", 9))
    before = [digest(p) for p in raid1]
    rc, _, err = run(capsys, "examine-bitmap", str(raid1[0]))
    assert rc == 1 and "unknown bitmap version 9" in one_error_line(err)
    rc, _, err = run(capsys, "write", *map(str, raid1), "-i", "/dev/null")
    assert rc == 1 and "unknown bitmap version 9" in one_error_line(err)
    out = tmp_path / "out.bin"
    rc, _, err = run(capsys, "cat", *map(str, raid1), "-o", str(out))
    assert rc == 0
    assert one_error_line(err).startswith("llraid: warning: ") and "unknown bitmap version 9" in err
    assert out.read_bytes() == good.read_bytes()
    assert [digest(p) for p in raid1] == before


def test_too_few_members_cli(
    unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = unpacked("b-raid10n2-llbitmap")
    rc, _, err = run(capsys, "cat", str(paths[0]), str(paths[1]), "-o", "/dev/null")
    assert rc == 1 and "too few members" in one_error_line(err)


def test_same_member_twice(unpacked: Callable[[str], list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    p = str(unpacked("a-raid1-llbitmap")[0])
    rc, _, err = run(capsys, "cat", p, p, "-o", "/dev/null")
    assert rc == 1 and "both claim device number 0" in one_error_line(err)


def test_bad_size_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["cat", "x", "--offset", "lots"])
    assert e.value.code == 2
    assert "not a size" in capsys.readouterr().err


def test_events_at_the_counter_limit(
    raid1: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A superblock (checksum fixed) whose events counter cannot take another update: refused for
    read-write use before anything is written (it overflowed in the middle of a write); read-only
    use still works."""
    for p in raid1:
        patch(p, SB_AT + 200, struct.pack("<Q", (1 << 64) - 1), fix_checksum=True)
    before = [digest(p) for p in raid1]
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 4096)
    rc, _, err = run(capsys, "write", *map(str, raid1), "-i", str(src))
    assert rc == 1 and "events 18446744073709551615 is at the counter's limit" in one_error_line(err)
    assert [digest(p) for p in raid1] == before
    assert run(capsys, "cat", *map(str, raid1), "--length", "4096", "-o", str(tmp_path / "out"))[0] == 0


def test_dev_number_no_superblock_can_hold(raid1: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """dev_number 0xfffffff0 (checksum fixed): refused as damaged, not a 32 GiB role table."""
    patch(raid1[1], SB_AT + 160, struct.pack("<I", 0xFFFFFFF0), fix_checksum=True)
    before = [digest(p) for p in raid1]
    rc, _, err = run(capsys, "write", *map(str, raid1), "-i", "/dev/null")
    assert rc == 1 and "dev_number 4294967280 is out of range (at most 1919)" in one_error_line(err)
    assert [digest(p) for p in raid1] == before
