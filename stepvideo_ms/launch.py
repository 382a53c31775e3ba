"""The generation command line (run_parallel.py), for one process or an msrun world.

Order of work, so that a mistake costs seconds, not a weight load:
1. parse and validate every argument (sizes, image, parallel layout against the transformer's
   config.json, the layout's predicted memory against --card_gb or the card's, servers reachable)
   before any weight is read;
2. every rank reads only its pipeline stage of the DiT (with --shard_weights: its slices of it);
3. rank 0 asks the caption server (and, for TI2V, the VAE server) for the conditions and
   broadcasts them; every rank draws the same noise from the seed;
4. the denoising loop runs on the (cfg x ulysses x pp) mesh;
5. rank 0 writes --save_latents, asks the VAE server for the frames, writes the MP4 and its JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional

import numpy as np

from .diffusion.settings import GenerationSettings

TRANSFORMER_DIR = "transformer"
SCHEDULER_DIR = "scheduler"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    g.add_argument("--first_image_path", default=None, help="TI2V: the first frame (PNG/JPEG)")
    g.add_argument("--motion_score", type=float, default=None, help="TI2V: 2 steady, 5 default, 10/20 lively")
    g.add_argument("--num_frames", type=int, default=None, help="frames, rounded down to a multiple of 17 (task)")
    g.add_argument("--height", type=int, default=None, help="pixels, rounded down to a multiple of 16 (544)")
    g.add_argument("--width", type=int, default=None, help="pixels, rounded down to a multiple of 16 (992)")
    g.add_argument("--infer_steps", type=int, default=None, help="denoising steps (50; Turbo 10-15)")
    g.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance (9.0; Turbo 5.0)")
    g.add_argument("--time_shift", type=float, default=None, help="flow-matching time shift (13.0; Turbo 17.0)")
    g.add_argument("--pos_magic", default=None, help="appended to the prompt (task default)")
    g.add_argument("--neg_magic", default=None, help="the negative prompt (task default)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the initial noise (and of the image latent sample)")
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
    g.add_argument("--cfg_degree", type=int, default=1, help="2: the [cond, uncond] halves on two rank groups (1)")
    g.add_argument("--ulysses_degree", type=int, default=1, help="sequence-parallel ranks per pipeline stage")
    g.add_argument("--pp_degree", type=int, default=1, help="pipeline stages")
    g.add_argument("--pp_split", default=None, help="stage boundaries as layer indices, e.g. 24 or 12,24,36 (balanced)")
    g.add_argument("--ring_degree", type=int, default=1, help="must be 1: ring attention is not supported")
    g.add_argument("--shard_weights", action="store_true",
                   help="each rank keeps 1/(cfg x ulysses) of its stage's blocks, gathered just before each block runs")
    g.add_argument("--weights", choices=("full", "int8"), default=None,
                   help="int8: the DiT blocks' linear layers hold int8 weights with one scale per output channel "
                        "(half the memory and gather traffic of bf16), quantized while loading released weights or "
                        "read from a convert.py --quantize int8 folder (default: what the transformer folder holds)")
    g.add_argument("--card_gb", type=float, default=None,
                   help="memory per card (GiB): refuse a layout predicted not to fit (default: the device's, when known)")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    g.add_argument("--verbose", action="store_true",
                   help="show MindSpore's and the libraries' log lines (default: errors only)")
    return p


def settings_from(args, task: str) -> GenerationSettings:
    """The resolved settings; their notes (e.g. a rounded size) are printed once, by rank 0, not warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _settings_from(args, task)


def _settings_from(args, task: str) -> GenerationSettings:
    return GenerationSettings(
        prompt=args.prompt, task=task, first_image_path=args.first_image_path, num_frames=args.num_frames,
        height=args.height, width=args.width, infer_steps=args.infer_steps, cfg_scale=args.cfg_scale,
        time_shift=args.time_shift, motion_score=args.motion_score, pos_magic=args.pos_magic,
        neg_magic=args.neg_magic, seed=args.seed).resolved()


