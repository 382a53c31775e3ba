"""Checks of the simulated HCCL, run inside every msrun worker of tests/test_ascend_sim_parallel.py
(by tests/parallel_worker.py when the device is ascend-sim). Each returns failure messages.

They exercise the MindSpore entry points as the product calls them and as the device would reject
them: members-only groups, the real signatures, split_count = group size, contiguous inputs,
global ranks, and the dead-lock timeout of a recv no one sends to and of a collective a rank skips.
"""
from __future__ import annotations

import os
import time
from typing import Callable, List

import numpy as np

DEADLOCK_TIMEOUT = 2.0  # seconds: the dead-lock checks lower the timeout to this for their own calls


def _raises(failures: List[str], what: str, exc, needles, fn: Callable) -> None:
    try:
        fn()
    except exc as err:
        missing = [n for n in needles if n not in str(err)]
        if missing:
            failures.append(f"{what}: {type(err).__name__} does not say {missing}: {err}")
        return
    except Exception as err:  # noqa: BLE001 - any other error is a failure to report
        failures.append(f"{what}: expected {exc.__name__}, got {type(err).__name__}: {err}")
        return
    failures.append(f"{what}: was accepted, expected {exc.__name__}")


def emulator_checks(world: int, rank: int) -> List[str]:
    import mindspore as ms
    from mindspore import Tensor, mint, ops
    from mindspore.communication import create_group, get_group_size, get_rank
    from mindspore.mint import distributed as dist
    from stepvideo_ms.parallel import Mesh, make_communicator
    from stepvideo_ms.parallel.comm import NativeCommunicator

    failures: List[str] = []
    comm = make_communicator(Mesh.create(world, rank, world, 1))
    if not isinstance(comm, NativeCommunicator):
        failures.append(f"make_communicator under ascend-sim gave {type(comm).__name__}, not NativeCommunicator")
    if (get_rank(), get_group_size(), dist.get_rank(), dist.get_world_size()) != (rank, world, rank, world):
        failures.append(f"world rank/size: {get_rank()}/{get_group_size()}, dist {dist.get_rank()}/{dist.get_world_size()}")
    if not dist.is_initialized():
        failures.append("mint.distributed.is_initialized() is False after init()")
    dist.init_process_group()  # after init(): accepted, nothing changes
    _raises(failures, "init_process_group(world_size=world+1)", ValueError, ["world_size"],
            lambda: dist.init_process_group(world_size=world + 1))

    # members-only groups: pairs (0,1), (2,3), ... each created and used by its own members only
    pair = [rank - rank % 2, rank - rank % 2 + 1]
    name = f"pair_{pair[0]}_{pair[1]}"
    create_group(name, pair)
    x = Tensor(np.full((1, 3), rank, np.float32))
    got = ops.AllGather(group=name)(x).asnumpy()
    if not np.array_equal(got, np.array([[pair[0]] * 3, [pair[1]] * 3], np.float32)):
        failures.append(f"AllGather on {name}: {got.tolist()}")
    if get_rank(name) != rank % 2 or get_group_size(name) != 2:
        failures.append(f"get_rank/get_group_size({name}) = {get_rank(name)}/{get_group_size(name)}")
    bf = Tensor(np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * rank).astype(ms.bfloat16)
    got = ops.AlltoAll(2, 0, 1, group=name)(bf)
    want = np.concatenate([np.arange(4, dtype=np.float32).reshape(2, 2)[rank % 2:rank % 2 + 1] + 10 * r
                           for r in pair], 1)
    if got.dtype != ms.bfloat16 or not np.array_equal(got.astype(ms.float32).asnumpy(), want):
        failures.append(f"bf16 AlltoAll on {name}: {got.dtype} {got.astype(ms.float32).asnumpy().tolist()}")
    create_group(name, list(pair))  # the same list again: a no-op, as in MindSpore
    _raises(failures, "create_group of an existing name with other ranks", ValueError, ["exists"],
            lambda: create_group(name, pair[::-1]))
    others = [r for r in range(world) if r not in pair][:2]
    if others:
        _raises(failures, "create_group by a non-member", ValueError, ["not in rank_ids", "members"],
                lambda: create_group("strangers", others))
    _raises(failures, "AllGather on a group never created", ValueError, ["does not exist"],
            lambda: ops.AllGather(group="never_made"))

    # the real signatures: unknown keywords fail as on the device
    _raises(failures, "AlltoAll(..., bogus=1)", TypeError, ["AlltoAll", "bogus"],
            lambda: ops.AlltoAll(split_count=2, split_dim=0, concat_dim=0, group=name, bogus=1))
    _raises(failures, "mint.distributed.send(..., bogus=1)", TypeError, ["send", "bogus"],
            lambda: dist.send(x, dst=(rank + 1) % world, bogus=1))
    _raises(failures, "create_group(rank_ids=tuple)", TypeError, ["rank_ids"], lambda: create_group("t", tuple(pair)))
    # argument rules
    _raises(failures, "AlltoAll with split_count != group size", ValueError, ["split_count=3", "2 ranks"],
            lambda: ops.AlltoAll(split_count=3, split_dim=0, concat_dim=0, group=name)(Tensor(np.ones((6, 2), np.float32))))
    view = mint.permute(Tensor(np.ones((2, 4), np.float32)), (1, 0))
    _raises(failures, "AlltoAll of a non-contiguous view", ValueError, ["contiguous"],
            lambda: ops.AlltoAll(2, 0, 0, group=name)(view))
    _raises(failures, "send to itself", ValueError, ["own rank"], lambda: dist.send(x, dst=rank))
    _raises(failures, "recv from a rank outside the world", ValueError, ["not a member"],
            lambda: dist.recv(x, src=world + 3))
    _raises(failures, "Broadcast from a root outside the group", ValueError, ["root_rank"],
            lambda: ops.Broadcast(others[0] if others else world + 1, group=name))

    # send/recv with global ranks, a bf16 payload, receiving into the given tensor
    peer = pair[1] if rank == pair[0] else pair[0]
    payload = Tensor(np.full((2, 3), 100 + rank, np.float32)).astype(ms.bfloat16)
    buf = mint.zeros((2, 3), dtype=ms.bfloat16)
    if rank == pair[0]:
        dist.send(payload, dst=peer)
        dist.recv(buf, src=peer)
    else:
        dist.recv(buf, src=peer)
        dist.send(payload, dst=peer)
    if not np.array_equal(buf.astype(ms.float32).asnumpy(), np.full((2, 3), 100 + peer, np.float32)):
        failures.append(f"send/recv with rank {peer}: {buf.astype(ms.float32).asnumpy().tolist()}")
    if rank == pair[1]:
        dist.send(Tensor(np.ones((2, 2), np.float32)), dst=peer)
    else:
        _raises(failures, "recv into a tensor of another shape", ValueError, ["(2, 2)", "(2, 3)"],
                lambda: dist.recv(mint.zeros((2, 3), dtype=ms.float32), src=peer))
    failures += deadlock_checks(world, rank)
    return failures


