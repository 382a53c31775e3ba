"""Device selection and the dtype policy.

One place decides where we run and in which dtype we compute:
- Ascend when an Ascend device is usable, else CPU (an explicit choice always wins);
- bfloat16 compute on Ascend, float32 on CPU (MindSpore's CPU matmul, softmax and norms have
  no bfloat16 kernels).

The device `ascend-sim` (tests only) runs the Ascend branches on the CPU backend: MindSpore is set to
CPU, `is_ascend()` is true, the policy is Ascend's (bf16), and `stepvideo_ms.testing.ascend_sim`
replaces the NPU-only MindSpore calls with strict emulators. The product code has one Ascend branch
per primitive; the simulation only changes what those branches call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import mindspore as ms

DEVICES = ("Ascend", "CPU", "ascend-sim")
SIMULATED_ASCEND = "ascend-sim"
ENV_DEVICE = "STEPVIDEO_DEVICE"


@dataclass(frozen=True)
class Runtime:
    device: str
    device_id: int
    compute_dtype: ms.dtype

    @property
    def is_ascend(self) -> bool:
        return self.device in ("Ascend", SIMULATED_ASCEND)


# Set once by init(): the Ascend simulation is installed in this process. The device itself is
# MindSpore's context (device_target); this records only that CPU stands in for Ascend.
_simulating = False


def _ascend_available() -> bool:
    # Probe only where CANN is installed: asking MindSpore elsewhere prints plugin warnings.
    if not any(os.environ.get(v) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")) \
            and not os.path.isdir("/usr/local/Ascend"):
        return False
    try:
        from mindspore import hal  # noqa: F401

        return ms.hal.is_available("Ascend")
    except Exception:  # pragma: no cover - depends on the installed wheel
        return False


def pick_device(override: Optional[str] = None) -> str:
    """The device to run on: `override`, else $STEPVIDEO_DEVICE, else Ascend if present, else CPU."""
    choice = override or os.environ.get(ENV_DEVICE)
    if choice:
        for name in DEVICES:
            if choice.lower() == name.lower():
                return name
        raise ValueError(f"device={choice!r} is not supported: use one of {', '.join(DEVICES)}")
    return "Ascend" if _ascend_available() else "CPU"


def dtype_for(device: str) -> ms.dtype:
    """The compute dtype of the policy: bf16 on Ascend (real or simulated), float32 on CPU."""
    return ms.bfloat16 if device in ("Ascend", SIMULATED_ASCEND) else ms.float32


def init(device: Optional[str] = None, device_id: Optional[int] = None) -> Runtime:
    """Set MindSpore up for inference on the chosen device (PyNative mode) and return the policy."""
    name = pick_device(device)
    if device_id is None:
        device_id = int(os.environ.get("DEVICE_ID", "0"))
    global _simulating
    if name == "Ascend":
        ms.set_device(name, device_id)
    elif name == SIMULATED_ASCEND:
        from .testing import ascend_sim

        ms.set_device("CPU")
        ms.runtime.launch_blocking()
        ascend_sim.install()
        _simulating = True
    else:
        if _simulating:
            raise RuntimeError("this process already runs the Ascend simulation; start a new process for CPU")
        ms.set_device(name)
        # PyNative's asynchronous launch makes the Python thread busy-wait at every sync point on
        # CPU, taking cycles from the kernels (and from peer ranks in a collective); blocking launch
        # measured a tiny DiT forward at 0.28 s instead of 2.4 s on a loaded 2-core machine.
        ms.runtime.launch_blocking()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return Runtime(device=name, device_id=device_id, compute_dtype=dtype_for(name))


def current_device() -> str:
    """The device MindSpore is set to now ("Ascend" or "CPU"); the simulation counts as Ascend."""
    if _simulating:
        return "Ascend"
    target = ms.get_context("device_target")
    return "Ascend" if target == "Ascend" else "CPU"


def device_name() -> str:
    """The device of this process as `init` named it: "Ascend", "CPU" or "ascend-sim"."""
    return SIMULATED_ASCEND if _simulating else current_device()


def is_simulated() -> bool:
    """True in a process running the Ascend simulation (device `ascend-sim`)."""
    return _simulating


def is_ascend() -> bool:
    return current_device() == "Ascend"


def compute_dtype() -> ms.dtype:
    return dtype_for(current_device())
