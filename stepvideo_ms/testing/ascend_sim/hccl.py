"""Simulated HCCL: the collectives and transfers the product calls on Ascend, across msrun workers.

Replaced, each bound to the real MindSpore 2.10 signature (an unknown keyword is a TypeError, as on
the device) and held to the documented rules:
- `mindspore.communication`: `init`, `create_group`, `get_rank`, `get_group_size`;
- `mindspore.ops`: `AlltoAll` (split_count = the group size), `AllGather`, `Broadcast` (global root);
- `mindspore.mint.distributed`: `init_process_group`, `is_initialized`, `get_rank`, `get_world_size`,
  `send` / `recv` (global ranks; a send waits for its receiver, as a device stream does): hccl_dist.py.
Only the ranks concerned make a call: data moves through `side_channel.Channel` (files in a run
directory of the job), keyed by group and call number. A call whose peers never come fails after
$STEPVIDEO_SIM_HCCL_TIMEOUT seconds (default 120, read at each call) naming the operation, the
group and those ranks.

`init()` joins MindSpore's CPU world (msrun's cluster: ranks, and one broadcast to agree on the run
directory), then presents it as `hccl_world_group`; no other CPU collective is used.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from . import accounting, patching
from .env import positive_number
from .side_channel import Channel

ENV_TIMEOUT = "STEPVIDEO_SIM_HCCL_TIMEOUT"
ENV_DIR = "STEPVIDEO_SIM_HCCL_DIR"  # where run directories are made (default: the system temp dir)
DEFAULT_TIMEOUT = 120.0
WORLD = "hccl_world_group"


class _World:
    """This process's view of the simulated HCCL world (set by init())."""

    def __init__(self, rank: int, size: int, channel: Channel):
        self.rank, self.size, self.channel = rank, size, channel
        self.groups: Dict[str, Tuple[int, ...]] = {WORLD: tuple(range(size))}  # name -> members by group rank
        self.created: Dict[str, list] = {}  # name -> rank_ids as given to create_group
        self.calls: Dict[str, int] = {}
        self.transfers: Dict[tuple, int] = {}

    def members(self, group, what: str) -> Tuple[int, ...]:
        if not isinstance(group, str):
            raise TypeError(f"{what}: group must be a str, got {type(group).__name__}")
        if group not in self.groups:
            raise ValueError(f"{what}: group {group!r} does not exist on rank {self.rank}: its members must "
                             f"create_group it first (known: {sorted(self.groups)})")
        ranks = self.groups[group]
        if self.rank not in ranks:  # pragma: no cover - create_group admits members only
            raise ValueError(f"{what}: rank {self.rank} is not a member of group {group!r} {list(ranks)}")
        return ranks

    def next_key(self, group: str) -> str:
        n = self.calls.get(group, 0)
        self.calls[group] = n + 1
        return f"{group}.{n}"


_world: Optional[_World] = None
_initialising = False  # inside the real communication.init
_originals: Dict[str, object] = {}


def wait_limit() -> float:
    return positive_number(ENV_TIMEOUT, DEFAULT_TIMEOUT, "seconds")


def current_world() -> Optional[_World]:
    return _world


def need_world(what: str) -> _World:
    if _world is None:
        raise RuntimeError(f"{what}: the communication is not initialised: call mindspore.communication.init() "
                           "(or mint.distributed.init_process_group()) first, in a job started by msrun")
    return _world


def bind_call(name: str, args, kwargs) -> Dict[str, object]:
    """The call bound to the real function's (or class constructor's) signature, defaults applied
    (TypeError as on the device)."""
    return patching.bind(_originals[name], name, args, kwargs)


# ---- host <-> wire ---------------------------------------------------------------------------
def to_host(x: Tensor) -> np.ndarray:
    with accounting.internal():
        return (x.astype(ms.float32) if x.dtype == ms.bfloat16 else x).asnumpy()


