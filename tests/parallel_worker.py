"""msrun worker of tests/test_parallel_msrun.py (one process per rank):

    python tests/parallel_worker.py CASES_JSON MODELS_DIR OUT_DIR
    python tests/parallel_worker.py CASES_JSON MODELS_DIR OUT_DIR --reference   (one process: the
        single-process latents of each case, OUT_DIR/<case>.reference.npy)

The device is $STEPVIDEO_DEVICE (CPU when unset; `ascend-sim` runs the native communicator on the
simulated HCCL, and then also the simulation's own checks, tests/ascend_sim_hccl_checks.py, last).
1. checks the communicator's operations against numpy on every layout of this world size;
2. for every case of this world size: loads only this rank's stage of MODELS_DIR/<kind> (with
   sharded weights: only its slices of the stage's blocks; offloaded: the stage's blocks in host memory),
   checks that nothing else was loaded
   (counting the block elements held), runs `parallel_denoise` and saves the final latents to
   OUT_DIR/<case>.rank<R>.npy.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List

import numpy as np

from parallel_cases import (GUIDANCE, TIME_SHIFT, cached_reference, case_inputs, conditioning, load_cases, output_path,
                            reference_latents, reference_path, step_cache, steps)


def _pattern(rank: int, shape) -> np.ndarray:
    return (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1000.0 * rank)


def comm_checks(world: int, rank: int) -> List[str]:
    import mindspore as ms
    from mindspore import Tensor
    from stepvideo_ms.parallel import Mesh, make_communicator

    failures = []

    def expect(what, got, want):
        if got is None or tuple(got.shape) != tuple(want.shape) or not np.array_equal(got, want):
            failures.append(f"{what}: got {None if got is None else got.shape}, want {want.shape}")

    for u in [d for d in range(1, world + 1) if world % d == 0]:
        mesh = Mesh.create(world, rank, u, world // u)
        comm = make_communicator(mesh)
        tag = f"(ulysses {u}, pp {world // u})"
        shape = (1, 2, 4, 3)  # (b, local tokens, heads, d)
        xs = {r: _pattern(r, shape) for r in range(world)}
        got = comm.all_to_all(Tensor(xs[rank]), mesh.sp_group, scatter_axis=2, gather_axis=1).asnumpy()
        share = 4 // u
        want = np.concatenate([xs[r][:, :, mesh.sp_rank * share:(mesh.sp_rank + 1) * share] for r in mesh.sp_group], 1)
        expect(f"all_to_all heads->tokens {tag}", got, want)
        back = comm.all_to_all(Tensor(want), mesh.sp_group, scatter_axis=1, gather_axis=2).asnumpy()
        expect(f"all_to_all tokens->heads {tag}", back, xs[rank])
        got = comm.all_gather(Tensor(xs[rank]), mesh.sp_group, axis=1).asnumpy()
        expect(f"all_gather SP group {tag}", got, np.concatenate([xs[r] for r in mesh.sp_group], 1))
        got = comm.all_gather(Tensor(xs[rank]), mesh.column, axis=0).asnumpy()
        expect(f"all_gather column {tag}", got, np.concatenate([xs[r] for r in mesh.column], 0))
        if mesh.pp_degree > 1:
            s = mesh.stage
            send = Tensor(xs[rank]) if s < mesh.pp_degree - 1 else None
            got = comm.shift(send, mesh.column[s + 1] if send is not None else None,
                             mesh.column[s - 1] if s > 0 else None, shape, ms.float32)
            if s > 0:
                expect(f"shift from stage {s - 1} {tag}", got.asnumpy(), xs[mesh.column[s - 1]])
            elif got is not None:
                failures.append(f"shift {tag}: stage 0 received {got.shape}")
        root = world - 1
        floats = _pattern(root, (2, 3))
        flags = np.array([True, False, True])
        got_f = comm.broadcast(Tensor(floats) if rank == root else None, root).asnumpy()
        got_b = comm.broadcast(Tensor(flags) if rank == root else None, root).asnumpy()
        expect(f"broadcast float {tag}", got_f, floats)
        expect(f"broadcast bool {tag}", got_b, flags)
    return failures


def stage_loading_failures(model, mesh, shards) -> List[str]:
    """What this rank holds beyond (or short of) its share; block elements counted one by one."""
    from stepvideo_ms.parallel.shard import held_block_elements

    mine = set(mesh.stage_layers(model.num_layers))
    failures, per_block = [], {}
    for name, param in model.parameters_and_names():
        if name.startswith("transformer_blocks."):
            layer = int(name.split(".")[1])
            per_block[layer] = per_block.get(layer, 0) + int(np.prod(param.shape))
            should = layer in mine and not mesh.shard_weights and not mesh.offload
            if should == param.has_init:  # has_init: never given data
                failures.append(f"{name}: stage {mesh.stage} holds layers {sorted(mine)} "
                                f"(sharded {mesh.shard_weights}) but loaded={not param.has_init}")
        elif param.has_init:
            failures.append(f"{name}: shared parameter not loaded")
    from stepvideo_ms.parallel.shard import block_layouts, cut_rows

    block = per_block[0]
    parts = len(mesh.shard_group)
    groups = cut_rows(block_layouts(model.transformer_blocks[0]), parts)
    if sum(g.total for g in groups) != block:
        failures.append(f"groups of {[g.total for g in groups]} elements do not add up to the block's {block}")
    # 1/N of every block of the stage (each group's slices padded to its largest one)
    want = len(mine) * (sum(g.shard_size(parts) for g in groups) if mesh.shard_weights else block)
    held = held_block_elements(model, shards)
    if held != want:
        failures.append(f"holds {held} block elements, expected {want} ({len(mine)} blocks, 1/{parts} of each)")
    if mesh.shard_weights and sorted(shards.flats) != sorted(mine):
        failures.append(f"shards of layers {sorted(shards.flats)}, stage layers {sorted(mine)}")
    if mesh.offload and shards.layers != sorted(mine):
        failures.append(f"host blocks of layers {shards.layers}, stage layers {sorted(mine)}")
    return failures


def barrier(comm) -> None:
    """Returns once every rank of the world has called it (the run's agreement, an all-gather)."""
    from stepvideo_ms.generation.world import any_rank

    any_rank(comm, comm.mesh, False)


def host_map_report(mesh, host) -> dict:
    """This rank's file-backed memory of its stage's host map (host_share.mapped_memory) and who wrote it."""
    from stepvideo_ms.parallel.host_share import mapped_memory

    memory = mapped_memory(os.path.basename(host.map_path))
    return {"stage": mesh.stage, "nbytes": int(host.backing.nbytes),
            "created": bool(host.shared.created) if host.shared is not None else True, **memory}


def write_references(cases, models_dir: str, out_dir: str, dtype) -> None:
    """One process, no msrun: the plain model's loop for each (kind, grid), saved beside the ranks' output."""
    done = {}
    for case in cases:
        key = (case.kind, case.grid, case.weights, bool(case.cache))
        if key not in done:
            model_dir = os.path.join(models_dir, case.kind)
            done[key] = (cached_reference(model_dir, case, dtype) if case.cache else
                         (reference_latents(model_dir, case, dtype), None))
            if case.cache:  # the one-process cached run's decisions, for the test to compare
                with open(os.path.join(out_dir, f"{case.name}.reference_cache.json"), "w", encoding="utf-8") as fh:
                    json.dump(done[key][1], fh)
        np.save(reference_path(out_dir, case), done[key][0])


def main(argv: List[str]) -> int:
    cases_json, models_dir, out_dir = argv[:3]
    from mindspore import Tensor
    from stepvideo_ms import runtime

    rt = runtime.init(os.environ.get(runtime.ENV_DEVICE) or "CPU")
    if argv[3:] == ["--reference"]:
        write_references(load_cases(cases_json), models_dir, out_dir, rt.compute_dtype)
        print(f"device {rt.device}, compute dtype {rt.compute_dtype}", flush=True)
        return 0
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.diffusion.sampling import denoise
    from stepvideo_ms.parallel import Mesh, ParallelDiT, init_world, load_stage, make_communicator, parallel_denoise

    world, rank = init_world()
    start = time.perf_counter()
    report = {"comm": comm_checks(world, rank), "loading": {}, "cache": {}, "host_map": {}}
    print(f"rank {rank}: communicator checks took {time.perf_counter() - start:.1f} s", flush=True)
    for case in [c for c in load_cases(cases_json) if c.world == world]:
        mesh = Mesh.create(world, rank, case.ulysses, case.pp, pp_split=case.pp_split, cfg_degree=case.cfg,
                           shard_weights=case.shard, offload=case.offload, sequential_cfg=case.seq)
        model, shards = load_stage(os.path.join(models_dir, case.kind), mesh, rt.compute_dtype, progress=False,
                                   weights=case.weights)
        report["loading"][case.name] = stage_loading_failures(model, mesh, shards)
        comm = make_communicator(mesh)
        if mesh.offload:  # as a run does it: every rank has loaded (an all-gather), then the shared map's name goes
            barrier(comm)
            shards.settle()
        inputs = case_inputs(case)
        cache = step_cache(case)
        if cache is None:
            latents = parallel_denoise(mesh, comm, model, Tensor(inputs["latents"]),
                                       conditioning(inputs, case.kind), FlowMatchScheduler(), steps(case), TIME_SHIFT,
                                       GUIDANCE, progress=False, shards=shards)
        else:  # parallel_denoise's loop, keeping the DiT to count the blocks its source fetched
            dit = ParallelDiT(mesh, comm, model, shards)
            cache.settings.check_model(model.num_layers, dit.partition)
            cache.num_layers = model.num_layers
            latents = denoise(dit.predictor(conditioning(inputs, case.kind), cache), Tensor(inputs["latents"]),
                              FlowMatchScheduler(), steps(case), TIME_SHIFT, GUIDANCE, progress=False)
            fetched = getattr(dit.blocks, "copies", getattr(dit.blocks, "gathers", None))
            report["cache"][case.name] = {"record": cache.record(), "fetched": fetched}
        np.save(output_path(out_dir, case, rank), latents.asnumpy())
        if mesh.offload and shards.backing is not None:  # the host map, measured while every rank still maps it
            barrier(comm)
            report["host_map"][case.name] = host_map_report(mesh, shards)
            barrier(comm)
        print(f"rank {rank}: {case.name} done at {time.perf_counter() - start:.1f} s", flush=True)
    if runtime.is_simulated():  # last: its dead-lock checks leave the ranks' call numbers out of step
        from ascend_sim_hccl_checks import emulator_checks

        report["sim"] = emulator_checks(world, rank)
    print(f"rank {rank}: device {rt.device}, all done at {time.perf_counter() - start:.1f} s", flush=True)
    with open(os.path.join(out_dir, f"report.rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
