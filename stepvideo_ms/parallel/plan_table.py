"""The planner's table as `describe --plan` prints it: one line per layout with its predicted peak per
card, its parts, the host memory of its offloaded blocks per host, the traffic and the step time."""
from __future__ import annotations

from typing import List, Optional

from .plan import GIB, Hardware, Plan


def table(plans: List[Plan], card_gb: Optional[float], hardware: Hardware, host_gb: Optional[float] = None,
          steps: Optional[int] = None) -> str:
    """A text table, the fitting layouts first by step time. host GiB: the offloaded blocks of the host
    that holds the most (Plan.host_gib); offload x: step time over the same layout's without exposed
    copies; with `steps`, the time of that many steps (minutes)."""
    wide = max([47] + [len(pl.layout.name()) for pl in plans])  # "... + chunks + int8" is longer than 47
    run = f"{f'{steps} steps':>9} " if steps else ""
    head = (f"{'layout':<{wide}} {'peak GiB':>8} {'weights':>8} {'activ.':>7} {'host GiB':>8} {'sent GB/step':>12} "
            f"{'idle':>5} {'step s':>7} {run}{'offload x':>9}  fits")
    lines = [head, "-" * len(head)]
    for pl in sorted(plans, key=lambda q: (not q.fits(card_gb, host_gb), q.step_s)):
        mem = pl.memory
        act = mem["block activations"] + mem["embedded tokens"] + mem["pipeline in flight"]
        ratio = f"{pl.offload_ratio:9.3f}" if pl.layout.offload else f"{'-':>9}"
        total = f"{pl.step_s * steps / 60:7.1f} m " if steps else ""
        lines.append(f"{pl.layout.name():<{wide}} {pl.peak_gib:8.1f} {mem['weights'] / GIB:8.1f} {act / GIB:7.1f} "
                     f"{pl.host_gib:8.1f} {sum(pl.sent_bytes.values()) / 1e9:12.1f} {pl.idle_share:5.0%} "
                     f"{pl.step_s:7.1f} {total}{ratio}  {'yes' if pl.fits(card_gb, host_gb) else 'no'}")
    lines.append(hardware.describe())
    return "\n".join(lines)
