"""Strict emulators of the NPU-only MindSpore calls that the product's Ascend branches make.

Each emulator binds the call to the real MindSpore 2.10 signature (an unknown keyword raises
TypeError, as on the device), enforces the rules written in that function's docstring (dtypes,
layouts, shapes, mask polarity and shapes per `sparse_mode`) and computes the documented result in
float32, rounded to the output dtype as an NPU does.

Replaced: ops.flash_attention_score, ops.rms_norm, ops.conv3d (P.Conv3D: float16/float32 only),
mint.nn.functional.{layer_norm, group_norm, embedding, conv3d}, and the W8A16 matmul
ops.auto_generate.WeightQuantBatchMatmul (quant_matmul.py). What the product never calls
(dropout, TND layout, prefix and band sparse modes, ALiBi-compressed real_shift) is refused with
NotImplementedError rather than emulated loosely.
"""
from __future__ import annotations

import functools
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, ops

from .patching import bind, original, replace
from . import accounting, flash_attention

FLOATS = (ms.float16, ms.bfloat16, ms.float32)


def require_tensor(name: str, arg: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"For '{name}', '{arg}' must be a Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, arg: str, value: Tensor, allowed) -> None:
    if value.dtype not in allowed:
        raise TypeError(f"For '{name}', the dtype of '{arg}' must be one of "
                        f"{', '.join(str(d) for d in allowed)}, got {value.dtype}")


def _f32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.astype(ms.float32)


# ---------------------------------------------------------------------------------------------
# ops.rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)

def rms_norm_emulator(real):
    def rms_norm(*args, **kwargs):
        a = bind(real, "ops.rms_norm", args, kwargs)
        x = require_tensor("rms_norm", "x", a["x"])
        gamma = require_tensor("rms_norm", "gamma", a["gamma"])
        eps = a["epsilon"]
        require_dtype("rms_norm", "x", x, FLOATS)
        require_dtype("rms_norm", "gamma", gamma, FLOATS)
        if gamma.dtype != x.dtype:
            raise TypeError(f"For 'rms_norm', gamma ({gamma.dtype}) must have the dtype of x ({x.dtype})")
        if not isinstance(eps, float) or not 0 < eps <= 1:
            raise ValueError(f"For 'rms_norm', 'epsilon' must be a float in (0, 1], got {eps!r}")
        if gamma.ndim > x.ndim:
            raise ValueError(f"For 'rms_norm', gamma{tuple(gamma.shape)} has a larger rank than x{tuple(x.shape)}")
        if gamma.ndim and tuple(x.shape[-gamma.ndim:]) != tuple(gamma.shape):
            raise ValueError(f"For 'rms_norm', gamma{tuple(gamma.shape)} must match the last axes of x{tuple(x.shape)}")
        axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
        xf = x.astype(ms.float32)
        rstd = mint.rsqrt(mint.mean(xf * xf, dim=axes, keepdim=True) + eps)
        return (xf * rstd * gamma.astype(ms.float32)).astype(x.dtype), rstd
    return rms_norm


def _check_eps(op: str, eps) -> None:
    if not isinstance(eps, float):
        raise TypeError(f"For '{op}', 'eps' must be a float, got {eps!r}")


def _check_affine(op: str, a, shape) -> None:
    """The optional `weight` and `bias` of a norm are tensors of exactly `shape`."""
    for arg in ("weight", "bias"):
        if a[arg] is not None and tuple(require_tensor(op, arg, a[arg]).shape) != tuple(shape):
            raise ValueError(f"For '{op}', {arg}{tuple(a[arg].shape)} must have the shape {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# mint.nn.functional.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05)

def layer_norm_emulator(real):
    def layer_norm(*args, **kwargs):
        a = bind(real, "mint.nn.functional.layer_norm", args, kwargs)
        x = require_tensor("layer_norm", "input", a["input"])
        shape = a["normalized_shape"]
        if isinstance(shape, int):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
            raise TypeError(f"For 'layer_norm', 'normalized_shape' must be an int, tuple or list, got {shape!r}")
        _check_eps("layer_norm", a["eps"])
        require_dtype("layer_norm", "input", x, FLOATS)
        n = len(shape)
        if tuple(x.shape[x.ndim - n:]) != tuple(shape):
            raise ValueError(f"For 'layer_norm', normalized_shape {tuple(shape)} is not the end of input{tuple(x.shape)}")
        _check_affine("layer_norm", a, tuple(shape))
        axes = tuple(range(x.ndim - n, x.ndim))
        xf = x.astype(ms.float32)
        centred = xf - mint.mean(xf, dim=axes, keepdim=True)
        out = centred * mint.rsqrt(mint.mean(centred * centred, dim=axes, keepdim=True) + a["eps"])
        if a["weight"] is not None:
            out = out * _f32(a["weight"])
        if a["bias"] is not None:
            out = out + _f32(a["bias"])
        return out.astype(x.dtype)
    return layer_norm


# ---------------------------------------------------------------------------------------------
# mint.nn.functional.group_norm(input, num_groups, weight=None, bias=None, eps=1e-05)

def group_norm_emulator(real):
    def group_norm(*args, **kwargs):
        a = bind(real, "mint.nn.functional.group_norm", args, kwargs)
        x = require_tensor("group_norm", "input", a["input"])
        groups = a["num_groups"]
        if not isinstance(groups, int) or isinstance(groups, bool):
            raise TypeError(f"For 'group_norm', 'num_groups' must be an int, got {groups!r}")
        _check_eps("group_norm", a["eps"])
        if groups < 1 or x.ndim < 2 or x.shape[1] % groups:
            raise ValueError(f"For 'group_norm', num_groups={groups} must be >= 1 and divide the channels of input{tuple(x.shape)}")
        require_dtype("group_norm", "input", x, FLOATS)
        _check_affine("group_norm", a, (x.shape[1],))
        out = real(x.astype(ms.float32), groups, _f32(a["weight"]), _f32(a["bias"]), a["eps"])
        return out.astype(x.dtype)
    return group_norm


# ---------------------------------------------------------------------------------------------
# mint.nn.functional.embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, ...)

def embedding_emulator(real):
    def embedding(*args, **kwargs):
        a = bind(real, "mint.nn.functional.embedding", args, kwargs)
        ids = require_tensor("embedding", "input", a["input"])
        table = require_tensor("embedding", "weight", a["weight"])
        require_dtype("embedding", "input", ids, (ms.int32, ms.int64))
        if table.ndim != 2:
            raise ValueError(f"For 'embedding', weight must be 2-D, got {tuple(table.shape)}")
        if a["max_norm"] is not None or a["scale_grad_by_freq"]:
            raise NotImplementedError("the simulation does not emulate embedding's max_norm / scale_grad_by_freq")
        vocab = table.shape[0]
        if a["padding_idx"] is not None and not -vocab <= a["padding_idx"] < vocab:
            raise ValueError(f"For 'embedding', padding_idx={a['padding_idx']} is out of [-{vocab}, {vocab})")
        index = ids.asnumpy()
        if index.size and (index.min() < 0 or index.max() >= vocab):
            raise ValueError(f"For 'embedding', ids must lie in [0, {vocab}) (on Ascend others give "
                             f"unpredictable rows), got [{index.min()}, {index.max()}]")
        return original(ops.gather)(table.astype(ms.float32), ids, 0).astype(table.dtype)
    return embedding


# ---------------------------------------------------------------------------------------------
# ops.conv3d (P.Conv3D: "input data type only support float16 and float32") and
# mint.nn.functional.conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)

def ops_conv3d_emulator(real):
    def conv3d(*args, **kwargs):
        a = bind(real, "ops.conv3d", args, kwargs)
        for arg in ("input", "weight"):
            require_dtype("Conv3D", arg, require_tensor("conv3d", arg, a[arg]), (ms.float16, ms.float32))
        return real(**a)
    return conv3d


def _triple(name: str, value, what: str):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return tuple(value)
    if isinstance(value, (tuple, list)):
        raise ValueError(f"For '{name}', '{what}' must have 3 ints, got {value!r}")
    raise TypeError(f"For '{name}', '{what}' must be an int, tuple or list, got {value!r}")


def mint_conv3d_emulator(real):
    def conv3d(*args, **kwargs):
        a = bind(real, "mint.nn.functional.conv3d", args, kwargs)
        x = require_tensor("conv3d", "input", a["input"])
        w = require_tensor("conv3d", "weight", a["weight"])
        require_dtype("conv3d", "input", x, FLOATS)
        if w.dtype != x.dtype:
            raise TypeError(f"For 'conv3d', weight ({w.dtype}) must have the dtype of input ({x.dtype})")
        if x.ndim != 5 or w.ndim != 5:
            raise ValueError(f"For 'conv3d', input and weight must be 5-D here, got {tuple(x.shape)} and {tuple(w.shape)}")
        bias = a["bias"]
        if bias is not None:
            require_tensor("conv3d", "bias", bias)
            if tuple(bias.shape) != (w.shape[0],):
                raise ValueError(f"For 'conv3d', bias{tuple(bias.shape)} must be ({w.shape[0]},)")
        if not isinstance(a["groups"], int):
            raise TypeError(f"For 'conv3d', 'groups' must be an int, got {a['groups']!r}")
        stride = _triple("conv3d", a["stride"], "stride")
        dilation = _triple("conv3d", a["dilation"], "dilation")
        padding = a["padding"]
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"For 'conv3d', padding must be 'same' or 'valid' as a string, got {padding!r}")
            if padding == "same":
                raise NotImplementedError("the simulation does not emulate padding='same'")
            padding = (0, 0, 0)
        padding = _triple("conv3d", padding, "padding")
        if dilation != (1, 1, 1) or a["groups"] != 1:
            raise NotImplementedError("the simulation emulates conv3d with dilation 1 and groups 1 only")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"For 'conv3d', input has {x.shape[1]} channels, weight{tuple(w.shape)} expects {w.shape[1]}")
        out = conv3d_float32(x, w, bias, stride, padding)
        return Tensor(out).astype(x.dtype)
    return conv3d


