"""The kernel-made golden fixtures in ``../shared/fixtures``: locate, unpack, and know their data.

The parity-RAID set (raid5/raid6, ``../shared/fixtures-parity``) has the same format and is
kept apart so that code iterating the first set is unaffected; :func:`load_parity_fixtures`
reads it. Used by the tests and by ``llraid demo``. The fixtures are never copied or changed: member
images are decompressed (zstd) into a scratch directory as sparse files, and the expected
array content is regenerated from the manifest's write list (pattern in the fixtures' README).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llraid.errors import LlraidError

ENV_VAR = "LLRAID_FIXTURES"
PARITY_ENV_VAR = "LLRAID_FIXTURES_PARITY"
SECTOR = 512
_ZERO_MIB = bytes(1 << 20)


def fixtures_dir(start: Path | None = None, *, parity: bool = False) -> Path:
    """``$LLRAID_FIXTURES``, else ``../shared/fixtures`` beside the repo (or ``start``); with
    ``parity``, ``$LLRAID_FIXTURES_PARITY``, else ``../shared/fixtures-parity``."""
    env = os.environ.get(PARITY_ENV_VAR if parity else ENV_VAR)
    if env:
        return Path(env)
    leaf = "fixtures-parity" if parity else "fixtures"
    here = start or Path(__file__).resolve().parent.parent
    for base in (here, Path.cwd()):
        candidate = base.parent / "shared" / leaf
        if (candidate / "manifest.json").is_file():
            return candidate
    return here.parent / "shared" / leaf


@dataclass(frozen=True)
class Write:
    tag: int
    start_sector: int
    sectors: int


@dataclass(frozen=True)
class Fixture:
    """One fixture's manifest entry with the facts tests use most."""

    root: Path
    entry: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.entry["name"])

    @property
    def dir(self) -> Path:
        return self.root / str(self.entry["dir"])

    @property
    def members(self) -> list[dict[str, Any]]:
        return list(self.entry["members"])

    @property
    def array_sectors(self) -> int:
        return int(self.entry["array_size_sectors"])

    @property
    def writes(self) -> list[Write]:
        return [
            Write(int(w["tag_int"]), int(w["start_sector"]), int(w["sectors"])) for w in self.entry["writes"]
        ]

    def examine_file(self, index: int, kind: str = "examine") -> Path:
        """mdadm's output for exactly the shipped image of member ``index``."""
        # Crash fixtures were reset before a post-stop dump; their images were dumped by the
        # next boot before it assembled anything.
        for sub in ("boot2-reassemble/ondisk-before-assemble", "boot1/ondisk-after-stop"):
            p = self.dir / sub / f"{kind}_m{index}.txt"
            if p.is_file():
                return p
        raise FileNotFoundError(f"{self.name}: no {kind} output for m{index}")

    def unpack(self, dest: Path) -> list[Path]:
        """Decompress every member image into ``dest`` (once), verify sha256, return paths."""
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for m in self.members:
            out = dest / str(m["image"])
            if not out.exists():
                tmp = out.with_suffix(".part")
                digest = decompress_sparse(self.dir / str(m["file"]), tmp)
                if digest != m["sha256"]:
                    raise LlraidError(f"{self.name}/{m['file']}: sha256 {digest} is not the manifest's")
                tmp.rename(out)
            paths.append(out)
        return paths

    def expected_content(self) -> bytes:
        """The whole array as the kernel read it back, rebuilt from the write list."""
        buf = bytearray(self.array_sectors * SECTOR)
        for w in self.writes:
            buf[w.start_sector * SECTOR : (w.start_sector + w.sectors) * SECTOR] = pattern(
                w.tag, w.start_sector, w.sectors
            )
        return bytes(buf)


def pattern(tag: int, start_sector: int, sectors: int) -> bytes:
    """The fixtures' data: each sector is ``pack('<QQ', tag, sector)`` repeated 32 times."""
    return b"".join(struct.pack("<QQ", tag, s) * 32 for s in range(start_sector, start_sector + sectors))


def decode_sector(data: bytes) -> tuple[int, int] | None:
    """``(tag, sector)`` if the 512 bytes hold the pattern, ``None`` for anything else."""
    head = data[:16]
    if len(data) != SECTOR or head * 32 != data:
        return None
    tag, sector = struct.unpack("<QQ", head)
    return tag, sector


def _write_sparse(reader: BinaryIO, fout: BinaryIO) -> str:
    """Copy ``reader`` to ``fout`` leaving holes for zero MiBs; returns the content's sha256."""
    h = hashlib.sha256()
    size = 0
    while True:
        block = reader.read(1 << 20)
        if not block:
            break
        h.update(block)
        if block == _ZERO_MIB[: len(block)]:
            fout.seek(len(block), os.SEEK_CUR)  # the images are mostly zeros
        else:
            fout.write(block)
        size += len(block)
    fout.truncate(size)
    return h.hexdigest()


def decompress_sparse(src: Path, dest: Path) -> str:
    """zstd-decompress ``src`` into a sparse ``dest``; returns the sha256 of the content."""
    import zstandard

    with open(src, "rb") as fin, open(dest, "wb") as fout:
        return _write_sparse(zstandard.ZstdDecompressor().stream_reader(fin), fout)


def copy_sparse(src: Path, dest: Path) -> Path:
    """A private copy of an unpacked image (for tests that damage a member)."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        _write_sparse(fin, fout)
    return dest


def load_fixtures(root: Path | None = None, *, parity: bool = False) -> list[Fixture]:
    root = root or fixtures_dir(parity=parity)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise LlraidError(f"fixtures not found at {root} (set {PARITY_ENV_VAR if parity else ENV_VAR})")
    data = json.loads(manifest.read_text())
    return [Fixture(root, f) for f in data["fixtures"]]


def load_parity_fixtures(root: Path | None = None) -> list[Fixture]:
    """The raid5/raid6 set (``../shared/fixtures-parity`` or ``$LLRAID_FIXTURES_PARITY``)."""
    return load_fixtures(root, parity=True)
