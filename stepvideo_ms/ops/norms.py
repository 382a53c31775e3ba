"""Normalisations: layer norm, RMSNorm and group norm, computed in float32 on CPU."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm over the last axis (biased variance, as PyTorch), optional affine."""
    if is_ascend():  # pragma: no cover - needs an NPU
        return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    dtype = x.dtype
    xf = x.astype(ms.float32)
    mean = mint.mean(xf, dim=-1, keepdim=True)
    centred = xf - mean
    var = mint.mean(centred * centred, dim=-1, keepdim=True)
    out = centred * mint.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.astype(ms.float32)
    if bias is not None:
        out = out + bias.astype(ms.float32)
    return out.astype(dtype)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps), in float32, cast back, then scaled by `weight`."""
    if is_ascend() and weight is not None:  # pragma: no cover - needs an NPU
        return ops.rms_norm(x, weight.astype(x.dtype), eps)[0]
    dtype = x.dtype
    xf = x.astype(ms.float32)
    out = (xf * mint.rsqrt(mint.mean(xf * xf, dim=-1, keepdim=True) + eps)).astype(dtype)
    if weight is not None:
        out = out * weight
    return out


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Group norm over (N, C, ...) in float32."""
    dtype = x.dtype
    out = mint.nn.functional.group_norm(
        x.astype(ms.float32), num_groups,
        None if weight is None else weight.astype(ms.float32),
        None if bias is None else bias.astype(ms.float32), eps,
    )
    return out.astype(dtype)
