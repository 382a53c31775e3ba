"""CPU only: numpy as a kernel library beside MindSpore's, through zero-copy views.

On the CPU backend a contiguous Tensor and a numpy array can share memory both ways
(`Tensor.asnumpy()` returns a view of the tensor's storage that keeps it alive,
`Tensor.from_numpy` wraps an array's buffer and keeps the array alive), so handing work to numpy
costs no copy. Two kinds of work are much faster there on MindSpore 2.10's CPU backend:

- layout copies: making a permuted (strided) tensor contiguous runs ~25x slower in MindSpore than
  numpy's transposing copy (a (2, 2048, 8, 128) float32 head transpose: ~190 ms against ~8 ms);
- dense products: numpy's BLAS (OpenBLAS, multithreaded) takes transposed operands as they are.

Only dtypes numpy has take this path; bfloat16 (which numpy lacks) and float16 products (no BLAS
kernel for half precision) stay on MindSpore's kernels. On Ascend (and under its simulation) the
gates below say no, so a device tensor never goes to numpy, whichever branch asks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..runtime import is_ascend

# numpy has no bfloat16; everything else MindSpore's CPU path holds has a numpy twin
_NO_NUMPY = (ms.bfloat16,)
# dtypes numpy multiplies through BLAS (float16 products run in a slow generic loop)
_BLAS = (ms.float32, ms.float64)


def has_numpy(*tensors: Tensor) -> bool:
    """True on CPU when every tensor's dtype exists in numpy (so it can be viewed there)."""
    return not is_ascend() and all(t.dtype not in _NO_NUMPY for t in tensors)


def blas_ready(*tensors: Tensor) -> bool:
    """True on CPU when numpy multiplies these tensors through BLAS (float32/float64, all one dtype)."""
    return not is_ascend() and all(t.dtype in _BLAS for t in tensors) and len({t.dtype for t in tensors}) == 1


def view(t: Tensor) -> np.ndarray:
    """The tensor's storage as a numpy array (no copy when the tensor is contiguous)."""
    return t.asnumpy()


def wrap(a: np.ndarray) -> Tensor:
    """A tensor on the array's buffer (a contiguous copy first only if the array is strided)."""
    return Tensor.from_numpy(np.ascontiguousarray(a))


def permute(t: Tensor, axes: Sequence[int]) -> Tensor:
    """`t` with its axes permuted, as a contiguous tensor: numpy's transposing copy where the dtype
    allows, else MindSpore's permute made contiguous."""
    axes = tuple(int(a) for a in axes)
    if axes == tuple(range(t.ndim)):
        return t
    if not has_numpy(t):
        return mint.permute(t, axes).contiguous()
    return wrap(np.transpose(view(t), axes))


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """a @ b (or a @ b^T) of float32/float64 tensors through numpy's BLAS; leading axes batch."""
    if not blas_ready(a, b):
        raise TypeError(f"host.matmul takes float32/float64 operands of one dtype, got {a.dtype} and {b.dtype}")
    bv = view(b)
    return wrap(np.matmul(view(a), np.swapaxes(bv, -1, -2) if transpose_b else bv))
