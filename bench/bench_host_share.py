"""Host memory of --offload's host blocks with 1, 2 and 4 msrun ranks of one stage, each rank its own copy
(STEPVIDEO_SHARE_HOST_BLOCKS=0, as before issue 26) against one copy per host (the default), on the CPU backend.

    .venv/bin/python bench/bench_host_share.py [--layers 8] [--heads 8] [--head_dim 64] [--grid 2 8 8]
                                               [--ranks 1 2 4] [--out results.json]

Each launch is a real msrun world of N ranks running ulysses N x pp 1 with --offload (so every rank runs the one
stage: all the layers), as run_parallel.py does it: load the stage, agree that every rank has loaded (an
all-gather), settle the shared map, one denoising step. Then, with every rank still mapping its map, each
measures from /proc/self/smaps the map's resident (Rss) and proportional (Pss: a shared page divided among the
processes that map it) bytes, and its whole process's Pss. The host's memory for the host blocks is the sum of
the ranks' map Pss; "copies" is that over one copy's size. Also printed: the slowest rank's load time (with
sharing, one rank reads the checkpoint and the others wait for it) and whether the latents equal the unshared
launch's, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

TEXT, CLIP = 6, 3


def _barrier(comm) -> None:
    """Returns once every rank has called it (run_parallel's agreement, an all-gather)."""
    from stepvideo_ms.generation.world import any_rank

    any_rank(comm, comm.mesh, False)


def _process_pss() -> int:
    with open("/proc/self/smaps_rollup", "r", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(model_dir: str, out_dir: str, grid) -> None:
    import numpy as np
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore import Tensor
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Conditioning, Mesh, init_world, load_stage, make_communicator, parallel_denoise
    from stepvideo_ms.parallel.host_share import mapped_memory

    world, rank = init_world()
    with open(os.path.join(model_dir, "config.json"), "r", encoding="utf-8") as fh:
        config = json.load(fh)
    mesh = Mesh.create(world, rank, ulysses_degree=world, pp_degree=1, offload=True)
    comm = make_communicator(mesh)
    t0 = time.perf_counter()
    model, host = load_stage(model_dir, mesh, progress=False)
    load_s = time.perf_counter() - t0
    _barrier(comm)
    host.settle()
    rng = np.random.default_rng(1)
    text_ch, clip_ch = config["caption_channels"]
    cond = Conditioning(Tensor(rng.standard_normal((2, TEXT, text_ch)).astype(np.float32)),
                        Tensor(np.ones((2, TEXT), np.int64)),
                        Tensor(rng.standard_normal((2, CLIP, clip_ch)).astype(np.float32)))
    f, h, w = grid
    noise = Tensor(rng.standard_normal((1, f, config["in_channels"], h, w)).astype(np.float32))
    latents = parallel_denoise(mesh, comm, model, noise, cond, FlowMatchScheduler(), 1, 13.0, 9.0, progress=False,
                               shards=host).asnumpy()
    _barrier(comm)  # every rank maps its map while each measures
    memory = mapped_memory(os.path.basename(host.map_path))
    report = {"rank": rank, "load_s": load_s, "map_bytes": int(host.backing.nbytes), "map_rss": memory["Rss"],
              "map_pss": memory["Pss"], "process_pss": _process_pss(),
              "created": bool(host.shared.created) if host.shared is not None else True}
    _barrier(comm)
    if rank == 0:
        np.save(os.path.join(out_dir, "latents.npy"), latents)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--grid", type=int, nargs=3, default=[2, 8, 8])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:  # an msrun worker: rank MODEL_DIR OUT_DIR F H W (msrun takes --options as its own)
        worker(argv[1], argv[2], tuple(int(v) for v in argv[3:6]))
        return 0
    args = ap.parse_args(argv)
    import numpy as np
    from bench_offload import model_config, write_model
    from stepvideo_ms.parallel.msrun import run_msrun

    if any(args.heads % n for n in args.ranks):
        ap.error(f"--heads {args.heads} must divide by every --ranks value {args.ranks} (ulysses N)")
    mib, rows = 2 ** 20, []
    with tempfile.TemporaryDirectory(prefix="bench_host_share_") as tmp:
        model = os.path.join(tmp, "model")
        write_model(model, model_config(args.layers, args.heads, args.head_dim))
        for n in args.ranks:
            latents = {}
            for share in ("0", "1"):
                out = os.path.join(tmp, f"r{n}s{share}")
                maps = os.path.join(out, "maps")
                os.makedirs(maps)
                result = run_msrun(os.path.abspath(__file__),
                                   ["rank", model, out, *map(str, args.grid)], workers=n,
                                   log_dir=os.path.join(out, "logs"), timeout=1800,
                                   extra_env={"STEPVIDEO_SHARE_HOST_BLOCKS": share, "STEPVIDEO_OFFLOAD_DIR": maps})
                if not result.ok:
                    print(result.logs()[-4000:], file=sys.stderr)
                    return 1
                reps = [json.load(open(os.path.join(out, f"rank{r}.json"), encoding="utf-8")) for r in range(n)]
                latents[share] = np.load(os.path.join(out, "latents.npy"))
                one = reps[0]["map_bytes"]
                rows.append({"ranks": n, "shared": share == "1", "copy_bytes": one,
                             "host_bytes": sum(r["map_pss"] for r in reps),
                             "copies": sum(r["map_pss"] for r in reps) / one,
                             "writers": sum(r["created"] for r in reps),
                             "process_pss": sum(r["process_pss"] for r in reps),
                             "load_s": max(r["load_s"] for r in reps), "left": os.listdir(maps)})
            rows[-1]["latents_equal"] = rows[-2]["latents_equal"] = bool(np.array_equal(latents["0"], latents["1"]))
    print(f"model: {args.layers} layers x {args.heads} heads x {args.head_dim} (float32 host blocks), grid "
          f"{tuple(args.grid)}, ulysses N x pp 1 + offload under msrun on the CPU backend; load {os.getloadavg()[0]:.1f}")
    print(f"{'ranks':>5} {'host copy':>9} {'1 copy MiB':>10} {'host MiB':>9} {'copies':>6} {'writers':>7} "
          f"{'all ranks MiB':>13} {'load s':>7} {'same latents':>12} {'files left':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {'per host' if r['shared'] else 'per rank':>9} {r['copy_bytes'] / mib:10.1f} "
              f"{r['host_bytes'] / mib:9.1f} {r['copies']:6.2f} {r['writers']:7d} {r['process_pss'] / mib:13.1f} "
              f"{r['load_s']:7.2f} {'yes' if r['latents_equal'] else 'NO':>12} {len(r['left']):>10}")
    print("host MiB: the ranks' proportional resident memory of their host maps, added up; all ranks MiB: the "
          "same of the whole processes")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
