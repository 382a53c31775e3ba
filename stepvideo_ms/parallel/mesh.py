"""Where each process sits in the Ulysses (sequence) x pipeline layout, decided once at start-up.

World rank r = stage * ulysses_degree + sp_rank: the ranks of one pipeline stage form one
sequence-parallel (SP) group and hold consecutive world ranks; the ranks sharing an SP index
across stages form a pipeline "column" through which activations travel stage to stage.

The layers are cut into `pp_degree` contiguous stages: balanced by default (earlier stages take
the extra layer when the count does not divide), or at explicit boundaries (`pp_split`, the first
layer of every stage after the first, e.g. "24" or "12,24,36" for 48 layers).

The mesh is a frozen value passed to whatever needs it; nothing here is global.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

SplitSpec = Union[None, int, str, Sequence[int]]


def _factor_pairs(world_size: int) -> str:
    pairs = [(u, world_size // u) for u in range(1, world_size + 1) if world_size % u == 0]
    return ", ".join(f"--ulysses_degree {u} --pp_degree {p}" for u, p in pairs)


def parse_pp_split(spec: SplitSpec) -> Tuple[int, ...]:
    """'24' / '12,24,36' / 24 / [12, 24, 36] / None -> a tuple of stage boundaries (empty = balanced)."""
    if spec is None:
        return ()
    if isinstance(spec, bool):
        raise ValueError(f"pp_split={spec!r} is not a layer index list: give e.g. '24' or '12,24,36'")
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return ()
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"pp_split={spec!r} is not a comma-separated list of layer indices: "
                             "give e.g. '24' or '12,24,36'") from None
    try:
        return tuple(int(v) for v in spec)
    except (TypeError, ValueError):
        raise ValueError(f"pp_split={spec!r} is not a list of layer indices: give e.g. '24' or '12,24,36'") from None


def balanced_boundaries(num_layers: int, pp_degree: int) -> Tuple[int, ...]:
    """First layer of stages 1..pp-1 for contiguous stages whose sizes differ by at most one."""
    base, extra = divmod(num_layers, pp_degree)
    bounds, start = [], 0
    for stage in range(pp_degree - 1):
        start += base + (1 if stage < extra else 0)
        bounds.append(start)
    return tuple(bounds)


def layer_partition(num_layers: int, pp_degree: int, pp_split: SplitSpec = None) -> Tuple[range, ...]:
    """The layers of every stage, as contiguous ranges covering 0..num_layers-1 in order."""
    if pp_degree < 1:
        raise ValueError(f"pp_degree={pp_degree} must be at least 1")
    if num_layers < pp_degree:
        raise ValueError(f"num_layers={num_layers} < pp_degree={pp_degree}: every pipeline stage needs at least "
                         f"one layer; use pp_degree <= {num_layers}")
    bounds = parse_pp_split(pp_split)
    if not bounds:
        bounds = balanced_boundaries(num_layers, pp_degree)
    else:
        example = ",".join(str(b) for b in balanced_boundaries(num_layers, pp_degree)) or "(none)"
        if len(bounds) != pp_degree - 1:
            raise ValueError(f"pp_split={','.join(map(str, bounds))} gives {len(bounds) + 1} stages but "
                             f"pp_degree={pp_degree}: give pp_degree-1 = {pp_degree - 1} boundaries, "
                             f"e.g. pp_split={example}")
        edges = (0,) + bounds + (num_layers,)
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"pp_split={','.join(map(str, bounds))} must be strictly increasing layer indices "
                             f"between 1 and {num_layers - 1} (num_layers={num_layers}): e.g. pp_split={example}")
    edges = (0,) + bounds + (num_layers,)
    return tuple(range(a, b) for a, b in zip(edges, edges[1:]))


@dataclass(frozen=True)
class Mesh:
    world_size: int
    rank: int
    ulysses_degree: int = 1
    pp_degree: int = 1
    pp_split: Tuple[int, ...] = ()

    @classmethod
    def create(cls, world_size: int, rank: int, ulysses_degree: int = 1, pp_degree: int = 1,
               ring_degree: int = 1, pp_split: SplitSpec = None) -> "Mesh":
        """Validate the layout arguments (as named on the command line) and build the mesh."""
        if ring_degree != 1:
            raise ValueError(f"ring_degree={ring_degree} is not supported: this port does Ulysses sequence "
                             f"parallelism only; use --ring_degree 1 and --ulysses_degree {world_size // max(pp_degree, 1) or 1}")
        return cls(int(world_size), int(rank), int(ulysses_degree), int(pp_degree), parse_pp_split(pp_split))

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside the world of {self.world_size} ranks")
        if self.ulysses_degree < 1:
            raise ValueError(f"ulysses_degree={self.ulysses_degree} must be at least 1; valid layouts for "
                             f"{self.world_size} ranks: {_factor_pairs(self.world_size)}")
        if self.pp_degree < 1:
            raise ValueError(f"pp_degree={self.pp_degree} must be at least 1; valid layouts for "
                             f"{self.world_size} ranks: {_factor_pairs(self.world_size)}")
        if self.ulysses_degree * self.pp_degree != self.world_size:
            raise ValueError(
                f"ulysses_degree={self.ulysses_degree} x pp_degree={self.pp_degree} = "
                f"{self.ulysses_degree * self.pp_degree} must equal the world size {self.world_size} (the number "
                f"of msrun workers); valid layouts for {self.world_size} ranks: {_factor_pairs(self.world_size)}")
        if self.pp_split and len(self.pp_split) != self.pp_degree - 1:
            raise ValueError(f"pp_split={','.join(map(str, self.pp_split))} gives {len(self.pp_split) + 1} stages "
                             f"but pp_degree={self.pp_degree}: give pp_degree-1 = {self.pp_degree - 1} boundaries")

    # ---- where this rank is --------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self.rank // self.ulysses_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses_degree

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_degree - 1

    def stage_ranks(self, stage: int) -> Tuple[int, ...]:
        """World ranks of the SP group of `stage`, in SP order."""
        return tuple(range(stage * self.ulysses_degree, (stage + 1) * self.ulysses_degree))

    @property
    def sp_group(self) -> Tuple[int, ...]:
        return self.stage_ranks(self.stage)

    @property
    def column(self) -> Tuple[int, ...]:
        """World ranks with this rank's SP index, stage 0 first."""
        return tuple(s * self.ulysses_degree + self.sp_rank for s in range(self.pp_degree))

    @property
    def world_ranks(self) -> Tuple[int, ...]:
        return tuple(range(self.world_size))

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: stage {self.stage}/{self.pp_degree}, "
                f"sp rank {self.sp_rank}/{self.ulysses_degree}")

    # ---- the model on the mesh -----------------------------------------------------------
    def check_model(self, num_attention_heads: int, num_layers: int) -> None:
        """Refuse a layout the model cannot take, before any weight is read."""
        if num_attention_heads % self.ulysses_degree:
            fits = [u for u in range(1, self.world_size + 1)
                    if self.world_size % u == 0 and num_attention_heads % u == 0]
            raise ValueError(
                f"ulysses_degree={self.ulysses_degree} does not divide num_attention_heads={num_attention_heads} "
                f"(each SP rank takes heads/ulysses_degree heads); with {self.world_size} ranks use "
                + " or ".join(f"--ulysses_degree {u} --pp_degree {self.world_size // u}" for u in fits))
        layer_partition(num_layers, self.pp_degree, self.pp_split)

    def partition(self, num_layers: int) -> Tuple[range, ...]:
        return layer_partition(num_layers, self.pp_degree, self.pp_split)

    def stage_layers(self, num_layers: int) -> range:
        return self.partition(num_layers)[self.stage]
