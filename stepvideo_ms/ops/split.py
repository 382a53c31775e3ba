"""A tensor cut into parts of given sizes along one axis (mint.split with a list of sizes).

MindSpore 2.7.0 has no CPU kernel for the sized split (SplitWithSize); there the parts are taken as
slices, which give the same tensors. capabilities.sized_split_kernel() decides, once per process.
"""
from __future__ import annotations

from typing import List, Sequence

from mindspore import Tensor, mint

from .. import capabilities, runtime


def split(x: Tensor, sizes: Sequence[int], dim: int = -1) -> List[Tensor]:
    sizes = [int(s) for s in sizes]
    axis = dim % x.ndim
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split: sizes {sizes} add up to {sum(sizes)}, the axis {dim} has {x.shape[axis]}")
    if capabilities.sized_split_kernel(runtime.device_name()):
        return list(mint.split(x, sizes, dim=dim))
    parts, at = [], 0
    lead = (slice(None),) * axis
    for size in sizes:
        parts.append(x[lead + (slice(at, at + size),)])
        at += size
    return parts