def validate_model(args, world_size: int):
    """The checks of the model and the layout, shared by every mode: -> (task, transformer path)."""
    from . import checkpoint
    from .diffusion.backends import check_local_dirs

    if not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir}: no such directory")
    transformer = os.path.join(args.model_dir, args.transformer_dir)
    config = checkpoint.read_config(transformer)
    checkpoint.checkpoint_files(transformer)  # the shards are all there
    task = "ti2v" if config.get("use_additional_conditions") else "t2v"
    weights_of(args, config, transformer)  # --weights against what the folder holds
    mesh = mesh_from(args, world_size, 0)
    mesh.check_model(int(config.get("num_attention_heads", 48)), int(config.get("num_layers", 48)))
    check_local_dirs(args.model_dir, args.caption_url, args.vae_url)
    return task, transformer


def weights_of(args, config: dict, transformer: str) -> str:
    """The DiT's weights for this run: --weights, else what the transformer folder holds."""
    from .ops.quant import resolve_weights

    return resolve_weights(getattr(args, "weights", None), config, transformer)


def check_layout_for(args, settings, transformer: str, world_size: int) -> None:
    """The layout against one video's settings: CFG parallel needs guidance, and the planner's memory
    prediction must fit --card_gb (when given)."""
    from .checkpoint import read_config

    mesh = mesh_from(args, world_size, 0)
    if mesh.cfg_degree > 1 and settings.cfg_scale <= 1.0:
        raise ValueError(f"--cfg_degree {mesh.cfg_degree} runs the [cond, uncond] halves on two rank groups, but "
                         f"--cfg_scale {settings.cfg_scale} <= 1 has no unconditional half: use --cfg_degree 1 or a "
                         "cfg_scale above 1")
    if args.card_gb is not None:
        from .runtime import pick_device

        config = read_config(transformer)
        check_fits(args.card_gb, mesh, config, settings, pick_device(args.device), weights_of(args, config, transformer))


def validate(args, world_size: int):
    """Every check that needs no weights: -> (settings, transformer path)."""
    check_outputs(args)  # first: needs no MindSpore import, so a bad --save_path fails in a second
    from . import video

    task, transformer = validate_model(args, world_size)
    if task == "t2v" and args.first_image_path:
        raise ValueError(f"--first_image_path is for TI2V, but {transformer} is a T2V model "
                         "(use_additional_conditions is false): drop the image or use the TI2V weights")
    settings = settings_from(args, task)
    if task == "ti2v":
        video.load_image(settings.first_image_path)  # readable, before anything else
    check_layout_for(args, settings, transformer, world_size)
    return settings, transformer


def mesh_from(args, world_size: int, rank: int):
    from .parallel import Mesh

    return Mesh.create(world_size, rank, args.ulysses_degree, args.pp_degree, args.ring_degree, args.pp_split,
                       args.cfg_degree, args.shard_weights)


def check_fits(card_gb: float, mesh, config: dict, settings, device: str, weights: str = "full") -> None:
    """Refuse (before any weight is read) a layout the planner predicts not to fit `card_gb` GiB per card
    (the CPU backend's profile on CPU: float32, memory per rank; the 910B profile otherwise)."""
    from .parallel import plan as planner

    if card_gb <= 0:
        raise ValueError(f"--card_gb {card_gb:g} must be positive (GiB per card, e.g. 64)")
    hardware = planner.CPU if device == "CPU" else planner.Hardware()
    shape = planner.ModelShape.from_config(config)
    layout = planner.Layout(mesh.cfg_degree, mesh.ulysses_degree, mesh.pp_degree, mesh.shard_weights, weights)
    grid = tuple(settings.latent_shape(1)[i] for i in (1, 3, 4))
    guidance = settings.cfg_scale > 1.0
    predicted = planner.plan(shape, layout, grid, guidance=guidance, hardware=hardware)
    if predicted.fits(card_gb):
        return
    others = [planner.plan(shape, other, grid, guidance=guidance, hardware=hardware)
              for other in planner.layouts(mesh.world_size, shape.heads, shape.num_layers, settings.cfg_scale > 1.0,
                                           weights)]
    fitting = sorted((q for q in others if q.fits(card_gb)), key=lambda q: q.step_s)
    hint = (f"layouts of {mesh.world_size} cards predicted to fit: "
            + "; ".join(f"{q.layout.arguments()} ({q.peak_gib:.1f} GiB)" for q in fitting[:3])) if fitting else \
        f"no layout of {mesh.world_size} cards fits: use more cards or fewer frames / a smaller size"
    raise ValueError(f"--card_gb {card_gb:g}: {layout.name()} is predicted to need {predicted.peak_gib:.1f} GiB per "
                     f"card for {settings.num_frames} frames {settings.height}x{settings.width} "
                     f"(python -m stepvideo_ms.describe --plan shows the parts); {hint}")


