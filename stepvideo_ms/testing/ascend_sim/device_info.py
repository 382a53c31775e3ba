"""mindspore.hal's device queries for the simulated card, kept to their documented contracts.

- `hal.is_initialized(device_target)`: for "Ascend", whether the device under the simulation (the CPU
  backend) is initialized: MindSpore initializes a device at its first operator, or at
  `mindspore.communication.init` in a distributed job.
- `hal.get_device_properties(device_id, device_target=None)`: for "Ascend" (or the default target,
  which the simulation counts as Ascend), an `AscendDeviceProperties` with `name`, `total_memory` and
  `free_memory` in bytes. Its documented rules are enforced: `device_id` an int in [0, device count)
  (the count is that of ASCEND_RT_VISIBLE_DEVICES, else 8), and before the device is initialized
  `total_memory` and `free_memory` are 0.
The simulated card has $STEPVIDEO_SIM_CARD_GB GiB (default 64, an Atlas 800T A2 card).
"""
from __future__ import annotations

import os

from .env import positive_number
from .patching import bind, replace

SIM_CARD_ENV = "STEPVIDEO_SIM_CARD_GB"
DEFAULT_CARD_GB = 64.0
DEFAULT_DEVICE_COUNT = 8


class AscendDeviceProperties:
    """The fields MindSpore documents for an Ascend card."""

    def __init__(self, name: str, total_memory: int, free_memory: int):
        self.name, self.total_memory, self.free_memory = name, total_memory, free_memory

    def __repr__(self) -> str:
        return (f"AscendDeviceProperties(name='{self.name}', total_memory={self.total_memory / 2 ** 20:.0f}MB, "
                f"free_memory={self.free_memory / 2 ** 20:.0f}MB)")


def card_bytes() -> int:
    return int(positive_number(SIM_CARD_ENV, DEFAULT_CARD_GB, "GiB (the simulated card's memory, e.g. 32)") * 2 ** 30)


def device_count() -> int:
    visible = [c for c in os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").split(",") if c.strip()]
    return len(visible) or DEFAULT_DEVICE_COUNT


def _make_is_initialized(real):
    def is_initialized(*args, **kwargs):
        target = bind(real, "hal.is_initialized", args, kwargs)["device_target"]
        return real("CPU") if target == "Ascend" else real(target)

    return is_initialized


def _make_get_device_properties(real, real_is_initialized):
    def get_device_properties(*args, **kwargs):
        params = bind(real, "hal.get_device_properties", args, kwargs)
        target = params["device_target"] or "Ascend"  # the context's device: Ascend, in the simulation
        if target != "Ascend":
            return real(**params)
        device_id = params["device_id"]
        if not isinstance(device_id, int) or isinstance(device_id, bool):
            raise TypeError(f"The argument 'device_id' must be int, but got {device_id}, type is {type(device_id)}.")
        if not 0 <= device_id < device_count():
            raise ValueError(f"The argument 'device_id' must be in [0, {device_count()}), but got {device_id}.")
        total = card_bytes() if real_is_initialized("CPU") else 0  # 0 before the device is initialized
        return AscendDeviceProperties("Ascend910B (simulated)", total, total)

    return get_device_properties


def install() -> None:
    from mindspore import hal

    card_bytes()  # a bad $STEPVIDEO_SIM_CARD_GB fails here, at the start of the simulation

    real_is_initialized = replace(hal, "is_initialized", _make_is_initialized)
    replace(hal, "get_device_properties", lambda real: _make_get_device_properties(real, real_is_initialized))
