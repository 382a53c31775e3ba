"""Simulated `mindspore.mint.distributed` (the product's stage-to-stage transfers on Ascend) on the
world of hccl.py: `init_process_group`, `is_initialized`, `get_rank`, `get_world_size`, and
`send` / `recv` between global ranks. A send waits until its receiver has taken the message, as a
device stream blocks at an HCCL send: a pair that would dead-lock on the device dead-locks here too,
and is reported after the timeout.
"""
from __future__ import annotations

from mindspore import Tensor

from . import accounting, hccl


def init_process_group(*args, **kwargs) -> None:
    a = hccl.bind_call("init_process_group", args, kwargs)
    if a["backend"] != "hccl":
        raise RuntimeError(f"init_process_group: backend={a['backend']!r}, but this process simulates Ascend: use 'hccl'")
    if a["init_method"] is not None or a["store"] is not None:
        raise NotImplementedError("init_process_group: the simulation joins the msrun world only "
                                  "(init_method/store are not simulated)")
    hccl.init("hccl")
    size = hccl.need_world("init_process_group").size
    if a["world_size"] not in (-1, size):
        raise ValueError(f"init_process_group: world_size={a['world_size']} but the world has {size} ranks")


def is_initialized(*args, **kwargs) -> bool:
    hccl.bind_call("is_initialized", args, kwargs)
    return hccl.current_world() is not None


def dist_get_rank(*args, **kwargs) -> int:
    a = hccl.bind_call("dist_get_rank", args, kwargs)
    return hccl.get_rank(hccl.WORLD if a["group"] is None else a["group"])


def dist_get_world_size(*args, **kwargs) -> int:
    a = hccl.bind_call("dist_get_world_size", args, kwargs)
    return hccl.get_group_size(hccl.WORLD if a["group"] is None else a["group"])


def _transfer_args(name: str, args, kwargs, peer_key: str):
    a = hccl.bind_call(name, args, kwargs)
    tensor, peer, group, tag = a["tensor"], a[peer_key], a["group"], a["tag"]
    if not isinstance(tensor, Tensor):
        raise TypeError(f"For {name}, the input tensor must be tensor")
    if isinstance(peer, bool) or not isinstance(peer, int):
        raise TypeError(f"For {name}, the {peer_key} must be int")
    world = hccl.need_world(name)
    group = hccl.WORLD if group is None else group
    members = world.members(group, name)
    if peer == world.rank:
        raise ValueError(f"{name}: {peer_key}={peer} is this process's own rank")
    if peer not in members:
        raise ValueError(f"{name}: {peer_key}={peer} is not a member of group {group!r} {list(members)} "
                         f"({peer_key} is a global rank)")
    return world, tensor, peer, group, tag


def send(*args, **kwargs) -> None:
    world, tensor, dst, group, tag = _transfer_args("send", args, kwargs, "dst")
    hccl.check_tensor(tensor, "send")
    with accounting.collective("send"):
        pair = (world.rank, dst, group, tag)
        n = world.transfers.get(pair, 0)
        world.transfers[pair] = n + 1
        key = f"p2p.{group}.tag{tag}.{n}"
        op = {"op": "send", "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
        world.channel.post(key, dst, hccl.to_host(tensor), op)
        # a device stream blocks at a send until the peer receives: so does the simulation
        world.channel.collect(key + ".ack", [dst], f"send to rank {dst} (tag {tag}, group {group!r}) waiting "
                                                    "for its recv", hccl.wait_limit())


def recv(*args, **kwargs) -> int:
    world, tensor, src, group, tag = _transfer_args("recv", args, kwargs, "src")
    with accounting.collective("recv"):
        pair = (src, world.rank, group, tag)
        n = world.transfers.get(pair, 0)
        world.transfers[pair] = n + 1
        key = f"p2p.{group}.tag{tag}.{n}"
        data, header = world.channel.collect(key, [src], f"recv from rank {src} (tag {tag}, group {group!r})",
                                             hccl.wait_limit())[src]
        world.channel.post(key + ".ack", src, None, {"op": "ack"})
        if header["shape"] != list(tensor.shape) or header["dtype"] != str(tensor.dtype):
            raise ValueError(f"recv from rank {src}: it sent {header['dtype']}{tuple(header['shape'])}, the "
                             f"receiving tensor is {tensor.dtype}{tuple(tensor.shape)}")
        tensor.copy_(hccl.from_host(data, tensor.dtype))
    return 0


PATCHES = (  # (module, attribute, original key, emulator), given to hccl.install() by the package install()
    ("mindspore.mint.distributed", "init_process_group", "init_process_group", init_process_group),
    ("mindspore.mint.distributed", "is_initialized", "is_initialized", is_initialized),
    ("mindspore.mint.distributed", "get_rank", "dist_get_rank", dist_get_rank),
    ("mindspore.mint.distributed", "get_world_size", "dist_get_world_size", dist_get_world_size),
    ("mindspore.mint.distributed", "send", "send", send),
    ("mindspore.mint.distributed", "recv", "recv", recv),
)
