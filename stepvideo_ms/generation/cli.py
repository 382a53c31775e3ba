"""The generation command line (run_parallel.py), for one process or an msrun world.

Order of work, so that a mistake costs seconds, not a weight load:
1. parse and validate every argument (sizes, image, parallel layout against the transformer's
   config.json, the layout's predicted memory against --card_gb or the card's, servers reachable)
   before any weight is read;
   (generation/checks.py);
2. the world loads once (generation/world.py): every rank reads only its pipeline stage of the DiT
   (with --shard_weights: its slices of it), rank 0 opens the text encoders and the VAE;
3. every video is a job run by `GenerationWorld.run_job` on every rank: rank 0 encodes the prompt
   and broadcasts the conditions, the denoising loop runs on the (cfg x ulysses x pp) mesh, rank 0
   writes the latents if asked, decodes, writes the MP4 and its JSON. One --prompt is a one-job run;
   --prompts_file (generation/batch.py) and --serve (generation/service/) run many on the same world.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..console import SuggestingParser

TRANSFORMER_DIR = "transformer"


def finite_float(text: str) -> float:
    """argparse type of every float argument: a finite number (Python's float() also reads nan and inf)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give a value such as 9.0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = SuggestingParser(
        prog="run_parallel.py",
        description="Step-Video T2V / TI2V generation on MindSpore; run under msrun for cfg x ulysses x pp parallelism.",
        epilog="Defaults marked 'task' come from the task of the transformer (T2V: 204 frames, TI2V: 102 frames, "
               "motion 5; both 544x992, 50 steps, cfg 9, shift 13, the upstream magic prompts).")
    g = p.add_argument_group("model and servers")
    g.add_argument("--model_dir", required=True, help="the downloaded model directory (transformer/, scheduler/, ...)")
    g.add_argument("--transformer_dir", default=TRANSFORMER_DIR, help="sub-folder of the DiT (default: transformer)")
    g.add_argument("--caption_url", default="127.0.0.1",
                   help="caption server, http://HOST:PORT (host alone: port 5000), or 'local': Step-1 and "
                        "HunyuanCLIP in this process (rank 0 under msrun)")
    g.add_argument("--vae_url", default="127.0.0.1",
                   help="VAE server, http://HOST:PORT (host alone: port 5001), or 'local': the VAE in this process")
    g.add_argument("--local_in_turn", action="store_true",
                   help="with local encoders/VAE: load each only while it runs and release it after (one card holds "
                        "everything in turn; every video reads their weights again). Chosen by itself when the "
                        "card is too small for them beside the DiT")
    g.add_argument("--vae_tile", type=int, default=None,
                   help="with --vae_url local: decode in spatial tiles of N x N latent positions (same frames, "
                        "less memory)")
    g.add_argument("--vae_budget_gb", type=finite_float, default=None,
                   help="with --vae_url local: decode in tiles when the untiled decode is predicted not to fit "
                        "this many GiB")
    g.add_argument("--auth_token", default=None, help="token of the servers (default: $STEPVIDEO_AUTH_TOKEN)")
    g.add_argument("--device", default=None, help="Ascend or CPU (default: Ascend when present)")
    g = p.add_argument_group("what to make")
    g.add_argument("--prompt", default=None, help="the text prompt (or --prompts_file, or --serve)")
    g.add_argument("--prompts_file", default=None, metavar="JSONL",
                   help="batch: one JSON object per line (prompt and any per-video setting, output_file_name); "
                        "the world loads once and writes every video")
    g.add_argument("--serve", action="store_true",
                   help="keep the world loaded and serve an HTTP job API and a web page (rank 0)")
    g.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (loopback unless a token)")
    g.add_argument("--port", type=int, default=8000, help="--serve: port (0 picks a free one)")
    g.add_argument("--queue_size", type=int, default=16, help="--serve: jobs that may wait")
    g.add_argument("--metrics_public", action="store_true",
                   help="--serve: GET /metrics answers without the token (for a Prometheus on a trusted network)")
    g.add_argument("--first_image_path", default=None, help="TI2V: the first frame (PNG/JPEG)")
    g.add_argument("--motion_score", type=finite_float, default=None, help="TI2V: 2 steady, 5 default, 10/20 lively")
    g.add_argument("--num_frames", type=int, default=None, help="frames, rounded down to a multiple of 17 (task)")
    g.add_argument("--height", type=int, default=None, help="pixels, rounded down to a multiple of 16 (544)")
    g.add_argument("--width", type=int, default=None, help="pixels, rounded down to a multiple of 16 (992)")
    g.add_argument("--infer_steps", type=int, default=None, help="denoising steps (50; Turbo 10-15)")
    g.add_argument("--cfg_scale", type=finite_float, default=None, help="classifier-free guidance (9.0; Turbo 5.0)")
    g.add_argument("--time_shift", type=finite_float, default=None, help="flow-matching time shift (13.0; Turbo 17.0)")
    g.add_argument("--pos_magic", default=None, help="appended to the prompt (task default)")
    g.add_argument("--neg_magic", default=None, help="the negative prompt (task default)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the initial noise (and of the image latent sample)")
    g = p.add_argument_group("step cache (docs/step-cache.md): skip the middle blocks of steps that barely change")
    g.add_argument("--cache_threshold", type=finite_float, default=None,
                   help="relative L1 change of the first blocks' output under which a step reuses the middle blocks' "
                        "residual (0: off, the default; DBCache publishes 0.08-0.12)")
    g.add_argument("--cache_warmup", type=int, default=None, help="steps always computed at the start (8)")
    g.add_argument("--cache_first", type=int, default=None,
                   help="blocks always computed at the front; their output is the probe (8)")
    g.add_argument("--cache_last", type=int, default=None, help="blocks always computed at the end (0)")
    g.add_argument("--cache_max_skip", type=int, default=None, help="at most this many cached steps in a row (2)")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="./results", help="folder of the MP4 and its JSON")
    g.add_argument("--output_file_name", default="", help="file name without extension (default: the prompt's start)")
    g.add_argument("--name_suffix", default="", help="appended to the file name")
    g.add_argument("--save_latents", default=None, metavar="PATH",
                   help="also write the final latents to PATH (safetensors, key 'latents')")
    g.add_argument("--no_video", action="store_true", help="stop after the latents (no VAE decode, no MP4)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing NAME.mp4/NAME.json (default: write NAME-1, NAME-2, ...)")
    g = p.add_argument_group("parallelism (world size = cfg_degree x ulysses_degree x pp_degree msrun workers)")
    g.add_argument("--cfg_degree", type=int, default=None, help="2: the [cond, uncond] halves on two rank groups (1)")
    g.add_argument("--ulysses_degree", type=int, default=None, help="sequence-parallel ranks per pipeline stage (1)")
    g.add_argument("--pp_degree", type=int, default=None,
                   help="pipeline stages (1). With no layout flag at all and a known card size (--card_gb, or the "
                        "Ascend card's), the planner picks the fastest layout predicted to fit and prints it")
    g.add_argument("--pp_split", default=None, help="stage boundaries as layer indices, e.g. 24 or 12,24,36 (balanced)")
    g.add_argument("--ring_degree", type=int, default=1, help="must be 1: ring attention is not supported")
    g.add_argument("--shard_weights", action="store_true",
                   help="each rank keeps 1/(cfg x ulysses) of its stage's blocks, gathered just before each block runs")
    g.add_argument("--weights", choices=("full", "int8"), default=None,
                   help="int8: the DiT blocks' linear layers hold int8 weights with one scale per output channel "
                        "(half the memory and gather traffic of bf16), quantized while loading released weights or "
                        "read from a convert.py --quantize int8 folder (default: what the transformer folder holds)")
    g.add_argument("--offload", action="store_true",
                   help="keep the stage's block weights in host memory and copy each in just before it runs (the "
                        "next one's copy issued ahead on a side stream); the card holds the rest and two blocks")
    g.add_argument("--sequential_cfg", action="store_true",
                   help="run the [cond, uncond] halves one after the other (half the activations, same result)")
    g.add_argument("--chunk_tokens", type=int, default=0,
                   help="run the blocks' token-wise parts (norms, cross-attention, feed-forward, output projection) "
                        "on this many tokens at a time: same result, smaller activation peak (0: off)")
    g.add_argument("--card_gb", type=finite_float, default=None,
                   help="memory per card (GiB): refuse a layout predicted not to fit (default: the device's, when known)")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    g.add_argument("--verbose", action="store_true",
                   help="show MindSpore's and the libraries' log lines (default: errors only)")
    return p


