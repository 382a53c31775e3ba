"""The planner's step time with the step cache (`describe --plan --cache_share S`): predictions.

On a cached step each stage runs only its blocks outside the middle span (the first `first` and the
last `last` of the model) and adds a kept residual for the rest. Predicted, with the planner's own
figures of an uncached step (parallel/plan.py): the per-block parts of a step (compute, all-to-alls,
weight gathers, exposed host copies) scale with the blocks the busiest stage still runs over the
blocks it runs uncached; the output gather is paid in full; the pipeline's idle share is kept. The
mean step at a cached share S (the user's figure: the share of steps cached, which depends on the
threshold and the video and was not measured here) is (1 - S) x uncached + S x cached.
"""
from __future__ import annotations

from typing import List, Optional

from ..diffusion.step_cache import CACHE_DEFAULTS
from .mesh import layer_partition
from .plan import Hardware, Plan


def cached_fraction(num_layers: int, pp: int, first: int, last: int) -> float:
    """Blocks run on a cached step by the busiest stage over those of the largest stage uncached."""
    stages = layer_partition(num_layers, pp, None)
    middle = range(first, num_layers - last)
    run = max(sum(1 for layer in s if layer not in middle) for s in stages)
    return run / max(len(s) for s in stages)


def cached_step_s(p: Plan, num_layers: int, hardware: Hardware, first: int, last: int) -> float:
    share = cached_fraction(num_layers, p.layout.pp, first, last)
    out_s = p.sent_bytes["output gather"] / (hardware.link_gb_s * 1e9)
    return p.compute_s * share / (1.0 - p.idle_share) + (p.comm_s - out_s) * share + out_s + p.offload_s * share


def mean_step_s(p: Plan, num_layers: int, hardware: Hardware, share: float, first: int, last: int) -> float:
    return (1.0 - share) * p.step_s + share * cached_step_s(p, num_layers, hardware, first, last)


def cache_table(plans: List[Plan], num_layers: int, hardware: Hardware, share: float,
                first: Optional[int] = None, last: Optional[int] = None) -> str:
    """The fitting layouts' step times with a cached share `share`, as the table lists them."""
    first = CACHE_DEFAULTS["cache_first"] if first is None else first
    last = CACHE_DEFAULTS["cache_last"] if last is None else last
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--cache_share {share:g} must be a share of steps from 0 to 1 (e.g. 0.4)")
    if first + last >= num_layers:
        raise ValueError(f"--cache_first {first} + --cache_last {last} leave no middle block of {num_layers}")
    lines = [f"with the step cache, {share:.0%} of steps cached (your figure), first {first} and last {last} blocks "
             "always run (predictions):",
             f"{'layout':<47} {'step s':>7} {'cached step s':>13} {'mean step s':>11}"]
    for p in plans:
        if first > len(layer_partition(num_layers, p.layout.pp, None)[0]):
            lines.append(f"{p.layout.name():<47} {p.step_s:7.1f} {'-':>13} {'-':>11}  (first stage < --cache_first)")
            continue
        lines.append(f"{p.layout.name():<47} {p.step_s:7.1f} {cached_step_s(p, num_layers, hardware, first, last):13.1f} "
                     f"{mean_step_s(p, num_layers, hardware, share, first, last):11.1f}")
    return "\n".join(lines)
