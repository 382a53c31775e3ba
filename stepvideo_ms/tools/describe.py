"""Describe the released-size DiT without allocating its weights, and plan its parallel layouts.

    python -m stepvideo_ms describe [--config transformer/config.json] [--ti2v] [--layers]
    python -m stepvideo_ms describe --plan --frames 204 --height 544 --width 992 --cards 4 [--card_gb 64]

Builds StepVideoModel under MindSpore's `no_init_parameters` (parameters hold shapes, no data)
and prints the parameter count, the per-block shapes and the memory the weights need. With
--plan: every layout of --cards ranks with its predicted peak memory per card, bytes sent per
card per step, pipeline idle share and step time (parallel/plan.py; the hardware figures are
stated assumptions), the layouts that fit --card_gb first. When none fits, it says what would (the
closest layout and its excess, the fewest cards of this size, the largest video on these cards) and
exits with status 1. The host memory of --offload is counted per host of --cards_per_host cards
(default: all of them, up to 8), pinned per rank as on a 910B; --host_gb is one host's memory.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import List, Optional

import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from ..console import SuggestingParser
from ..models.common import count_parameters
from ..models.dit import StepVideoModel


def build_empty(config: dict) -> StepVideoModel:
    with no_init_parameters():
        return StepVideoModel.from_config(config, dtype=ms.bfloat16)


def describe(model: StepVideoModel, per_layer: bool = False) -> str:
    shapes = OrderedDict((n, tuple(p.shape)) for n, p in model.parameters_and_names())
    total = count_parameters(model)
    block = [(n[len("transformer_blocks.0."):], s) for n, s in shapes.items() if n.startswith("transformer_blocks.0.")]
    per_block = sum(_numel(s) for _, s in block)
    lines = [
        f"StepVideoModel: {model.num_layers} layers x {model.num_attention_heads} heads x {model.attention_head_dim}"
        f" (width {model.inner_dim}), in {model.in_channels}, out {model.out_channels},"
        f" additional conditions {model.use_additional_conditions}",
        f"parameters: {total:,} ({total / 1e9:.2f} B); bf16 weights {total * 2 / 2**30:.1f} GiB",
        f"per block: {per_block:,} x {model.num_layers} = {per_block * model.num_layers:,};"
        f" outside the blocks: {total - per_block * model.num_layers:,}",
        "block parameters:",
    ]
    lines += [f"  transformer_blocks.N.{n:<28} {s}" for n, s in block]
    lines.append("other parameters:")
    lines += [f"  {n:<45} {s}" for n, s in shapes.items() if not n.startswith("transformer_blocks.")]
    if per_layer:
        lines.append("all parameters:")
        lines += [f"  {n:<55} {s}" for n, s in shapes.items()]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def resolved_request(frames: int, height: int, width: int, steps: Optional[int] = None):
    """The request with run_parallel's rounding rules and defaults: -> (latent grid, denoising steps)."""
    from ..diffusion.settings import GenerationSettings

    s = GenerationSettings("plan", "t2v", num_frames=frames, height=height, width=width,
                           infer_steps=steps).resolved()
    return tuple(s.latent_shape(1)[i] for i in (1, 3, 4)), s.infer_steps


def latent_grid(frames: int, height: int, width: int) -> tuple:
    """(latent frames, latent height, latent width) of a request, with run_parallel's rounding rules."""
    return resolved_request(frames, height, width)[0]


def plan_text(config: dict, frames: int, height: int, width: int, cards: int, card_gb: Optional[float],
              show_all: bool = False, hardware=None, host_gb: Optional[float] = None, weights: str = "full",
              steps: Optional[int] = None, cards_per_host: Optional[int] = None) -> str:
    return plan_report(config, frames, height, width, cards, card_gb, show_all, hardware, host_gb, weights, steps,
                       cards_per_host=cards_per_host)[0]


