"""The MindSpore versions this package supports, and the CANN toolkit each is published with.

Plain data and a version parser, importing nothing of the package or of MindSpore, so that
scripts/setup.sh can check a requested version before MindSpore is installed:

    python stepvideo_ms/versions.py check 2.7.1     # exit 0, or 2 with the supported range
    python stepvideo_ms/versions.py oldest          # 2.7.0 (CI runs the suite on it too)

What a version can do is not decided here from its number: stepvideo_ms/capabilities.py asks the
installed MindSpore itself.
"""
from __future__ import annotations

import re
import sys
from typing import Optional, Tuple

OLDEST, NEWEST = "2.7.0", "2.10.0"  # the supported range, both ends tested (CI runs the suite on both)
# The PyPI wheels run here by bench/compat_matrix.py (CPU and the Ascend simulation).
TESTED = ("2.7.0", "2.7.1", "2.7.2", "2.8.0", "2.9.0", "2.10.0")
# MindSpore -> CANN, as published by Huawei's Ascend deployer (ascend-deployer's version_match.json) and
# MindSpore's install pages. Versions missing here have no pairing known to this package.
CANN_FOR = {"2.6.0": "8.2.RC1", "2.7.0": "8.2.RC1", "2.7.1": "8.3.RC1", "2.7.2": "8.5.0"}


def parse(version: str) -> Tuple[int, int, int]:
    """(major, minor, patch) of "2.7.1", "2.7.1.post1", "2.8.0rc1", ... ; ValueError when it is none."""
    found = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not found:
        raise ValueError(f"{version!r} is not a MindSpore version (expected e.g. {NEWEST})")
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def supported(version: str) -> bool:
    return parse(OLDEST) <= parse(version) <= parse(NEWEST)


def range_text() -> str:
    return f"{OLDEST} to {NEWEST}"


def cann_for(version: str) -> Optional[str]:
    """The CANN toolkit published with this MindSpore release (post releases count as their release)."""
    return CANN_FOR.get("{}.{}.{}".format(*parse(version)))


def main(argv) -> int:
    if argv == ["oldest"]:
        print(OLDEST)
        return 0
    if len(argv) != 2 or argv[0] != "check":
        print("usage: python stepvideo_ms/versions.py check VERSION | oldest", file=sys.stderr)
        return 2
    try:
        ok = supported(argv[1])
    except ValueError as exc:
        print(f"STEPVIDEO_MINDSPORE: {exc}", file=sys.stderr)
        return 2
    if not ok:
        print(f"MindSpore {argv[1]} is not supported: stepvideo_ms supports MindSpore {range_text()}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
