"""What this rank holds, as the output JSON records it.

On Ascend: MindSpore's device statistics (`mindspore.runtime.max_memory_allocated`, the peak of tensor
memory since start-up or the last reset, and `memory_allocated`). On the CPU backend (and the
simulation), where there is no device memory, the process's resident memory split by backing
(/proc/self/status): anonymous pages are the working memory of the "device" (weights on the card,
activations), file-backed and shared pages include the blocks that --offload keeps in host memory.
"""
from __future__ import annotations

from typing import Dict

GIB = 2 ** 30


def proc_status() -> Dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmRSS and VmHWM of this process in bytes ({} where /proc is absent)."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def memory_record(device: str) -> Dict[str, float]:
    """The figures for the output JSON, in GiB."""
    if device == "Ascend":  # pragma: no cover - needs an NPU
        import mindspore as ms

        return {"device_max_allocated_gib": ms.runtime.max_memory_allocated() / GIB,
                "device_allocated_gib": ms.runtime.memory_allocated() / GIB}
    status = proc_status()
    record = {"source": "/proc/self/status (CPU backend: no device memory)"}
    for key, name in (("RssAnon", "anonymous_gib"), ("RssFile", "file_backed_gib"), ("RssShmem", "shared_gib"),
                      ("VmHWM", "peak_rss_gib")):
        if key in status:
            record[name] = status[key] / GIB
    return record


def release_working_set(device: str) -> None:
    """After the denoising loop: the DiT's activations and offload working blocks are garbage by now;
    on Ascend the memory pool's cached blocks go back to the device, so that a VAE (or caption) server
    sharing the card can use them while this rank decodes or waits. The DiT's resident weights stay."""
    import gc

    gc.collect()
    if device == "Ascend":  # pragma: no cover - needs an NPU
        import mindspore as ms

        ms.runtime.empty_cache()
