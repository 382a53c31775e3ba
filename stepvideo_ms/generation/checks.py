"""The checks of a generation run that need no weights, shared by every mode (one video, a prompts
file, the service): the model folder and the parallel layout against its config.json, the settings of a
video, the layout's predicted memory, the output folders. Each raises ValueError naming the argument and
the fix; none reads a weight, so a mistake costs seconds.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np

from ..diffusion.settings import GenerationSettings
from ..diffusion.step_cache import CACHE_SETTINGS, CacheSettings
from .decode_checks import check_vae_tiling, local_decode_tile_for


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
        neg_magic=args.neg_magic, seed=args.seed,
        **{name: getattr(args, name, None) for name in CACHE_SETTINGS}).resolved()


def validate_model(args, world_size: int):
    """The checks of the model and the layout, shared by every mode: -> (task, transformer path)."""
    from ..formats import checkpoint
    from ..diffusion.backends import check_local_dirs, model_folder_problem
    from ..parallel.host_memory import ranks_on_this_host

    if not os.path.isdir(args.model_dir):
        raise ValueError(f"--model_dir {args.model_dir}: no such directory")
    problem = model_folder_problem(args.model_dir, [os.path.join(args.transformer_dir, "config.json")])
    if problem:
        raise ValueError(problem)
    transformer = os.path.join(args.model_dir, args.transformer_dir)
    config = checkpoint.read_config(transformer)
    checkpoint.checkpoint_files(transformer)  # the shards are all there
    task = "ti2v" if config.get("use_additional_conditions") else "t2v"
    weights = weights_of(args, config, transformer)  # --weights against what the folder holds
    resolve_layout(args, world_size, task, config, weights)
    mesh = mesh_from(args, world_size, 0)
    ranks_on_this_host(world_size, getattr(args, "worker_env", None))  # $STEPVIDEO_RANKS_PER_HOST, checked early
    mesh.check_model(int(config.get("num_attention_heads", 48)), int(config.get("num_layers", 48)))
    check_local_dirs(args.model_dir, args.caption_url, args.vae_url)
    return task, transformer


def weights_of(args, config: dict, transformer: str) -> str:
    """The DiT's weights for this run: --weights, else what the transformer folder holds."""
    from ..ops.quant import resolve_weights

    return resolve_weights(getattr(args, "weights", None), config, transformer)


def check_layout_for(args, settings, transformer: str, world_size: int, card_gb: Optional[float] = None,
                     device: Optional[str] = None) -> None:
    """The layout against one video's settings: CFG parallel needs guidance, and the planner's memory
    prediction must fit `card_gb` (default --card_gb, when given) on `device` (default: --device's)."""
    from ..formats.checkpoint import read_config

    mesh = mesh_from(args, world_size, 0)
    if mesh.cfg_degree > 1 and settings.cfg_scale <= 1.0:
        raise ValueError(f"--cfg_degree {mesh.cfg_degree} runs the [cond, uncond] halves on two rank groups, but "
                         f"--cfg_scale {settings.cfg_scale} <= 1 has no unconditional half: use --cfg_degree 1 or a "
                         "cfg_scale above 1")
    cache = CacheSettings.of(settings)
    if cache.enabled:
        layers = int(read_config(transformer).get("num_layers", 48))
        cache.check_model(layers, mesh.partition(layers))
    card_gb = args.card_gb if card_gb is None else card_gb
    if card_gb is not None:
        from ..runtime import pick_device

        config = read_config(transformer)
        check_fits(card_gb, mesh, config, settings, device or pick_device(args.device), args,
                   weights_of(args, config, transformer))


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
    check_vae_tiling(args, settings)
    return settings, transformer


