"""DiT forward time with Ulysses sequence parallelism at degree 1 and 2 on this machine.

    .venv/bin/python bench/bench_ulysses.py [--layers 4 --heads 8 --head_dim 128 --grid 8,32,32 --repeats 2]

Launches the same worker under msrun with 1 and then 2 ranks (pp 1), each running one warm-up and
`--repeats` timed forwards of a random-weight DiT on one sample, with every collective timed
(ops launch blocking on CPU ranks, so a collective's time includes waiting for the slower peer). Prints the
median forward time, the communication share and the ratio of the two runs, and checks that
both degrees compute the same output. CPU op threads per rank = cores / ranks, so both runs use
the same cores. On CPU the all-to-all is emulated with world all-gathers (each rank receives
the whole tensor of every rank), so its cost is an upper bound of a native all-to-all.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--grid", default="8,32,32", help="latent frames,height,width (tokens = product)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--degrees", default="1,2")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="worker only: where to write the JSON result")
    return p.parse_args(argv)


def _model_and_inputs(args):
    from mindspore import Tensor
    from stepvideo_ms.models.dit import StepVideoModel

    model = StepVideoModel(num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                           in_channels=args.channels, num_layers=args.layers, caption_channels=[256, 128])
    rng = np.random.default_rng(0)
    for name, param in sorted(model.parameters_and_names()):
        shape = tuple(param.shape)
        if len(shape) == 1:
            value = (1.0 if name.endswith("norm.weight") else 0.0) + 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        param.set_data(Tensor(value.astype(np.float32)))
    f, h, w = (int(v) for v in args.grid.split(","))
    latents = Tensor(rng.standard_normal((1, f, args.channels, h, w)).astype(np.float32))
    timestep = Tensor(np.array([0.5], np.float32))
    context = Tensor(rng.standard_normal((1, 32, 256)).astype(np.float32))
    mask = Tensor(np.ones((1, 32), np.int64))
    clip = Tensor(rng.standard_normal((1, 8, 128)).astype(np.float32))
    return model, latents, timestep, context, mask, clip


def worker(args) -> int:
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore.device_context.cpu.op_tuning import threads_num
    from stepvideo_ms.parallel import Conditioning, Mesh, ParallelDiT, init_world, make_communicator

    world, rank = init_world()
    threads_num(max(1, (os.cpu_count() or 1) // world))
    mesh = Mesh.create(world, rank, ulysses_degree=world, pp_degree=1)
    comm = make_communicator(mesh, timed=True)
    model, latents, timestep, context, mask, clip = _model_and_inputs(args)
    dit = ParallelDiT(mesh, comm, model)
    cond = Conditioning(context, mask, clip)
    times, comm_times, out = [], [], None
    for i in range(1 + args.repeats):
        comm.stats.reset()
        start = time.perf_counter()
        out = dit(latents, timestep, cond).asnumpy()
        if i:  # the first forward warms up
            times.append(time.perf_counter() - start)
            comm_times.append(comm.stats.seconds)
    result = {"world": world, "rank": rank, "forward_s": times, "comm_s": comm_times,
              "comm_calls": comm.stats.calls, "comm_bytes": comm.stats.bytes_sent}  # of one forward
    with open(f"{args.out}.rank{rank}.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    if rank == 0:
        np.save(f"{args.out}.npy", out)
    return 0


def _read_json(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def driver(args) -> int:
    from stepvideo_ms.parallel.msrun import run_msrun

    f, h, w = (int(v) for v in args.grid.split(","))
    print(f"DiT {args.layers} layers x {args.heads} heads x {args.head_dim}, {f * h * w} tokens, batch 1, "
          f"{os.cpu_count()} CPU cores, {args.repeats} timed forwards after 1 warm-up", flush=True)
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_ulysses_") as tmp:
        for degree in (int(d) for d in args.degrees.split(",")):
            out = os.path.join(tmp, f"u{degree}")
            forwarded = [f"--layers={args.layers}", f"--heads={args.heads}", f"--head_dim={args.head_dim}",
                         f"--grid={args.grid}", f"--channels={args.channels}", f"--repeats={args.repeats}"]
            result = run_msrun(os.path.abspath(__file__), forwarded + [f"--out={out}"], workers=degree,
                               log_dir=os.path.join(tmp, f"logs{degree}"), timeout=args.timeout)
            if not result.ok:
                print(result.logs(), file=sys.stderr)
                return 1
            ranks = [_read_json(f"{out}.rank{r}.json") for r in range(degree)]
            forward = statistics.median(max(r["forward_s"][i] for r in ranks) for i in range(args.repeats))
            comm = statistics.median(max(r["comm_s"][i] for r in ranks) for i in range(args.repeats))
            rows.append((degree, forward, comm, ranks[0]["comm_calls"], ranks[0]["comm_bytes"] / 2 ** 20))
            outputs[degree] = np.load(f"{out}.npy")
    base = rows[0][1]
    print(f"{'ulysses':>7} {'forward s':>10} {'vs u=1':>7} {'comm s':>8} {'comm share':>10} {'calls/fwd':>9} {'MiB sent/fwd/rank':>17}")
    for degree, forward, comm, calls, mib in rows:
        print(f"{degree:>7} {forward:>10.2f} {base / forward:>6.2f}x {comm:>8.2f} {comm / forward:>10.1%} {calls:>9} {mib:>17.1f}")
    ref = outputs[rows[0][0]]
    for degree, out in list(outputs.items())[1:]:
        err = float(np.abs(out - ref).max())
        print(f"max |out(u={degree}) - out(u={rows[0][0]})| = {err:.2e} (max |out| {np.abs(ref).max():.2f})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from stepvideo_ms.parallel.comm import launched_distributed

    return worker(args) if launched_distributed() else driver(args)


if __name__ == "__main__":
    sys.exit(main())
