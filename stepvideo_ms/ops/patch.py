"""Patch embedding: a conv2d whose kernel equals its stride, computed as one matmul."""
from typing import Optional

from mindspore import Tensor, mint

from .linear import linear


def patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Conv2d(kernel=stride=p) of x (n, c, h, w) by weight (d, c, p, p), flattened to (n, h/p*w/p, d).

    A non-overlapping convolution is a matmul over the patches; written this way it is exact and
    fast on every backend (the native CPU conv is slow, see the CPU notes).
    """
    n, c, h, w = x.shape
    d, wc, p, q = weight.shape
    if wc != c or p != q:
        raise ValueError(f"patch_embed: weight {tuple(weight.shape)} does not fit input channels {c}")
    if h % p or w % p:
        raise ValueError(f"patch_embed: height {h} and width {w} must be multiples of the patch size {p}")
    if p == 1:
        patches = mint.permute(x.reshape(n, c, h * w), (0, 2, 1))
    else:
        patches = x.reshape(n, c, h // p, p, w // p, p)
        patches = mint.permute(patches, (0, 2, 4, 1, 3, 5)).reshape(n, (h // p) * (w // p), c * p * p)
    return linear(patches, weight.reshape(d, c * p * p), bias)
