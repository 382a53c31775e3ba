"""What would fit when no layout does (`describe --plan`, `run_parallel.py`'s refusal): the closest
layout, or, when the cards hold one and the host memory does not, what that layout needs of the host; the
fewest cards of the same size that fit; the largest video on the cards asked. All from plan.plan."""
from __future__ import annotations

from typing import List, Optional

from .plan import GIB, Hardware, ModelShape, Plan, layouts, plan

MAX_CARDS = 128  # the search for "how many cards would fit" stops here (16 hosts of 8 cards)
DESCRIBE = "python -m stepvideo_ms describe --plan"
FRAME_STEP, PIXEL_STEP, LATENT_FRAMES_PER_STEP = 17, 16, 3  # the VAE's chunk and the latent's pixel


def video_grid(frames: int, height: int, width: int):
    """(latent frames, latent height, latent width) of a video, frames and sides already valid."""
    return (frames // FRAME_STEP * LATENT_FRAMES_PER_STEP, height // PIXEL_STEP, width // PIXEL_STEP)


def cards_word(n: int) -> str:
    return f"{n} card" if n == 1 else f"{n} cards"


def plans_for(model: ModelShape, cards: int, grid, guidance: bool = True, hardware: Hardware = Hardware(),
              weights: str = "full", ranks_per_host: Optional[int] = None) -> List[Plan]:
    """Every layout's plan, its host memory per host of `ranks_per_host` ranks (None: one host)."""
    return [plan(model, layout, grid, guidance=guidance, hardware=hardware, ranks_per_host=ranks_per_host)
            for layout in layouts(cards, model.heads, model.num_layers, guidance, weights=weights)]


def lowest(plans: List[Plan]) -> Optional[Plan]:
    """The plan with the smallest predicted peak per card (the closest to fitting)."""
    return min(plans, key=lambda q: (q.peak_bytes, q.step_s), default=None)


def fewest_cards(model: ModelShape, grid, card_gb: float, start: int, guidance: bool = True,
                 hardware: Hardware = Hardware(), limit: int = MAX_CARDS, weights: str = "full",
                 host_gb: Optional[float] = None, ranks_per_host: Optional[int] = None):
    """(cards, fitting plans) for the smallest card count from `start` up to `limit` where a layout fits
    the cards and (`host_gb`: the offloaded blocks' bound per host of `ranks_per_host` ranks) the host,
    or (None, [])."""
    for n in range(max(1, start), limit + 1):
        fitting = [q for q in plans_for(model, n, grid, guidance, hardware, weights, ranks_per_host)
                   if q.fits(card_gb, host_gb)]
        if fitting:
            return n, fitting
    return None, []


def largest_video(model: ModelShape, cards: int, card_gb: float, frames: int, height: int, width: int,
                  guidance: bool = True, hardware: Hardware = Hardware(), weights: str = "full",
                  host_gb: Optional[float] = None, ranks_per_host: Optional[int] = None):
    """The largest video these cards (and the host, `host_gb`) are predicted to hold: at the asked size the
    most frames (multiples of 17, up to `frames`); if not even 17 frames fit, the largest size of the same
    shape (sides in multiples of 16) with the most frames. -> (frames, height, width, the lowest plan) or None."""
    aspect = width / height
    for h in range(height, 0, -PIXEL_STEP):
        w = width if h == height else max(PIXEL_STEP, int(round(h * aspect / PIXEL_STEP)) * PIXEL_STEP)
        for f in range(frames, 0, -FRAME_STEP):
            fitting = [q for q in plans_for(model, cards, video_grid(f, h, w), guidance, hardware, weights,
                                            ranks_per_host) if q.fits(card_gb, host_gb)]
            if fitting:
                return f, h, w, lowest(fitting)
    return None


def advice(model: ModelShape, cards: int, card_gb: float, frames: int, height: int, width: int,
           guidance: bool = True, hardware: Hardware = Hardware(), weights: str = "full", host=None,
           ranks_per_host: Optional[int] = None, host_flag: str = "") -> List[str]:
    """Lines that say what would fit when no layout of `cards` cards fits `card_gb` GiB and the host
    (`host`: a host_memory.HostLimit, or None: not checked; per host of `ranks_per_host` ranks, None: one
    host): which of the two decides (the closest layout
    and by how much it misses the card, or the layout that fits the card and what it needs of the host),
    the fewest cards of this size that fit both, the largest video that fits both. The suggested commands
    keep --weights, --host_gb and `host_flag` (describe's --cards_per_host when given)."""
    from .host_memory import limit_gib

    grid = video_grid(frames, height, width)
    host_gb = limit_gib(host)
    flag = (" --weights int8" if weights == "int8" else "") + (  # the suggested commands ask the same question
        f" --host_gb {host.host_gib:g}" if host is not None and host.source == "--host_gb" else "") + host_flag
    lines = []
    plans = plans_for(model, cards, grid, guidance, hardware, weights, ranks_per_host)
    on_card = [q for q in plans if q.fits(card_gb)]
    if on_card and host is not None:  # the cards hold a layout: the host memory decides
        q = min(on_card, key=lambda q: (q.host_gib, q.step_s))
        lines.append(f"the host memory decides: {q.layout.name()} ({q.layout.arguments()}) fits the card "
                     f"({q.peak_gib:.1f} of {card_gb:g} GiB) but needs {q.host_gib:.1f} GiB of host memory per host "
                     f"for its offloaded blocks, over {host.describe()}; a host of {host.host_for(q.host_gib):.0f} GiB "
                     "would hold it")
    else:
        closest = lowest(plans)
        if closest is not None:
            lines.append(f"closest: {closest.layout.name()} ({closest.layout.arguments()}) needs "
                         f"{closest.peak_gib:.1f} GiB per card, {closest.peak_gib - card_gb:.1f} GiB over {card_gb:g}")
    with_host = " within the host memory" if host is not None else ""
    n, fitting = fewest_cards(model, grid, card_gb, cards + 1, guidance, hardware, weights=weights, host_gb=host_gb,
                              ranks_per_host=ranks_per_host)
    if n is None:
        lines.append(f"no number of cards up to {MAX_CARDS} fits {frames} frames {height}x{width} in {card_gb:g} "
                     f"GiB per card{with_host}")
    else:
        best = lowest(fitting)
        host_need = f", {best.host_gib:.1f} GiB of host memory per host" if best.layout.offload else ""
        lines.append(f"fewest cards of {card_gb:g} GiB{with_host} for {frames} frames {height}x{width}: {n} "
                     f"({len(fitting)} layout{'s' if len(fitting) > 1 else ''} fit; {best.layout.name()} peaks at "
                     f"{best.peak_gib:.1f} GiB{host_need}): {DESCRIBE} --cards {n} --card_gb {card_gb:g}{flag}")
    video = largest_video(model, cards, card_gb, frames, height, width, guidance, hardware, weights, host_gb,
                          ranks_per_host)
    on = f"{cards_word(cards)} of {card_gb:g} GiB" + (f" and {host.describe()} of host memory" if host else "")
    if video is None:
        small = plans_for(model, cards, video_grid(FRAME_STEP, PIXEL_STEP, PIXEL_STEP), guidance, hardware, weights,
                          ranks_per_host)
        hosted = [q for q in small if q.fits(None, host_gb)]
        if hosted:
            need = min(q.memory["weights"] + q.memory["runtime reserve"] for q in hosted) / GIB
            unhosted = [q.host_gib for q in small if q not in hosted]
            lines.append(f"no video fits {on}: the weights and the runtime reserve alone need {need:.1f} GiB per "
                         "card in the best layout" + (f" whose offloaded blocks the host holds (the others pin "
                                                      f"{min(unhosted):.1f} GiB of host memory per host)"
                                                      if unhosted else ""))
        else:
            lines.append(f"no video fits {on}: the offloaded blocks alone need "
                         f"{min(q.host_gib for q in small):.1f} GiB of host memory per host")
    else:
        f, h, w, best = video
        lines.append(f"largest video on {on}: {f} frames {h}x{w} ({best.layout.name()} peaks at "
                     f"{best.peak_gib:.1f} GiB): {DESCRIBE} --cards {cards} --card_gb {card_gb:g}{flag} "
                     f"--frames {f} --height {h} --width {w}")
    return lines