def run(args) -> int:
    """One video (--prompt): a one-job run through the same world path as a batch and the service."""
    from .checks import validate, world_size_from_env
    from .jobs import Job
    from .outputs import public_arguments
    from .world import GenerationWorld, JobFailed

    settings, transformer = validate(args, world_size_from_env())
    job = Job(settings, args.output_file_name, args.name_suffix, args.save_latents, args.no_video)
    headline = (f"{settings.task}: {settings.num_frames} frames {settings.height}x{settings.width}, "
                f"{settings.infer_steps} steps, cfg {settings.cfg_scale}, shift {settings.time_shift}; ")
    world = GenerationWorld.start(args, settings.task, transformer, need_vae=settings.task == "ti2v" or not args.no_video,
                                  headline=headline, notes=settings.notes, fit=[settings])
    try:
        out = world.run_job(job, args.save_path, extra={"arguments": public_arguments(args)})
    except JobFailed as exc:
        print(f"run_parallel.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if out is not None and out[0] is not None:
        print(f"[run_parallel] video: {out[0]}\n[run_parallel] record: {out[1]}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..console import quiet_environment

    quiet_environment(args.verbose)
    from ..formats.checkpoint import CheckpointError
    from ..serving.client import RemoteServerError
    from .checks import world_size_from_env
    from .world import PeerFailed

    modes = [name for name, on in (("--prompt", args.prompt is not None), ("--prompts_file", args.prompts_file),
                                   ("--serve", args.serve)) if on]
    if len(modes) != 1:
        parser.error("give exactly one of --prompt, --prompts_file, --serve" + (f" (got {', '.join(modes)})"
                                                                                 if modes else ""))
    if args.prompt is None:  # the flags of one video have no meaning for many
        single = [flag for flag, on in (("--first_image_path", args.first_image_path), ("--save_latents", args.save_latents),
                                        ("--no_video", args.no_video), ("--output_file_name", args.output_file_name),
                                        ("--name_suffix", args.name_suffix)) if on]
        if single:
            parser.error(f"{', '.join(single)} belong(s) to one video (--prompt); with {modes[0]} give "
                         "first_image_path / output_file_name per job")
    try:
        if args.prompts_file:
            from .batch import run_batch
            return run_batch(args, world_size_from_env())
        if args.serve:
            from .service.main import run_service
            return run_service(args, world_size_from_env())
        return run(args)
    except (ValueError, CheckpointError) as exc:  # bad input: say what to change, no traceback
        print(f"run_parallel.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (RemoteServerError, PeerFailed) as exc:
        print(f"run_parallel.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
