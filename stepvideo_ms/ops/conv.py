"""3D and 2D convolution: the native kernel on Ascend, matmul-based on CPU.

MindSpore's CPU `ops.conv3d` runs at about 1 GFLOP/s (see the CPU notes), so the CPU path
rewrites a convolution as matrix products:

- the input goes channels-last and zero-padded, then flattened to rows (frames*rows*cols, C);
- in that flat layout every kernel tap (a, b, c) is ONE contiguous row offset
  a*Hp*Wp + b*Wp + c, so the im2col matrix is a concatenation of contiguous row slices
  (cheap memory copies, unlike strided slicing) and the convolution is one matmul per tile;
- outputs are computed on the padded grid (Hp x Wp) and the columns past the valid width/height
  are cropped once at the end;
- a strided convolution is first turned into a stride-1 one by splitting the input into its
  stride phases (space-to-depth): kernel k with stride s becomes kernel ceil(k/s) over s^3*C
  channels, the weight rearranged with zeros where the phase has no tap;
- the im2col matrix is built in tiles of rows so it never exceeds `max_cols_bytes`.

Padding is explicit zero padding per side, so causal (front-only) temporal padding is one
call: padding=((2, 0), (1, 1), (1, 1)).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend

# Upper bound on one im2col tile on CPU (float32 bytes).
DEFAULT_MAX_COLS_BYTES = 96 * 1024 * 1024

IntOrSeq = Union[int, Sequence[int]]
PaddingSpec = Union[int, Sequence[int], Sequence[Sequence[int]]]
Pairs = Tuple[Tuple[int, int], ...]


def conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrSeq = 1,
    padding: PaddingSpec = 0,
    max_cols_bytes: int = DEFAULT_MAX_COLS_BYTES,
) -> Tensor:
    """Cross-correlation of x (N, C, T, H, W) with weight (Co, C, kt, kh, kw), plus bias (Co,).

    stride: int or (st, sh, sw).
    padding: zeros added to each side: int, (pt, ph, pw) (both sides) or
        ((t_front, t_back), (h_top, h_bottom), (w_left, w_right)).
    Returns (N, Co, To, Ho, Wo) in x's dtype.
    """
    strides = _as_tuple(stride, 3, "stride")
    pads = _as_pairs(padding, 3)
    _check(x, weight, bias, 5, strides, pads)
    if is_ascend():  # pragma: no cover - needs an NPU
        return conv3d_native(x, weight, bias, strides, pads)
    return _conv_matmul(x, weight, bias, strides, pads, max_cols_bytes)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrSeq = 1,
    padding: PaddingSpec = 0,
    max_cols_bytes: int = DEFAULT_MAX_COLS_BYTES,
) -> Tensor:
    """Cross-correlation of x (N, C, H, W) with weight (Co, C, kh, kw); arguments as `conv3d`."""
    strides = _as_tuple(stride, 2, "stride")
    pads = _as_pairs(padding, 2)
    _check(x, weight, bias, 4, strides, pads)
    if is_ascend():  # pragma: no cover - needs an NPU
        if pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1]:
            x = ops.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
            return ops.conv2d(x, weight, bias, stride=strides, pad_mode="valid")
        return ops.conv2d(x, weight, bias, stride=strides, pad_mode="pad", padding=(pads[0][0], pads[1][0]))
    out = _conv_matmul(x.expand_dims(2), weight.expand_dims(2), bias, (1,) + strides, ((0, 0),) + pads,
                       max_cols_bytes)
    return out.squeeze(2)


def conv3d_native(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: IntOrSeq = 1,
                  padding: PaddingSpec = 0) -> Tensor:
    """The backend's own conv3d with the same arguments as `conv3d` (the reference on CPU)."""
    strides = _as_tuple(stride, 3, "stride")
    pads = _as_pairs(padding, 3)
    if any(lo != hi for lo, hi in pads):
        x = ops.pad(x, (pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        pads = ((0, 0),) * 3
    if all(lo == 0 for lo, _ in pads):
        return ops.conv3d(x, weight, bias, stride=strides, pad_mode="valid")
    return ops.conv3d(x, weight, bias, stride=strides, pad_mode="pad", padding=tuple(lo for lo, _ in pads))


def output_size(size: int, kernel: int, stride: int, pad: Tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# argument handling


def _as_tuple(value: IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    out = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != n or any(v < 1 for v in out):
        raise ValueError(f"{name}={value!r}: give a positive int or {n} positive ints")
    return out


def _as_pairs(padding: PaddingSpec, n: int) -> Pairs:
    if isinstance(padding, int):
        pairs = ((padding, padding),) * n
    else:
        items = list(padding)
        if len(items) != n:
            raise ValueError(f"padding={padding!r}: give an int, {n} ints or {n} (before, after) pairs")
        pairs = tuple((int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p) for p in items)
    if any(len(p) != 2 or p[0] < 0 or p[1] < 0 for p in pairs):
        raise ValueError(f"padding={padding!r}: pads must be non-negative (before, after) pairs")
    return pairs


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], ndim: int, strides, pads) -> None:
    kind = "conv3d" if ndim == 5 else "conv2d"
    if x.ndim != ndim or weight.ndim != ndim:
        raise ValueError(f"{kind}: x and weight must be {ndim}-D, got x{tuple(x.shape)} weight{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{kind}: x has {x.shape[1]} channels but weight{tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{kind}: bias{tuple(bias.shape)} must be ({weight.shape[0]},)")
    for size, k, s, p in zip(x.shape[2:], weight.shape[2:], strides, pads):
        if size + p[0] + p[1] < k:
            raise ValueError(f"{kind}: input {tuple(x.shape)} padded by {pads} is smaller than kernel "
                             f"{tuple(weight.shape[2:])}")


# ---------------------------------------------------------------------------------------------
# CPU: matmul over flat channels-last rows


def _conv_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], strides, pads, max_cols_bytes: int) -> Tensor:
    dtype = x.dtype
    x = x.astype(ms.float32)
    weight = weight.astype(ms.float32)
    bias = None if bias is None else bias.astype(ms.float32)
    n, c, *sizes = x.shape
    co, _, *kernel = weight.shape
    out_sizes = [output_size(s, k, st, p) for s, k, st, p in zip(sizes, kernel, strides, pads)]
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and all(p == (0, 0) for p in pads):
        out = mint.matmul(weight.reshape(co, c), x.reshape(n, c, -1))  # pointwise: no layout change
        if bias is not None:
            out = out + bias.reshape(co, 1)
        return out.reshape(n, co, *out_sizes).astype(dtype)
    coarse_kernel = [-(-k // s) for k, s in zip(kernel, strides)]
    wmat = _weight_matrix(weight, kernel, strides, coarse_kernel)  # (K, Co)
    outs = []
    for i in range(n):
        xcl = _phase_split(_pad_channels_last(mint.permute(x[i], (1, 2, 3, 0)), pads, kernel, strides, out_sizes),
                           strides)
        outs.append(_flat_conv(xcl, wmat, bias, coarse_kernel, out_sizes, max_cols_bytes))
    out = outs[0].expand_dims(0) if n == 1 else ops.stack(outs, axis=0)
    return out.astype(dtype)


def _weight_matrix(weight: Tensor, kernel, strides, coarse_kernel) -> Tensor:
    """(Co, C, kt, kh, kw) -> (K, Co), rows ordered (coarse tap t,h,w, phase t,h,w, channel)."""
    co, c = weight.shape[:2]
    grow = [ck * s - k for ck, s, k in zip(coarse_kernel, strides, kernel)]
    if any(grow):
        weight = ops.pad(weight, (0, grow[2], 0, grow[1], 0, grow[0]))  # taps no phase reaches are zero
    (kt, kh, kw), (st, sh, sw) = coarse_kernel, strides
    w = weight.reshape(co, c, kt, st, kh, sh, kw, sw)
    w = mint.permute(w, (2, 4, 6, 3, 5, 7, 1, 0))  # kt kh kw st sh sw c co
    return w.reshape(kt * kh * kw * st * sh * sw * c, co)


def _pad_channels_last(x: Tensor, pads: Pairs, kernel, strides, out_sizes) -> Tensor:
    """Zero-pad (T, H, W, C) and cut or extend each axis to exactly what the strided taps read."""
    for axis in (2, 1, 0):  # width first: the smallest copies first
        lo, hi = pads[axis]
        s, k, o = strides[axis], kernel[axis], out_sizes[axis]
        needed = (o - 1 + -(-k // s)) * s  # whole stride phases covering every tap
        hi = needed - lo - x.shape[axis]
        if hi < 0:
            index = [slice(None)] * x.ndim
            index[axis] = slice(0, x.shape[axis] + hi)
            x = x[tuple(index)]
            hi = 0
        parts = []
        for amount in (lo, None, hi):
            if amount is None:
                parts.append(x)
            elif amount:
                shape = list(x.shape)
                shape[axis] = amount
                parts.append(mint.zeros(tuple(shape), dtype=x.dtype))
        if len(parts) > 1:
            x = mint.cat(parts, dim=axis)
    return x


def _phase_split(x: Tensor, strides) -> Tensor:
    """(T, H, W, C) -> (T/st, H/sh, W/sw, st*sh*sw*C): space-to-depth by the strides."""
    if all(s == 1 for s in strides):
        return x
    (t, h, w, c), (st, sh, sw) = x.shape, strides
    x = x.reshape(t // st, st, h // sh, sh, w // sw, sw, c)
    x = mint.permute(x, (0, 2, 4, 1, 3, 5, 6))
    return x.reshape(t // st, h // sh, w // sw, st * sh * sw * c)


def _flat_conv(x: Tensor, wmat: Tensor, bias: Optional[Tensor], kernel, out_sizes, max_cols_bytes: int) -> Tensor:
    """Stride-1, unpadded conv of channels-last x (T, H, W, C) -> (Co, To, Ho, Wo)."""
    t, h, w, c = x.shape
    kt, kh, kw = kernel
    to, ho, wo = out_sizes
    co = wmat.shape[1]
    rows = to * h * w  # outputs on the full h x w grid; the invalid border is cropped below
    tail = (kh - 1) * w + (kw - 1)
    flat = x.reshape(t * h * w, c)
    if tail:
        flat = mint.cat([flat, mint.zeros((tail, c), dtype=flat.dtype)], dim=0)
    offsets = [a * h * w + b * w + d for a in range(kt) for b in range(kh) for d in range(kw)]
    tile = max(1, min(rows, max_cols_bytes // (4 * c * len(offsets))))
    tiles = []
    for start in range(0, rows, tile):
        size = min(tile, rows - start)
        slices = [flat[start + off:start + off + size] for off in offsets]
        cols = slices[0] if len(slices) == 1 else mint.cat(slices, dim=1)
        tiles.append(mint.matmul(cols, wmat))
    out = tiles[0] if len(tiles) == 1 else mint.cat(tiles, dim=0)
    if bias is not None:
        out = out + bias
    out = out.reshape(to, h, w, co)
    if ho != h or wo != w:
        out = out[:, :ho, :wo]
    return mint.permute(out, (3, 0, 1, 2))
