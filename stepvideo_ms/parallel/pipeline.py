"""Pipeline parallelism over contiguous layer stages, with micro-batches so that stages overlap.

The denoiser's [cond, uncond] batch is cut into micro-batches (one sample each when pp > 1). In
tick t, stage s runs micro-batch t - s through its layers, then hands the activations to stage
s + 1 of its pipeline column; after S + M - 1 ticks the last stage holds every micro-batch.

With a lockstep communicator (the CPU world-collective emulation) every rank must make the same
collectives in the same order: each rank runs as many layer slots per tick as the largest stage
(idle slots make the attention's collectives with dummies) and joins every transfer round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Sequence, Tuple

from mindspore import Tensor

from .comm import Communicator
from .mesh import Mesh


def micro_batch_count(batch: int, pp_degree: int, sequential: bool = False) -> int:
    """One micro-batch per sample when there are stages to overlap or the samples must run one after
    the other (sequential CFG), else the whole batch at once."""
    return batch if pp_degree > 1 or sequential else 1


@dataclass(frozen=True)
class Schedule:
    stages: int
    micro_batches: int

    def __post_init__(self):
        if self.stages < 1 or self.micro_batches < 1:
            raise ValueError(f"a schedule needs at least one stage and one micro-batch, got {self}")

    @property
    def ticks(self) -> int:
        return self.stages + self.micro_batches - 1

    def micro_at(self, stage: int, tick: int) -> Optional[int]:
        """The micro-batch stage `stage` runs in tick `tick`, or None if it has none."""
        m = tick - stage
        return m if 0 <= m < self.micro_batches else None

    def transfers_after(self, tick: int) -> bool:
        """Whether any stage but the last worked in `tick` (so activations move on after it)."""
        return any(self.micro_at(s, tick) is not None for s in range(self.stages - 1))


def layer_count(items: Sequence) -> int:
    """The layer slots of a stage's work items (its layers; step cache markers are not layers)."""
    return sum(1 for item in items if isinstance(item, int))


class StageWork(Protocol):
    """What a stage computes; the schedule decides when."""

    transfer_shape: Tuple[int, ...]
    transfer_dtype: object

    def first_input(self, micro: int) -> Tensor:
        """Stage 0: the activations of micro-batch `micro` entering the first layer."""

    def run_layer(self, x: Tensor, micro: int, layer) -> Tensor:
        """Layer `layer` on micro-batch `micro` (or a step cache marker, step_plan.Marker)."""

    def idle_layer(self) -> None:
        """The collectives of one layer with dummies (called only by lockstep communicators)."""


def run_stage(mesh: Mesh, comm: Communicator, schedule: Schedule, partition: Sequence[Sequence],
              work: StageWork) -> Dict[int, Tensor]:
    """This rank's share of the schedule; returns {micro: output of the last layer} on the last
    stage's ranks and {} elsewhere. `partition`: each stage's layers, in order; with the step cache,
    its work items of the step (layers and step_plan markers, which take no layer slot)."""
    if len(partition) != mesh.pp_degree or schedule.stages != mesh.pp_degree:
        raise ValueError(f"{len(partition)} layer stages / {schedule.stages} scheduled stages for pp_degree={mesh.pp_degree}")
    stage, last = mesh.stage, mesh.pp_degree - 1
    mine = list(partition[stage])
    slots = max(layer_count(r) for r in partition)
    outputs: Dict[int, Tensor] = {}
    x: Optional[Tensor] = None
    for tick in range(schedule.ticks):
        micro = schedule.micro_at(stage, tick)
        busy = 0
        if micro is not None:
            if stage == 0:
                x = work.first_input(micro)
            for layer in mine:
                x = work.run_layer(x, micro, layer)
            busy = layer_count(mine)
            if stage == last:
                outputs[micro] = x
        if comm.lockstep:
            for _ in range(slots - busy):
                work.idle_layer()
        if schedule.transfers_after(tick):
            send = micro is not None and stage < last
            receive = stage > 0 and schedule.micro_at(stage, tick + 1) is not None
            got = comm.shift(x if send else None,
                             mesh.column[stage + 1] if send else None,
                             mesh.column[stage - 1] if receive else None,
                             work.transfer_shape, work.transfer_dtype)
            if receive:
                x = got
    return outputs
