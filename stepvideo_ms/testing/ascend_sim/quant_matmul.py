"""Strict emulator of `mindspore.ops.auto_generate.WeightQuantBatchMatmul` (the W8A16 matmul).

The real one is a Primitive: `WeightQuantBatchMatmul(transpose_x=False, transpose_weight=False,
antiquant_group_size=0)`, called as `(x, weight, antiquant_scale, antiquant_offset=None,
quant_scale=None, quant_offset=None, bias=None)`; MindSpore 2.10 has no kernel for it but on
Ascend (CANN aclnnWeightQuantBatchMatmulV2). Both calls are bound to those real signatures and
the documented rules of the A2 kernel are enforced:
- x 2-D (m, k), float16 or bfloat16; weight 2-D int8, (k, n), or (n, k) with transpose_weight;
- k and n within [1, 65535];
- antiquant_scale in the dtype of x, shape (n,) or (1, n) per channel (or (1,) per tensor);
  antiquant_offset, when given, the dtype and shape of antiquant_scale;
- bias (n,), float32 when x is bfloat16, float16 when x is float16.
Result: x @ ((weight + offset) * scale) + bias, computed in float32, rounded to the dtype of x.
What the product never uses (groups, output quantization by quant_scale / quant_offset, int64
scales) is refused with NotImplementedError rather than emulated loosely.
"""
from __future__ import annotations

import inspect

import mindspore as ms
from mindspore import Tensor, mint

from .npu_ops import _as_device_work, require_dtype, require_tensor
from .patching import bind_signature, original, replace

NAME = "WeightQuantBatchMatmul"
MAX_DIM = 65535


def _check_quant_param(arg: str, value: Tensor, x: Tensor, n: int) -> None:
    require_tensor(NAME, arg, value)
    if value.dtype != x.dtype:
        if value.dtype in (ms.int64, ms.uint64):
            raise NotImplementedError(f"the simulation does not emulate {arg} of dtype {value.dtype}")
        raise TypeError(f"For '{NAME}', {arg} ({value.dtype}) must have the dtype of x ({x.dtype})")
    if tuple(value.shape) not in ((n,), (1, n), (1,)):
        raise ValueError(f"For '{NAME}', {arg}{tuple(value.shape)} must be ({n},) or (1, {n}) per channel "
                         "(or (1,) per tensor)")


class _Emulated:
    def __init__(self, real_call: inspect.Signature, transpose_x: bool, transpose_weight: bool, group_size: int):
        self._call = real_call
        self.transpose_x, self.transpose_weight, self.antiquant_group_size = transpose_x, transpose_weight, group_size

    def __call__(self, *args, **kwargs):
        a = bind_signature(self._call, NAME, args, kwargs)
        x = require_tensor(NAME, "x", a["x"])
        w = require_tensor(NAME, "weight", a["weight"])
        require_dtype(NAME, "x", x, (ms.float16, ms.bfloat16))
        require_dtype(NAME, "weight", w, (ms.int8,))
        if x.ndim != 2 or w.ndim != 2:
            raise ValueError(f"For '{NAME}', x and weight must be 2-D, got x{tuple(x.shape)} weight{tuple(w.shape)}")
        m, k = (x.shape[1], x.shape[0]) if self.transpose_x else tuple(x.shape)
        n, kw = tuple(w.shape) if self.transpose_weight else (w.shape[1], w.shape[0])
        if kw != k:
            raise ValueError(f"For '{NAME}', x{tuple(x.shape)} has k={k} but weight{tuple(w.shape)} has k={kw} "
                             f"(transpose_x={self.transpose_x}, transpose_weight={self.transpose_weight})")
        for dim, value in (("k", k), ("n", n)):
            if not 1 <= value <= MAX_DIM:
                raise ValueError(f"For '{NAME}', {dim}={value} must lie in [1, {MAX_DIM}]")
        if a["quant_scale"] is not None or a["quant_offset"] is not None:
            raise NotImplementedError("the simulation does not emulate the output quantization (quant_scale)")
        scale = a["antiquant_scale"]
        _check_quant_param("antiquant_scale", scale, x, n)
        offset = a["antiquant_offset"]
        if offset is not None:
            _check_quant_param("antiquant_offset", offset, x, n)
            if tuple(offset.shape) != tuple(scale.shape):
                raise ValueError(f"For '{NAME}', antiquant_offset{tuple(offset.shape)} must have the shape of "
                                 f"antiquant_scale{tuple(scale.shape)}")
        bias = a["bias"]
        if bias is not None:
            require_tensor(NAME, "bias", bias)
            want = ms.float32 if x.dtype == ms.bfloat16 else ms.float16
            if bias.dtype != want:
                raise TypeError(f"For '{NAME}', bias must be {want} when x is {x.dtype}, got {bias.dtype}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"For '{NAME}', bias{tuple(bias.shape)} must be ({n},)")
        # weight as (n, k) in float32, dequantized per output channel
        wf = w.astype(ms.float32) if self.transpose_weight else w.astype(ms.float32).T
        per_channel = scale.astype(ms.float32).reshape(-1, 1)
        if offset is not None:
            wf = wf + offset.astype(ms.float32).reshape(-1, 1)
        wf = wf * per_channel
        xf = x.astype(ms.float32).T if self.transpose_x else x.astype(ms.float32)
        out = original(mint.matmul)(xf, wf.T)
        if bias is not None:
            out = out + bias.astype(ms.float32)
        return out.astype(x.dtype)


def emulator(real_cls):
    init = inspect.signature(real_cls)
    call = inspect.signature(real_cls.__call__)
    call = call.replace(parameters=list(call.parameters.values())[1:])  # without self

    def WeightQuantBatchMatmul(*args, **kwargs):  # noqa: N802 - the real name
        a = bind_signature(init, NAME, args, kwargs)
        for flag in ("transpose_x", "transpose_weight"):
            if not isinstance(a[flag], bool):
                raise TypeError(f"For '{NAME}', '{flag}' must be a bool, got {a[flag]!r}")
        group = a["antiquant_group_size"]
        if not isinstance(group, int) or isinstance(group, bool):
            raise TypeError(f"For '{NAME}', 'antiquant_group_size' must be an int, got {group!r}")
        if group != 0:
            raise NotImplementedError("the simulation emulates per-channel / per-tensor scales only "
                                      "(antiquant_group_size=0)")
        return _Emulated(call, a["transpose_x"], a["transpose_weight"], group)

    return WeightQuantBatchMatmul


def install() -> None:
    """Replace the primitive on its module (ops/linear.py looks it up there at first use)."""
    from mindspore.ops import auto_generate

    replace(auto_generate, NAME, lambda real: _as_device_work(emulator(real)))
