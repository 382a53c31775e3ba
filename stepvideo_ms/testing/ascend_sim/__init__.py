"""The Ascend simulation: the product's Ascend branches, executed on MindSpore's CPU backend.

`install()` is called once by `runtime.init("ascend-sim")` in every process of a simulated run
(pytest, the servers, every msrun worker: the device reaches them through $STEPVIDEO_DEVICE).
Each part replaces MindSpore entry points that exist only on an NPU with an emulator that binds
the call to the real function's signature and enforces its documented rules:
- npu_ops: flash attention, rms_norm, conv3d, mint layer_norm / group_norm / embedding / conv3d;
- quant_matmul: WeightQuantBatchMatmul (int8 weights);
- bf16_cpu: the CPU kernels without bfloat16 compute in float32 and round to bfloat16;
- streams: Stream / Event / StreamCtx, pinned host memory and asynchronous host-to-device copies;
- device_info: hal.is_initialized / hal.get_device_properties for the simulated card (its memory).
"""
from __future__ import annotations

_installed = False


def install() -> None:
    """Install every part of the simulation in this process (idempotent)."""
    global _installed
    if _installed:
        return
    from . import bf16_cpu, device_info, hccl, hccl_dist, npu_ops, quant_matmul, streams

    npu_ops.install()  # first: its emulators own the NPU-only names that bf16_cpu would also wrap
    quant_matmul.install()  # WeightQuantBatchMatmul (int8 weights)
    bf16_cpu.install()
    streams.install()
    device_info.install()  # the card's memory, as hal reports it
    hccl.install(hccl_dist.PATCHES)  # HCCL and mint.distributed across msrun workers, and the host-sync accounting
    _installed = True


def installed() -> bool:
    return _installed
