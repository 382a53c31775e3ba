"""Where the CPU time of one DiT forward and one VAE decode goes: the cases of bench_cpu_vs_torch.py
under Python's profiler.

    python bench/profile_cpu.py [--cases dit,vae_released,vae_golden] [--top 15] [--threads N]

The CPU backend runs with blocking launch (runtime.init), so each kernel's time is spent inside
the Python call that launched it: the profile's own time per function ("tottime") is the time of
those kernels, plus the Python around them. The profiler's clock is the process CPU time (all
threads), the steadier measure on a shared machine (`--clock wall` for wall time). One warm-up,
then one profiled run per case; prints the top functions by own time, with their share.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu_vs_torch as bench  # noqa: E402


def top_costs(profile: cProfile.Profile, total: float, count: int):
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, name), (_, calls, own, _cum, _) in stats.stats.items():
        where = name if path == "~" else f"{os.path.basename(path)}:{line}({name})"
        rows.append((own, calls, where))
    rows.sort(reverse=True)
    return [(where, own, calls, own / total) for own, calls, where in rows[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(bench.CASES))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    bench.runtime.init("CPU")
    bench.set_threads(args.threads)
    rng = np.random.default_rng(bench.SEED)
    for name in [c for c in args.cases.split(",") if c]:
        title, spec = bench.CASES[name]
        run, *_ = bench.dit_case(rng) if spec is None else bench.vae_case(rng, *spec)
        run().asnumpy()  # warm-up
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        profile = cProfile.Profile(clock)
        w0, c0 = time.perf_counter(), time.process_time()
        profile.enable()
        run().asnumpy()
        profile.disable()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        total = cpu if args.clock == "cpu" else wall
        print(f"\n{title}: profiled run {wall:.2f} s wall, {cpu:.2f} s cpu ({args.clock} shares below), "
              f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
        for where, own, calls, share in top_costs(profile, total, args.top):
            print(f"  {own:7.3f} s {100 * share:5.1f}%  {calls:6d} calls  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
