"""Counting what a simulated run asks of the host: synchronisations and collective calls.

A host synchronisation is a point where Python waits for the device: `Tensor.asnumpy`, `.item()`,
`.tolist()`, truth or number conversion of a Tensor, and `mindspore.runtime.synchronize()`. The
simulation's own reads are not counted (on a device the data stays there): the HCCL side channel's
run inside `internal()`, and a sync whose first caller outside MindSpore is in this package (an
emulator checking a mask) is the simulation's. Kernel launches are counted by
MindSpore's profiler (see bench/ascend_sim_syncs.py), not here.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Optional

import mindspore as ms
from mindspore import Tensor

SYNC_METHODS = ("asnumpy", "item", "tolist", "__bool__", "__float__", "__int__", "__index__")
_counts: Counter = Counter()
_local = threading.local()
_installed = False


def _inside() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextmanager
def internal():
    """Work of the simulation itself: host syncs inside are not the product's."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


@contextmanager
def collective(name: str):
    """One simulated communication call (counted as `comm.<name>`), internal to the simulation."""
    if not _inside():
        _counts[f"comm.{name}"] += 1
    with internal():
        yield


_SIM_DIR = os.path.dirname(os.path.abspath(__file__))
_MS_DIR = f"{os.sep}mindspore{os.sep}"


def product_call_site(depth: int = 2) -> Optional[str]:
    """file:line of the first caller outside MindSpore, or None when that caller is the simulation
    itself (an emulator reading a mask to check it: a device would not sync there)."""
    try:
        frame = sys._getframe(depth)
    except ValueError:  # called from the top of the stack
        return "?"
    while frame is not None and _MS_DIR in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    if os.path.abspath(path).startswith(_SIM_DIR + os.sep):
        return None
    return f"{os.path.relpath(path)}:{frame.f_lineno}"


def _counting(kind: str, fn):
    def wrapper(*args, **kwargs):
        if not _inside():
            site = product_call_site(2)
            if site is not None:
                _counts[f"sync.{kind}"] += 1
                _counts[f"site.{site}"] += 1
        with internal():  # a conversion built on another (float() -> asnumpy) counts once
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", kind)
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    return wrapper


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for name in SYNC_METHODS:
        original = getattr(Tensor, name, None)
        if original is not None:
            setattr(Tensor, name, _counting(name.strip("_"), original))
    ms.runtime.synchronize = _counting("synchronize", _synchronize_blocking(ms.runtime.synchronize))


def _synchronize_blocking(real):
    """`mindspore.runtime.synchronize()` of the simulation: the CPU backend launches blocking under
    ascend-sim (runtime.init), so there is nothing to wait for; the real one only logs
    "CPU device is not supported" there. Bound to the real (empty) signature."""
    import inspect

    signature = inspect.signature(real)

    def synchronize(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"synchronize(): {err}") from None
        from .streams import synchronize_all

        synchronize_all()  # every asynchronous copy lands

    return synchronize


def snapshot() -> Dict[str, int]:
    """The counts so far: `sync.<kind>` per host synchronisation kind, `site.<file:line>` per place
    that synchronised, `comm.<op>` per simulated call."""
    return dict(_counts)


def reset() -> None:
    _counts.clear()


def host_syncs(counts: Dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("sync."))
