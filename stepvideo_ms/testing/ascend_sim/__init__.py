"""The Ascend simulation: the product's Ascend branches, executed on MindSpore's CPU backend.

`install()` is called once by `runtime.init("ascend-sim")` in every process of a simulated run
(pytest, the servers, every msrun worker: the device reaches them through $STEPVIDEO_DEVICE).
Each part replaces MindSpore entry points that exist only on an NPU with an emulator that binds
the call to the real function's signature and enforces its documented rules.
"""
from __future__ import annotations

_installed = False


def install() -> None:
    """Install every part of the simulation in this process (idempotent)."""
    global _installed
    if _installed:
        return
    from . import hccl

    hccl.install()  # HCCL across msrun workers, and the host-sync accounting
    _installed = True


def installed() -> bool:
    return _installed
