"""Normalisations: layer norm, RMSNorm and group norm, computed in float32 on CPU.

CPU, float32: RMSNorm and the modulated layer norm run in numpy on zero-copy views (`host`); the
same arithmetic through MindSpore's CPU elementwise kernels costs 2-4x the CPU time.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host
from .broadcast import expand


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm over the last axis (biased variance, as PyTorch), optional affine."""
    if is_ascend():
        return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _layer_norm_cpu(x, weight, bias, eps)


def modulated_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor,
                         shift: Tensor, eps: float) -> Tensor:
    """layer_norm(x) * (1 + scale) + shift (adaLN modulation): x (b, n, D), scale and shift (b, 1, D)."""
    if is_ascend():  # pragma: no cover - needs an NPU
        return layer_norm(x, weight, bias, eps) * (1 + scale) + shift
    # CPU: the modulation folds into the layer norm's own scale and shift, one fused call per sample
    dim = x.shape[-1]
    scale = scale.reshape(-1, dim).astype(ms.float32)
    shift = shift.reshape(-1, dim).astype(ms.float32)
    if scale.shape[0] != shift.shape[0] or scale.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"modulated_layer_norm: scale{tuple(scale.shape)} and shift{tuple(shift.shape)} must "
                         f"have one row per sample of x{tuple(x.shape)} (or one row)")
    if host.blas_ready(x, scale, shift, *(p for p in (weight, bias) if p is not None)) and x.ndim == 3:
        return _modulated_layer_norm_host(x, weight, bias, scale, shift, eps)
    gain = 1 + scale
    gamma = gain if weight is None else gain * weight.astype(ms.float32)
    beta = shift if bias is None else shift + gain * bias.astype(ms.float32)
    if scale.shape[0] == 1:
        return _layer_norm_cpu(x, gamma[0], beta[0], eps)
    outs = [_layer_norm_cpu(x[i], gamma[i], beta[i], eps) for i in range(x.shape[0])]
    return ops.stack(outs, axis=0)


def _modulated_layer_norm_host(x, weight, bias, scale, shift, eps) -> Tensor:
    """numpy: (x - mean) / sqrt(var + eps) * gamma + beta, gamma = (1 + scale) * weight, beta = shift + (1 + scale) * bias."""
    xn = host.view(x)
    gain = 1 + host.view(scale)[:, None, :]  # (1 or b, 1, D)
    shift_n = host.view(shift)[:, None, :]
    gamma = gain if weight is None else gain * host.view(weight)
    beta = shift_n if bias is None else shift_n + gain * host.view(bias)
    out = xn - xn.mean(axis=-1, keepdims=True)
    inv = _inverse_rms(out, eps)
    out *= inv[..., None]
    out *= gamma
    out += beta
    return host.wrap(out)


def _inverse_rms(x: np.ndarray, eps: float) -> np.ndarray:
    """1 / sqrt(mean(x^2, last axis) + eps), in x's dtype."""
    inv = np.einsum("...i,...i->...", x, x)
    inv /= x.shape[-1]
    inv += eps
    np.sqrt(inv, out=inv)
    return np.reciprocal(inv, out=inv)


def _layer_norm_cpu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """MindSpore's fused LayerNorm kernel (one pass; the composed form is several times slower)."""
    dtype, dim = x.dtype, x.shape[-1]
    xf = x if dtype == ms.float32 else x.astype(ms.float32)
    gamma = mint.ones((dim,), dtype=ms.float32) if weight is None else _f32(weight)
    beta = mint.zeros((dim,), dtype=ms.float32) if bias is None else _f32(bias)
    out = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)(xf, gamma, beta)[0]
    return out if dtype == ms.float32 else out.astype(dtype)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == ms.float32 else t.astype(ms.float32)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps), in float32, cast back, then scaled by `weight`."""
    if is_ascend() and weight is not None:
        return _rms_norm_ascend(x, weight, eps)
    if host.blas_ready(x, *(() if weight is None else (weight,))):
        xn = host.view(x)
        out = xn * _inverse_rms(xn, eps)[..., None]
        if weight is not None:
            out *= host.view(weight)
        return host.wrap(out)
    dtype = x.dtype
    xf = _f32(x)
    # CPU: every product is between equal shapes (broadcasting kernels are slow there, see broadcast.py)
    inv = mint.rsqrt(mint.mean(xf * xf, dim=-1, keepdim=True) + eps)
    out = xf * expand(inv, xf.shape)
    if dtype != ms.float32:
        out = out.astype(dtype)
    if weight is not None:
        out = out * expand(weight, out.shape)
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
