"""What the installed MindSpore can do, asked once, in one place.

The user's MindSpore is fixed by their cluster's CANN and driver (stepvideo_ms/versions.py: the supported
range). Versions differ in their API (`Tensor.pin_memory` is missing in 2.7.0) and in their CPU kernels
(2.7.0 has no CPU kernel for a split into a list of sizes; bfloat16 elementwise kernels on CPU came in
2.9; bench/compat_matrix.py prints what each version has). Every caller asks `capabilities()` instead of comparing version numbers, and takes a fallback that
computes the same result where a capability is missing; `in_use()` says which paths a run takes, for its
record, and `python -m stepvideo_ms doctor` prints the same to the user.

API capabilities are read from the installed package (an attribute exists or not). Kernel capabilities
are probed once with a tiny operation on the backend that runs it (on Ascend the NPU kernels are used
and the CPU ones are not asked): PyNative launches blocking here (runtime.init), so an unsupported kernel
raises at its own call and leaves the process usable.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from . import versions


@dataclass(frozen=True)
class Capabilities:
    mindspore: str
    supported: bool  # inside versions.OLDEST .. versions.NEWEST
    pinned_host_memory: bool  # Tensor.pin_memory: page-locked host blocks, asynchronous offload copies
    streams: bool  # mindspore.runtime Stream / Event / StreamCtx (side-stream copies)
    int8_matmul: bool  # WeightQuantBatchMatmul, the Ascend W8A16 kernel
    fused_attention: bool  # ops.flash_attention_score
    device_properties: bool  # mindspore.hal.get_device_properties (the card's memory)


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    from mindspore import ops

    try:
        from mindspore.ops.auto_generate import WeightQuantBatchMatmul  # noqa: F401
        int8 = True
    except ImportError:
        int8 = False
    runtime_api = getattr(ms, "runtime", None)
    return Capabilities(
        mindspore=ms.__version__,
        supported=versions.supported(ms.__version__),
        pinned_host_memory=hasattr(Tensor, "pin_memory"),
        streams=all(hasattr(runtime_api, n) for n in ("Stream", "Event", "StreamCtx")),
        int8_matmul=int8,
        fused_attention=hasattr(ops, "flash_attention_score"),
        device_properties=hasattr(getattr(ms, "hal", None), "get_device_properties"),
    )


def _probe(fn) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_sized_split() -> bool:
    """mint.split into a list of sizes has a CPU kernel (SplitWithSize; missing in 2.7.0)."""
    x = Tensor(np.arange(6, dtype=np.float32).reshape(1, 6))
    return _probe(lambda: mint.split(x, [2, 4], dim=-1)[1].asnumpy())


@functools.lru_cache(maxsize=None)
def cpu_bf16_elementwise() -> bool:
    """The CPU elementwise kernels take bfloat16 (missing before 2.9): asked by the Ascend simulation only,
    the product computes in float32 on CPU."""
    x = Tensor(np.ones(2, np.float32)).astype(ms.bfloat16)
    return _probe(lambda: (x * x).astype(ms.float32).asnumpy())


@functools.lru_cache(maxsize=None)
def cpu_zero_copy_asnumpy() -> bool:
    """Tensor.asnumpy of an operator's output is a view of its storage (2.7.1 on); on 2.7.0 it copies, so the
    CPU float32 path in numpy (ops/host.py) reads copies there: the same results, more memory traffic."""
    t = Tensor(np.ones((2, 2), np.float32)) * 2
    try:
        return t.asnumpy().ctypes.data == t.data_ptr()
    except (RuntimeError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_empty() -> bool:
    """mint.empty runs on CPU (2.7.0's asks for the Ascend plugin)."""
    return _probe(lambda: mint.empty((2,), dtype=ms.float32).shape)


def empty_kernel(device: str) -> bool:
    """Whether a process on `device` may call mint.empty (the NPU always can)."""
    return device == "Ascend" or cpu_empty()


def sized_split_kernel(device: str) -> bool:
    """Whether a process on `device` ("Ascend", "CPU", "ascend-sim") may call mint.split with a list of
    sizes (the NPU always can; the simulation runs CPU kernels)."""
    return device == "Ascend" or cpu_sized_split()


def asynchronous_offload(device: str) -> bool:
    """Whether `--offload` on `device` keeps its host blocks pinned and copies them ahead on a side stream:
    an NPU (real or simulated) with Tensor.pin_memory and the runtime's streams. Otherwise (CPU, 2.7.0) the
    host blocks sit in a file-backed map and are copied synchronously."""
    caps = capabilities()
    return device != "CPU" and caps.pinned_host_memory and caps.streams


def in_use(device: str) -> Dict[str, object]:
    """The capabilities and the paths a process on `device` ("Ascend", "CPU", "ascend-sim") takes where
    versions differ, for a run's record and `doctor`."""
    caps = capabilities()
    out: Dict[str, object] = asdict(caps)
    if device == "CPU":
        out["offload_copies"] = "synchronous (CPU backend: one working block)"
    elif asynchronous_offload(device):
        out["offload_copies"] = "asynchronous (pinned host blocks, side stream)"
    else:
        out["offload_copies"] = (f"synchronous (MindSpore {caps.mindspore} has no Tensor.pin_memory: float32 host "
                                 "blocks, copied on the compute stream)")
    out["sized_split"] = "mint.split" if sized_split_kernel(device) else "slices (no sized-split kernel on this backend)"
    if device == "CPU":
        out["cpu_numpy_views"] = "zero-copy" if cpu_zero_copy_asnumpy() else "copies (Tensor.asnumpy copies in this version)"
    return out
