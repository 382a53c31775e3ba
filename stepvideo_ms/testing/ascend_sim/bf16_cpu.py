"""bfloat16 on the CPU backend: compute in float32, round the result to bfloat16.

MindSpore's CPU kernels reject bfloat16 for matmul, softmax, reductions, exp/sqrt/rsqrt/sin/cos,
gelu/silu/sigmoid, comparisons, gather, pad, interpolate, masked_fill... (measured with 2.10:
"Select CPU operator[MatMul] fail! Unsupported data type!"). An NPU runs those in bfloat16 with
float32 accumulation and one rounding of the result, so under the simulation each of these calls
takes its bfloat16 inputs to float32, runs the real CPU kernel and rounds its floating results to
bfloat16. Calls without a bfloat16 input are passed through untouched, so the float32 policy
(and HunyuanCLIP, float32 as upstream) runs exactly as on CPU.

Elementwise add/sub/mul/div, slicing, reshape, permute, cat, split and casts have bfloat16 CPU
kernels from MindSpore 2.9 on and are left alone: they round after every op, as the NPU does. Older
versions (2.7, 2.8) refuse bfloat16 in mul, div, neg, zeros, copy_, an even split...: where
capabilities.cpu_bf16_elementwise() says so, those calls are widened too (one elementwise op in
float32 rounded once to bfloat16 is the bfloat16 op's result), creations in bfloat16 are made in
float32 and cast, and an in-place copy into a bfloat16 tensor assigns its value.
"""
from __future__ import annotations

import functools
from typing import Callable, Tuple

import mindspore as ms
from mindspore import Tensor, mint, ops

from .patching import replace

# (module, names): the calls our code reaches whose CPU kernels have no bfloat16 path.
_MINT = ("matmul", "bmm", "softmax", "mean", "sum", "rsqrt", "sqrt", "exp", "cos", "sin", "clamp", "tanh",
         "sigmoid", "abs", "max", "min", "erf", "log", "where", "logical_not", "gt", "lt", "ge", "le", "eq")
_MINT_F = ("linear", "silu", "softmax", "group_norm", "interpolate", "relu", "sigmoid")
_OPS = ("gelu", "gather", "pad", "interpolate", "bias_add", "stack", "tile", "batch_norm", "softmax", "silu",
        "sigmoid", "tanh", "exp", "erf", "cumsum")
# Tensor methods and operators (the Python Tensor class shadows the C++ ones).
_TENSOR = ("masked_fill", "sum", "mean", "max", "min", "__rsub__", "__pow__", "__gt__", "__lt__", "__ge__",
           "__le__", "__getitem__", "abs", "exp", "sqrt", "rsqrt")


def _widen(value) -> Tuple[object, bool]:
    """bfloat16 tensors (also inside lists and tuples) -> float32; says whether any was found."""
    if isinstance(value, Tensor):
        if value.dtype == ms.bfloat16:
            return value.astype(ms.float32), True
        return value, False
    if isinstance(value, (list, tuple)):
        items, found = [], False
        for item in value:
            new, hit = _widen(item)
            items.append(new)
            found |= hit
        return (type(value)(items) if found else value), found
    return value, False


def _round(value):
    """float32 results -> bfloat16 (booleans, integers and indices are left as they are)."""
    if isinstance(value, Tensor):
        return value.astype(ms.bfloat16) if value.dtype == ms.float32 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_round(v) for v in value)
    return value


def in_float32(fn: Callable) -> Callable:
    """fn computing in float32 when given bfloat16 tensors, its result rounded to bfloat16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wide_args, hit_args = _widen(args)
        wide_kwargs, hit_kwargs = {}, False
        for key, value in kwargs.items():
            wide_kwargs[key], hit = _widen(value)
            hit_kwargs |= hit
        if not (hit_args or hit_kwargs):
            return fn(*args, **kwargs)
        return _round(fn(*wide_args, **wide_kwargs))

    return wrapper


def _tensor_getitem(original: Callable) -> Callable:
    """Indexing by a tensor is a gather (no bfloat16 kernel); slicing keeps its bfloat16 kernel."""
    wide = in_float32(original)

    @functools.wraps(original)
    def getitem(self, index):
        if self.dtype == ms.bfloat16 and _has_tensor(index):
            return wide(self, index)
        return original(self, index)

    return getitem


def _has_tensor(index) -> bool:
    if isinstance(index, Tensor):
        return True
    return isinstance(index, tuple) and any(isinstance(i, Tensor) for i in index)


# Without bfloat16 elementwise CPU kernels (MindSpore before 2.9): these too.
_OLD_MINT = ("mul", "div", "neg", "square", "pow", "stack", "narrow", "split", "chunk", "tile", "erf", "tanh",
             "lerp", "addcmul", "maximum", "minimum")
_OLD_OPS = ("mul", "div", "neg", "square", "split", "chunk", "tile")
_OLD_TENSOR = ("__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__", "__imul__", "__itruediv__", "square",
               "pow", "tile", "split", "chunk", "narrow", "mul", "div", "neg", "tanh", "erf")
_CREATIONS = ("zeros", "ones", "full")


def _create_in_float32(fn: Callable) -> Callable:
    """mint.zeros / ones / full with dtype=bfloat16: made in float32, then cast (exact)."""

    @functools.wraps(fn)
    def create(*args, **kwargs):
        if kwargs.get("dtype") == ms.bfloat16:
            return fn(*args, **dict(kwargs, dtype=ms.float32)).astype(ms.bfloat16)
        return fn(*args, **kwargs)

    return create


def _copy_by_assign(real: Callable) -> Callable:
    """Tensor.copy_ into a bfloat16 tensor: the value assigned (no bfloat16 copy kernel)."""

    @functools.wraps(real)
    def copy_(self, src, *args, **kwargs):
        if self.dtype == ms.bfloat16 and isinstance(src, Tensor):
            self.assign_value(src if src.dtype == self.dtype else src.astype(self.dtype))
            return self
        return real(self, src, *args, **kwargs)

    return copy_


def install() -> None:
    from ...capabilities import cpu_bf16_elementwise

    if not cpu_bf16_elementwise():
        _install_elementwise()
    for owner, names in ((mint, _MINT), (mint.nn.functional, _MINT_F), (ops, _OPS)):
        for name in names:
            if hasattr(owner, name):
                replace(owner, name, in_float32)
    for name in _TENSOR:
        if name == "__getitem__":
            replace(Tensor, name, _tensor_getitem)
        elif hasattr(Tensor, name):
            replace(Tensor, name, in_float32)


def _install_elementwise() -> None:
    for owner, names in ((mint, _OLD_MINT), (ops, _OLD_OPS)):
        for name in names:
            replace(owner, name, in_float32, optional=True)
    for name in _OLD_TENSOR:
        replace(Tensor, name, in_float32, optional=True)
    for name in _CREATIONS:
        replace(mint, name, _create_in_float32, optional=True)
    replace(Tensor, "copy_", _copy_by_assign)
