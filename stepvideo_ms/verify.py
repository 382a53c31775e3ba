"""Check our modules against golden data made by the upstream PyTorch code.

    python -m stepvideo_ms.verify --golden DIR [--case NAME ...]

For every case in DIR (NAME_weights.safetensors + NAME_io.safetensors) of a supported kind, builds
the module from the case's config, loads the weights through the checkpoint loader, runs the
inputs and prints one line: name, max abs error, tolerance, PASS/FAIL. Exits non-zero when a case
fails or none ran.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np

from . import runtime
from .verification import GoldenCase, REGISTRY, kind_of, load_all_kinds


def find_cases(golden_dir: str) -> List[Tuple[str, str, str]]:
    """(name, weights, io) of every complete case in the directory, sorted by name."""
    cases = []
    for io_path in sorted(glob.glob(os.path.join(golden_dir, "*_io.safetensors"))):
        name = os.path.basename(io_path)[: -len("_io.safetensors")]
        weights = os.path.join(golden_dir, f"{name}_weights.safetensors")
        if os.path.isfile(weights):
            cases.append((name, weights, io_path))
    return cases


def check_case(name: str, weights: str, io_path: str) -> Tuple[bool, float, float, str]:
    """Run one case: (passed, worst error, its tolerance, detail)."""
    kind = kind_of(name)
    case = GoldenCase.open(name, weights, io_path)
    passed, worst, worst_tol, details = True, 0.0, 0.0, []
    for label, ours, golden in kind.run(case):
        if ours.shape != golden.shape:
            return False, float("inf"), 0.0, f"{label}: shape {ours.shape} vs golden {golden.shape}"
        err = float(np.max(np.abs(ours.astype(np.float64) - golden.astype(np.float64)))) if golden.size else 0.0
        tol = kind.rtol * (1.0 + float(np.max(np.abs(golden))) if golden.size else 1.0)
        ok = bool(np.isfinite(err) and err <= tol)
        passed &= ok
        details.append(f"{label}={err:.3e}")
        if err / tol >= (worst / worst_tol if worst_tol else -1):
            worst, worst_tol = err, tol
    return passed, worst, worst_tol, " ".join(details)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_ms.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", required=True, help="directory of NAME_weights/NAME_io.safetensors pairs")
    parser.add_argument("--case", action="append", default=None, metavar="NAME",
                        help="run only this case (repeatable); default: every supported case found")
    parser.add_argument("--device", default=None, help="Ascend or CPU (default: Ascend when present)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.golden):
        parser.error(f"--golden {args.golden}: no such directory")
    runtime.init(args.device)
    load_all_kinds()
    found = find_cases(args.golden)
    if args.case:
        names = {n for n, _, _ in found}
        unknown = [c for c in args.case if c not in names]
        if unknown:
            parser.error(f"--case {', '.join(unknown)}: not found in {args.golden} (found: {', '.join(sorted(names)) or 'none'})")
        found = [c for c in found if c[0] in args.case]
    ran = failed = 0
    for name, weights, io_path in found:
        if kind_of(name) is None:
            print(f"{name:<12} SKIP (no supported kind; supported: {', '.join(sorted(REGISTRY))})")
            continue
        start = time.perf_counter()
        try:
            ok, err, tol, detail = check_case(name, weights, io_path)
        except Exception as exc:  # a case that cannot run is a failure, and the others still run
            ok, err, tol, detail = False, float("nan"), float("nan"), f"error: {type(exc).__name__}: {exc}"
        ran += 1
        failed += not ok
        print(f"{name:<12} max_abs_err={err:.3e} tol={tol:.3e} {'PASS' if ok else 'FAIL'} "
              f"({detail}; {time.perf_counter() - start:.1f}s)", flush=True)
    if ran == 0:
        print(f"no supported case ran from {args.golden}", file=sys.stderr)
        return 2
    print(f"{ran - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
