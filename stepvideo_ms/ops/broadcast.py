"""Elementwise products and sums with a broadcast operand, fast on MindSpore's CPU backend.

MindSpore's CPU kernels for broadcasting arithmetic are more than ten times slower than for
operands of equal shape, while `tile` copies memory quickly: on CPU the smaller operand is
tiled to the full shape first, then combined elementwise; float32/float64 operands of one dtype
are combined by numpy (which broadcasts without copies) on zero-copy views. Ascend broadcasts
natively.
"""
from __future__ import annotations

from typing import Sequence

from mindspore import Tensor, mint

from ..runtime import is_ascend
from . import host


def expand(t: Tensor, shape: Sequence[int]) -> Tensor:
    """t broadcast to `shape` as a real tensor of that shape (a tiled copy; t itself if it has the shape)."""
    shape = tuple(int(s) for s in shape)
    if tuple(t.shape) == shape:
        return t
    if t.ndim > len(shape):
        raise ValueError(f"expand: cannot broadcast {tuple(t.shape)} to {shape}")
    t = t.reshape((1,) * (len(shape) - t.ndim) + tuple(t.shape))
    reps = []
    for have, want in zip(t.shape, shape):
        if have != want and have != 1:
            raise ValueError(f"expand: cannot broadcast {tuple(t.shape)} to {shape}")
        reps.append(want if have != want else 1)
    return mint.tile(t, tuple(reps))


def mul(a: Tensor, b: Tensor) -> Tensor:
    """a * b with broadcasting."""
    if is_ascend() or a.shape == b.shape:
        return a * b
    shape = _result_shape(a, b)
    if a.dtype == b.dtype and host.blas_ready(a):  # numpy broadcasts without a tiled copy
        return host.wrap(host.view(a) * host.view(b))
    return expand(a, shape) * expand(b, shape)


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b with broadcasting."""
    if is_ascend() or a.shape == b.shape:
        return a + b
    shape = _result_shape(a, b)
    if a.dtype == b.dtype and host.blas_ready(a):
        return host.wrap(host.view(a) + host.view(b))
    return expand(a, shape) + expand(b, shape)


def _result_shape(a: Tensor, b: Tensor):
    n = max(a.ndim, b.ndim)
    sa = (1,) * (n - a.ndim) + tuple(a.shape)
    sb = (1,) * (n - b.ndim) + tuple(b.shape)
    out = []
    for x, y in zip(sa, sb):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


def repeat_axis(x: Tensor, axis: int, times: int) -> Tensor:
    """Each element repeated `times` times along `axis` (torch.repeat_interleave with an int)."""
    if times == 1:
        return x
    shape = tuple(x.shape)
    x = x.expand_dims(axis + 1)
    if is_ascend():
        x = x.broadcast_to(shape[:axis + 1] + (times,) + shape[axis + 1:])
    else:  # CPU: tile copies ~10x faster than materialising a broadcast view
        x = mint.tile(x, (1,) * (axis + 1) + (times,) + (1,) * (len(shape) - axis - 1))
    return x.reshape(shape[:axis] + (shape[axis] * times,) + shape[axis + 1:])
