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

With int8 weights (--weights int8) a block has three groups, each flattened, sliced and gathered on
its own: the int8 linear weights (1 byte an element) cut at whole rows (balanced by elements), their
scales cut at the same rows (so a rank slicing released float weights reads its rows once and
derives their scales from them; a converted int8 folder has them stored), and the rest (norms,
modulation table) in the working dtype, cut evenly.
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
from ..ops.quant import SCALE_SUFFIX, quantize_rows, row_scales
from .comm import Communicator
from .mesh import Mesh

BLOCK_PREFIX = "transformer_blocks."


@dataclass(frozen=True)
class BlockLayout:
    """The parameters of one transformer block in flattening order: relative names and shapes."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    bounds: Optional[Tuple[int, ...]] = None  # set by `cut`: rank j holds flat elements bounds[j]..bounds[j+1]

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
        if self.bounds is not None:
            return max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))
        return -(-self.total // parts)

    def span(self, index: int, parts: int) -> Tuple[int, int]:
        """The flat elements rank `index` of `parts` holds (equal slices, the last one short, unless cut)."""
        if self.bounds is not None:
            return self.bounds[index], self.bounds[index + 1]
        size = self.shard_size(parts)
        return min(index * size, self.total), min((index + 1) * size, self.total)

    def same_parameters(self, other: "BlockLayout") -> bool:
        return (self.names, self.shapes) == (other.names, other.shapes)

    def pieces(self, start: int, stop: int):
        """(name index, first, last) of every parameter overlapping flat elements start..stop, with
        first/last the element range inside that parameter."""
        offset = 0
        for i, size in enumerate(self.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                yield i, lo - offset, hi - offset
            offset += size


def block_layouts(block: nn.Cell) -> Tuple[BlockLayout, ...]:
    """A block's parameters in groups, each flattened on its own: with --weights int8 the int8 weights,
    their scales (in the same order), then every other parameter (norms, modulation table)."""
    pairs = list(block.parameters_and_names())
    int8 = [n for n, p in pairs if p.dtype == ms.int8]
    scales = [n + SCALE_SUFFIX for n in int8]
    groups = [int8, scales, [n for n, _ in pairs if n not in set(int8) | set(scales)]]
    shapes = {n: tuple(int(s) for s in p.shape) for n, p in pairs}
    return tuple(BlockLayout(tuple(g), tuple(shapes[n] for n in g)) for g in groups if g)


def cut_rows(layouts: Tuple[BlockLayout, ...], parts: int) -> Tuple[BlockLayout, ...]:
    """With int8 weights, slice them by whole rows (balanced by elements) and give each rank the scales of
    exactly its rows: a rank quantizing released weights reads its rows once and derives their scales."""
    if len(layouts) < 3:
        return layouts
    weights, scales, rest = layouts
    row_len = np.concatenate([np.full(shape[0], shape[1], np.int64) for shape in weights.shapes])
    ends = np.concatenate([[0], np.cumsum(row_len)])  # flat element offset of each row's start
    rows = [0] + [int(np.searchsorted(ends, j * weights.total / parts)) for j in range(1, parts)] + [len(row_len)]
    return (BlockLayout(weights.names, weights.shapes, tuple(int(ends[r]) for r in rows)),
            BlockLayout(scales.names, scales.shapes, tuple(rows)), rest)


def _group_dtype(layout: BlockLayout, block: nn.Cell, dtype):
    first = dict(block.parameters_and_names())[layout.names[0]]
    return ms.int8 if first.dtype == ms.int8 else dtype


@dataclass
class BlockShards:
    """This rank's slice of each block of its stage: {layer: one flat tensor per dtype group}, group g
    holding layouts[g].shard_size(parts) elements."""

    layouts: Tuple[BlockLayout, ...]
    parts: int
    index: int
    flats: Dict[int, Tuple[Tensor, ...]]

    def shard_sizes(self) -> Tuple[int, ...]:
        return tuple(g.shard_size(self.parts) for g in self.layouts)

    def numel(self) -> int:
        return sum(int(np.prod(t.shape)) for ts in self.flats.values() for t in ts)

    def nbytes(self) -> int:
        return sum(int(t.nbytes) for ts in self.flats.values() for t in ts)


def _block_layer(name: str) -> Optional[int]:
    if not name.startswith(BLOCK_PREFIX):
        return None
    return int(name[len(BLOCK_PREFIX):].split(".", 1)[0])


class _PieceReader:
    """Elements lo..hi of a block parameter, read from the checkpoint: an int8 parameter from released
    float weights is quantized from the whole rows holding those elements; its scales (derived, absent
    from such a checkpoint) from the rows they scale."""

    def __init__(self, where: Dict[str, SafetensorsFile]):
        self.where = where
        self._scales: Dict[Tuple[str, int, int], np.ndarray] = {}  # (weight, first row, last row) -> scales

    def read(self, key: str, int8: bool, lo: int, hi: int) -> np.ndarray:
        if key not in self.where and key.endswith(SCALE_SUFFIX):  # scales of a float checkpoint's weight
            weight = key[:-len(SCALE_SUFFIX)]
            kept = self._scales.pop((weight, lo, hi), None)
            if kept is not None:  # derived while quantizing these very rows
                return kept
            f, cols = self.where[weight], self.where[weight].shape(weight)[1]
            return row_scales(f.get_range(weight, lo * cols, hi * cols).reshape(-1, cols))
        f = self.where[key]
        if not int8 or f.dtype(key) == "I8":
            return f.get_range(key, lo, hi)
        cols = f.shape(key)[1]
        first, last = lo // cols, -(-hi // cols)
        q, scales = quantize_rows(f.get_range(key, first * cols, last * cols).reshape(-1, cols))
        if lo % cols == 0 and hi % cols == 0:
            self._scales[(key, first, last)] = scales
        return q.reshape(-1)[lo - first * cols:hi - first * cols]


def derived_scales(wanted, where: Dict[str, SafetensorsFile]) -> set:
    """The scale keys of `wanted` that reading makes rather than finds: those of released (non-int8)
    weights, quantized while they are read (_PieceReader)."""
    return {k for k in wanted if k.endswith(SCALE_SUFFIX) and k not in where and k[:-len(SCALE_SUFFIX)] in where
            and where[k[:-len(SCALE_SUFFIX)]].dtype(k[:-len(SCALE_SUFFIX)]) != "I8"}


def stage_sources(path: str, layers, wanted: Dict[str, tuple], derived=None) -> Dict[str, SafetensorsFile]:
    """{key: the safetensors file holding it} for the blocks of `layers`, after checking that every key of
    `wanted` ({key: shape}) is there with its shape (`derived(where)`: keys made while reading, not
    stored). CheckpointError naming the missing and the misshapen keys otherwise."""
    files = [SafetensorsFile(f) for f in checkpoint.checkpoint_files(path)]
    where = {key: f for f in files for key in f.keys() if _block_layer(key) in layers}
    for f in set(files) - set(where.values()):  # shards of other stages only
        f.close()
    missing = sorted(set(wanted) - set(where) - (derived(where) if derived else set()))
    wrong = [f"{k}: checkpoint {where[k].shape(k)} vs model {wanted[k]}" for k in sorted(set(wanted) & set(where))
             if tuple(where[k].shape(k)) != wanted[k]]
    if missing or wrong:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not fit the stage's blocks: missing {missing[:10]} wrong shapes {wrong[:10]}; "
            "check that the config matches the weights")
    return where


def load_sharded_stage(path: str, mesh: Mesh, dtype=ms.float32, progress: bool = True,
                       weights: Optional[str] = None) -> Tuple[StepVideoModel, BlockShards]:
    """The DiT of `path` with every non-block parameter loaded and the blocks left unallocated, and
    this rank's slice of each block of its stage, read slice by slice from the safetensors files.
    weights "int8": the blocks' linear weights are sliced as int8 (quantized while reading released
    weights), gathered apart from the float parameters (half the bytes of bf16)."""
    config = checkpoint.read_config(path)
    probe = {k: v for k, v in config.items() if k in StepVideoModel.config_keys()}
    heads, layers = int(probe.get("num_attention_heads", 48)), int(probe.get("num_layers", 48))
    mesh.check_model(heads, layers)
    model = StepVideoModel.from_pretrained(path, config, dtype=dtype, select=lambda n: _block_layer(n) is None,
                                           progress=progress, weights=weights)
    block0 = model.transformer_blocks[0]
    group = mesh.shard_group
    parts, index = len(group), group.index(mesh.rank)
    layouts = cut_rows(block_layouts(block0), parts)
    dtypes = [_group_dtype(g, block0, dtype) for g in layouts]
    mine = list(mesh.stage_layers(model.num_layers))

    wanted = {f"{BLOCK_PREFIX}{layer}.{name}": shape for layer in mine for g in layouts
              for name, shape in zip(g.names, g.shapes)}

    where = stage_sources(path, mine, wanted, lambda found: derived_scales(wanted, found))
    reader = _PieceReader(where)
    flats: Dict[int, Tuple[Tensor, ...]] = {}
    for layer in progress_bar(mine, desc="loading block shards", unit="block", disable=not progress, leave=False):
        mine_flats = []
        for g, gdtype in zip(layouts, dtypes):
            size = g.shard_size(parts)
            start, stop = g.span(index, parts)
            flat = np.zeros(size, np.int8 if gdtype == ms.int8 else np.float32)
            at = 0
            for i, lo, hi in g.pieces(start, stop):
                flat[at:at + hi - lo] = reader.read(f"{BLOCK_PREFIX}{layer}.{g.names[i]}", gdtype == ms.int8, lo, hi)
                at += hi - lo
            mine_flats.append(Tensor(flat, gdtype))
        flats[layer] = tuple(mine_flats)
    for f in set(where.values()):
        f.close()
    return model, BlockShards(layouts, parts, index, flats)


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
        self.work = StepVideoTransformerBlock(model.inner_dim, model.attention_head_dim, model.dtype,
                                              getattr(model, "weights", "full"))
        self.work.set_train(False)
        mine = block_layouts(self.work)
        if len(mine) != len(shards.layouts) or not all(a.same_parameters(b) for a, b in zip(mine, shards.layouts)):
            raise ValueError("the working block's parameters do not match the shards' layout")
        named = dict(self.work.parameters_and_names())
        self._params = [[named[n] for n in g.names] for g in shards.layouts]
        self._dtypes = [_group_dtype(g, self.work, model.dtype) for g in shards.layouts]
        self._pending: Dict[int, Tuple[Tensor, ...]] = {}
        self._sequence: Optional[list] = None  # step cache: the exact blocks asked for next, in order
        self._at = 0
        self.gathers = 0  # blocks gathered (for tests and the bench; an idle slot's zeros are not counted)

    def plan(self, sequence: Sequence[int]) -> None:
        """The step cache's order of the blocks asked for next (a skipped block is not in it): the
        gather issued ahead is the next one of it, none past its end."""
        self._sequence, self._at = list(sequence), 0

    def _next(self, layer: int) -> Optional[int]:
        if self._sequence is None:  # no plan: the stage's blocks in order
            at = self.order.index(layer)
            return self.order[at + 1] if at + 1 < len(self.order) else None
        self._at += 1
        return self._sequence[self._at] if self._at < len(self._sequence) else None

    def _gather(self, layer: int) -> Tuple[Tensor, ...]:
        self.gathers += 1
        return tuple(self.comm.all_gather(flat, self.group, axis=0) for flat in self.shards.flats[layer])

    def block(self, layer: int) -> StepVideoTransformerBlock:
        fulls = self._pending.pop(layer, None)
        if fulls is None:
            fulls = self._gather(layer)
        nxt = self._next(layer)
        if self.prefetch and nxt is not None and nxt not in self._pending:
            # issue the next block's gather now; it runs while this block computes
            self._pending[nxt] = self._gather(nxt)
        for full, params, g in zip(fulls, self._params, self.shards.layouts):
            if g.bounds is not None:  # uneven slices, each padded to the largest: keep each rank's own part
                size, parts = g.shard_size(self.shards.parts), self.shards.parts
                full = mint.cat([full[j * size:j * size + g.bounds[j + 1] - g.bounds[j]] for j in range(parts)])
            offset = 0
            for param, size, shape in zip(params, g.sizes, g.shapes):
                param.set_data(full[offset:offset + size].reshape(shape))
                offset += size
        del fulls
        return self.work

    def idle(self) -> None:
        """The gathers of one block with zeros (lockstep communicators, idle pipeline slot)."""
        for size, gdtype in zip(self.shards.shard_sizes(), self._dtypes):
            self.comm.all_gather(mint.zeros((size,), dtype=gdtype), self.group, axis=0)


def held_block_elements(model: StepVideoModel, shards) -> int:
    """Block parameter elements this rank holds: loaded block parameters plus its shards (BlockShards)
    or its host blocks (offload.HostBlocks)."""
    loaded = sum(int(np.prod(p.shape)) for n, p in model.parameters_and_names()
                 if _block_layer(n) is not None and not p.has_init)
    return loaded + (shards.numel() if shards is not None else 0)