def from_host(a: np.ndarray, dtype) -> Tensor:
    t = Tensor(np.ascontiguousarray(a))
    return t.astype(dtype) if t.dtype != dtype else t


def check_tensor(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: the input must be a Tensor, got {type(x).__name__}")
    if not x.is_contiguous():
        raise ValueError(f"{what}: the input is a non-contiguous view (shape {tuple(x.shape)}); HCCL sends the "
                         "device buffer as laid out: call .contiguous() first")
    return x


def _exchange(what: str, group: str, op: dict, outgoing: Dict[int, np.ndarray], sources: Sequence[int]
              ) -> Dict[int, np.ndarray]:
    """One collective call: post `outgoing[dst]` to each peer, collect from `sources`, check that every
    peer made the same call (operation and parameters)."""
    world = _world
    key = world.next_key(group)
    for dst, data in outgoing.items():
        world.channel.post(key, dst, data, op)
    got = world.channel.collect(key, sources, f"{what} on group {group!r} {list(world.groups[group])}", wait_limit())
    for src, (_, header) in got.items():
        if header != op:
            raise RuntimeError(f"{what} on group {group!r}: call #{key.rsplit('.', 1)[1]} of rank {src} was "
                               f"{header}, this rank ({world.rank}) called {op}: the members' calls differ "
                               "(operation, parameters, shape or dtype)")
    return {src: data for src, (data, _) in got.items()}


# ---- mindspore.communication -----------------------------------------------------------------
def init(*args, **kwargs):
    a = bind_call("init", args, kwargs)
    backend = a["backend_name"]
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"init: backend_name must be a str, got {type(backend).__name__}")
    if backend not in (None, "hccl"):
        raise RuntimeError(f"init: backend_name={backend!r}, but this process simulates Ascend: use 'hccl' (or None)")
    global _world
    if _world is not None:
        return
    if "MS_WORKER_NUM" not in os.environ and "RANK_TABLE_FILE" not in os.environ:
        raise RuntimeError("init: the simulated HCCL world needs a job started by msrun (no MS_WORKER_NUM here)")
    from mindspore.communication import _comm_helper

    global _initialising
    _initialising = True  # MindSpore 2.7's init asks get_rank() / get_group_size() of its CPU world itself
    try:
        _originals["init"]("mccl")
    finally:
        _initialising = False
    cpu_world = _comm_helper.GlobalComm.WORLD_COMM_GROUP
    rank, size = _originals["get_rank"](cpu_world), _originals["get_group_size"](cpu_world)
    # agree on a fresh run directory: rank 0 draws a token, one broadcast on the CPU world
    token = np.array([secrets.randbits(62) if rank == 0 else 0], np.int64)
    token = _originals["Broadcast"](0, group=cpu_world)((Tensor(token),))[0]
    base = os.environ.get(ENV_DIR) or tempfile.gettempdir()
    run_dir = os.path.join(base, f"stepvideo-hccl-sim-{int(token.asnumpy()[0]):x}")
    os.makedirs(run_dir, exist_ok=True)
    _comm_helper.GlobalComm.WORLD_COMM_GROUP = WORLD  # the product sees Ascend's world group
    _world = _World(rank, size, Channel(run_dir, rank))


def get_rank(*args, **kwargs) -> int:
    if _initialising:  # inside the real init (2.7.x): its own question about the CPU world
        return _originals["get_rank"](*args, **kwargs)
    a = bind_call("get_rank", args, kwargs)
    world = need_world("get_rank")
    return world.members(a["group"], "get_rank").index(world.rank)


def get_group_size(*args, **kwargs) -> int:
    if _initialising:
        return _originals["get_group_size"](*args, **kwargs)
    a = bind_call("get_group_size", args, kwargs)
    return len(need_world("get_group_size").members(a["group"], "get_group_size"))


