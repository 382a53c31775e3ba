"""Block offload under ascend-sim, in one process (run by tests/test_offload.py):

    STEPVIDEO_DEVICE=ascend-sim python tests/offload_sim_checks.py MODELS_DIR

Prints one JSON line: per kind (t2v, ti2v) the max |offload - plain| of the final latents (bf16 policy,
both in the simulation), the working blocks' and the model's device-resident parameter counts, the
copies made and issued ahead, and what happens when the compute stream does not wait for a copy and when
the side stream does not wait for the compute stream's release of a working block before copying into it;
under "int8" the same for --offload --weights int8 (T2V) against the int8 model without offload.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from parallel_cases import GUIDANCE, STEPS, TIME_SHIFT, Case, case_inputs, conditioning, reference_latents


def main(models_dir: str) -> int:
    from mindspore import Tensor
    from stepvideo_ms import runtime

    rt = runtime.init("ascend-sim")
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Mesh, load_stage, make_communicator, parallel_denoise
    from stepvideo_ms.parallel.dit_forward import ParallelDiT
    from stepvideo_ms.parallel.offload import BlockStreamer

    from stepvideo_ms.capabilities import capabilities

    report = {"device": rt.device, "dtype": str(rt.compute_dtype),
              "pinned_host_memory": capabilities().pinned_host_memory}
    for kind in ("t2v", "ti2v"):
        case = Case(kind, (3, 3, 3), 1, 1)
        path = os.path.join(models_dir, kind)
        want = reference_latents(path, case, rt.compute_dtype)
        mesh = Mesh.create(1, 0, offload=True)
        comm = make_communicator(mesh)
        model, host = load_stage(path, mesh, rt.compute_dtype, progress=False)
        inputs = case_inputs(case)

        def run():
            return parallel_denoise(mesh, comm, model, Tensor(inputs["latents"]), conditioning(inputs, kind),
                                    FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE, progress=False,
                                    shards=host).asnumpy()

        got = run()
        dit = ParallelDiT(mesh, comm, model, host)
        streamer = dit.blocks
        model_resident = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names() if not p.has_init)
        working = sum(int(np.prod(p.shape)) for cell in streamer.slots for _, p in cell.parameters_and_names())
        pinned = host.pinned and all(t.is_pinned() for block in host.blocks.values() for t in block)
        # one forward through the streamer: every block copied, each but the first issued ahead
        x = dit.forward(Tensor(np.concatenate([inputs["latents"]] * 2)), Tensor(np.array([500.0, 500.0], np.float32)),
                        conditioning(inputs, kind))
        report[kind] = {"err": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
                        "moved": float(np.abs(want - inputs["latents"]).max()),
                        "model_resident": model_resident, "working": working, "working_blocks": len(streamer.slots),
                        "block": host.layout.total, "host": host.numel(), "layers": model.num_layers,
                        "pinned": pinned, "copies_one_forward": streamer.copies,
                        "in_flight_after": sorted(streamer._pending), "finite": bool(np.isfinite(x.asnumpy()).all())}
        # the wait removed: the compute stream uses a block whose copy has not landed
        saved = BlockStreamer._wait
        BlockStreamer._wait = lambda self, copy: None
        try:
            run()
            report[kind]["without_wait"] = "no error"
        except RuntimeError as exc:
            report[kind]["without_wait"] = str(exc)
        finally:
            BlockStreamer._wait = saved
        # the side stream's wait on the compute stream's release removed: a copy overwrites a block in use
        report[kind]["without_release_wait"] = _run_without_side_stream_waits(run)
    report["int8"] = _int8_offload(models_dir, rt)
    print(json.dumps(report), flush=True)
    return 0


def _int8_offload(models_dir: str, rt) -> dict:
    """--offload --weights int8 (T2V): the latents against the int8 model without offload, the host and
    working blocks' dtypes, the copy in flight, and how often the strict W8A16 emulator ran."""
    import mindspore as ms
    from mindspore import Tensor
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Mesh, load_stage, make_communicator, parallel_denoise
    from stepvideo_ms.parallel.dit_forward import ParallelDiT
    from stepvideo_ms.testing.ascend_sim import quant_matmul

    case = Case("t2v", (3, 3, 3), 1, 1, weights="int8")
    path = os.path.join(models_dir, "t2v")
    want = reference_latents(path, case, rt.compute_dtype)
    mesh = Mesh.create(1, 0, offload=True)
    comm = make_communicator(mesh)
    model, host = load_stage(path, mesh, rt.compute_dtype, progress=False, weights="int8")
    inputs = case_inputs(case)
    calls = []
    real = quant_matmul._Emulated.__call__
    quant_matmul._Emulated.__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        got = parallel_denoise(mesh, comm, model, Tensor(inputs["latents"]), conditioning(inputs, "t2v"),
                               FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE, progress=False,
                               shards=host).asnumpy()
    finally:
        quant_matmul._Emulated.__call__ = real
    dit = ParallelDiT(mesh, comm, model, host)
    streamer = dit.blocks
    dit.forward(Tensor(np.concatenate([inputs["latents"]] * 2)), Tensor(np.array([500.0, 500.0], np.float32)),
                conditioning(inputs, "t2v"))
    # pinned host Tensors, or (no Tensor.pin_memory: MindSpore 2.7.0) numpy views of the host map
    host_int8 = [t.dtype == (ms.int8 if isinstance(t, Tensor) else np.int8) for t in host.blocks[0]]
    return {"err": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
            "moved": float(np.abs(want - inputs["latents"]).max()), "w8a16_calls": len(calls),
            "host_int8": sum(host_int8), "host_pinned": host.pinned,
            "working_int8_match": all([p.dtype == ms.int8 for _, p in cell.parameters_and_names()] == host_int8
                                      for cell in streamer.slots),
            "working_blocks": len(streamer.slots), "copies_one_forward": streamer.copies,
            "in_flight_after": sorted(streamer._pending), "layers": model.num_layers}


def _run_without_side_stream_waits(run) -> str:
    """`run()` with every stream made while it runs (the streamer's side stream) ignoring `wait_event`,
    as if BlockStreamer._issue did not wait for the released event: the simulation's answer."""
    import mindspore as ms

    real = ms.runtime.Stream

    class NoWaitStream(real):
        def wait_event(self, event) -> None:
            pass

    ms.runtime.Stream = NoWaitStream
    try:
        run()
        return "no error"
    except RuntimeError as exc:
        return str(exc)
    finally:
        ms.runtime.Stream = real


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
