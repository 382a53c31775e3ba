"""numpy's BLAS as seen from the CPU path: its thread count.

numpy's wheels bundle OpenBLAS, which reads its thread count from the environment once, when
numpy is imported (OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else the cores). MindSpore sets
OMP_NUM_THREADS=1 in its C environment later, which does not reach the loaded OpenBLAS; this
module reads and sets the count of the loaded library directly (its `openblas_*_num_threads`
calls, found in the process's loaded libraries). Where numpy is not linked to OpenBLAS the
count is unknown (None) and setting it does nothing.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional, Tuple

import numpy as np

_SUFFIXES = ("64_", "")  # numpy's 64-bit-integer OpenBLAS suffixes its symbols with 64_


@functools.lru_cache(maxsize=1)
def _openblas() -> Optional[Tuple[object, object]]:
    np.dot  # numpy (and so its BLAS) is loaded by the import above
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: ("numpy" not in p, p)):  # numpy's own first (scipy bundles another)
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in _SUFFIXES:
            get = getattr(lib, "openblas_get_num_threads" + suffix, None)
            put = getattr(lib, "openblas_set_num_threads" + suffix, None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


def get_threads() -> Optional[int]:
    """Threads of numpy's OpenBLAS, or None when numpy's BLAS is not OpenBLAS."""
    calls = _openblas()
    return None if calls is None else int(calls[0]())


def set_threads(threads: int) -> None:
    """Run numpy's OpenBLAS on `threads` threads (no effect on another BLAS)."""
    if threads < 1:
        raise ValueError(f"threads={threads}: give at least 1")
    calls = _openblas()
    if calls is not None:
        calls[1](int(threads))
