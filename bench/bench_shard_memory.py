"""Peak host memory per rank with and without --shard_weights, next to the planner's prediction.

    .venv/bin/python bench/bench_shard_memory.py [--layers 8 --heads 16 --head_dim 128 --ranks 4 --grid 1,4,8]

Writes a random-weight DiT of the given size (float32, one safetensors file) to a temporary
directory, then launches the same worker under msrun twice with `--ranks` ranks (ulysses = ranks,
pp 1): once with full block weights, once sharded. Every rank loads its weights with
`parallel.load_stage`, records its RSS growth over its start-up size, runs one denoising step
(CFG batch, small latent grid) and records its peak RSS (VmHWM). Prints per-rank figures, the
planner's CPU prediction of the weights each rank holds, and checks that both runs give the same
latents. The CPU is shared with whatever else runs: RSS is not affected, times are not reported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--grid", default="1,4,8", help="latent frames,height,width")
    p.add_argument("--workdir", default=None, help="where the model is written (default: a temporary directory)")
    return p.parse_args(argv)


def _status(field: str) -> int:
    with open("/proc/self/status", "r", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def config_of(args) -> dict:
    return {"num_attention_heads": args.heads, "attention_head_dim": args.head_dim, "num_layers": args.layers,
            "in_channels": 8, "out_channels": 8, "caption_channels": [64, 32]}


def write_model(folder: str, config: dict) -> None:
    from mindspore.nn.utils import no_init_parameters
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.formats.safetensors_io import save_file_atomic

    with no_init_parameters():
        model = StepVideoModel.from_config(config)
    rng = np.random.default_rng(0)
    state = {}
    for name, param in model.parameters_and_names():
        shape = tuple(param.shape)
        scale = 0.05 if len(shape) <= 1 else 1.0 / np.sqrt(np.prod(shape[1:]))
        state[name] = (("norm" in name and name.endswith("weight")) + scale * rng.standard_normal(shape)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file_atomic(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)


def worker(model_dir: str, grid, shard: bool, out_dir: str) -> int:
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore import Tensor
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Conditioning, Mesh, init_world, load_stage, make_communicator, parallel_denoise

    world, rank = init_world()
    mesh = Mesh.create(world, rank, ulysses_degree=world, shard_weights=shard)
    comm = make_communicator(mesh)
    base = _status("VmRSS")
    model, shards = load_stage(model_dir, mesh, progress=False)
    loaded = _status("VmRSS") - base
    rng = np.random.default_rng(5)
    f, h, w = grid
    mask = np.ones((2, 6), np.int64)
    cond = Conditioning(Tensor(rng.standard_normal((2, 6, 64)).astype(np.float32)), Tensor(mask),
                        Tensor(rng.standard_normal((2, 3, 32)).astype(np.float32)))
    latents = parallel_denoise(mesh, comm, model, Tensor(rng.standard_normal((1, f, 8, h, w)).astype(np.float32)),
                               cond, FlowMatchScheduler(), 1, 13.0, 5.0, progress=False, shards=shards)
    record = {"loaded": loaded, "peak": _status("VmHWM") - base, "start": base,
              "shard_elements": 0 if shards is None else shards.numel()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    if rank == 0:
        np.save(os.path.join(out_dir, "latents.npy"), latents.asnumpy())
    return 0


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "worker":
        model_dir, grid, shard, out_dir = sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
        return worker(model_dir, tuple(int(v) for v in grid.split(",")), shard, out_dir)
    args = parse_args(argv)
    from stepvideo_ms.parallel import plan as planner
    from stepvideo_ms.parallel.msrun import run_msrun

    grid = tuple(int(v) for v in args.grid.split(","))
    config = config_of(args)
    shape = planner.ModelShape.from_config(config)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model_dir = os.path.join(tmp, "model")
        write_model(model_dir, config)
        print(f"DiT {args.layers} layers x {args.heads} heads x {args.head_dim}: {shape.total_params:,} parameters, "
              f"{shape.total_params * 4 / MIB:.0f} MiB float32; {args.ranks} ranks (ulysses {args.ranks}), "
              f"latents {grid}", flush=True)
        results = {}
        for shard in (False, True):
            out = os.path.join(tmp, "shard" if shard else "full")
            os.makedirs(out)
            res = run_msrun(os.path.abspath(__file__), ["worker", model_dir, args.grid, "1" if shard else "0", out],
                            args.ranks, os.path.join(out, "logs"), timeout=1800)
            if not res.ok:
                print(res.logs(), file=sys.stderr)
                return 1
            ranks = []
            for r in range(args.ranks):
                with open(os.path.join(out, f"rank{r}.json"), "r", encoding="utf-8") as fh:
                    ranks.append(json.load(fh))
            layout = planner.Layout(1, args.ranks, 1, shard)
            predicted = planner.plan(shape, layout, grid, hardware=planner.CPU, text_tokens=9)
            results[shard] = (ranks, predicted, np.load(os.path.join(out, "latents.npy")))
        for shard, (ranks, predicted, _) in results.items():
            name = "sharded" if shard else "full weights"
            print(f"\n{name}: planner (CPU) weights {predicted.memory['weights'] / MIB:.0f} MiB + gather buffers "
                  f"{predicted.memory['gather buffers'] / MIB:.0f} MiB per rank")
            for r, rec in enumerate(ranks):
                print(f"  rank {r}: RSS after loading +{rec['loaded'] / MIB:7.0f} MiB, peak +{rec['peak'] / MIB:7.0f} MiB "
                      f"(start-up {rec['start'] / MIB:.0f} MiB), block elements in shards {rec['shard_elements']:,}")
        full, sharded = results[False], results[True]
        ratio = np.mean([r["peak"] for r in sharded[0]]) / np.mean([r["peak"] for r in full[0]])
        err = float(np.abs(full[2] - sharded[2]).max())
        print(f"\nmean peak growth sharded / full: {ratio:.2f}; max |latents full - sharded| = {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
