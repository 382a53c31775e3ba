"""Where each process sits in the CFG x pipeline x Ulysses (sequence) layout, decided once at start-up.

World rank r = cfg_rank * (pp_degree * ulysses_degree) + stage * ulysses_degree + sp_rank.
With cfg_degree 2 the world holds two identical "replicas" of the pp x ulysses layout, replica 0
running the conditional half of the [cond, uncond] batch and replica 1 the unconditional half;
with cfg_degree 1 there is one replica running the whole batch. Inside a replica, the ranks of one
pipeline stage form one sequence-parallel (SP) group and hold consecutive world ranks; the ranks
sharing an SP index across stages form a pipeline "column" through which activations travel.

With `shard_weights`, the ranks that run the same layers at the same time (one stage's SP
ranks in every replica: the "shard group", cfg_degree x ulysses_degree ranks) each keep 1/N of
every block's parameters and all-gather a block just before it runs. With `offload`, every rank
keeps its stage's blocks in host memory and copies each in just before it runs (offload.py). With
`sequential_cfg`, the [cond, uncond] batch runs as two micro-batches of one sample even without a
pipeline (the activations of one sample at a time; with pp > 1 or cfg 2 that is so already). With
`chunk_tokens`, the blocks' token-wise parts run on that many tokens at a time (layers.tokenwise).

The layers are cut into `pp_degree` contiguous stages: balanced by default (earlier stages take
the extra layer when the count does not divide), or at explicit boundaries (`pp_split`, the first
layer of every stage after the first, e.g. "24" or "12,24,36" for 48 layers).

The mesh is a frozen value passed to whatever needs it; nothing here is global.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

SplitSpec = Union[None, int, str, Sequence[int]]


CFG_DEGREES = (1, 2)


def _factor_pairs(world_size: int) -> str:
    """Every (cfg, ulysses, pp) whose product is the world size, as command-line arguments."""
    options = []
    for c in CFG_DEGREES:
        if world_size % c:
            continue
        rest = world_size // c
        for u in range(1, rest + 1):
            if rest % u == 0:
                options.append((f"--cfg_degree {c} " if c > 1 else "") + f"--ulysses_degree {u} --pp_degree {rest // u}")
    return ", ".join(options)


def divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


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
    cfg_degree: int = 1
    shard_weights: bool = False
    offload: bool = False
    sequential_cfg: bool = False  # the [cond, uncond] halves one after the other (micro-batches of one sample)
    chunk_tokens: int = 0  # the blocks' token-wise parts on this many tokens at a time (0: all at once)

    @classmethod
    def create(cls, world_size: int, rank: int, ulysses_degree: int = 1, pp_degree: int = 1,
               ring_degree: int = 1, pp_split: SplitSpec = None, cfg_degree: int = 1,
               shard_weights: bool = False, offload: bool = False, sequential_cfg: bool = False,
               chunk_tokens: int = 0) -> "Mesh":
        """Validate the layout arguments (as named on the command line) and build the mesh."""
        if ring_degree != 1:
            raise ValueError(f"ring_degree={ring_degree} is not supported: this port does Ulysses sequence "
                             f"parallelism only; use --ring_degree 1 and --ulysses_degree "
                             f"{world_size // max(pp_degree * cfg_degree, 1) or 1}")
        return cls(int(world_size), int(rank), int(ulysses_degree), int(pp_degree), parse_pp_split(pp_split),
                   int(cfg_degree), bool(shard_weights), bool(offload), bool(sequential_cfg), int(chunk_tokens or 0))

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
        if self.cfg_degree not in CFG_DEGREES:
            raise ValueError(f"cfg_degree={self.cfg_degree} must be 1 or 2 (the [cond, uncond] batch has two halves); "
                             f"valid layouts for {self.world_size} ranks: {_factor_pairs(self.world_size)}")
        product = self.cfg_degree * self.ulysses_degree * self.pp_degree
        if product != self.world_size:
            named = (f"cfg_degree={self.cfg_degree} x " if self.cfg_degree > 1 else "")
            raise ValueError(
                f"{named}ulysses_degree={self.ulysses_degree} x pp_degree={self.pp_degree} = {product} must equal "
                f"the world size {self.world_size} (the number of msrun workers); valid layouts for "
                f"{self.world_size} ranks: {_factor_pairs(self.world_size)}")
        if self.shard_weights and self.cfg_degree * self.ulysses_degree == 1:
            raise ValueError(
                "shard_weights splits a stage's blocks over the ranks that run it (cfg_degree x ulysses_degree), "
                f"but cfg_degree={self.cfg_degree} x ulysses_degree={self.ulysses_degree} = 1 leaves nothing to split: "
                "drop --shard_weights, or raise --ulysses_degree / --cfg_degree (e.g. --ulysses_degree "
                f"{self.world_size} --pp_degree 1 --shard_weights)")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be a positive number of tokens (or 0: no chunks), "
                             "e.g. --chunk_tokens 8192")
        if self.shard_weights and self.offload:
            raise ValueError(
                "offload and shard_weights are two ways to keep the blocks off the card: offload streams each block "
                "from host memory, shard_weights all-gathers it from the other ranks; use one of --offload and "
                "--shard_weights (python -m stepvideo_ms describe --plan compares them)")
        if self.pp_split and len(self.pp_split) != self.pp_degree - 1:
            raise ValueError(f"pp_split={','.join(map(str, self.pp_split))} gives {len(self.pp_split) + 1} stages "
                             f"but pp_degree={self.pp_degree}: give pp_degree-1 = {self.pp_degree - 1} boundaries")

    # ---- where this rank is --------------------------------------------------------------
    @property
    def replica_size(self) -> int:
        """Ranks of one CFG replica (pp x ulysses)."""
        return self.ulysses_degree * self.pp_degree

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional half of the batch (or all of it with cfg_degree 1); 1: the unconditional."""
        return self.rank // self.replica_size

    @property
    def _offset(self) -> int:
        return self.cfg_rank * self.replica_size

    @property
    def stage(self) -> int:
        return (self.rank % self.replica_size) // self.ulysses_degree

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
        """World ranks of the SP group of `stage` in this rank's replica, in SP order."""
        first = self._offset + stage * self.ulysses_degree
        return tuple(range(first, first + self.ulysses_degree))

    @property
    def sp_group(self) -> Tuple[int, ...]:
        return self.stage_ranks(self.stage)

    @property
    def column(self) -> Tuple[int, ...]:
        """World ranks with this rank's SP index, stage 0 first."""
        return tuple(self._offset + s * self.ulysses_degree + self.sp_rank for s in range(self.pp_degree))

    @property
    def replica_ranks(self) -> Tuple[int, ...]:
        """World ranks of this rank's CFG replica, in rank order."""
        return tuple(range(self._offset, self._offset + self.replica_size))

    @property
    def cfg_group(self) -> Tuple[int, ...]:
        """The ranks holding this rank's place (stage, SP index) in every replica, replica 0 first."""
        local = self.rank % self.replica_size
        return tuple(c * self.replica_size + local for c in range(self.cfg_degree))

    @property
    def shard_group(self) -> Tuple[int, ...]:
        """Ranks that split this stage's block weights between them with shard_weights (this stage's SP
        ranks in every replica, in rank order); (this rank,) without sharding."""
        if not self.shard_weights:
            return (self.rank,)
        first = self.stage * self.ulysses_degree
        return tuple(c * self.replica_size + first + s for c in range(self.cfg_degree)
                     for s in range(self.ulysses_degree))

    @property
    def shard_index(self) -> int:
        return self.shard_group.index(self.rank)

    @property
    def world_ranks(self) -> Tuple[int, ...]:
        return tuple(range(self.world_size))

    def describe(self) -> str:
        cfg = f"cfg rank {self.cfg_rank}/{self.cfg_degree}, " if self.cfg_degree > 1 else ""
        shard = f", weights 1/{len(self.shard_group)}" if self.shard_weights else ""
        shard += ", blocks offloaded to host memory" if self.offload else ""
        return (f"rank {self.rank}/{self.world_size}: {cfg}stage {self.stage}/{self.pp_degree}, "
                f"sp rank {self.sp_rank}/{self.ulysses_degree}{shard}")

    # ---- the model on the mesh -----------------------------------------------------------
    def check_model(self, num_attention_heads: int, num_layers: int) -> None:
        """Refuse a layout the model cannot take, before any weight is read."""
        if num_attention_heads % self.ulysses_degree:
            rest = self.world_size // self.cfg_degree
            fits = [u for u in range(1, rest + 1)
                    if rest % u == 0 and num_attention_heads % u == 0 and rest // u <= num_layers]
            cfg = f"--cfg_degree {self.cfg_degree} " if self.cfg_degree > 1 else ""
            advice = (f"with {self.world_size} ranks use "
                      + " or ".join(f"{cfg}--ulysses_degree {u} --pp_degree {rest // u}" for u in fits)) if fits else (
                f"no layout of {self.world_size} ranks fits this model: --ulysses_degree must divide "
                f"{num_attention_heads} ({', '.join(str(u) for u in divisors(num_attention_heads)[:8])}) and "
                f"--pp_degree be at most {num_layers}, e.g. --ulysses_degree {max(divisors(num_attention_heads)[:8])}"
                " --pp_degree 1")
            raise ValueError(
                f"ulysses_degree={self.ulysses_degree} does not divide num_attention_heads={num_attention_heads} "
                f"(the sequence-parallel ranks share the heads equally); {advice}")
        layer_partition(num_layers, self.pp_degree, self.pp_split)

    def partition(self, num_layers: int) -> Tuple[range, ...]:
        return layer_partition(num_layers, self.pp_degree, self.pp_split)

    def stage_layers(self, num_layers: int) -> range:
        return self.partition(num_layers)[self.stage]
