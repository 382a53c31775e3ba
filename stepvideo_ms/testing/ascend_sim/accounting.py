"""Counting what a simulated run asks of the host: synchronisations and collective calls.

A host synchronisation is a point where Python waits for the device: `Tensor.asnumpy`, `.item()`,
`.tolist()`, truth or number conversion of a Tensor, and `mindspore.runtime.synchronize()`. The
simulation's own transfers (the HCCL side channel reads tensors to the host) run inside
`internal()` and are not counted: on a device the data stays there. Kernel launches are counted by
MindSpore's profiler (see bench/ascend_sim_syncs.py), not here.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Dict

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


def _counting(kind: str, fn):
    def wrapper(*args, **kwargs):
        if not _inside():
            _counts[f"sync.{kind}"] += 1
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
    ms.runtime.synchronize = _counting("synchronize", ms.runtime.synchronize)


def snapshot() -> Dict[str, int]:
    """The counts so far: `sync.<kind>` per host synchronisation kind, `comm.<op>` per simulated call."""
    return dict(_counts)


def reset() -> None:
    _counts.clear()


def host_syncs(counts: Dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("sync."))
