"""Block offload (`--offload`): the stage's block weights live in host memory, the card holds the
non-block parameters and a few working blocks, and each block is copied in just before it runs.

Host side (`HostBlocks`): every parameter of every block of this rank's stage, read once from the
safetensors files. On Ascend they are pinned host tensors (`Tensor.pin_memory()`), the source of
asynchronous copies; a MindSpore without `Tensor.pin_memory` (2.7.0) keeps them in the map
described next and copies them synchronously (float32 but for int8 weights: twice the host memory
of bf16, no overlap: the run's record says so). On the CPU backend, where host and device are the same memory, they sit in a
file-backed memory map (an unlinked temporary file), so that a process's resident memory tells
them apart from its working memory: file-backed (or shared) pages are the host blocks, anonymous
pages the device-resident part (see bench/bench_offload.py).

Device side (`BlockStreamer`): working blocks whose parameters are allocated once and filled in
place (`Tensor.copy_`). On Ascend there are two: while block i computes on the current stream, the
copy of the stage's next block is issued on a side stream (`mindspore.runtime.Stream`) into the
other working block, after that side stream waited for the event recorded when the compute stream
last handed that working block out (its previous contents are no longer read), and an `Event` is
recorded behind the copy. `block(i + 1)` makes the compute stream wait on that event (never on the
whole device) before handing the working block out. The order wraps around (after the stage's last
block comes its first: the next micro-batch or the next step), so every copy is issued one block
ahead. On the CPU backend one working block is filled synchronously. A stage with no more blocks
than working blocks copies each once and keeps them.

It composes with ulysses, pipeline and CFG parallelism: every rank streams its own stage's blocks.
It replaces `--shard_weights` (which keeps 1/N of every block on each card and all-gathers it over
the card links): offload needs no peers and frees the card of all blocks but the working ones, at
the price of host memory (a whole stage per rank) and host-link traffic; the planner chooses.

With --weights int8 the host blocks hold the blocks' linear weights in int8 with their per-channel
scales (read from a converted int8 folder, or quantized while reading the released weights, as
--shard_weights does), the rest as before, and the working blocks are int8 blocks (the W8A16 kernel
on Ascend): about half the host memory and half the host-link traffic of bf16 blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint
from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from ..capabilities import asynchronous_offload
from ..formats import checkpoint
from ..models.dit import StepVideoModel
from ..models.layers import StepVideoTransformerBlock
from .host_memory import host_blocks_shared
from .host_share import SharedBlockFile, content_key, open_shared, private_map
from .mesh import Mesh
from .shard import BLOCK_PREFIX, BlockLayout, _block_layer, _PieceReader, derived_scales, stage_sources

ASCEND_WORKING_BLOCKS = 2  # the one computing and the next one being copied in
CPU_WORKING_BLOCKS = 1


@dataclass
class HostBlocks:
    """This rank's stage blocks in host memory: {layer: [host tensor or array per parameter, in layout order]}."""

    layout: BlockLayout
    blocks: Dict[int, List[object]]
    pinned: bool  # Ascend: pinned host Tensors; CPU: numpy views of a file-backed map
    backing: Optional[np.ndarray] = None  # that map
    shared: Optional[SharedBlockFile] = None  # the map is the host's one copy of the stage (host_share.py)

    @property
    def copy_kind(self) -> str:
        """"per host": one copy that the ranks of this stage on this host share; "per rank": this rank's own
        (pinned tensors, or STEPVIDEO_SHARE_HOST_BLOCKS=0)."""
        return "per host" if self.shared is not None else "per rank"

    @property
    def map_path(self) -> Optional[str]:
        """The file behind the host map (None for pinned tensors; once settled or private, it has no name left)."""
        if self.shared is not None:
            return self.shared.path
        return getattr(self.backing, "filename", None)

    def settle(self) -> None:
        """Every rank of the world has loaded: the shared map's name can go (host_share.SharedBlockFile.settle)."""
        if self.shared is not None:
            self.shared.settle()

    def numel(self) -> int:
        return len(self.blocks) * self.layout.total

    def nbytes(self) -> int:
        """Bytes of the host blocks (int8 weights 1 byte an element; on CPU the rest float32)."""
        return sum(int(t.nbytes) for block in self.blocks.values() for t in block)

    @property
    def layers(self) -> List[int]:
        return sorted(self.blocks)


HOST_ALIGN = 64  # bytes: every parameter's view of the host map starts on this boundary