def fit_local_decode(args, settings, transformer: str, world_size: int, card_gb: float, device: str) -> None:
    """An in-process VAE (--vae_url local) with neither --vae_tile nor --vae_budget_gb, on a card of known
    size: its decode gets what rank 0's card has left once it holds its DiT stage's weights, the runtime
    reserve and the local models (all of them, or with --local_in_turn the VAE alone): sets
    args.vae_budget_gb (tiles only when an untiled decode is predicted not to fit), or refuses before
    anything loads when no tile fits in it."""
    from ..diffusion.backends import is_local
    from ..formats.checkpoint import read_config
    from ..parallel import plan as planner

    if not is_local(args.vae_url) or args.vae_tile is not None or args.vae_budget_gb is not None:
        return
    mesh, config = mesh_from(args, world_size, 0), read_config(transformer)
    hardware = planner.hardware_for(device)
    layout = planner.Layout(mesh.cfg_degree, mesh.ulysses_degree, mesh.pp_degree, mesh.shard_weights, mesh.offload,
                            mesh.sequential_cfg, weights=weights_of(args, config, transformer))
    grid = tuple(settings.latent_shape(1)[i] for i in (1, 3, 4))
    plan = planner.plan(planner.ModelShape.from_config(config), layout, grid, guidance=settings.cfg_scale > 1.0,
                        hardware=hardware)
    parts = local_backend_parts(args, hardware.dtype_bytes)
    held = parts.get("vae", 0) if getattr(args, "local_in_turn", False) else sum(parts.values())
    left = planner.decode_budget_bytes(plan, card_gb, held) / planner.GIB
    if left <= 0:
        raise ValueError(f"rank 0's card ({card_gb:g} GiB) is filled by its DiT weights, the runtime reserve and the "
                         "in-process models before the VAE decodes: use a VAE server (--vae_url URL), --offload or "
                         "--shard_weights, or give --vae_tile")
    args.vae_budget_gb = left
    try:
        check_vae_tiling(args, settings)
    except ValueError as exc:
        args.vae_budget_gb = None
        raise ValueError(f"the VAE decode on rank 0's card, with the {left:.2f} GiB it has left: {exc}".replace(
            "--vae_budget_gb: ", "")) from None


LAYOUT_FLAGS = ("cfg_degree", "ulysses_degree", "pp_degree")
LAYOUT_SWITCHES = ("shard_weights", "offload", "sequential_cfg")


def layout_given(args) -> bool:
    return (any(getattr(args, f, None) is not None for f in LAYOUT_FLAGS)
            or any(getattr(args, f, False) for f in LAYOUT_SWITCHES) or bool(getattr(args, "pp_split", None)))


def resolve_layout(args, world_size: int, task: str, config: dict, weights: str = "full") -> None:
    """Fill in the layout arguments. Given ones win (unset degrees are 1). With none given and a known
    card size (--card_gb, or the Ascend card's own), the planner picks the fastest layout of the world
    predicted to fit the command line's video (offload, sequential CFG and sharding included) and rank 0
    prints it with its predicted peak and step time; none fitting is refused, naming what would."""
    if getattr(args, "_layout_resolved", False):
        return
    chosen = None
    if not layout_given(args):
        from ..runtime import pick_device

        device = pick_device(args.device)
        probed = args.card_gb is None
        if probed:  # the card's own size; kept in args.card_gb for every later check (and msrun_job)
            from ..parallel.card_memory import probe_card_gib

            args.card_gb, _ = probe_card_gib(device, getattr(args, "probe_env", None))
        if args.card_gb is not None:
            try:
                chosen = choose_layout(args, world_size, task, config, args.card_gb, device, weights)
            except ValueError as exc:
                from ..parallel.card_memory import CARD_REPORTS

                raise ValueError(f"{CARD_REPORTS.format(gib=args.card_gb)}: {exc}" if probed else str(exc)) from None
    for flag in LAYOUT_FLAGS:
        if getattr(args, flag, None) is None:
            setattr(args, flag, 1)
    if chosen is not None:
        args.cfg_degree, args.ulysses_degree, args.pp_degree = chosen.layout.cfg, chosen.layout.ulysses, chosen.layout.pp
        args.shard_weights, args.offload, args.sequential_cfg = chosen.layout.shard, chosen.layout.offload, chosen.layout.seq_cfg
    args._layout_resolved = True


def local_backend_parts(args, dtype_bytes: int) -> dict:
    """Weights of the in-process text encoders (--caption_url local) and VAE (--vae_url local) that rank 0's
    card holds beside its DiT stage: {"encoders": bytes, "vae": bytes}, from their parameter counts
    (safetensors headers) x the compute dtype's bytes."""
    from ..diffusion.backends import is_local
    from ..formats.safetensors_io import SafetensorsFile

    parts = {}
    for part, folders, url in (("encoders", ("step_llm", "hunyuan_clip"), args.caption_url),
                               ("vae", ("vae",), args.vae_url)):
        if not is_local(url):
            continue
        elements = 0
        for sub in folders:
            for root, _, files in os.walk(os.path.join(args.model_dir, sub)):
                for name in files:
                    if name.endswith(".safetensors"):
                        f = SafetensorsFile(os.path.join(root, name))
                        elements += sum(int(np.prod(f.shape(k), dtype=np.int64)) for k in f.keys())
        parts[part] = elements * dtype_bytes
    return parts


def fits_with_local(plan, card_gb: float, parts: dict, in_turn: bool) -> bool:
    """Rank 0's card: the DiT's peak plus the local encoders/VAE held all along, or (in turn) the DiT's peak
    alone and, apart from it, the DiT's resident weights plus the larger local model (its activations,
    e.g. the VAE decode's, are not modelled)."""
    from ..parallel.plan import GIB

    if not in_turn:
        return plan.fits(card_gb - sum(parts.values()) / GIB)
    resident = plan.memory["weights"] + plan.memory["runtime reserve"] + max(parts.values(), default=0)
    return plan.fits(card_gb) and resident / GIB <= card_gb