def conv3d_float32(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding) -> np.ndarray:
    """The emulated kernel's arithmetic: a float32 convolution of the device's own, independent of the
    product's CPU conv (numpy windows and one BLAS product per output frame, to bound the memory)."""
    xa = np.pad(x.astype(ms.float32).asnumpy(), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    wa = w.astype(ms.float32).asnumpy()
    kernel = wa.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(xa, kernel, axis=(2, 3, 4))
    windows = windows[:, :, ::stride[0], ::stride[1], ::stride[2]]  # (N, C, To, Ho, Wo, kt, kh, kw)
    frames = [np.tensordot(windows[:, :, t], wa, axes=([1, 4, 5, 6], [1, 2, 3, 4]))  # (N, Ho, Wo, Co)
              for t in range(windows.shape[2])]
    out = np.stack(frames, axis=1).transpose(0, 4, 1, 2, 3)  # (N, Co, To, Ho, Wo)
    if bias is not None:
        out = out + bias.astype(ms.float32).asnumpy().reshape(1, -1, 1, 1, 1)
    return np.ascontiguousarray(out, dtype=np.float32)




# (owner, name) -> emulator factory (given the real function)
EMULATORS = (
    (ops, "flash_attention_score", flash_attention.emulator),
    (ops, "rms_norm", rms_norm_emulator),
    (ops, "conv3d", ops_conv3d_emulator),
    (mint.nn.functional, "layer_norm", layer_norm_emulator),
    (mint.nn.functional, "group_norm", group_norm_emulator),
    (mint.nn.functional, "embedding", embedding_emulator),
    (mint.nn.functional, "conv3d", mint_conv3d_emulator),
)


def _as_device_work(emulator):
    """The emulator's own host reads (mask and index checks) are not the product's host syncs."""
    @functools.wraps(emulator)
    def run(*args, **kwargs):
        with accounting.internal():
            return emulator(*args, **kwargs)
    return run


def install() -> None:
    for owner, name, factory in EMULATORS:
        replace(owner, name, lambda real, make=factory: _as_device_work(make(real)))
