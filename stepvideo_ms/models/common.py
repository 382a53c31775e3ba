"""Basic cells with PyTorch's parameter names (weight/bias), so released state dicts load as is.

Parameters start as zeros of the requested dtype: the real values always come from a checkpoint
(`checkpoint.load_into`). Build a model under `mindspore.nn.utils.no_init_parameters()` to
describe it without allocating its weights.
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import Zero, One, initializer

from .. import ops
from ..ops.linear import linear_int8
from ..ops.quant import WEIGHTS_CHOICES


def new_param(shape: Sequence[int], dtype=ms.float32, ones: bool = False) -> Parameter:
    return Parameter(initializer(One() if ones else Zero(), tuple(shape), dtype), requires_grad=False)


class Linear(nn.Cell):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_param((out_features, in_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)

    def heads(self, x: Tensor, heads: int, head_dim: int, parts: int):
        """A fused per-head projection cut into its `parts` (ops.linear_heads)."""
        return ops.linear_heads(x, self.weight, heads, head_dim, parts)


class QuantLinear(nn.Cell):
    """Linear with an int8 weight (out, in) and one scale per output channel (`weight_scale`, in the
    working dtype): y = x @ (weight * weight_scale)^T + bias (ops.quant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_param((out_features, in_features), ms.int8)
        self.weight_scale = new_param((out_features,), dtype, ones=True)
        self.bias = new_param((out_features,), dtype) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        return linear_int8(x, self.weight, self.weight_scale, self.bias)

    def heads(self, x: Tensor, heads: int, head_dim: int, parts: int):
        return ops.linear_heads(x, self.weight, heads, head_dim, parts, scale=self.weight_scale)


def make_linear(in_features: int, out_features: int, bias: bool = True, dtype=ms.float32, weights: str = "full"):
    """Linear (weights "full": the working dtype) or QuantLinear (weights "int8")."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights={weights!r}: use one of {', '.join(WEIGHTS_CHOICES)}")
    cls = QuantLinear if weights == "int8" else Linear
    return cls(in_features, out_features, bias=bias, dtype=dtype)


class LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_param((dim,), dtype, ones=True) if elementwise_affine else None
        self.bias = new_param((dim,), dtype) if elementwise_affine else None

    def construct(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_param((dim,), dtype, ones=True) if elementwise_affine else None

    def construct(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class EmbeddingTable(nn.Cell):
    """A lookup table with PyTorch's parameter name `weight` (vocab, dim)."""

    def __init__(self, vocab_size: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((vocab_size, dim), dtype)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.embedding(ids.astype(ms.int32), self.weight)


def count_parameters(cell: nn.Cell) -> int:
    total = 0
    for _, p in cell.parameters_and_names():
        n = 1
        for s in p.shape:
            n *= int(s)
        total += n
    return total