def device_memory_gib(device: str) -> Optional[float]:
    """Memory of the current Ascend card in GiB, when MindSpore can tell; None elsewhere."""
    if device != "Ascend":
        return None
    try:  # pragma: no cover - needs an NPU
        import mindspore as ms

        return ms.hal.get_device_properties(int(os.environ.get("DEVICE_ID", "0"))).total_memory / 2 ** 30
    except Exception:  # an old driver or runtime without the query: no default limit
        return None


def check_outputs(args) -> None:
    """The output folders can be created and written, before any weight is read (creates nothing)."""
    from .output_files import check_save_folder

    if args.save_latents:
        if not args.save_latents.endswith(".safetensors"):
            raise ValueError(f"--save_latents {args.save_latents}: give a path ending in .safetensors")
        if os.path.isdir(args.save_latents):
            raise ValueError(f"--save_latents {args.save_latents} is a folder: give a file path")
        check_save_folder(os.path.dirname(os.path.abspath(args.save_latents)), "--save_latents")
    if not args.no_video:
        check_save_folder(args.save_path)


def output_stem(args, settings: GenerationSettings) -> str:
    """The MP4/JSON name this run writes: a numbered suffix when that name exists already, unless --overwrite."""
    from .diffusion.pipeline import output_stem as stem_in

    return stem_in(args.save_path, settings.prompt, args.output_file_name, args.name_suffix, args.overwrite)


def world_size_from_env() -> int:
    return int(os.environ.get("MS_WORKER_NUM", "1"))


class PeerFailed(RuntimeError):
    """Rank 0 failed; the other ranks stop instead of waiting for it."""


def agree(comm, ok: bool, rank: int):
    """Rank 0 tells every rank whether it succeeded (so no rank waits forever in a collective)."""
    from mindspore import Tensor

    flag = comm.broadcast(Tensor(np.array([1.0 if ok else 0.0], np.float32)) if rank == 0 else None)
    if not ok:
        return
    if float(flag.asnumpy()[0]) != 1.0:
        raise PeerFailed("rank 0 failed (see its log); stopping this rank")


def broadcast_conditions(comm, cond, rank: int):
    """Rank 0's Conditions on every rank (the others pass None)."""
    from mindspore import Tensor
    from .diffusion.pipeline import Conditions

    local = cond.arrays() if rank == 0 else {}
    flags = np.zeros(2, np.float32)
    if rank == 0:
        flags[:] = [cond.condition is not None, -1.0 if cond.motion_score is None else cond.motion_score]
    flags = comm.broadcast(Tensor(flags) if rank == 0 else None).asnumpy()
    has_condition, motion = bool(flags[0]), (None if flags[1] < 0 else float(flags[1]))
    names = ("y", "y_mask", "clip_embedding") + (("condition",) if has_condition else ())
    arrays = {name: comm.broadcast(Tensor(local[name]) if rank == 0 else None).asnumpy() for name in names}
    return Conditions(arrays["y"], arrays["y_mask"], arrays["clip_embedding"], arrays.get("condition"), motion)