def _aligned(nbytes: int) -> int:
    return -(-nbytes // HOST_ALIGN) * HOST_ALIGN


class _MapLayout:
    """Where each parameter of each block sits in the host map: blocks one after another, every parameter
    starting on a HOST_ALIGN boundary."""

    def __init__(self, layout: BlockLayout, host_types):
        self.layout, self.types = layout, host_types
        self.nbytes = [size * np.dtype(t).itemsize for size, t in zip(layout.sizes, host_types)]
        self.per_block = sum(_aligned(n) for n in self.nbytes)

    def of(self, buffer: np.ndarray, index: int) -> List[np.ndarray]:
        """The parameters of the `index`-th block of the map, as views of `buffer` (read-only if it is)."""
        at, out = index * self.per_block, []
        for nbytes, t, shape in zip(self.nbytes, self.types, self.layout.shapes):
            out.append(buffer[at:at + nbytes].view(t).reshape(shape))
            at += _aligned(nbytes)
        return out


def load_offloaded_stage(path: str, mesh: Mesh, dtype=ms.float32, progress: bool = True,
                         weights: Optional[str] = None) -> Tuple[StepVideoModel, HostBlocks]:
    """The DiT of `path` with every non-block parameter loaded and the blocks unallocated, and this
    rank's stage blocks in host memory. weights: "full", "int8" (the blocks' linear weights in int8
    with their scales) or None (what the folder holds), see StepVideoModel.from_pretrained."""
    from ..runtime import device_name

    config = checkpoint.read_config(path)
    probe = {k: v for k, v in config.items() if k in StepVideoModel.config_keys()}
    heads, layers = int(probe.get("num_attention_heads", 48)), int(probe.get("num_layers", 48))
    mesh.check_model(heads, layers)
    model = StepVideoModel.from_pretrained(path, config, dtype=dtype, select=lambda n: _block_layer(n) is None,
                                           progress=progress, weights=weights)
    block0 = dict(model.transformer_blocks[0].parameters_and_names())
    layout = BlockLayout.of(model.transformer_blocks[0])
    dtypes = [block0[name].dtype for name in layout.names]  # int8 linear weights with --weights int8
    host_types = [np.int8 if t == ms.int8 else np.float32 for t in dtypes]  # the CPU map's
    mine = list(mesh.stage_layers(model.num_layers))
    wanted = {f"{BLOCK_PREFIX}{layer}.{name}": shape for layer in mine
              for name, shape in zip(layout.names, layout.shapes)}
    where = stage_sources(path, mine, wanted, lambda found: derived_scales(wanted, found))
    reader = _PieceReader(where)  # quantizes released weights (and derives their scales) for int8 blocks
    sources = checkpoint.checkpoint_files(path)

    def read_blocks():
        """(layer, [array per parameter in layout order]) for every block of the stage, read from the checkpoint."""
        for layer in progress_bar(mine, desc="loading blocks to host memory", unit="block", disable=not progress,
                                  leave=False):
            yield layer, [reader.read(f"{BLOCK_PREFIX}{layer}.{name}", dt == ms.int8, 0, size).reshape(shape)
                          for name, shape, size, dt in zip(layout.names, layout.shapes, layout.sizes, dtypes)]

    # Ascend with Tensor.pin_memory: pinned host tensors, the source of asynchronous copies, one copy per rank.
    # Without it (MindSpore 2.7.0) and on CPU: a file-backed map, copied synchronously (capabilities.in_use says
    # which), one per host for the ranks of this stage (host_share.py).
    device = device_name()
    pinned = asynchronous_offload(device)
    shared = None
    try:
        if pinned:
            blocks = {layer: [Tensor(arr, dt).pin_memory() for arr, dt in zip(arrays, dtypes)]
                      for layer, arrays in read_blocks()}
            backing = None
        else:
            views = _MapLayout(layout, host_types)
            nbytes = len(mine) * views.per_block

            def fill(buffer) -> None:
                for index, (_, arrays) in enumerate(read_blocks()):
                    for view, arr in zip(views.of(buffer, index), arrays):
                        view[...] = arr

            if host_blocks_shared(device):  # the planner's rule too (STEPVIDEO_SHARE_HOST_BLOCKS=0: per rank)
                key = content_key(sources, (mine, layout.names, layout.shapes, [np.dtype(t).str for t in host_types]))
                shared = open_shared(key, nbytes, fill)
                backing = shared.array
            else:
                backing = private_map(nbytes)
                fill(backing)
            blocks = {layer: views.of(backing, index) for index, layer in enumerate(mine)}
    finally:
        for f in set(where.values()):
            f.close()
    return model, HostBlocks(layout, blocks, pinned, backing, shared)


class _Copy:
    def __init__(self, slot: int, event):
        self.slot, self.event = slot, event


class BlockStreamer:
    """`block(layer)`: a working block holding layer `layer`'s weights, copied in from host memory
    (on Ascend the copy was issued one block ahead on a side stream)."""

    def __init__(self, host: HostBlocks, model: StepVideoModel, stage_layers: Sequence[int],
                 asynchronous: Optional[bool] = None):
        from ..runtime import is_ascend

        self.host = host
        self.order = list(stage_layers)
        if sorted(self.order) != host.layers:
            raise ValueError(f"host blocks of layers {host.layers} but the stage runs {self.order}")
        # asynchronous copies need pinned host memory (a copy from pageable memory would block)
        self.asynchronous = (is_ascend() and host.pinned) if asynchronous is None else asynchronous
        count = min(ASCEND_WORKING_BLOCKS if self.asynchronous else CPU_WORKING_BLOCKS, len(self.order))
        self.slots = []
        for _ in range(count):
            cell = StepVideoTransformerBlock(model.inner_dim, model.attention_head_dim, model.dtype,
                                             getattr(model, "weights", "full"))  # int8 blocks with --weights int8
            cell.set_train(False)
            for _, p in cell.parameters_and_names():  # real storage, allocated once
                p.set_data(mint.zeros(tuple(p.shape), dtype=p.dtype))
            if BlockLayout.of(cell) != host.layout:
                raise ValueError("the working block's parameters do not match the host blocks' layout")
            self.slots.append(cell)
        self._params = [[p for _, p in cell.parameters_and_names()] for cell in self.slots]
        self.holds: List[Optional[int]] = [None] * count  # layer in each working block (copied or in flight)
        self._pending: Dict[int, _Copy] = {}
        self._released: List[object] = [None] * count  # compute-stream event after a working block's last use
        self._running: Optional[int] = None  # the working block handed out last
        self.copies = 0  # blocks copied in (for tests and the bench)
        self._sequence: Optional[List[int]] = None  # step cache: the exact blocks asked for next, in order
        self._at = 0
        self._side = ms.runtime.Stream() if self.asynchronous else None

    # ---- copies ---------------------------------------------------------------------------
    def _copy_sync(self, layer: int, slot: int) -> None:
        for param, src in zip(self._params[slot], self.host.blocks[layer]):
            if not isinstance(src, Tensor):  # a float32 view of the host map
                src = Tensor.from_numpy(src)
                src = src if src.dtype == param.dtype else src.astype(param.dtype)
            param.copy_(src)
        self.holds[slot] = layer
        self.copies += 1

    def _issue(self, layer: int, slot: int) -> _Copy:
        """The copy of `layer` into working block `slot` on the side stream, behind the compute
        stream's release of that block; returns it with the event recorded after it."""
        side = self._side
        with ms.runtime.StreamCtx(side):
            if self._released[slot] is not None:
                side.wait_event(self._released[slot])
            for param, src in zip(self._params[slot], self.host.blocks[layer]):
                param.copy_(src, non_blocking=True)
            event = ms.runtime.Event()
            event.record(side)
        self.holds[slot] = layer
        self.copies += 1
        return _Copy(slot, event)

    def _wait(self, copy: _Copy) -> None:
        """The current (compute) stream waits for the copy's event: only that copy, not the device."""
        ms.runtime.current_stream().wait_event(copy.event)

    def _free_slot(self, avoid: Optional[int]) -> int:
        """A working block to fill: one not handed out last and not holding a pending copy."""
        busy = {c.slot for c in self._pending.values()}
        for slot in range(len(self.slots)):
            if slot != avoid and slot not in busy:
                return slot
        raise RuntimeError("no free working block")  # cannot happen with one copy in flight

    # ---- the stage's forward ---------------------------------------------------------------
    def plan(self, sequence: Sequence[int]) -> None:
        """The step cache's order of the blocks asked for next (a skipped block is not in it): each
        copy is issued ahead for the next one of it, none past its end (the next phase's first block is
        decided later; it is copied when asked for)."""
        self._sequence, self._at = list(sequence), 0

    def _next(self, layer: int) -> Optional[int]:
        if self._sequence is None:  # no plan: the stage's blocks in a loop
            return self.order[(self.order.index(layer) + 1) % len(self.order)]
        self._at += 1
        return self._sequence[self._at] if self._at < len(self._sequence) else None

    def block(self, layer: int) -> StepVideoTransformerBlock:
        if not self.asynchronous:
            if self._sequence is not None:
                self._at += 1
            if layer not in self.holds:
                self._copy_sync(layer, 0)
            return self.slots[self.holds.index(layer)]
        if self._running is not None:  # everything the last block runs is queued by now
            self._released[self._running] = ms.runtime.current_stream().record_event()
        copy = self._pending.pop(layer, None)
        if copy is not None:
            self._wait(copy)
            slot = copy.slot
        elif layer in self.holds:  # kept (a stage no larger than the working blocks)
            slot = self.holds.index(layer)
        else:  # the first block of all: nothing was issued ahead
            copy = self._issue(layer, self._free_slot(self._running))
            self._wait(copy)
            slot = copy.slot
        self._running = slot
        nxt = self._next(layer)
        if nxt is not None and nxt not in self.holds and nxt not in self._pending:
            self._pending[nxt] = self._issue(nxt, self._free_slot(slot))
        return self.slots[slot]

    def idle(self) -> None:
        """An idle pipeline slot: no collective to join."""

    def device_elements(self) -> int:
        return len(self.slots) * self.host.layout.total