def plan_report(config: dict, frames: int, height: int, width: int, cards: int, card_gb: Optional[float],
                show_all: bool = False, hardware=None, host_gb: Optional[float] = None, weights: str = "full",
                steps: Optional[int] = None, cache_share: Optional[float] = None, cache_first: Optional[int] = None,
                cache_last: Optional[int] = None, cards_per_host: Optional[int] = None):
    """-> (the text, how many layouts fit). The fastest layout that fits the cards and the host (`host_gb`:
    the memory of one host of `cards_per_host` cards, default host_memory.CARDS_PER_HOST or all the cards
    when fewer, under the rule of parallel/host_memory.py) is named as the one run_parallel.py would
    choose, with the time of the `steps` asked (default: the T2V preset's); when none fits, the text says
    what would, and whether the cards or the host memory decide. `cache_share`: also each layout's step
    time with that share of steps cached (parallel/plan_cache.py)."""
    from ..parallel import plan as planner
    from ..parallel.host_memory import CARDS_PER_HOST, HOST_SHARE, host_limit, hosts_words, limit_gib, sharing_words
    from ..parallel.plan_advice import advice, cards_word
    from ..parallel.plan_table import table

    hardware = hardware or planner.Hardware()
    host = host_limit(host_gb)
    bound = limit_gib(host)
    shape = planner.ModelShape.from_config(config)
    grid, steps = resolved_request(frames, height, width, steps)
    if cards_per_host is not None and cards_per_host < 1:
        raise ValueError(f"--cards_per_host {cards_per_host} must be a positive number of cards (e.g. 8)")
    per_host = cards_per_host or CARDS_PER_HOST  # a world of fewer cards: all on one host
    plans = [planner.plan(shape, layout, grid, hardware=hardware, ranks_per_host=per_host)
             for layout in planner.layouts(cards, shape.heads, shape.num_layers, weights=weights)]
    fitting = [p for p in plans if p.fits(card_gb, bound)]
    shown = plans if show_all else fitting
    f, h, w = grid
    title = (f"{frames} frames {height}x{width} -> latents {f}x{h}x{w} = {f * h * w:,} tokens, {steps} steps; "
             f"{shape.total_params:,} parameters ("
             + ("int8 block linear weights + per-channel scales, the rest bf16" if weights == "int8" else "bf16")
             + f"); {cards_word(cards)}"
             + (f" of {card_gb:g} GiB" if card_gb else "") + f": {len(fitting)} of {len(plans)} layouts fit")
    lines = [title, ("host memory: offloaded blocks (all ranks of the host) may take " + host.describe()) if host
             else f"host memory: not checked (--host_gb GiB of one host: offloaded blocks may take "
                  f"{HOST_SHARE:.0%} of it)",
             f"host GiB: {hosts_words(cards, per_host)}"
             + (" (--cards_per_host)" if cards_per_host else f" (--cards_per_host, default up to {CARDS_PER_HOST})")
             + f", {hardware.name}: {sharing_words(hardware.host_blocks_shared)}"]
    if shown:
        lines.append(table(shown, card_gb, hardware, bound, steps))
    if cache_share is not None and shown:
        from ..parallel.plan_cache import cache_table

        ordered = sorted(shown, key=lambda q: (not q.fits(card_gb, bound), q.step_s))
        lines.append(cache_table(ordered, shape.num_layers, hardware, cache_share, cache_first, cache_last))
    best = planner.choose(plans, card_gb, bound)
    if best is not None:
        lines.append(f"chosen (fastest predicted to fit): {best.layout.arguments()}: peak {best.peak_gib:.1f} GiB per "
                     f"card, host {best.host_gib:.1f} GiB, step {best.step_s:.1f} s, {steps} steps "
                     f"{planner.duration(best.step_s * steps)}"
                     + (f", offload x{best.offload_ratio:.3f}" if best.layout.offload else ""))
        if cards == 1 and card_gb:
            lines.append(one_card_backends(best, card_gb))
    if fitting and not show_all and len(fitting) < len(plans):
        lines.append(f"--all also lists the {len(plans) - len(fitting)} that do not fit")
    if not fitting:
        used = latent_frames_to_video(grid)
        lines.append(f"none of the {len(plans)} layouts of {cards_word(cards)} fits"
                     + ("" if show_all else " (--all lists them with their peaks)") + ". What would:")
        lines += ["  " + line for line in advice(shape, cards, card_gb, *used, hardware=hardware, weights=weights,
                                                 host=host, ranks_per_host=per_host, host_flag=(
                                                     f" --cards_per_host {cards_per_host}" if cards_per_host else ""))]
    return "\n".join(lines), len(fitting)


