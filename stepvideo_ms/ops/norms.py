"""Normalisations: layer norm, RMSNorm and group norm, computed in float32 on CPU."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm over the last axis (biased variance, as PyTorch), optional affine."""
    if is_ascend():
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
    if is_ascend() and weight is not None:
        return _rms_norm_ascend(x, weight, eps)
    dtype = x.dtype
    xf = x.astype(ms.float32)
    out = (xf * mint.rsqrt(mint.mean(xf * xf, dim=-1, keepdim=True) + eps)).astype(dtype)
    if weight is not None:
        out = out * weight
    return out


def _rms_norm_ascend(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # MindSpore 2.10: ops.rms_norm(x, gamma, epsilon) -> (y, rstd); its docstring announces the
    # signature rms_norm(input, normalized_shape, weight=None, eps) returning y alone. The keyword
    # call fails loudly (TypeError) under the new signature instead of misreading its result.
    result = ops.rms_norm(x, gamma=weight if weight.dtype == x.dtype else weight.astype(x.dtype), epsilon=float(eps))
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise RuntimeError(f"ops.rms_norm returned {type(result).__name__}, not (y, rstd): this MindSpore "
                           f"({ms.__version__}) changed its signature; update ops/norms.py")
    return result[0]


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Group norm over (N, C, ...), computed in float32 (on Ascend inside the kernel, which takes
    bfloat16 as it is: no float32 copies of the activations)."""
    if is_ascend():
        return mint.nn.functional.group_norm(x, num_groups, weight, bias, float(eps))
    dtype = x.dtype
    out = mint.nn.functional.group_norm(
        x.astype(ms.float32), num_groups,
        None if weight is None else weight.astype(ms.float32),
        None if bias is None else bias.astype(ms.float32), eps,
    )
    return out.astype(dtype)
