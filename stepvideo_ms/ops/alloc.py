"""An uninitialised buffer (mint.empty), where the backend has the kernel; zeros where it does not.

MindSpore 2.7.0's mint.empty runs on Ascend only (on CPU it asks for the Ascend plugin): there the
buffer is made with zeros, which callers overwrite or slice away all the same.
"""
from __future__ import annotations

from typing import Sequence

from mindspore import Tensor, mint

from .. import capabilities, runtime


def empty(shape: Sequence[int], dtype) -> Tensor:
    if capabilities.empty_kernel(runtime.device_name()):
        return mint.empty(tuple(shape), dtype=dtype)
    return mint.zeros(tuple(shape), dtype=dtype)