def create_group(*args, **kwargs) -> None:
    a = bind_call("create_group", args, kwargs)
    group, rank_ids = a["group"], a["rank_ids"]
    world = need_world("create_group")
    if not isinstance(group, str):
        raise TypeError(f"create_group: group must be a str, got {type(group).__name__}")
    if not isinstance(rank_ids, list):
        raise TypeError(f"create_group: rank_ids must be a list, got {type(rank_ids).__name__}")
    if group in world.created:  # as MindSpore: the same list again is a no-op, another list an error
        if rank_ids != world.created[group]:
            raise ValueError(f"create_group: group {group!r} exists with rank_ids {world.created[group]}, "
                             f"not {rank_ids}")
        return
    if group == WORLD:
        raise ValueError(f"create_group: {WORLD!r} is the world group, not a name to create")
    if len(rank_ids) < 2 or len(set(rank_ids)) != len(rank_ids) or \
            not all(isinstance(r, int) and 0 <= r < world.size for r in rank_ids):
        raise ValueError(f"create_group: rank_ids {rank_ids} must hold at least 2 distinct ranks of the world "
                         f"of {world.size}")
    if world.rank not in rank_ids:
        raise ValueError(f"create_group: rank {world.rank} is not in rank_ids {rank_ids}: only the members of a "
                         "group create it")
    key, peers = f"create.{group}", [r for r in rank_ids if r != world.rank]
    op = {"op": "create_group", "group": group, "rank_ids": list(rank_ids)}
    for dst in peers:
        world.channel.post(key, dst, None, op)
    for src, (_, header) in world.channel.collect(key, peers, f"create_group {group!r} {rank_ids}", wait_limit()).items():
        if header != op:
            raise RuntimeError(f"create_group {group!r}: rank {src} asked for {header['rank_ids']}, "
                               f"rank {world.rank} for {rank_ids}")
    world.created[group] = list(rank_ids)
    world.groups[group] = tuple(sorted(rank_ids))  # group rank = position among the sorted world ranks


# ---- mindspore.ops collectives ---------------------------------------------------------------
class _Collective:
    name = ""

    def _setup(self, args, kwargs) -> Dict[str, object]:
        a = bind_call(self.name, args, kwargs)
        self.group = a["group"]
        self.ranks = need_world(self.name).members(self.group, self.name)  # the device checks at build
        return a


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return value


class AlltoAll(_Collective):
    """`ops.AlltoAll(split_count, split_dim, concat_dim, group)`: block j of x goes to group rank j."""

    name = "AlltoAll"

    def __init__(self, *args, **kwargs):
        a = self._setup(args, kwargs)
        self.split_count = _int(a["split_count"], "AlltoAll: split_count")
        self.split_dim = _int(a["split_dim"], "AlltoAll: split_dim")
        self.concat_dim = _int(a["concat_dim"], "AlltoAll: concat_dim")

    def __call__(self, x):
        x, n = check_tensor(x, "AlltoAll"), len(self.ranks)
        if self.split_count != n:
            raise ValueError(f"AlltoAll: split_count={self.split_count} but group {self.group!r} has {n} ranks: "
                             "HCCL requires split_count = the group size")
        for dim in ("split_dim", "concat_dim"):
            if not -x.ndim <= getattr(self, dim) < x.ndim:
                raise ValueError(f"AlltoAll: {dim}={getattr(self, dim)} is out of range for a {x.ndim}-d input")
        split, concat = self.split_dim % x.ndim, self.concat_dim % x.ndim
        if x.shape[split] % n:
            raise ValueError(f"AlltoAll: dimension {split} of shape {tuple(x.shape)} cannot be split into "
                             f"split_count={n} blocks")
        with accounting.collective(self.name):
            blocks = np.split(to_host(x), n, axis=split)
            me = self.ranks.index(_world.rank)
            op = {"op": self.name, "split_count": n, "split_dim": split, "concat_dim": concat,
                  "shape": list(x.shape), "dtype": str(x.dtype)}
            got = _exchange("AlltoAll", self.group, op, {r: blocks[j] for j, r in enumerate(self.ranks) if j != me},
                            [r for r in self.ranks if r != _world.rank])
            got[_world.rank] = blocks[me]
            return from_host(np.concatenate([got[r] for r in self.ranks], axis=concat), x.dtype)


