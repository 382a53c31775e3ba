"""One step of the step cache on the mesh (the rule: diffusion/step_cache.py).

A cached forward runs in two phases:
1. the probe: the first stage's ranks run the first F blocks on every micro-batch (the other stages
   make the same number of idle layer slots when the communicator is lockstep) and sum |probe -
   probe at the last computed step| and |probe at the last computed step| over their real tokens;
   one world all-gather of those two numbers per rank (zeros off the first stage) gives every rank
   the same world sums, hence the same decision: the Ulysses ranks' token slices and the CFG halves
   are reduced together, and the first stage's verdict reaches every later stage before it starts.
2. the blocks after the probe on the pipeline schedule. Each stage's layers of the middle span
   [F, L - B) are wrapped in START / END markers on a computed step (the stage keeps, per micro-batch,
   the residual of its own part of the span) or replaced by one REUSE marker on a cached step (the
   stage adds its kept residual). The stages' residuals add up to the span's: the same latents as one
   process within float rounding. A skipped block is never asked for, so it is neither copied in
   (offload) nor gathered (sharded weights): the block sources are told the step's exact order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from mindspore import Tensor


@dataclass(frozen=True)
class Marker:
    kind: str  # "start", "end" (a computed step's middle span) or "reuse" (a cached step's)

    def __repr__(self) -> str:
        return self.kind.upper()


START, END, REUSE = Marker("start"), Marker("end"), Marker("reuse")


def stage_items(layers: Sequence[int], middle: range, reuse: bool, skip: Sequence[int] = ()) -> List[object]:
    """A stage's work in one step: its layers but `skip` (the probe, already run), the middle ones
    wrapped in START/END, or replaced by REUSE when the step reuses the residual."""
    mine = [layer for layer in layers if layer not in set(skip)]
    mids = [layer for layer in mine if layer in middle]
    items: List[object] = []
    for layer in mine:
        if mids and layer == mids[0]:
            items.append(REUSE if reuse else START)
        if layer not in middle or not reuse:
            items.append(layer)
        if mids and layer == mids[-1] and not reuse:
            items.append(END)
    return items


def layer_sequence(items: Sequence[object], micro_batches: int, probe: Sequence[int] = ()) -> List[int]:
    """The blocks a stage asks for in one step, in order: the probe's per micro-batch, then its items'."""
    ints = [item for item in items if isinstance(item, int)]
    return list(probe) * micro_batches + ints * micro_batches


class Residuals:
    """This rank's middle-span residual per micro-batch, kept from the last computed step."""

    def __init__(self, store: Dict[object, object]):
        self.store = store  # lives in the loop's StepCache.state: kept over steps
        self._inputs: Dict[int, Tensor] = {}

    def apply(self, marker: Marker, x: Tensor, micro: int) -> Tensor:
        if marker is START:
            self._inputs[micro] = x
            return x
        if marker is END:
            self.store[("residual", micro)] = x - self._inputs.pop(micro)
            return x
        if marker is REUSE:
            return x + self.store[("residual", micro)]
        raise ValueError(f"unknown step cache marker {marker!r}")