def run(args) -> int:
    from . import runtime
    from .diffusion.pipeline import StepVideoPipeline
    from .diffusion.scheduler import FlowMatchScheduler
    from .parallel import Conditioning, init_world, load_stage, make_communicator, parallel_denoise
    from .safetensors_io import save_file_atomic
    from .diffusion.backends import open_backends
    from mindspore import Tensor

    timings = {}
    t_start = time.perf_counter()
    settings, transformer = validate(args, world_size_from_env())
    rt = runtime.init(args.device)
    card_gb = device_memory_gib(rt.device) if args.card_gb is None else None  # given: validate checked it
    if card_gb:
        from .checkpoint import read_config

        config = read_config(transformer)
        check_fits(card_gb, mesh_from(args, world_size_from_env(), 0), config, settings, rt.device,
                   weights_of(args, config, transformer))
    world_size, rank = init_world()
    mesh = mesh_from(args, world_size, rank)
    comm = make_communicator(mesh)
    progress = not args.no_progress and rank == 0
    caption = vae = None
    if rank == 0:
        try:
            caption, vae = open_backends(args.model_dir, args.caption_url, args.vae_url, args.auth_token,
                                         need_vae=settings.task == "ti2v" or not args.no_video, progress=progress)
        except BaseException:
            agree(comm, False, rank)
            raise
    agree(comm, True, rank)
    if rank == 0:
        for note in settings.notes:
            print(f"[run_parallel] {note}", flush=True)
        print(f"[run_parallel] {settings.task}: {settings.num_frames} frames {settings.height}x{settings.width}, "
              f"{settings.infer_steps} steps, cfg {settings.cfg_scale}, shift {settings.time_shift}; "
              f"world {world_size} = " + (f"cfg {mesh.cfg_degree} x " if mesh.cfg_degree > 1 else "")
              + f"ulysses {mesh.ulysses_degree} x pp {mesh.pp_degree}" + (", sharded weights" if mesh.shard_weights else "")
              + (f", {args.weights} weights" if args.weights else "")
              + f"; device {rt.device}, compute dtype {rt.compute_dtype}", flush=True)

    t0 = time.perf_counter()
    model, shards = load_stage(transformer, mesh, dtype=rt.compute_dtype, progress=progress, weights=args.weights)
    timings["load_s"] = time.perf_counter() - t0
    scheduler = FlowMatchScheduler.from_dir(os.path.join(args.model_dir, SCHEDULER_DIR))
    pipe = StepVideoPipeline(model, scheduler, text_encoder=caption, vae=vae, progress=progress)

    t0 = time.perf_counter()
    cond = None
    if rank == 0:
        try:
            cond = pipe.encode_conditions(settings)
        except BaseException:
            agree(comm, False, rank)
            raise
    agree(comm, True, rank)
    cond = broadcast_conditions(comm, cond, rank)
    timings["encode_s"] = time.perf_counter() - t0

    conditioning = Conditioning(*cond.tensors(rt.compute_dtype), cond.motion_score)
    t0 = time.perf_counter()
    latents = parallel_denoise(mesh, comm, model, Tensor(pipe.initial_noise(settings)), conditioning, scheduler,
                               settings.infer_steps, settings.time_shift, settings.cfg_scale, progress=progress,
                               shards=shards)
    latents = latents.asnumpy()
    timings["denoise_s"] = time.perf_counter() - t0
    if rank != 0:
        return 0
    if args.save_latents:
        save_file_atomic({"latents": latents}, args.save_latents)
        print(f"[run_parallel] latents: {args.save_latents}", flush=True)
    if args.no_video:
        return 0
    from .console import Waiting

    t0 = time.perf_counter()
    with Waiting("VAE server decoding", live=not args.no_progress):
        frames = pipe.decode(latents)
    timings["decode_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    from .output_files import public_arguments

    extra = {"model_dir": os.path.abspath(args.model_dir), "arguments": public_arguments(args), "timings": timings,
             "parallel": {"world_size": world_size, "cfg_degree": mesh.cfg_degree,
                          "shard_weights": mesh.shard_weights, "ulysses_degree": mesh.ulysses_degree,
                          "pp_degree": mesh.pp_degree, "stages": [str(r) for r in mesh.partition(model.num_layers)]},
             "weights": model.weights,
             "device": rt.device}
    mp4, js = pipe.write_outputs(frames, settings, args.save_path, args.output_file_name, args.name_suffix, extra,
                                 overwrite=args.overwrite)
    print(f"[run_parallel] video: {mp4}\n[run_parallel] record: {js}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .console import quiet_environment

    quiet_environment(args.verbose)
    from .checkpoint import CheckpointError
    from .serving.client import RemoteServerError

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
            from .generation_service.main import run_service
            return run_service(args, world_size_from_env())
        return run(args)
    except (ValueError, CheckpointError) as exc:  # bad input: say what to change, no traceback
        print(f"run_parallel.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (RemoteServerError, PeerFailed) as exc:
        print(f"run_parallel.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
