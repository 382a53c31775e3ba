"""Peak memory and time of the VAE decode, untiled vs spatial tiles, on CPU (one run, interleaved).

    python bench/bench_vae_tile.py [--ch 64] [--z 16] [--latent 6] [--tiles 2,1] [--repeats 2] [--threads 2]

Each measurement is a fresh child process (so one run's peak cannot hide another's): it warms the
kernels on a 1x1 latent, records VmRSS, decodes one 3-latent-frame chunk of LATENT x LATENT
positions with the released layout of the decoder at width CH (ch_mult 1,2,4,4, 2 res blocks,
random weights) and prints the growth of VmHWM over that baseline (first decode at that shape) and
the wall time of a second decode.
The modes alternate (untiled, tile a, tile b, untiled, ...), and the tiled frames are compared
with the untiled ones (max |difference|).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status", "r", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(args) -> None:
    sys.path.insert(0, REPO)
    import gc

    import numpy as np
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore import Tensor
    from stepvideo_ms.models.vae import AutoencoderKL
    from stepvideo_ms.tools.tiny import set_small_random_weights

    cfg = {"z_channels": args.z, "decoder": {"ch": args.ch, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
           "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 4], "num_res_blocks": 1}}
    model = AutoencoderKL.from_config(cfg)
    rng = np.random.default_rng(0)
    set_small_random_weights(model, rng, 0.05)
    tile = None if args.mode == "untiled" else int(args.mode)
    model.decode_chunks(Tensor(rng.standard_normal((1, 3, args.z, 1, 1)).astype(np.float32)), progress=False,
                        tile_size=tile)  # kernels and weight layouts
    latents = Tensor(np.random.default_rng(1).standard_normal((1, 3, args.z, args.latent, args.latent))
                     .astype(np.float32))
    gc.collect()
    base = _status("VmRSS")
    out = model.decode_chunks(latents, progress=False, tile_size=tile).asnumpy()
    peak = _status("VmHWM") - base
    del out
    gc.collect()
    start = time.perf_counter()  # timed again once this shape's index tables exist
    out = model.decode_chunks(latents, progress=False, tile_size=tile).asnumpy()
    seconds = time.perf_counter() - start
    np.save(args.out, out)
    print(json.dumps({"mode": args.mode, "peak_mib": peak / 2 ** 20, "seconds": seconds,
                      "frame_mib": out.nbytes / 2 ** 20}))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--z", type=int, default=16)
    p.add_argument("--latent", type=int, default=6)
    p.add_argument("--tiles", default="2,1")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return 0
    import numpy as np

    env = {**os.environ, "GLOG_v": "3", "OMP_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads)}
    modes = ["untiled"] + args.tiles.split(",")
    results = {m: [] for m in modes}
    outs = {}
    for r in range(args.repeats):
        for mode in modes:
            out = f"/tmp/bench_vae_tile_{os.getpid()}_{mode}.npy"
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--out", out, "--ch", str(args.ch),
                                   "--z", str(args.z), "--latent", str(args.latent)], env=env, capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            if proc.returncode:
                print(proc.stderr[-3000:])
                return 1
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode].append(rec)
            outs[mode] = np.load(out)
            os.unlink(out)
            print(json.dumps(rec), flush=True)
    base = results["untiled"]
    print(f"decoder ch {args.ch}, z {args.z}, one chunk of 3 x {args.latent} x {args.latent} latents "
          f"-> 17 x {16 * args.latent} x {16 * args.latent}; load: {os.getloadavg()[0]:.1f}")
    for mode in modes:
        peak = min(r["peak_mib"] for r in results[mode])
        secs = min(r["seconds"] for r in results[mode])
        err = float(np.abs(outs[mode] - outs["untiled"]).max())
        print(f"{mode:>8}: peak +{peak:.0f} MiB (x{peak / min(b['peak_mib'] for b in base):.2f}), "
              f"{secs:.2f} s (x{secs / min(b['seconds'] for b in base):.2f}), max |tiled - untiled| {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