class AllGather(_Collective):
    """`ops.AllGather(group)`: the members' inputs concatenated on axis 0, in group rank order."""

    name = "AllGather"

    def __init__(self, *args, **kwargs):
        self._setup(args, kwargs)

    def __call__(self, x):
        x = check_tensor(x, "AllGather")
        with accounting.collective(self.name):
            mine = to_host(x)
            op = {"op": self.name, "shape": list(x.shape), "dtype": str(x.dtype)}
            peers = [r for r in self.ranks if r != _world.rank]
            got = _exchange("AllGather", self.group, op, {r: mine for r in peers}, peers)
            got[_world.rank] = mine
            return from_host(np.concatenate([got[r] for r in self.ranks], axis=0), x.dtype)


class Broadcast(_Collective):
    """`ops.Broadcast(root_rank, group)((x, ...))`: the root's tensors (root_rank is a global rank)."""

    name = "Broadcast"

    def __init__(self, *args, **kwargs):
        a = self._setup(args, kwargs)
        self.root = _int(a["root_rank"], "Broadcast: root_rank")
        if self.root not in self.ranks:
            raise ValueError(f"Broadcast: root_rank={self.root} is not a member of group {self.group!r} "
                             f"{list(self.ranks)} (root_rank is a global rank)")

    def __call__(self, inputs):
        tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        tensors = tuple(check_tensor(t, "Broadcast") for t in tensors)
        with accounting.collective(self.name):
            op = {"op": self.name, "root": self.root, "shapes": [list(t.shape) for t in tensors],
                  "dtypes": [str(t.dtype) for t in tensors]}
            me = _world.rank
            if me == self.root:
                for t in tensors:
                    data = to_host(t)
                    _exchange("Broadcast", self.group, op, {r: data for r in self.ranks if r != me}, [])
                return tensors
            out = []
            for t in tensors:
                got = _exchange("Broadcast", self.group, op, {}, [self.root])
                out.append(from_host(got[self.root], t.dtype))
            return tuple(out)


# ---- installation ----------------------------------------------------------------------------
_PATCHES = (  # (module, attribute, original key, emulator)
    ("mindspore.communication", "init", "init", init),
    ("mindspore.communication.management", "init", "init", init),
    ("mindspore.communication", "get_rank", "get_rank", get_rank),
    ("mindspore.communication.management", "get_rank", "get_rank", get_rank),
    ("mindspore.communication", "get_group_size", "get_group_size", get_group_size),
    ("mindspore.communication.management", "get_group_size", "get_group_size", get_group_size),
    ("mindspore.communication", "create_group", "create_group", create_group),
    ("mindspore.communication.management", "create_group", "create_group", create_group),
    ("mindspore.ops", "AlltoAll", "AlltoAll", AlltoAll),
    ("mindspore.ops", "AllGather", "AllGather", AllGather),
    ("mindspore.ops", "Broadcast", "Broadcast", Broadcast),
)


def install(more: Sequence[Tuple[str, str, str, object]] = ()) -> None:
    """Replace the HCCL entry points in this process, and `more` patches of the same form (the package's
    install() passes hccl_dist's: that module builds on this one, so this one does not import it)."""
    import importlib
    import atexit

    accounting.install()
    for module_name, attr, key, emulator in _PATCHES + tuple(more):
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        if original is emulator:
            continue
        _originals.setdefault(key, original)
        setattr(module, attr, emulator)
    atexit.register(_remove_run_dir)


def _remove_run_dir() -> None:
    """Every rank tries to remove the run directory at exit: the last one out succeeds if every message
    was read (else the directory is kept, to debug)."""
    if _world is not None:
        try:
            os.rmdir(_world.channel.run_dir)
        except OSError:
            pass


def original(name: str):
    """The MindSpore function or class an emulator replaced (tests compare signatures with it)."""
    return _originals[name]


