"""``llraid demo``: examine and read one of the kernel-made fixture arrays.

The README's first command runs this until the array can be served (a later milestone): it
unpacks a fixture's member images, prints what ``examine`` and ``examine-bitmap`` say about the
first member, reads the whole array through the read-only assembly and checks the result
against the content the kernel read back (sha256 from the fixture manifest).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from llraid.assemble import assemble
from llraid.errors import LlraidError
from llraid.examine import examine_bitmap, examine_bitmap_text, examine_text
from llraid.fixtures import load_fixtures
from llraid.member import open_member
from llraid.raid.registry import level_name


def run_demo(fixture_name: str, workdir: str | None) -> int:
    fixtures = {f.name: f for f in load_fixtures()}
    fx = fixtures.get(fixture_name)
    if fx is None:
        raise LlraidError(f"no fixture {fixture_name!r}; have: {', '.join(sorted(fixtures))}")
    with tempfile.TemporaryDirectory(prefix="llraid-demo-") as tmp:
        dest = Path(workdir) if workdir else Path(tmp)
        paths = fx.unpack(dest / fx.name)
        print(f"== fixture {fx.name}: {len(paths)} members made by Linux md, unpacked to {dest / fx.name}")
        members = [open_member(str(p)) for p in paths]
        try:
            print(f"\n== llraid examine {paths[0].name}")
            print(examine_text(members[0], "mdvm"), end="")
            if members[0].sb.has_bitmap:
                print(f"\n== llraid examine-bitmap {paths[0].name}")
                print(examine_bitmap_text(examine_bitmap(members[0])), end="")
            asm = assemble(members)
            h = hashlib.sha256()
            for piece in asm.iter_bytes(0, asm.array_bytes):
                h.update(piece)
            digest = h.hexdigest()
            ok = digest == fx.entry["md_sha256"]
            print(f"\n== llraid cat: {level_name(asm.sb.level)}, {asm.array_bytes} bytes")
            print(f"sha256 {digest}")
            print(f"kernel {fx.entry['md_sha256']}  -> {'MATCH' if ok else 'MISMATCH'}")
        finally:
            for m in members:
                m.device.close()
    return 0 if ok else 1
