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

from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host

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


def linear_heads(x: Tensor, weight: Tensor, heads: int, head_dim: int, parts: int) -> List[Tensor]:
    """A fused per-head projection (upstream's wqkv / wkv) cut into its parts.

    weight (heads*parts*head_dim, in) maps x (b, n, in) to (b, n, heads, parts*head_dim); returns
    the `parts` tensors (b, n, heads, head_dim) (q, k, v for parts=3).
    Ascend: one product, then a split. CPU, float32: one product through numpy's BLAS, each part
    copied out contiguous by numpy (MindSpore's elementwise kernels on the strided views a split
    gives are ~50x slower than on contiguous tensors). CPU, other dtypes: each part is its own
    product by the weight rows it needs (one gather), and comes out contiguous.
    """
    b, n, _ = x.shape
    if weight.shape[0] != heads * parts * head_dim:
        raise ValueError(f"linear_heads: weight{tuple(weight.shape)} has {weight.shape[0]} rows, expected "
                         f"heads*parts*head_dim = {heads}*{parts}*{head_dim}")
    if is_ascend():  # pragma: no cover - needs an NPU
        out = linear(x, weight).reshape(b, n, heads, parts * head_dim)
        return list(mint.split(out, [head_dim] * parts, dim=-1))
    if host.blas_ready(x, weight):
        full = (host.view(x).reshape(b * n, -1) @ host.view(weight).T).reshape(b, n, heads, parts, head_dim)
        return [host.wrap(full[:, :, :, part]) for part in range(parts)]
    outs = []
    for part in range(parts):
        rows = (np.arange(heads)[:, None] * parts * head_dim + part * head_dim + np.arange(head_dim)[None, :])
        part_weight = ops.gather(weight, Tensor(rows.reshape(-1).astype(np.int32)), 0)
        outs.append(linear(x, part_weight).reshape(b, n, heads, head_dim))
    return outs
