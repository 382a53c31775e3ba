"""Check our modules against golden data made by the upstream PyTorch code.

    python -m stepvideo_ms verify [--golden DIR] [--case NAME ...] [--device CPU|Ascend|ascend-sim]

For every case in DIR and its subdirectories (NAME_weights.safetensors + NAME_io.safetensors) of a
supported kind, builds the module from the case's config, loads the weights through the checkpoint
loader, runs the inputs and prints one line per case with PASS/FAIL. Exits non-zero when a case
fails or none ran.

float32 cases run in float32 and pass when max |ours - golden| <= rtol * (1 + max |golden|).
bf16 cases (with `ref.fp32.*` entries, see golden/README.md) run in bfloat16, which needs the
Ascend policy (Ascend or ascend-sim; on CPU they are skipped), and pass when both the max and the
mean of |ours - out| are no larger than those of the case's own floor |ref.fp32 - out|; the line
shows both ratios (ours / floor).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import mindspore as ms

from .. import runtime
from .verification import GoldenCase, REGISTRY, kind_of, load_all_kinds


# The golden data kept with the repository (a checkout's tests/golden).
CHECKOUT_GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "tests", "golden")


def find_cases(golden_dir: str) -> List[Tuple[str, str, str]]:
    """(name, weights, io) of every complete case in the directory and its subdirectories, by name."""
    cases = []
    paths = glob.glob(os.path.join(golden_dir, "*_io.safetensors")) + \
        glob.glob(os.path.join(golden_dir, "*", "*_io.safetensors"))
    for io_path in paths:
        name = os.path.basename(io_path)[: -len("_io.safetensors")]
        weights = os.path.join(os.path.dirname(io_path), f"{name}_weights.safetensors")
        if os.path.isfile(weights):
            cases.append((name, weights, io_path))
    return sorted(cases)


def check_case(name: str, weights: str, io_path: str) -> Tuple[bool, float, float, str]:
    """Run one case: (passed, worst error, its bound, detail)."""
    kind = kind_of(name)
    case = GoldenCase.open(name, weights, io_path)
    if case.is_bf16:
        return check_bf16(case, kind)
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


def bf16_ratios(ours: np.ndarray, golden: np.ndarray, reference: np.ndarray) -> Tuple[float, float, float, float]:
    """(max err, max floor, mean err, mean floor): |ours - out| against the floor |ref.fp32 - out|."""
    err = np.abs(ours.astype(np.float64) - golden.astype(np.float64))
    floor = np.abs(reference.astype(np.float64) - golden.astype(np.float64))
    return float(err.max()), float(floor.max()), float(err.mean()), float(floor.mean())


def check_bf16(case: GoldenCase, kind) -> Tuple[bool, float, float, str]:
    """A bf16 case: every output's max and mean error within the case's own bf16 floor."""
    passed, worst, worst_floor, details = True, 0.0, 0.0, []
    for label, ours, golden in kind.run(case):
        reference = case.reference(label)
        if reference is None:
            return False, float("nan"), float("nan"), f"{label}: the case has no ref.fp32 answer for it"
        if ours.shape != golden.shape:
            return False, float("inf"), 0.0, f"{label}: shape {ours.shape} vs golden {golden.shape}"
        err_max, floor_max, err_mean, floor_mean = bf16_ratios(ours, golden, reference)
        ok = bool(np.isfinite(err_max) and err_max <= floor_max and err_mean <= floor_mean)
        passed &= ok
        details.append(f"{label}: max {err_max:.3e}/{floor_max:.3e}=x{_ratio(err_max, floor_max):.2f} "
                       f"mean {err_mean:.3e}/{floor_mean:.3e}=x{_ratio(err_mean, floor_mean):.2f}")
        if _ratio(err_max, floor_max) >= _ratio(worst, worst_floor):
            worst, worst_floor = err_max, floor_max
    return passed, worst, worst_floor, "; ".join(details)


def _ratio(err: float, floor: float) -> float:
    return err / floor if floor else (0.0 if err == 0 else float("inf"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_ms verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", default=CHECKOUT_GOLDEN,
                        help="directory of NAME_weights/NAME_io.safetensors pairs (default: this checkout's "
                             "tests/golden, the upstream answers kept with the repository)")
    parser.add_argument("--case", action="append", default=None, metavar="NAME",
                        help="run only this case (repeatable); default: every supported case found")
    parser.add_argument("--device", default=None,
                        help="Ascend, CPU or ascend-sim (default: $STEPVIDEO_DEVICE, else Ascend when present)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.golden):
        parser.error(f"--golden {args.golden}: no such directory")
    try:
        rt = runtime.init(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
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
        bf16 = GoldenCase.open(name, weights, io_path).is_bf16
        if bf16 and rt.compute_dtype != ms.bfloat16:
            print(f"{name:<12} SKIP (a bf16 case: run it with --device Ascend or ascend-sim, the bf16 policy)")
            continue
        start = time.perf_counter()
        try:
            ok, err, tol, detail = check_case(name, weights, io_path)
        except Exception as exc:  # a case that cannot run is a failure, and the others still run
            ok, err, tol, detail = False, float("nan"), float("nan"), f"error: {type(exc).__name__}: {exc}"
        ran += 1
        failed += not ok
        print(f"{name:<12} max_abs_err={err:.3e} {'floor' if bf16 else 'tol'}={tol:.3e} {'PASS' if ok else 'FAIL'} "
              f"({detail}; {time.perf_counter() - start:.1f}s)", flush=True)
    if ran == 0:
        print(f"no supported case ran from {args.golden}", file=sys.stderr)
        return 2
    print(f"{ran - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
