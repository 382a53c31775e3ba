"""The checks of a generation run that need no weights, shared by every mode (one video, a prompts
file, the service): the model folder and the parallel layout against its config.json, the settings of a
video, the layout's predicted memory, the output folders. Each raises ValueError naming the argument and
the fix; none reads a weight, so a mistake costs seconds.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from ..diffusion.settings import GenerationSettings


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
    from ..formats import checkpoint
    from ..diffusion.backends import check_local_dirs, model_folder_problem

    if not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir}: no such directory")
    problem = model_folder_problem(args.model_dir, [os.path.join(args.transformer_dir, "config.json")])
    if problem:
        raise ValueError(problem)
    transformer = os.path.join(args.model_dir, args.transformer_dir)
    config = checkpoint.read_config(transformer)
    checkpoint.checkpoint_files(transformer)  # the shards are all there
    task = "ti2v" if config.get("use_additional_conditions") else "t2v"
    mesh = mesh_from(args, world_size, 0)
    mesh.check_model(int(config.get("num_attention_heads", 48)), int(config.get("num_layers", 48)))
    check_local_dirs(args.model_dir, args.caption_url, args.vae_url)
    return task, transformer


def check_layout_for(args, settings, transformer: str, world_size: int) -> None:
    """The layout against one video's settings: CFG parallel needs guidance, and the planner's memory
    prediction must fit --card_gb (when given)."""
    from ..formats.checkpoint import read_config

    mesh = mesh_from(args, world_size, 0)
    if mesh.cfg_degree > 1 and settings.cfg_scale <= 1.0:
        raise ValueError(f"--cfg_degree {mesh.cfg_degree} runs the [cond, uncond] halves on two rank groups, but "
                         f"--cfg_scale {settings.cfg_scale} <= 1 has no unconditional half: use --cfg_degree 1 or a "
                         "cfg_scale above 1")
    if args.card_gb is not None:
        from ..runtime import pick_device

        check_fits(args.card_gb, mesh, read_config(transformer), settings, pick_device(args.device))


def validate(args, world_size: int):
    """Every check that needs no weights: -> (settings, transformer path)."""
    check_outputs(args)  # first: needs no MindSpore import, so a bad --save_path fails in a second
    from .. import video

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
    from ..parallel import Mesh

    return Mesh.create(world_size, rank, args.ulysses_degree, args.pp_degree, args.ring_degree, args.pp_split,
                       args.cfg_degree, args.shard_weights)


def check_fits(card_gb: float, mesh, config: dict, settings, device: str) -> None:
    """Refuse (before any weight is read) a layout the planner predicts not to fit `card_gb` GiB per card
    (the CPU backend's profile on CPU: float32, memory per rank; the 910B profile otherwise)."""
    from ..parallel import plan as planner

    if card_gb <= 0:
        raise ValueError(f"--card_gb {card_gb:g} must be positive (GiB per card, e.g. 64)")
    hardware = planner.CPU if device == "CPU" else planner.Hardware()
    shape = planner.ModelShape.from_config(config)
    layout = planner.Layout(mesh.cfg_degree, mesh.ulysses_degree, mesh.pp_degree, mesh.shard_weights)
    grid = tuple(settings.latent_shape(1)[i] for i in (1, 3, 4))
    guidance = settings.cfg_scale > 1.0
    predicted = planner.plan(shape, layout, grid, guidance=guidance, hardware=hardware)
    if predicted.fits(card_gb):
        return
    others = [planner.plan(shape, other, grid, guidance=guidance, hardware=hardware)
              for other in planner.layouts(mesh.world_size, shape.heads, shape.num_layers, settings.cfg_scale > 1.0)]
    fitting = sorted((q for q in others if q.fits(card_gb)), key=lambda q: q.step_s)
    hint = (f"layouts of {mesh.world_size} cards predicted to fit: "
            + "; ".join(f"{q.layout.arguments()} ({q.peak_gib:.1f} GiB)" for q in fitting[:3])) if fitting else \
        f"no layout of {planner.cards_word(mesh.world_size)} fits; " + "; ".join(planner.advice(
            shape, mesh.world_size, card_gb, settings.num_frames, settings.height, settings.width, guidance,
            hardware)[1:])
    raise ValueError(f"--card_gb {card_gb:g}: {layout.name()} is predicted to need {predicted.peak_gib:.1f} GiB per "
                     f"card for {settings.num_frames} frames {settings.height}x{settings.width} "
                     f"(python -m stepvideo_ms describe --plan shows the parts); {hint}")


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
    from .outputs import check_save_folder

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
    from ..diffusion.pipeline import output_stem as stem_in

    return stem_in(args.save_path, settings.prompt, args.output_file_name, args.name_suffix, args.overwrite)


def world_size_from_env() -> int:
    return int(os.environ.get("MS_WORKER_NUM", "1"))
