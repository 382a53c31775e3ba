"""Linear layer: x @ weight^T + bias over the last axis.

CPU: one 2D matrix product over all leading axes (rows = every token of every sample) with the
weight read transposed in place. float32 goes to numpy's BLAS through zero-copy views (`host`),
the bias added in place on the product; other dtypes take MindSpore's dense kernel, the bias added
by `bias_add` afterwards (the kernel runs several times slower when it adds the bias itself).
Ascend: the fused kernel.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host
from .split import split

_matmul_bt = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., in) by weight (out, in), plus bias (out,) -> (..., out); PyTorch's F.linear."""
    if is_ascend():  # pragma: no cover - needs an NPU
        return mint.nn.functional.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight{tuple(weight.shape)} takes {weight.shape[-1]}")
    lead = x.shape[:-1]
    if host.blas_ready(x, weight, *(() if bias is None else (bias,))):
        out = host.view(x).reshape(-1, x.shape[-1]) @ host.view(weight).T
        if bias is not None:
            out += host.view(bias)
        return host.wrap(out.reshape(*lead, weight.shape[0]))
    out = _matmul_bt(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(*lead, weight.shape[0])


def linear_heads(x: Tensor, weight: Tensor, heads: int, head_dim: int, parts: int,
                 scale: Optional[Tensor] = None) -> List[Tensor]:
    """A fused per-head projection (upstream's wqkv / wkv) cut into its parts.

    weight (heads*parts*head_dim, in) maps x (b, n, in) to (b, n, heads, parts*head_dim); returns
    the `parts` tensors (b, n, heads, head_dim) (q, k, v for parts=3).
    Ascend: one product, then a split. CPU, float32: one product through numpy's BLAS, each part
    copied out contiguous by numpy (MindSpore's elementwise kernels on the strided views a split
    gives are ~50x slower than on contiguous tensors). CPU, other dtypes: each part is its own
    product by the weight rows it needs (one gather), and comes out contiguous.
    scale: the weight is int8 with these per-row scales (ops.quant); such products take the gather path.
    """
    def product(rows_weight, rows_scale):
        return linear(x, rows_weight) if scale is None else linear_int8(x, rows_weight, rows_scale)

    b, n, _ = x.shape
    if weight.shape[0] != heads * parts * head_dim:
        raise ValueError(f"linear_heads: weight{tuple(weight.shape)} has {weight.shape[0]} rows, expected "
                         f"heads*parts*head_dim = {heads}*{parts}*{head_dim}")
    if is_ascend():  # pragma: no cover - needs an NPU
        out = product(weight, scale).reshape(b, n, heads, parts * head_dim)
        return split(out, [head_dim] * parts, dim=-1)
    if scale is None and host.blas_ready(x, weight):
        full = (host.view(x).reshape(b * n, -1) @ host.view(weight).T).reshape(b, n, heads, parts, head_dim)
        return [host.wrap(full[:, :, :, part]) for part in range(parts)]
    outs = []
    for part in range(parts):
        rows = (np.arange(heads)[:, None] * parts * head_dim + part * head_dim + np.arange(head_dim)[None, :])
        index = Tensor(rows.reshape(-1).astype(np.int32))
        part_scale = None if scale is None else ops.gather(scale, index, 0)
        outs.append(product(ops.gather(weight, index, 0), part_scale).reshape(b, n, heads, head_dim))
    return outs


# ---------------------------------------------------------------------------------------------
# int8 weights with per-row scales (W8A16; the scheme and the quantization: ops/quant.py)

_prims = {}


def _weight_quant_matmul():
    """The Ascend primitive, looked up on its module at first use (the simulation replaces it there)."""
    from mindspore.ops import auto_generate

    cls = auto_generate.WeightQuantBatchMatmul
    key = id(cls)
    if key not in _prims:
        _prims.clear()
        _prims[key] = cls(transpose_x=False, transpose_weight=True, antiquant_group_size=0)
    return _prims[key]


def dequantize(weight: Tensor, scale: Tensor, dtype) -> Tensor:
    """int8 (n, k) and scales (n,) -> the weight (n, k) in `dtype`."""
    return weight.astype(dtype) * scale.astype(dtype).reshape(-1, 1)


def linear_int8(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., k) by an int8 weight (n, k) with per-row scales (n,), plus bias (n,) -> (..., n)."""
    if weight.dtype != ms.int8:
        raise TypeError(f"linear_int8: the weight must be int8, got {weight.dtype}")
    if x.shape[-1] != weight.shape[-1] or tuple(scale.shape) != (weight.shape[0],):
        raise ValueError(f"linear_int8: input (..., {x.shape[-1]}), weight{tuple(weight.shape)} and "
                         f"scale{tuple(scale.shape)} do not fit (weight (n, k), scale (n,))")
    if is_ascend():
        lead = x.shape[:-1]
        if bias is not None and x.dtype == ms.bfloat16:
            bias = bias.astype(ms.float32)
        out = _weight_quant_matmul()(x.reshape(-1, x.shape[-1]), weight, scale.astype(x.dtype), None, None, None,
                                     None if bias is None else bias)
        return out.reshape(*lead, weight.shape[0])
    return linear(x, dequantize(weight, scale, x.dtype), bias)
