"""Device-resident memory and wall time of one rank with and without --offload (and with sequential
CFG and chunked token-wise parts), measured on the CPU backend, against the planner's CPU profile.

    .venv/bin/python bench/bench_offload.py [--layers 8] [--heads 8] [--head_dim 64] [--grid 4 16 32]
                                            [--steps 2] [--threads 2] [--out results.json]

On the CPU backend host and device are the same memory; they are told apart by how the pages are
backed: the offloaded host blocks live in a file-backed map (parallel/offload.py), so the process's
anonymous resident memory (RssAnon of /proc/self/status) is the "device-resident" part: non-block
weights, working block(s), activations. Each configuration runs in its own process (a fresh peak):
after start-up and a warm-up forward of a one-layer model (kernels, allocator pools), RssAnon is
sampled every 2 ms by a thread; reported are the growth of RssAnon once the stage is loaded (weights)
and its peak growth during `parallel_denoise` (weights + activations), the file-backed/shared growth
(host blocks), and the wall time of the loop. Configurations run interleaved, A B C D A B C D, so that
the load of a shared machine falls on all alike; the figures are the medians of the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {
    "plain": {},
    "offload": {"offload": True},
    "offload + seq cfg": {"offload": True, "sequential_cfg": True},
    "offload + seq cfg + chunks": {"offload": True, "sequential_cfg": True, "chunk_tokens": 512},
    "seq cfg + chunks": {"sequential_cfg": True, "chunk_tokens": 512},
}


def status() -> dict:
    out = {}
    with open("/proc/self/status", "r", encoding="ascii") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                out[key] = int(line.split()[1]) * 1024
    return out


class PeakSampler:
    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status()["RssAnon"])
            time.sleep(self.period)

    def __enter__(self):
        self.peak = status()["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status()["RssAnon"])


def model_config(layers: int, heads: int, head_dim: int) -> dict:
    return {"num_attention_heads": heads, "attention_head_dim": head_dim, "in_channels": 16, "out_channels": 16,
            "num_layers": layers, "caption_channels": [128, 64]}


def write_model(folder: str, config: dict) -> None:
    import numpy as np
    from stepvideo_ms.formats.safetensors_io import save_file_atomic
    from stepvideo_ms.models.dit import StepVideoModel
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        model = StepVideoModel.from_config(config)
    rng = np.random.default_rng(0)
    state = {n: (0.02 * rng.standard_normal(tuple(p.shape))).astype(np.float32) for n, p in model.parameters_and_names()}
    os.makedirs(folder, exist_ok=True)
    save_file_atomic(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)


TEXT, CLIP = 6, 3


def child(model_dir: str, grid, steps: int, flags: dict) -> dict:
    import gc
    import numpy as np
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore import Tensor
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.parallel import Conditioning, Mesh, load_stage, make_communicator, parallel_denoise

    with open(os.path.join(model_dir, "config.json"), "r", encoding="utf-8") as fh:
        config = json.load(fh)
    text_ch, clip_ch = config["caption_channels"]
    rng = np.random.default_rng(1)
    f, h, w = grid
    ch = config["in_channels"]
    cond = Conditioning(Tensor(rng.standard_normal((2, TEXT, text_ch)).astype(np.float32)),
                        Tensor(np.ones((2, TEXT), np.int64)),
                        Tensor(rng.standard_normal((2, CLIP, clip_ch)).astype(np.float32)))
    noise = Tensor(rng.standard_normal((1, f, ch, h, w)).astype(np.float32))
    # warm-up: the kernels, on a one-layer model and a tiny grid (no activation pool of the real size)
    warm = StepVideoModel.from_config(dict(config, num_layers=1))
    mesh1 = Mesh.create(1, 0)
    parallel_denoise(mesh1, make_communicator(mesh1), warm, Tensor(rng.standard_normal((1, 1, ch, 2, 2)).astype(np.float32)),
                     cond, FlowMatchScheduler(), 1, 13.0, 9.0, progress=False)
    del warm
    gc.collect()
    base = status()
    mesh = Mesh.create(1, 0, **flags)
    model, held = load_stage(model_dir, mesh, progress=False)
    gc.collect()
    loaded = status()
    with PeakSampler() as peak:
        t0 = time.perf_counter()
        out = parallel_denoise(mesh, make_communicator(mesh), model, noise, cond, FlowMatchScheduler(), steps, 13.0,
                               9.0, progress=False, shards=held).asnumpy()
        wall = time.perf_counter() - t0
    after = status()
    return {"weights_anon": loaded["RssAnon"] - base["RssAnon"],
            "host_file": (after["RssFile"] + after["RssShmem"]) - (base["RssFile"] + base["RssShmem"]),
            "peak_anon": peak.peak - base["RssAnon"], "wall_s": wall, "checksum": float(np.abs(out).sum())}


def predicted(config: dict, grid, flags: dict) -> dict:
    from stepvideo_ms.parallel import plan as planner

    shape = planner.ModelShape.from_config(config)
    layout = planner.Layout(1, 1, 1, False, bool(flags.get("offload")), bool(flags.get("sequential_cfg")),
                            int(flags.get("chunk_tokens", 0)))
    p = planner.plan(shape, layout, grid, hardware=planner.CPU, text_tokens=TEXT + CLIP)
    mem = p.memory
    working = (shape.block_params * planner.CPU.dtype_bytes * planner.CPU.offload_working_blocks
               if layout.offload else 0)  # made by the loop (BlockStreamer), after "stage loaded"
    return {"weights": mem["weights"] - working, "peak": p.peak_bytes, "host": p.host_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--grid", type=int, nargs=3, default=[4, 16, 32])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="configuration names (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["dir"], tuple(spec["grid"]), spec["steps"], spec["flags"])), flush=True)
        return 0
    config = model_config(args.layers, args.heads, args.head_dim)
    names = args.only or list(CONFIGS)
    results = {n: [] for n in names}
    env = {**os.environ, "GLOG_v": "3", "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": REPO}
    with tempfile.TemporaryDirectory(prefix="bench_offload_") as tmp:
        write_model(os.path.join(tmp, "model"), config)
        for _ in range(args.rounds):
            for name in names:
                spec = {"dir": os.path.join(tmp, "model"), "grid": args.grid, "steps": args.steps, "flags": CONFIGS[name]}
                run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                     capture_output=True, text=True, env=env, timeout=3600)
                if run.returncode:
                    print(run.stderr[-3000:], file=sys.stderr)
                    return 1
                results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    rows = []
    plain_wall = statistics.median(r["wall_s"] for r in results[names[0]])
    print(f"model: {args.layers} layers x {args.heads} heads x {args.head_dim}, grid {tuple(args.grid)} "
          f"({args.grid[0] * args.grid[1] * args.grid[2]} tokens), [cond, uncond], {args.steps} steps, "
          f"{args.threads} threads; medians of {args.rounds} interleaved rounds; load {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':<28} {'loaded MiB':>11} {'pred.':>7} {'peak MiB':>9} {'pred.':>7} {'host MiB':>9} "
          f"{'pred.':>7} {'wall s':>7} {'x plain':>7}")
    for name in names:
        med = {k: statistics.median(r[k] for r in results[name]) for k in results[name][0]}
        pred = predicted(config, tuple(args.grid), CONFIGS[name])
        rows.append({"configuration": name, "measured": med, "predicted": pred})
        print(f"{name:<28} {med['weights_anon'] / mib:11.1f} {pred['weights'] / mib:7.1f} {med['peak_anon'] / mib:9.1f} "
              f"{pred['peak'] / mib:7.1f} {med['host_file'] / mib:9.1f} {pred['host'] / mib:7.1f} {med['wall_s']:7.2f} "
              f"{med['wall_s'] / plain_wall:7.2f}")
    sums = {name: results[name][0]["checksum"] for name in names}
    print("latent checksums:", json.dumps(sums))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"config": config, "grid": args.grid, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
