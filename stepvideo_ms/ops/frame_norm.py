"""Group norm of video tensors with statistics per frame (the VAE's "spatial" group norm).

For x (b, c, t, h, w) it equals torch's group_norm of the frames as a batch, (b*t, c, h, w).

Ascend: the native group norm between two transposes. CPU, float32: numpy on zero-copy views
(last-axis reductions and two passes; ~1/3 of the CPU time of the batch-norm form below). CPU,
other dtypes: MindSpore's CPU broadcasting
arithmetic and multi-axis reductions are slow, so every (sample, channel, frame) plane becomes one
channel of an inference-mode batch norm (one fast kernel that centres and scales): per-plane sums
come from one last-axis reduction, the group statistics are combined on the host (a few numbers
per frame, in float64), and two batch-norm calls centre, then scale and shift (two passes over
the data, as an exact two-pass variance).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host
from .norms import group_norm

# Below float32 resolution next to 1: batch norm with variance 1 and this eps only subtracts.
_NO_EPS = 1e-10


def frame_group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """x (b, c, t, h, w) normalised per (sample, group, frame), then scaled by weight, shifted by bias (c,)."""
    if x.ndim != 5:
        raise ValueError(f"frame_group_norm takes (batch, channels, frames, height, width), got {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"frame_group_norm: {c} channels do not split into {num_groups} groups")
    if is_ascend():
        frames = mint.permute(x, (0, 2, 1, 3, 4)).reshape(b * t, c, h, w)
        out = group_norm(frames, num_groups, weight, bias, eps).reshape(b, t, c, h, w)
        return mint.permute(out, (0, 2, 1, 3, 4))
    if host.blas_ready(x, weight, bias):
        return _frame_group_norm_host(x, num_groups, weight, bias, eps)
    return _frame_group_norm_cpu(x, num_groups, weight, bias, eps)


def _frame_group_norm_host(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """CPU float32/float64 in numpy: per-plane sums by last-axis reductions, group statistics combined
    in float64 (a few numbers per frame), then one centring pass and one scale-and-shift pass."""
    b, c, t, h, w = x.shape
    per_group = c // groups
    planes = host.view(x).reshape(b, c, t, h * w)

    def group_mean(plane_sums: np.ndarray) -> np.ndarray:  # (b, c, t) -> the group's mean per plane
        means = plane_sums.astype(np.float64).reshape(b, groups, per_group, t).sum(axis=2) / (per_group * h * w)
        return np.repeat(means, per_group, axis=1)  # (b, c, t)

    centred = planes - group_mean(planes.sum(axis=-1)).astype(planes.dtype)[..., None]
    var = group_mean(np.einsum("bctk,bctk->bct", centred, centred))
    scale = (1.0 / np.sqrt(var + eps)) * host.view(weight).astype(np.float64)[None, :, None]
    centred *= scale.astype(planes.dtype)[..., None]
    centred += host.view(bias)[None, :, None, None]
    return host.wrap(centred.reshape(b, c, t, h, w))


def _frame_group_norm_cpu(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    b, c, t, h, w = x.shape
    planes, per_group = b * c * t, c // groups
    dtype = x.dtype
    flat = (x if dtype == ms.float32 else x.astype(ms.float32)).reshape(1, planes, h, w)

    def group_mean(values: Tensor) -> np.ndarray:  # per-plane sums -> the group's mean, per plane
        sums = mint.sum(values.reshape(planes, h * w), dim=-1).asnumpy().astype(np.float64)
        means = sums.reshape(b, groups, per_group, t).sum(axis=2) / (per_group * h * w)
        return np.repeat(means, per_group, axis=1).reshape(planes).astype(np.float32)

    def per_plane(values: Tensor) -> Tensor:  # (c,) -> (b*c*t,)
        arr = values.asnumpy().astype(np.float32).reshape(1, c, 1)
        return Tensor(np.ascontiguousarray(np.broadcast_to(arr, (b, c, t)).reshape(planes)))

    ones, zeros = Tensor(np.ones(planes, np.float32)), Tensor(np.zeros(planes, np.float32))
    centred = ops.batch_norm(flat, Tensor(group_mean(flat)), ones, ones, zeros, False, 0.0, _NO_EPS)
    var = Tensor(group_mean(centred * centred))
    out = ops.batch_norm(centred, zeros, var, per_plane(weight), per_plane(bias), False, 0.0, eps)
    out = out.reshape(b, c, t, h, w)
    return out if dtype == ms.float32 else out.astype(dtype)
