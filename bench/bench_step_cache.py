"""The step cache on the CPU backend: wall time and blocks run, uncached and at three thresholds, and the
latent and frame differences against the uncached run (random weights: the quality of real videos is
not measured here, see docs/step-cache.md).

    .venv/bin/python bench/bench_step_cache.py [--layers 12] [--heads 6] [--head_dim 64] [--size 256 256]
                                               [--steps 12] [--thresholds 0.2 0.3 0.4] [--threads 2]
                                               [--rounds 2] [--out results.json]

A tiny model folder (its text encoders and VAE: `python -m stepvideo_ms tiny`) gets a larger random DiT
(default 12 blocks of width 384 over 3 x 16 x 16 = 768 tokens, CFG batch 2) so that the blocks are most
of a step's time. One process, one pipeline (the Python API), after an untimed 2-step warm-up: the
uncached loop (threshold 0: today's loop, the plain model), the cached path with nothing cached
(threshold 1e-9: the same DiT on a one-rank mesh, probe and decision included, no step ever under it),
then each threshold, in --rounds interleaved rounds (the fastest wall time of each is reported, so that
a shared machine's load falls on all alike); each loop is timed alone (conditions encoded once, the VAE
decode not timed). The cache uses the defaults scaled to this depth: warmup 2 of 12 steps, first 2 of 12 blocks
(DBCache's 8 of 48), last 0, at most 2 cached steps in a row. Printed: the machine's load before and
after, and per run: wall time of the loop, blocks run, cached steps, latent max |difference| and PSNR
(peak: the uncached latents' range), the decoded frames' mean PSNR and SSIM (`compare`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stepvideo_ms.console import quiet_process  # noqa: E402

quiet_process()  # before MindSpore and transformers are imported


def write_dit(folder: str, layers: int, heads: int, head_dim: int, seed: int = 0) -> dict:
    """Replace the tiny model's DiT by a larger random one of the same channels."""
    from stepvideo_ms.formats.safetensors_io import save_file_atomic
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.tools.tiny import random_state

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    config.update(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    state = random_state(StepVideoModel.from_config(config), seed, "bench-step-cache")
    save_file_atomic(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return config


NOTHING_CACHED = 1e-9  # the cached path with a threshold no step is under: its own cost


def settings_at(pipe, base: dict, args, threshold: float):
    return pipe.settings_for("a bench of the step cache", **base, cache_threshold=threshold, cache_warmup=args.warmup,
                             cache_first=args.first, cache_last=0, cache_max_skip=2)


def latent_psnr(ref, got) -> float:
    import numpy as np

    mse = float(np.mean((ref.astype(np.float64) - got) ** 2))
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--thresholds", type=float, nargs=3, default=(0.2, 0.3, 0.4))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--first", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the wall time is the fastest")
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("GLOG_v", "3")
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="bench_step_cache_")
    try:
        from stepvideo_ms.tools.tiny import write_tiny_model

        model_dir = os.path.join(root, "model")
        write_tiny_model(model_dir, seed=0)
        config = write_dit(os.path.join(model_dir, "transformer"), args.layers, args.heads, args.head_dim)
        return run(args, model_dir, config, load_before)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, model_dir: str, config: dict, load_before) -> int:
    import numpy as np
    from stepvideo_ms import StepVideoPipeline
    from stepvideo_ms.tools.compare import compare_frames
    from stepvideo_ms.video import frames_to_uint8

    pipe = StepVideoPipeline.from_pretrained(model_dir, device="CPU", progress=False)
    base = dict(num_frames=args.frames, height=args.size[0], width=args.size[1], infer_steps=args.steps, seed=7)
    s = pipe.settings_for("a bench of the step cache", **base)
    cond = pipe.encode_conditions(s)
    noise = pipe.initial_noise(s)
    f, _, h, w = s.latent_shape(config["in_channels"])[1:]
    print(f"DiT: {args.layers} blocks x {args.heads} heads x {args.head_dim} = width {args.heads * args.head_dim}, "
          f"{f}x{h}x{w} = {f * h * w} tokens, CFG batch 2, {args.steps} steps; cache: warmup {args.warmup}, "
          f"first {args.first}, last 0, max skip 2; OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, "
          f"{os.cpu_count()} CPUs", flush=True)
    pipe.denoise(pipe.settings_for("a bench of the step cache", **dict(base, infer_steps=2)), cond, noise)  # warm-up
    rows, reference = [], None
    thresholds = (0.0, NOTHING_CACHED) + tuple(args.thresholds)
    walls = {t: [] for t in thresholds}
    for _ in range(args.rounds - 1):  # interleaved rounds, timing only: A B C D A B C D ...
        for threshold in thresholds:
            t0 = time.perf_counter()
            pipe.denoise(settings_at(pipe, base, args, threshold), cond, noise)
            walls[threshold].append(time.perf_counter() - t0)
    for threshold in thresholds:
        cached = settings_at(pipe, base, args, threshold)
        t0 = time.perf_counter()
        latents = pipe.denoise(cached, cond, noise)
        walls[threshold].append(time.perf_counter() - t0)
        wall = min(walls[threshold])
        record = pipe.last_cache
        frames = frames_to_uint8(pipe.decode(latents)[0])
        if reference is None:
            reference = (latents, frames)
        quality = compare_frames(reference[1], frames)
        rows.append({"threshold": threshold, "relative_l1": record["relative_l1"], "wall_s": round(wall, 2), "blocks_run": record["blocks_run"],
                     "blocks_total": args.steps * args.layers, "cached_steps": record["cached_steps"],
                     "latent_max_diff": float(np.abs(latents - reference[0]).max()),
                     "latent_psnr": latent_psnr(reference[0], latents),
                     "frame_psnr": quality["mean_psnr"], "frame_ssim": quality["mean_ssim"]})
        print(f"  threshold {threshold:g}: {', '.join(f'{w:.1f}' for w in walls[threshold])} s", flush=True)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}")
    uncached = rows[0]["wall_s"]
    print(f"{'threshold':>9} {'wall s':>7} {'speed-up':>8} {'blocks run':>11} {'cached steps':<22} "
          f"{'latent max|d|':>13} {'latent PSNR':>11} {'frame PSNR':>10} {'SSIM':>6}")
    for r in rows:
        print(f"{r['threshold']:9g} {r['wall_s']:7.1f} {uncached / r['wall_s']:7.2f}x "
              f"{r['blocks_run']:5d}/{r['blocks_total']:<5d} {str(r['cached_steps']):<22} "
              f"{r['latent_max_diff']:13.4f} {r['latent_psnr']:11.2f} {r['frame_psnr']:10.2f} {r['frame_ssim']:6.4f}")
    if args.out:
        from stepvideo_ms.formats.atomic import write_json

        write_json(args.out, {"rows": rows, "load_before": load_before, "load_after": load_after,
                              "config": {k: config[k] for k in ("num_layers", "num_attention_heads",
                                                                "attention_head_dim")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
