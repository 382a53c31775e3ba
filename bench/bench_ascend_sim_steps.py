"""Host synchronisations and kernel launches per denoising step of the simulated parallel loop.

    .venv/bin/python bench/bench_ascend_sim_steps.py [--ulysses 2 --pp 2 --grid 3,3,3 --layers 4]

Launches msrun workers under the Ascend simulation (STEPVIDEO_DEVICE=ascend-sim: bf16 policy, the
native communicator on the simulated HCCL) running `parallel_denoise` on a random-weight DiT, twice:
with 1 and with 3 steps. Per step = (3-step count - 1-step count) / 2, so set-up work (embedding
the conditions once, RoPE tables, group creation) is not counted. On rank 0:
- host synchronisations: Tensor.asnumpy / item / tolist / bool / float / int and
  mindspore.runtime.synchronize called by the product (the simulation's own reads are not counted),
  by the counting wrappers of `stepvideo_ms.testing.ascend_sim.accounting`;
- simulated HCCL calls (AlltoAll, AllGather, send, recv, ...);
- kernel launches, counted by MindSpore's profiler (CPU op occurrences). These include the
  simulation's own kernels (bf16 <-> float32 casts of the bf16-on-CPU wrappers, the HCCL side
  channel's casts), which a device would not launch; the per-type table shows them.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--grid", default="3,3,3", help="latent frames,height,width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)  # worker: output prefix
    return p.parse_args(argv)


def _model(args, dtype):
    from mindspore import Tensor
    from stepvideo_ms.models.dit import StepVideoModel

    model = StepVideoModel.from_config({"num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
                                        "in_channels": 8, "out_channels": 8, "num_layers": args.layers,
                                        "caption_channels": [64, 32]}, dtype=dtype)
    rng = np.random.default_rng(0)
    for name, param in sorted(model.parameters_and_names()):
        shape = tuple(param.shape)
        if len(shape) <= 1:
            value = (1.0 if name.endswith("norm.weight") else 0.0) + 0.05 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        param.set_data(Tensor(value.astype(np.float32)).astype(dtype))
    return model


def _kernel_counts(folder: str) -> Counter:
    """Op type -> occurrences, from the profiler's CPU op table."""
    counts = Counter()
    for path in glob.glob(os.path.join(folder, "**", "cpu_op_type_info_*.csv"), recursive=True):
        with open(path, "r", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                counts[row["op_type"]] += int(row["type_occurrences"])
    return counts


def _count_casts(counts: Counter) -> None:
    """Tensor.astype to another dtype (one Cast kernel), counted by who asked: the product or the
    simulation (bf16-on-CPU wrappers, emulators, the HCCL side channel)."""
    import mindspore as ms
    from mindspore import Tensor
    from stepvideo_ms.testing.ascend_sim import accounting

    original = Tensor.astype

    def astype(self, dtype, *rest, **kwargs):
        if ms.dtype_to_nptype(dtype) != ms.dtype_to_nptype(self.dtype) or dtype != self.dtype:
            counts["product" if accounting.product_call_site() is not None else "simulation"] += 1
        return original(self, dtype, *rest, **kwargs)

    Tensor.astype = astype


def _count_flash_calls(counts: Counter) -> None:
    """Calls of the flash-attention emulator (one FlashAttentionScore kernel each on a device)."""
    from mindspore import ops

    original = ops.flash_attention_score

    def flash(*a, **k):
        counts["flash_attention_score"] += 1
        return original(*a, **k)

    ops.flash_attention_score = flash


def worker(args) -> int:
    from stepvideo_ms import runtime

    rt = runtime.init()
    import mindspore.profiler as prof
    from mindspore import Tensor
    from mindspore.profiler import ProfilerActivity
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Conditioning, Mesh, init_world, make_communicator, parallel_denoise
    from stepvideo_ms.testing.ascend_sim import accounting

    world, rank = init_world()
    mesh = Mesh.create(world, rank, args.ulysses, args.pp)
    comm = make_communicator(mesh)
    model = _model(args, rt.compute_dtype)
    f, h, w = (int(v) for v in args.grid.split(","))
    rng = np.random.default_rng(1)
    latents = Tensor(rng.standard_normal((1, f, 8, h, w)).astype(np.float32))
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0
    cond = Conditioning(Tensor(rng.standard_normal((2, 6, 64)).astype(np.float32)).astype(rt.compute_dtype),
                        Tensor(mask), Tensor(rng.standard_normal((2, 3, 32)).astype(np.float32)).astype(rt.compute_dtype))
    result = {"device": rt.device, "comm": type(comm).__name__}
    casts, calls = Counter(), Counter()
    _count_casts(casts)
    _count_flash_calls(calls)
    parallel_denoise(mesh, comm, model, latents, cond, FlowMatchScheduler(), 1, 13.0, 5.0, progress=False)  # warm-up
    for steps in (1, 3):
        folder = f"{args.out}.prof{steps}"
        accounting.reset()
        casts.clear()
        calls.clear()
        if rank == 0:
            with prof.profile(activities=[ProfilerActivity.CPU], on_trace_ready=prof.tensorboard_trace_handler(folder)):
                parallel_denoise(mesh, comm, model, latents, cond, FlowMatchScheduler(), steps, 13.0, 5.0, progress=False)
        else:
            parallel_denoise(mesh, comm, model, latents, cond, FlowMatchScheduler(), steps, 13.0, 5.0, progress=False)
        result[f"steps{steps}"] = {"counts": {**accounting.snapshot(), **{f"cast.{k}": v for k, v in casts.items()},
                                              **{f"emulated.{k}": v for k, v in calls.items()}},
                                   "kernels": dict(_kernel_counts(folder)) if rank == 0 else {}}
    if rank == 0:
        with open(f"{args.out}.json", "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    return 0


def _per_step(one: dict, three: dict) -> dict:
    return {k: (three.get(k, 0) - one.get(k, 0)) / 2 for k in sorted(set(one) | set(three))
            if three.get(k, 0) != one.get(k, 0)}


def driver(args) -> int:
    from stepvideo_ms.parallel.msrun import run_msrun

    world = args.ulysses * args.pp
    with tempfile.TemporaryDirectory(prefix="bench_ascend_sim_") as tmp:
        out = os.path.join(tmp, "result")
        forwarded = [f"--ulysses={args.ulysses}", f"--pp={args.pp}", f"--grid={args.grid}", f"--layers={args.layers}",
                     f"--heads={args.heads}", f"--head_dim={args.head_dim}", f"--out={out}"]
        result = run_msrun(os.path.abspath(__file__), forwarded, workers=world, log_dir=os.path.join(tmp, "logs"),
                           timeout=args.timeout, extra_env={"STEPVIDEO_DEVICE": "ascend-sim",
                                                            "STEPVIDEO_SIM_HCCL_DIR": os.path.join(tmp, "hccl")})
        if not result.ok:
            print(result.logs(), file=sys.stderr)
            return 1
        with open(f"{out}.json", "r", encoding="utf-8") as fh:
            res = json.load(fh)
    counts = _per_step(res["steps1"]["counts"], res["steps3"]["counts"])
    kernels = _per_step(res["steps1"]["kernels"], res["steps3"]["kernels"])
    syncs = sum(v for k, v in counts.items() if k.startswith("sync."))
    sim_casts, flash = counts.get("cast.simulation", 0), counts.get("emulated.flash_attention_score", 0)
    print(f"device {res['device']}, {res['comm']}, world {world} = ulysses {args.ulysses} x pp {args.pp}, "
          f"DiT {args.layers} layers x {args.heads} heads x {args.head_dim}, grid {args.grid}, CFG batch 2")
    total = sum(kernels.values())
    print(f"rank 0, per denoising step: {syncs:g} host synchronisations, {total:g} kernel launches on the CPU "
          f"backend, of which {sim_casts:g} are casts added by the simulation (bf16-on-CPU wrappers, emulators, "
          f"HCCL side channel) and the rest includes {flash:g} flash-attention emulations (each one kernel on a device)")
    for k, v in counts.items():
        print(f"  {k:<28} {v:g}")
    print("  kernel launches by type:")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<26} {v:g}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from stepvideo_ms.parallel.comm import launched_distributed

    return worker(args) if launched_distributed() else driver(args)


if __name__ == "__main__":
    sys.exit(main())