def choose_layout(args, world_size: int, task: str, config: dict, card_gb: float, device: str,
                  weights: str = "full"):
    """The planner's fastest layout of `world_size` cards predicted to fit `card_gb` GiB (printed by rank 0)."""
    from ..parallel import plan as planner

    if card_gb <= 0:
        raise ValueError(f"--card_gb {card_gb:g} must be positive (GiB per card, e.g. 64)")
    settings = GenerationSettings("layout", task, num_frames=args.num_frames, height=args.height, width=args.width,
                                  cfg_scale=args.cfg_scale, infer_steps=getattr(args, "infer_steps", None),
                                  # the image itself is checked elsewhere: only its task here
                                  first_image_path=(getattr(args, "first_image_path", None) or "(the first image)")
                                  if task == "ti2v" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = settings.resolved()
    from ..parallel.host_memory import host_limit, limit_gib, ranks_on_this_host

    hardware = planner.hardware_for(device)
    shape = planner.ModelShape.from_config(config)
    grid = tuple(settings.latent_shape(1)[i] for i in (1, 3, 4))
    guidance = settings.cfg_scale > 1.0
    plans = [planner.plan(shape, layout, grid, guidance=guidance, hardware=hardware,
                          ranks_per_host=ranks_on_this_host(world_size, getattr(args, "worker_env", None)))
             for layout in planner.layouts(world_size, shape.heads, shape.num_layers, guidance, weights=weights)]
    parts = local_backend_parts(args, hardware.dtype_bytes)
    shared = sum(parts.values())
    host_gb = limit_gib(host_limit(this_host=True))  # this host: its ranks' offloaded blocks (Plan.host_gib)
    in_turn = bool(getattr(args, "local_in_turn", False))
    tile_for = local_decode_tile_for(args, settings)  # an in-process VAE decodes on rank 0's card after the DiT
    refused = {}  # layout -> why its decode would find no room, with the planner's numbers

    def decodes(p, turn: bool) -> bool:
        if tile_for is None:
            return True
        try:
            planner.expected_decode_tile(p, card_gb, parts.get("vae", 0) if turn else shared, tile_for)
            return True
        except ValueError as exc:
            refused.setdefault(p.layout, str(exc))
            return False

    best = planner.choose([p for p in plans if fits_with_local(p, card_gb, parts, in_turn) and decodes(p, in_turn)],
                          None, host_gb)
    if best is None and parts and not in_turn:  # one card holds everything in turn
        best = planner.choose([p for p in plans if fits_with_local(p, card_gb, parts, True) and decodes(p, True)],
                              None, host_gb)
        in_turn = args.local_in_turn = best is not None
    what = f"{settings.num_frames} frames {settings.height}x{settings.width}"
    if shared:
        what += (f", rank 0 also holding the local encoders/VAE ({shared / planner.GIB:.3g} GiB)" if not in_turn else
                 f", the local encoders and VAE loaded in turn (--local_in_turn, at most "
                 f"{max(parts.values()) / planner.GIB:.3g} GiB beside the DiT's weights)")
    if best is None:
        least = min(plans, key=lambda q: q.peak_bytes)
        raise ValueError(
            f"no layout of {world_size} card(s) of {card_gb:g} GiB is predicted to fit {what}: the smallest, "
            f"{least.layout.arguments()}, needs {least.peak_gib + shared / planner.GIB:.1f} GiB on rank 0's card; use "
            f"more cards (msrun workers), {'caption/VAE servers on other cards, ' if shared else ''}"
            f"fewer --num_frames or a smaller --height/--width (python -m stepvideo_ms describe --plan --cards "
            f"{world_size} --card_gb {card_gb:g} --frames {settings.num_frames} --height {settings.height} "
            f"--width {settings.width} --all shows every layout)"
            + (f"; the VAE decode refused {len(refused)} that fit the DiT, e.g. {next(iter(refused.values()))}"
               if refused else ""))
    if os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", "0")) == "0":
        offload = f", offload x{best.offload_ratio:.3f} of compute" if best.layout.offload else ""
        host = f", host memory {best.host_gib:.1f} GiB on this host" if best.layout.offload else ""
        if tile_for is not None:
            tile, budget = planner.expected_decode_tile(best, card_gb, parts.get("vae", 0) if in_turn else shared,
                                                        tile_for)
            host += (f", VAE decode in {budget / planner.GIB:.2f} GiB on rank 0: "
                     + ("untiled" if tile is None else f"tiles of {tile[0]}x{tile[1]} latent positions"))
        print(f"[run_parallel] layout for {world_size} card(s) of {card_gb:g} GiB ({hardware.name}, {what}): "
              f"{best.layout.arguments()}; predicted peak {best.peak_gib:.3g} GiB per card{host}, step "
              f"{best.step_s:.3g} s, {settings.infer_steps} steps "
              f"{planner.duration(best.step_s * settings.infer_steps)}"
              f"{offload} (predictions; explicit layout flags override)", flush=True)
    return best


def mesh_from(args, world_size: int, rank: int):
    from ..parallel import Mesh

    def degree(name):
        value = getattr(args, name, None)
        return 1 if value is None else value

    return Mesh.create(world_size, rank, degree("ulysses_degree"), degree("pp_degree"), args.ring_degree,
                       args.pp_split, degree("cfg_degree"), args.shard_weights, getattr(args, "offload", False),
                       getattr(args, "sequential_cfg", False), getattr(args, "chunk_tokens", 0))


def check_fits(card_gb: float, mesh, config: dict, settings, device: str, args=None, weights: str = "full") -> None:
    """Refuse (before any weight is read) a layout the planner predicts not to fit `card_gb` GiB per card
    (the CPU backend's profile on CPU: float32, memory per rank; the 910B profile otherwise)."""
    from ..parallel import plan as planner

    if card_gb <= 0:
        raise ValueError(f"--card_gb {card_gb:g} must be positive (GiB per card, e.g. 64)")
    from ..parallel.host_memory import check_host_holds, host_limit, ranks_on_this_host
    from ..parallel.plan_advice import advice, cards_word

    hardware = planner.hardware_for(device)
    ranks = ranks_on_this_host(mesh.world_size, getattr(args, "worker_env", None))
    shape = planner.ModelShape.from_config(config)
    grid = tuple(settings.latent_shape(1)[i] for i in (1, 3, 4))
    guidance = settings.cfg_scale > 1.0
    layout = planner.Layout(mesh.cfg_degree, mesh.ulysses_degree, mesh.pp_degree, mesh.shard_weights, mesh.offload,
                            mesh.sequential_cfg and guidance and mesh.cfg_degree == 1 and mesh.pp_degree == 1,
                            weights=weights)
    predicted = planner.plan(shape, layout, grid, guidance=guidance, hardware=hardware, ranks_per_host=ranks)
    parts = local_backend_parts(args, hardware.dtype_bytes) if args is not None else {}
    in_turn = bool(getattr(args, "local_in_turn", False))
    shared = 0 if in_turn else sum(parts.values())
    if in_turn and predicted.fits(card_gb) and not fits_with_local(predicted, card_gb, parts, True):
        raise ValueError(f"--local_in_turn: {layout.name()} keeps {predicted.memory['weights'] / planner.GIB:.1f} GiB "
                         f"of DiT weights on the card, with the largest local model "
                         f"({max(parts.values()) / planner.GIB:.1f} GiB) over --card_gb {card_gb:g}: use --offload "
                         "or --shard_weights, or caption/VAE servers on other cards")
    card_gb, host = card_gb - shared / planner.GIB, host_limit(this_host=True)  # rank 0's card: + local models
    if predicted.fits(card_gb):
        return check_host_holds(predicted, ranks, hardware.host_blocks_shared, host)
    others = [planner.plan(shape, other, grid, guidance=guidance, hardware=hardware, ranks_per_host=ranks)
              for other in planner.layouts(mesh.world_size, shape.heads, shape.num_layers, settings.cfg_scale > 1.0,
                                           weights=weights)]
    fitting = sorted((q for q in others if q.fits(card_gb)), key=lambda q: q.step_s)
    hint = (f"layouts of {mesh.world_size} cards predicted to fit: "
            + "; ".join(f"{q.layout.arguments()} ({q.peak_gib:.1f} GiB)" for q in fitting[:3])) if fitting else \
        f"no layout of {cards_word(mesh.world_size)} fits; " + "; ".join(advice(
            shape, mesh.world_size, card_gb, settings.num_frames, settings.height, settings.width, guidance,
            hardware, host=host, ranks_per_host=ranks)[1:])
    local = f" beside {shared / planner.GIB:.3g} GiB of local encoders/VAE" if shared else ""
    raise ValueError(f"--card_gb {card_gb + shared / planner.GIB:g}: {layout.name()} is predicted to need "
                     f"{predicted.peak_gib:.1f} GiB per card{local} for {settings.num_frames} frames "
                     f"{settings.height}x{settings.width} "
                     f"(python -m stepvideo_ms describe --plan shows the parts); {hint}")


def check_outputs(args) -> None:
    """The output folders can be created and written, before any weight is read (creates nothing)."""
    from ..formats.output_names import check_save_folder

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
