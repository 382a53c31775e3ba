"""Sharded block weights (`--shard_weights`): every rank of a stage keeps 1/N of each of its blocks.

A block's parameters, flattened in a fixed order (its `parameters_and_names` order) and
concatenated, form one vector of `total` elements. The shard group of N ranks (mesh.shard_group:
the stage's SP ranks in every CFG replica) cuts it into N slices of ceil(total / N) elements (the
last one zero-padded); rank j of the group keeps slice j. Loading reads only that slice's bytes
from the memory-mapped safetensors files, tensor piece by tensor piece.

Just before a block runs, one all-gather over the shard group rebuilds the flat vector and its
pieces are set into a single working block (the gather buffer), which then runs as usual. When
the communicator is not lockstep (Ascend), the gather of the stage's next block is issued right
after the current one, so that the transfer runs while the current block computes; the flat
vector is dropped once its values are in the working block. A lockstep communicator (the CPU
world-collective one) gathers on demand, and an idle pipeline slot makes the same gather with zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn
from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from ..formats import checkpoint
from ..models.dit import StepVideoModel
from ..models.layers import StepVideoTransformerBlock
from ..formats.safetensors_io import SafetensorsFile
from .comm import Communicator
from .mesh import Mesh

BLOCK_PREFIX = "transformer_blocks."


@dataclass(frozen=True)
class BlockLayout:
    """The parameters of one transformer block in flattening order: relative names and shapes."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def of(cls, block: nn.Cell) -> "BlockLayout":
        pairs = [(n, tuple(int(s) for s in p.shape)) for n, p in block.parameters_and_names()]
        return cls(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def shard_size(self, parts: int) -> int:
        return -(-self.total // parts)

    def pieces(self, start: int, stop: int):
        """(name index, first, last) of every parameter overlapping flat elements start..stop, with
        first/last the element range inside that parameter."""
        offset = 0
        for i, size in enumerate(self.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                yield i, lo - offset, hi - offset
            offset += size


@dataclass
class BlockShards:
    """This rank's slice of each block of its stage: {layer: flat tensor of shard_size elements}."""

    layout: BlockLayout
    parts: int
    index: int
    flats: Dict[int, Tensor]

    @property
    def shard_size(self) -> int:
        return self.layout.shard_size(self.parts)

    def numel(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.flats.values())


def _block_layer(name: str) -> Optional[int]:
    if not name.startswith(BLOCK_PREFIX):
        return None
    return int(name[len(BLOCK_PREFIX):].split(".", 1)[0])


def load_sharded_stage(path: str, mesh: Mesh, dtype=ms.float32,
                       progress: bool = True) -> Tuple[StepVideoModel, BlockShards]:
    """The DiT of `path` with every non-block parameter loaded and the blocks left unallocated, and
    this rank's slice of each block of its stage, read slice by slice from the safetensors files."""
    config = checkpoint.read_config(path)
    probe = {k: v for k, v in config.items() if k in StepVideoModel.config_keys()}
    heads, layers = int(probe.get("num_attention_heads", 48)), int(probe.get("num_layers", 48))
    mesh.check_model(heads, layers)
    model = StepVideoModel.from_pretrained(path, config, dtype=dtype, select=lambda n: _block_layer(n) is None,
                                           progress=progress)
    layout = BlockLayout.of(model.transformer_blocks[0])
    group = mesh.shard_group
    parts, index = len(group), group.index(mesh.rank)
    size = layout.shard_size(parts)
    start, stop = index * size, min((index + 1) * size, layout.total)
    mine = list(mesh.stage_layers(model.num_layers))

    files = [SafetensorsFile(f) for f in checkpoint.checkpoint_files(path)]
    where = {key: f for f in files for key in f.keys() if _block_layer(key) in mine}
    wanted = {f"{BLOCK_PREFIX}{layer}.{name}": shape for layer in mine
              for name, shape in zip(layout.names, layout.shapes)}
    missing = sorted(set(wanted) - set(where))
    wrong = [f"{k}: checkpoint {where[k].shape(k)} vs model {wanted[k]}" for k in sorted(set(wanted) & set(where))
             if tuple(where[k].shape(k)) != wanted[k]]
    if missing or wrong:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not fit the stage's blocks: missing {missing[:10]} wrong shapes {wrong[:10]}; "
            "check that the config matches the weights")
    flats: Dict[int, Tensor] = {}
    for layer in progress_bar(mine, desc="loading block shards", unit="block", disable=not progress, leave=False):
        flat = np.zeros(size, np.float32)
        at = 0
        for i, lo, hi in layout.pieces(start, stop):
            key = f"{BLOCK_PREFIX}{layer}.{layout.names[i]}"
            flat[at:at + hi - lo] = where[key].get_range(key, lo, hi)
            at += hi - lo
        flats[layer] = Tensor(flat, dtype)
    for f in files:
        f.close()
    return model, BlockShards(layout, parts, index, flats)


class BlockGatherer:
    """`block(layer)`: the working block holding layer `layer`'s full weights, gathered from the shards."""

    def __init__(self, comm: Communicator, group: Sequence[int], shards: BlockShards, model: StepVideoModel,
                 stage_layers: Sequence[int]):
        if len(group) != shards.parts:
            raise ValueError(f"the shards are cut {shards.parts} ways but the shard group {tuple(group)} has {len(group)} ranks")
        self.comm, self.group, self.shards = comm, tuple(group), shards
        self.order = list(stage_layers)
        self.prefetch = not comm.lockstep
        self.dtype = model.dtype
        self.work = StepVideoTransformerBlock(model.inner_dim, model.attention_head_dim, model.dtype)
        self.work.set_train(False)
        self._params = [p for _, p in self.work.parameters_and_names()]
        if BlockLayout.of(self.work) != shards.layout:
            raise ValueError("the working block's parameters do not match the shards' layout")
        self._pending: Dict[int, Tensor] = {}

    def _gather(self, layer: int) -> Tensor:
        return self.comm.all_gather(self.shards.flats[layer], self.group, axis=0)

    def block(self, layer: int) -> StepVideoTransformerBlock:
        full = self._pending.pop(layer, None)
        if full is None:
            full = self._gather(layer)
        if self.prefetch:  # issue the next block's gather now; it runs while this block computes
            at = self.order.index(layer)
            if at + 1 < len(self.order) and self.order[at + 1] not in self._pending:
                self._pending[self.order[at + 1]] = self._gather(self.order[at + 1])
        offset = 0
        for param, size, shape in zip(self._params, self.shards.layout.sizes, self.shards.layout.shapes):
            param.set_data(full[offset:offset + size].reshape(shape))
            offset += size
        del full
        return self.work

    def idle(self) -> None:
        """The gather of one block with zeros (lockstep communicators, idle pipeline slot)."""
        self.comm.all_gather(mint.zeros((self.shards.shard_size,), dtype=self.dtype), self.group, axis=0)


def held_block_elements(model: StepVideoModel, shards: Optional[BlockShards]) -> int:
    """Block parameter elements this rank holds: loaded block parameters plus its shards."""
    loaded = sum(int(np.prod(p.shape)) for n, p in model.parameters_and_names()
                 if _block_layer(n) is not None and not p.has_init)
    return loaded + (shards.numel() if shards is not None else 0)