def one_card_backends(best, card_gb: float) -> str:
    """Where the text encoders and the VAE run beside a one-card layout (run_parallel.py's rules)."""
    from ..parallel.plan import GIB

    resident = (best.memory["weights"] + best.memory["runtime reserve"]) / GIB
    return (f"on 1 card the text encoders and the VAE run either on servers on other cards (bash "
            f"scripts/start_servers.sh, then --caption_url URL --vae_url URL), or in this process on this card "
            f"(--caption_url local --vae_url local): beside the DiT's peak {card_gb - best.peak_gib:.1f} GiB is left; "
            f"when they do not fit there, run_parallel.py loads them in turn (--local_in_turn), each beside the DiT's "
            f"resident {resident:.1f} GiB (weights and reserve), {card_gb - resident:.1f} GiB left")


def latent_frames_to_video(grid) -> tuple:
    """(frames, height, width) of a latent grid: the request after run_parallel's rounding."""
    from ..parallel import plan_advice as advice

    f, h, w = grid
    return (f // advice.LATENT_FRAMES_PER_STEP * advice.FRAME_STEP, h * advice.PIXEL_STEP, w * advice.PIXEL_STEP)


def main(argv: Optional[List[str]] = None) -> int:
    from ..parallel.host_memory import CARDS_PER_HOST, HOST_SHARE

    parser = SuggestingParser(prog="python -m stepvideo_ms describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a transformer config.json (default: the released Step-Video-T2V config)")
    parser.add_argument("--ti2v", action="store_true", help="with use_additional_conditions (Step-Video-TI2V)")
    parser.add_argument("--layers", action="store_true", help="list every parameter of every layer")
    g = parser.add_argument_group("planning (--plan)")
    g.add_argument("--plan", action="store_true", help="list the parallel layouts of --cards with memory, traffic, time")
    g.add_argument("--frames", type=int, default=204, help="video frames (204)")
    g.add_argument("--height", type=int, default=544, help="pixels (544)")
    g.add_argument("--width", type=int, default=992, help="pixels (992)")
    g.add_argument("--cards", type=int, default=None, help="number of cards (world size)")
    g.add_argument("--card_gb", type=float, default=None, help="memory per card in GiB: list only layouts that fit")
    g.add_argument("--all", action="store_true", help="also list the layouts that do not fit --card_gb")
    g.add_argument("--weights", choices=("full", "int8"), default="full",
                   help="int8: the blocks' linear weights in int8 with per-channel scales (run_parallel.py --weights)")
    g.add_argument("--infer_steps", type=int, default=None, help="denoising steps, for the run's time (50)")
    g.add_argument("--cards_per_host", type=int, default=None,
                   help=f"cards (ranks) per host, numbered host by host as msrun does: the host GiB column and "
                        f"--host_gb count per host (default: all --cards on one host up to {CARDS_PER_HOST})")
    g.add_argument("--host_gb", type=float, default=None,
                   help=f"the memory of ONE host in GiB: the offloaded blocks of all its ranks may take "
                        f"{HOST_SHARE * 100:.0f}%% of it, as run_parallel.py allows of its host (default: not "
                        "checked, the host GiB column shows the need)")
    g.add_argument("--cache_share", type=float, default=None,
                   help="the share of steps you expect the step cache to cache (0-1, e.g. 0.4): also print each "
                        "layout's predicted step time with it (docs/step-cache.md)")
    g.add_argument("--cache_first", type=int, default=None, help="with --cache_share: blocks always run at the front (8)")
    g.add_argument("--cache_last", type=int, default=None, help="with --cache_share: blocks always run at the end (0)")
    args = parser.parse_args(argv)
    config = {}
    if args.config:
        with open(args.config, "r", encoding="utf-8") as fh:
            config = json.load(fh)
    if args.ti2v:
        config["use_additional_conditions"] = True
    if args.plan:
        if args.cards is None or args.cards < 1:
            parser.error("--plan needs --cards N (a positive number of cards)")
        if args.card_gb is not None and args.card_gb <= 0:
            parser.error(f"--card_gb {args.card_gb:g} must be positive (GiB per card, e.g. 64)")
        try:
            text, fitting = plan_report(config, args.frames, args.height, args.width, args.cards, args.card_gb,
                                        args.all, host_gb=args.host_gb, weights=args.weights,
                                        steps=args.infer_steps, cache_share=args.cache_share,
                                        cache_first=args.cache_first, cache_last=args.cache_last,
                                        cards_per_host=args.cards_per_host)
        except ValueError as exc:
            parser.error(str(exc))
        print(text)
        return 0 if fitting else 1
    print(describe(build_empty(config), args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
