"""`python -m stepvideo_ms COMMAND [ARGS]`: the package's tools in one place.

    python -m stepvideo_ms tiny OUT [--task t2v|ti2v]    a tiny random-weight model directory
    python -m stepvideo_ms describe [--plan ...]         the DiT's size; the parallel layouts that fit
    python -m stepvideo_ms verify [--golden DIR]         our modules against the upstream outputs
    python -m stepvideo_ms doctor [--device D]           MindSpore, CANN, the card, this version's capabilities
    python -m stepvideo_ms compare A.mp4 B.mp4           per-frame PSNR and SSIM of two videos

Generation, the servers and the converter have their own scripts at the top of the repository
(run_parallel.py, api/call_remote_server.py, convert.py). The old spellings
`python -m stepvideo_ms.tiny` (and .describe, .verify) still work.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "tiny": ("stepvideo_ms.tools.tiny", "a tiny random-weight model directory in the released layout"),
    "describe": ("stepvideo_ms.tools.describe", "the DiT's parameters and shapes; --plan: the layouts that fit"),
    "verify": ("stepvideo_ms.tools.verify", "our modules against the upstream outputs in a golden folder"),
    "doctor": ("stepvideo_ms.tools.doctor", "MindSpore, CANN, the card and what this version can do: check first"),
    "compare": ("stepvideo_ms.tools.compare", "per-frame PSNR and SSIM of two videos (pick a step cache threshold)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: python -m stepvideo_ms COMMAND [ARGS]  (COMMAND --help for its arguments)\n\ncommands:\n" \
        + "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m stepvideo_ms: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
