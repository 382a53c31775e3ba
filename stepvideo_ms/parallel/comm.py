"""Collectives of the parallel DiT, in terms of world ranks taken from the mesh.

One interface (`Communicator`), three implementations:
- `LocalCommunicator`: a world of one process; no MindSpore communication is initialised.
- `WorldCollectiveCommunicator` (CPU): MindSpore's CPU backend only has AllGather, AllReduce and
  Broadcast on the world group (no AlltoAll, no send/recv, no sub-groups), so every operation
  is built from one world all-gather from which each rank takes what it needs. Consequently it is
  `lockstep`: every rank must call every operation in the same order with the same shapes,
  contributing a dummy when it has nothing to give (the pipeline schedule takes care of that).
- `NativeCommunicator` (Ascend, HCCL): AlltoAll and AllGather on sub-groups made with
  create_group, stage-to-stage transfer with mint.distributed send/recv; only the ranks
  concerned call an operation.

Every implementation may time its collectives (`timed=True`: the device is synchronised before and
after each on Ascend; CPU ranks launch ops blocking, so host time is op time).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..ops.alloc import empty
from ..runtime import is_ascend
from .mesh import Mesh

Ranks = Sequence[int]
# dtypes a broadcast can carry when the receivers do not know the shape; bool travels as int32
_WIRE_DTYPES = (ms.float32, ms.float16, ms.bfloat16, ms.int32, ms.int64, ms.bool_)
_MAX_NDIM = 8


def launched_by_msrun() -> bool:
    """True in an msrun worker (dynamic cluster): msrun, its parent, sets MS_WORKER_NUM."""
    return "MS_WORKER_NUM" in os.environ


def launched_distributed() -> bool:
    """True when started by msrun (dynamic cluster) or with an Ascend rank table."""
    return launched_by_msrun() or "RANK_TABLE_FILE" in os.environ


def init_world() -> Tuple[int, int]:
    """Join the distributed world if this process was launched as one of several; -> (world_size, rank).

    Call after `runtime.init(...)` has chosen the device. Without msrun, returns (1, 0) and
    initialises nothing.
    """
    if not launched_distributed():
        return 1, 0
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if is_ascend():  # send/recv live in mint.distributed
        from mindspore.mint import distributed as dist

        if not dist.is_initialized():
            dist.init_process_group()
    return get_group_size(), get_rank()


def make_communicator(mesh: Mesh, timed: bool = False) -> "Communicator":
    """The communicator for this backend and world size (after `init_world`)."""
    if mesh.world_size == 1:
        return LocalCommunicator(mesh, timed)
    if is_ascend():
        return NativeCommunicator(mesh, timed)
    return WorldCollectiveCommunicator(mesh, timed)


# ---- layout helpers: chunks of one axis <-> a leading axis --------------------------------------
def split_to_front(x: Tensor, parts: int, axis: int) -> Tensor:
    """x with `axis` cut into `parts` equal chunks -> (parts, *chunk_shape), chunk j at index j."""
    axis %= x.ndim
    size = x.shape[axis]
    if size % parts:
        raise ValueError(f"axis {axis} of size {size} cannot be cut into {parts} equal parts")
    shape = tuple(x.shape[:axis]) + (parts, size // parts) + tuple(x.shape[axis + 1:])
    perm = (axis,) + tuple(i for i in range(len(shape)) if i != axis)
    return mint.permute(x.reshape(shape), perm)


def merge_from_front(y: Tensor, axis: int) -> Tensor:
    """(parts, *chunk_shape) -> the chunks concatenated along `axis` of the chunk shape, in order."""
    chunk = tuple(y.shape[1:])
    axis %= len(chunk)
    perm = tuple(range(1, axis + 1)) + (0,) + tuple(range(axis + 1, y.ndim))
    merged = chunk[:axis] + (y.shape[0] * chunk[axis],) + chunk[axis + 1:]
    return mint.permute(y, perm).reshape(merged)


@dataclass
class CommStats:
    """Collectives called by this rank and the wall time they took (when timed)."""

    calls: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes_sent = 0, 0.0, 0


class Communicator:
    lockstep = False

    def __init__(self, mesh: Mesh, timed: bool = False):
        self.mesh = mesh
        self.world_size = mesh.world_size
        self.rank = mesh.rank
        self.timed = timed
        self.stats = CommStats()
        self._broadcasts: Dict[int, object] = {}  # root -> the world Broadcast primitive, built once

    # ---- public operations -------------------------------------------------------------
    def all_gather(self, x: Tensor, ranks: Ranks, axis: int = 0) -> Tensor:
        """Every member's x concatenated along `axis`, in the order of `ranks` (which holds this rank)."""
        ranks = self._members(ranks)
        if len(ranks) == 1:
            return x
        with self._timing(x):
            stacked = self._gather_stacked(x, ranks)
        return merge_from_front(stacked, axis)

    def all_to_all(self, x: Tensor, ranks: Ranks, scatter_axis: int, gather_axis: int) -> Tensor:
        """Cut x into len(ranks) chunks along `scatter_axis`, send chunk j to member j, and concatenate
        the chunks received along `gather_axis` in member order."""
        ranks = self._members(ranks)
        if len(ranks) == 1:
            return x
        chunks = split_to_front(x, len(ranks), scatter_axis)
        with self._timing(chunks):
            received = self._exchange_stacked(chunks, ranks)
        return merge_from_front(received, gather_axis)

    def shift(self, x: Optional[Tensor], dst: Optional[int], src: Optional[int],
              shape: Sequence[int], dtype) -> Optional[Tensor]:
        """Stage-to-stage transfer: send x to world rank `dst` (if given) and receive a tensor of
        `shape`/`dtype` from `src` (if given). Returns what was received, else None."""
        if (dst is None) != (x is None):
            raise ValueError("shift: give x together with dst (or neither)")
        for r in (dst, src):
            if r is not None and (r == self.rank or not 0 <= r < self.world_size):
                raise ValueError(f"shift: peer rank {r} must be another rank of the world of {self.world_size}")
        if x is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"shift: sending shape {tuple(x.shape)} but transfers are {tuple(shape)}")
        if dst is None and src is None and not self.lockstep:
            return None
        with self._timing(x):
            return self._shift(x, dst, src, tuple(shape), dtype)

    def broadcast(self, x: Optional[Tensor], root: int = 0) -> Tensor:
        """x of world rank `root` on every rank; other ranks may pass None (shape and dtype travel first)."""
        if self.world_size == 1:
            if x is None:
                raise ValueError("broadcast: the root must pass a tensor")
            return x
        if self.rank == root:
            if x is None:
                raise ValueError("broadcast: the root must pass a tensor")
            if x.dtype not in _WIRE_DTYPES or x.ndim > _MAX_NDIM:
                raise ValueError(f"broadcast: dtype {x.dtype} / ndim {x.ndim} cannot travel; "
                                 f"use one of {_WIRE_DTYPES} with at most {_MAX_NDIM} dims")
            header = np.zeros(2 + _MAX_NDIM, dtype=np.int64)
            header[0], header[1] = _WIRE_DTYPES.index(x.dtype), x.ndim
            header[2:2 + x.ndim] = x.shape
        else:
            header = np.zeros(2 + _MAX_NDIM, dtype=np.int64)
        with self._timing(x):
            header = self._broadcast_raw(Tensor(header), root).asnumpy()
            dtype, shape = _WIRE_DTYPES[int(header[0])], tuple(int(v) for v in header[2:2 + int(header[1])])
            wire = ms.int32 if dtype == ms.bool_ else dtype
            payload = x.astype(wire) if self.rank == root else mint.zeros(shape, dtype=wire)
            out = self._broadcast_raw(payload, root)
        return out.astype(dtype) if dtype == ms.bool_ else out

    # ---- implementation hooks ----------------------------------------------------------
    def _gather_stacked(self, x: Tensor, ranks: Tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def _exchange_stacked(self, chunks: Tensor, ranks: Tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def _shift(self, x, dst, src, shape, dtype):
        raise NotImplementedError

    def _broadcast_raw(self, x: Tensor, root: int) -> Tensor:
        if root not in self._broadcasts:
            self._broadcasts[root] = ops.Broadcast(root, group=_world_group())
        return self._broadcasts[root]((x.contiguous(),))[0]

    # ---- shared ------------------------------------------------------------------------
    def _members(self, ranks: Ranks) -> Tuple[int, ...]:
        ranks = tuple(int(r) for r in ranks)
        if self.rank not in ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"group {ranks} must list distinct ranks of the world of {self.world_size}, "
                             f"this rank ({self.rank}) included")
        return ranks

    @contextmanager
    def _timing(self, payload: Optional[Tensor]):
        self.stats.calls += 1
        if payload is not None:
            self.stats.bytes_sent += int(np.prod(payload.shape)) * payload.itemsize
        if not self.timed:
            yield
            return
        _synchronize()
        start = time.perf_counter()
        yield
        _synchronize()
        self.stats.seconds += time.perf_counter() - start


def _synchronize() -> None:
    """Wait for the device. CPU ranks launch ops blocking (see init_world): nothing to wait for, and
    MindSpore's synchronize() only logs an error there."""
    if is_ascend():  # pragma: no cover - needs an NPU
        ms.runtime.synchronize()


def _world_group() -> str:
    from mindspore.communication import GlobalComm

    return GlobalComm.WORLD_COMM_GROUP


class LocalCommunicator(Communicator):
    """World of one: every group is this rank alone; there is no peer to shift to."""

    def __init__(self, mesh: Mesh, timed: bool = False):
        if mesh.world_size != 1:
            raise ValueError(f"LocalCommunicator serves a world of one rank, not {mesh.world_size}")
        super().__init__(mesh, timed)

    def _shift(self, x, dst, src, shape, dtype):  # unreachable: shift() refuses every peer
        return None


class WorldCollectiveCommunicator(Communicator):
    """CPU: every operation is one world AllGather; all ranks call it together (lockstep)."""

    lockstep = True

    def __init__(self, mesh: Mesh, timed: bool = False):
        super().__init__(mesh, timed)
        self._gather = ops.AllGather(group=_world_group())

    def _world_gather(self, x: Tensor) -> Tensor:
        """(world, *x.shape): every rank's x, by world rank."""
        if x.dtype in (ms.int8, ms.uint8):  # no CPU AllGather kernel for bytes: 4 travel as one int32
            return self._gather_bytes(x)
        return self._gather(x.expand_dims(0))

    def _gather_bytes(self, x: Tensor) -> Tensor:
        raw = x.asnumpy().reshape(-1)
        padded = np.zeros(-(-raw.size // 4) * 4, raw.dtype)
        padded[:raw.size] = raw
        words = self._gather(Tensor(padded.view(np.int32)).expand_dims(0)).asnumpy()
        out = words.view(raw.dtype)[:, :raw.size].reshape((self.world_size,) + tuple(x.shape))
        return Tensor(out, x.dtype)

    def _pick(self, stacked: Tensor, rows: Sequence[int]) -> Tensor:
        if list(rows) == list(range(stacked.shape[0])):
            return stacked
        return ops.gather(stacked, Tensor(np.asarray(rows, dtype=np.int32)), 0)

    def _gather_stacked(self, x, ranks):
        return self._pick(self._world_gather(x), ranks)

    def _exchange_stacked(self, chunks, ranks):
        parts, me = len(ranks), ranks.index(self.rank)
        everything = self._world_gather(chunks)  # (world, parts, ...): rank r's chunk j at [r, j]
        flat = everything.reshape((self.world_size * parts,) + tuple(chunks.shape[1:]))
        return self._pick(flat, [r * parts + me for r in ranks])

    def _shift(self, x, dst, src, shape, dtype):
        payload = x if x is not None else mint.zeros(shape, dtype=dtype)
        everything = self._world_gather(payload)
        return None if src is None else everything[src]


class NativeCommunicator(Communicator):
    """Ascend: HCCL collectives on sub-groups, send/recv between stages (run on CPU by the Ascend
    simulation, `stepvideo_ms.testing.ascend_sim`). Each group's primitives are built once."""

    def __init__(self, mesh: Mesh, timed: bool = False):
        super().__init__(mesh, timed)
        self._groups: Dict[Tuple[int, ...], str] = {mesh.world_ranks: _world_group()}
        self._gathers: Dict[str, object] = {}
        self._exchanges: Dict[str, object] = {}
        if len(mesh.sp_group) > 1:
            self._group(mesh.sp_group)  # every rank creates its own SP group at start-up
        if len(mesh.shard_group) > 1:
            self._group(mesh.shard_group)  # and its weight-shard group (shard_weights)

    def _group(self, ranks: Tuple[int, ...]) -> str:
        """The HCCL group of these ranks, created on first use (all members must ask together)."""
        ranks = tuple(sorted(ranks))
        if ranks not in self._groups:
            from mindspore.communication import create_group

            name = "stepvideo_" + "_".join(map(str, ranks))
            create_group(name, list(ranks))
            self._groups[ranks] = name
        return self._groups[ranks]

    def _gather_stacked(self, x, ranks):
        if list(ranks) != sorted(ranks):
            raise ValueError(f"native all_gather takes groups in rank order, got {ranks}")
        group = self._group(ranks)
        if group not in self._gathers:
            self._gathers[group] = ops.AllGather(group=group)
        return self._gathers[group](x.expand_dims(0).contiguous())

    def _exchange_stacked(self, chunks, ranks):
        if list(ranks) != sorted(ranks):
            raise ValueError(f"native all_to_all takes groups in rank order, got {ranks}")
        group = self._group(ranks)
        if group not in self._exchanges:
            self._exchanges[group] = ops.AlltoAll(split_count=len(ranks), split_dim=0, concat_dim=0, group=group)
        # split_to_front hands a permuted view: HCCL sends the buffer as laid out, so copy it in order first
        return self._exchanges[group](chunks.contiguous())

    def _shift(self, x, dst, src, shape, dtype):
        from mindspore.mint import distributed as dist

        # receive before sending: along a pipeline column this resolves as a chain from stage 0
        received = None
        if src is not None:
            received = empty(shape, dtype)  # recv overwrites it all: no fill kernel
            dist.recv(received, src=src)
        if dst is not None:
            dist.send(x.contiguous(), dst=dst)
        return received