def deadlock_checks(world: int, rank: int) -> List[str]:
    """Last: after these the ranks' call numbers are out of step on purpose."""
    import mindspore as ms
    from mindspore import Tensor, mint, ops
    from mindspore.mint import distributed as dist
    from stepvideo_ms.testing.ascend_sim.hccl import ENV_TIMEOUT
    from stepvideo_ms.testing.ascend_sim.side_channel import DeadlockError

    failures: List[str] = []
    os.environ[ENV_TIMEOUT] = str(DEADLOCK_TIMEOUT)
    start = time.monotonic()
    if rank == 0:  # a recv rank 1 never answers
        _raises(failures, "recv with no matching send", DeadlockError,
                ["recv from rank 1", "rank(s) [1] never arrived", f"{DEADLOCK_TIMEOUT:g} s"],
                lambda: dist.recv(mint.zeros((2,), dtype=ms.float32), src=1, tag=7))
    elif rank >= 2:  # ranks 2.. join a world AllGather that ranks 0 and 1 skip
        _raises(failures, "world AllGather two ranks skip", DeadlockError,
                ["AllGather", "hccl_world_group", "rank(s) [0, 1] never arrived"],
                lambda: ops.AllGather()(Tensor(np.ones((1,), np.float32))))
    elapsed = time.monotonic() - start
    if elapsed > DEADLOCK_TIMEOUT + 10:
        failures.append(f"the dead-lock checks took {elapsed:.1f} s with a timeout of {DEADLOCK_TIMEOUT} s")
    return failures
