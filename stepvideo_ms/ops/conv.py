"""3D and 2D convolution: the native kernel on Ascend, im2col + matmul on CPU.

MindSpore's CPU `ops.conv3d` runs at about 1 GFLOP/s (see the CPU notes), so the CPU path
rewrites a convolution as a matrix product:

- the input frames a tile reads go channels-last, flattened to rows (T*H*W, C), with one zero row
  after;
- the im2col matrix is ONE gather of those rows: for each output position and kernel tap the
  index (built in numpy) names the input row it reads, or the zero row when the tap falls in
  the padding. Zero padding, strides and the output size all live in the index, so there is no
  padded copy, no strided slicing and no cropping (MindSpore's CPU slicing and padding kernels
  are slow; its gather moves memory several times faster than concatenating shifted slices);
- pointwise (1x1x1, unpadded, stride 1) convolutions keep the native kernel, which is fast there;
- one matmul by the weight laid out (taps*C, Co) (laid out once per weight when the caller keeps
  a `MatmulWeight` for it, as the VAE's conv cells do), per tile of output positions (whole frames,
  or bands of rows of one frame), the tiles sized so one im2col matrix never exceeds
  `max_cols_bytes`; each tile reads only its input frames, so beyond input and output the
  memory held is one tile's worth.

float32 on CPU does all of this in numpy through zero-copy views (`host`): the channels-last rows
and the output layout by numpy's transposing copies, the gather by `np.take`, the product by its
BLAS, pointwise convolutions as one product per sample, each tile written straight into its place
in the output (MindSpore's strided copies and concatenations are the slow part there). Other
dtypes take MindSpore's kernels as described above.

Padding is explicit zero padding per side, so causal (front-only) temporal padding is one
call: padding=((2, 0), (1, 1), (1, 1)).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host

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
    *,
    weight_cache: Optional["MatmulWeight"] = None,
) -> Tensor:
    """Cross-correlation of x (N, C, T, H, W) with weight (Co, C, kt, kh, kw), plus bias (Co,).

    stride: int or (st, sh, sw).
    padding: zeros added to each side: int, (pt, ph, pw) (both sides) or
        ((t_front, t_back), (h_top, h_bottom), (w_left, w_right)).
    weight_cache: on CPU, keeps this weight's matmul layout between calls (one per weight; unused
        on Ascend).
    Returns (N, Co, To, Ho, Wo) in x's dtype.
    """
    strides = _as_tuple(stride, 3, "stride")
    pads = _as_pairs(padding, 3)
    _check(x, weight, bias, 5, strides, pads)
    if is_ascend():
        return _conv3d_ascend(x, weight, bias, strides, pads)
    return _conv_matmul(x, weight, bias, strides, pads, max_cols_bytes, weight_cache)


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
    if is_ascend():
        return _conv3d_ascend(x.expand_dims(2), weight.expand_dims(2), bias, (1,) + strides, ((0, 0),) + pads).squeeze(2)
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


def _conv3d_ascend(x: Tensor, weight: Tensor, bias: Optional[Tensor], strides, pads: Pairs) -> Tensor:
    """Ascend: mint's conv3d, the kernel with a bfloat16 path (`ops.conv3d` is P.Conv3D, float16/float32
    only). It pads symmetrically, so the uneven part of a padding (the causal front frames) is
    added first as explicit zeros."""
    x = _pad_uneven(x, pads)
    return mint.nn.functional.conv3d(x, weight, bias, stride=tuple(strides), padding=tuple(min(p) for p in pads))


def _pad_uneven(x: Tensor, pads: Pairs) -> Tensor:
    """Zeros for the part of each axis' padding that is not the same on both sides."""
    for axis, (lo, hi) in enumerate(pads, start=2):
        if lo == hi:
            continue
        shape = list(x.shape)
        shape[axis] = abs(lo - hi)
        zeros = mint.zeros(tuple(shape), dtype=x.dtype)
        x = mint.cat([zeros, x] if lo > hi else [x, zeros], dim=axis)
    return x


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
# CPU: one gather (im2col) and one matmul per tile of output positions


def _conv_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], strides, pads, max_cols_bytes: int,
                 weight_cache: Optional["MatmulWeight"] = None) -> Tensor:
    if host.blas_ready(x, weight, *(() if bias is None else (bias,))):
        return _conv_host(x, weight, bias, strides, pads, max_cols_bytes, weight_cache)
    dtype = x.dtype
    source = weight
    x, weight, bias = _f32(x), _f32(weight), None if bias is None else _f32(bias)
    n, c, *sizes = x.shape
    co, _, *kernel = weight.shape
    out_sizes = [output_size(s, k, st, p) for s, k, st, p in zip(sizes, kernel, strides, pads)]
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and all(p == (0, 0) for p in pads):
        # pointwise: the native CPU kernel handles 1x1x1 well (faster than a matmul here)
        return _as(ops.conv3d(x, weight, bias, pad_mode="valid"), dtype)
    taps = kernel[0] * kernel[1] * kernel[2]
    # The gathered columns come ordered (tap, channel) and the weight (channel, tap): reorder
    # whichever is smaller (a big kernel applied at few positions must not copy its weight).
    reorder_cols = out_sizes[0] * out_sizes[1] * out_sizes[2] < co
    if reorder_cols:
        wmat = weight.reshape(co, c * taps)
    elif weight_cache is not None:
        wmat = weight_cache.get(source, lambda: _matmul_layout(weight))
    else:
        wmat = _matmul_layout(weight)
    samples = []
    for i in range(n):
        pieces, rows, rows_span = [], None, None  # pieces: (Co, frames, rows, Wo) per block
        for block in output_blocks(out_sizes, 4 * c * taps, max_cols_bytes):
            first, end = input_frames(block, sizes[0], kernel[0], strides[0], pads[0])
            if (first, end) != rows_span:  # bands of one frame share their input rows
                rows_span = (first, end)
                rows = _channels_last_rows(x[i] if rows_span == (0, sizes[0]) else x[i, :, first:end], c)
            index = _tap_index_tensor(block, tuple(sizes), tuple(kernel), tuple(strides), pads, first, end)
            cols = rows[index]  # (positions, taps, C)
            if reorder_cols:  # weight (Co, C*taps) @ columns (C*taps, positions); the output is small
                cols = mint.permute(cols, (2, 1, 0)).reshape(c * taps, index.shape[0])
                out = mint.permute(mint.matmul(wmat, cols), (1, 0))
            else:
                out = mint.matmul(cols.reshape(index.shape[0], taps * c), wmat)
            if bias is not None:
                out = ops.bias_add(out, bias)  # its kernel is much faster than a broadcast add on CPU
            t0, t1, h0, h1 = block
            pieces.append(mint.permute(out.reshape(t1 - t0, h1 - h0, out_sizes[2], co), (3, 0, 1, 2)))
        samples.append(_assemble(pieces, out_sizes[1]))
    out = samples[0].expand_dims(0) if n == 1 else ops.stack(samples, axis=0)
    return _as(out, dtype)


def _conv_host(x: Tensor, weight: Tensor, bias: Optional[Tensor], strides, pads, max_cols_bytes: int,
               weight_cache: Optional["MatmulWeight"] = None) -> Tensor:
    """`_conv_matmul` in numpy, for float32/float64 tensors (see the module's docstring)."""
    n, c, *sizes = x.shape
    co, _, *kernel = weight.shape
    out_sizes = [output_size(s, k, st, p) for s, k, st, p in zip(sizes, kernel, strides, pads)]
    xn = host.view(x)
    bn = None if bias is None else host.view(bias)
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and all(p == (0, 0) for p in pads):
        out = np.matmul(host.view(weight).reshape(co, c), xn.reshape(n, c, -1))  # (n, Co, T*H*W)
        if bn is not None:
            out += bn[:, None]
        return host.wrap(out.reshape(n, co, *sizes))
    taps = kernel[0] * kernel[1] * kernel[2]
    # as in _conv_matmul: a big kernel applied at few positions reorders its columns, not its weight
    reorder_cols = out_sizes[0] * out_sizes[1] * out_sizes[2] < co
    if reorder_cols:
        wmat = host.view(weight).reshape(co, c * taps).T  # (C*taps, Co), a view
    elif weight_cache is not None:
        wmat = host.view(weight_cache.get(weight, lambda: _matmul_layout(weight)))
    else:
        wmat = host.view(_matmul_layout(weight))
    out = np.empty((n, co, *out_sizes), dtype=xn.dtype)
    for i in range(n):
        rows, rows_span = None, None
        for block in output_blocks(out_sizes, 4 * c * taps, max_cols_bytes):
            first, end = input_frames(block, sizes[0], kernel[0], strides[0], pads[0])
            if (first, end) != rows_span:  # bands of one frame share their input rows
                rows_span = (first, end)
                rows = np.zeros(((end - first) * sizes[1] * sizes[2] + 1, c), dtype=xn.dtype)
                rows[:-1] = xn[i, :, first:end].transpose(1, 2, 3, 0).reshape(-1, c)  # channels last, zero row after
            index = _tap_index_array(block, tuple(sizes), tuple(kernel), tuple(strides), pads, first, end)
            cols = np.take(rows, index, axis=0)  # (positions, taps, C)
            if reorder_cols:  # columns ordered (channel, tap) like the weight's rows
                cols = cols.transpose(0, 2, 1)
            cols = cols.reshape(index.shape[0], taps * c)
            # (Co, K) @ (K, positions): the product comes out channels-first, written by BLAS straight
            # into the tile's place in the output (whole frames or rows of one frame: one leading stride)
            t0, t1, h0, h1 = block
            place = out[i, :, t0:t1, h0:h1]
            flat = place.reshape(co, -1)
            if np.shares_memory(flat, out):
                np.matmul(wmat.T, cols.T, out=flat)
            else:  # pragma: no cover - every tile shape above reshapes to a view
                place[...] = (wmat.T @ cols.T).reshape(place.shape)
        if bn is not None:
            out[i] += bn.reshape(co, 1, 1, 1)
    return host.wrap(out)


@functools.lru_cache(maxsize=64)
def _tap_index_array(block, sizes, kernel, strides, pads, first: int, end: int) -> np.ndarray:
    """`tap_index`, memoised (read-only): a decode asks for the same few indices many times."""
    index = tap_index(block, sizes, kernel, strides, pads, first, end)
    index.setflags(write=False)
    return index


def _matmul_layout(weight: Tensor) -> Tensor:
    """(Co, C, kt, kh, kw) -> (taps*C, Co), rows ordered (tap, channel) like the gathered columns."""
    co, c = weight.shape[:2]
    if host.has_numpy(weight):  # numpy's transposing copy
        return host.wrap(host.view(weight).reshape(co, c, -1).transpose(2, 1, 0).reshape(-1, co))
    # a transpose kernel (one copy) is faster on CPU than reshaping a permuted view
    return ops.transpose(weight.reshape(co, c, -1), (2, 1, 0)).reshape(-1, co)


class MatmulWeight:
    """One conv weight's CPU matmul layout, made on first use and remade when the weight changes.

    Laying the weight out costs a copy of it (about 40% of a 512-channel conv at 8x8 on CPU), so a
    cell that owns a conv weight keeps one of these and passes it as `weight_cache`. The layout is
    reused while the weight tensor still reads the storage it was made from: `Parameter.set_data`
    (which checkpoint loading uses) gives the weight new storage, and this object holds a view of
    the old storage so its address cannot be handed to another tensor meanwhile. Writes in place
    into the weight's storage (assign, copy_, item assignment) are not seen: call `clear()` after
    them (`clear_weight_caches(cell)` does it for a whole model; `checkpoint.load_into` calls it).
    """

    __slots__ = ("_source", "_layout")

    def __init__(self) -> None:
        self._source: Optional[Tensor] = None
        self._layout: Optional[Tensor] = None

    def get(self, weight: Tensor, make) -> Tensor:
        """The layout `make()` builds from `weight`, made again only if `weight` is a new one."""
        src = self._source
        if (self._layout is None or src is None or weight.data_ptr() != src.data_ptr()
                or tuple(weight.shape) != tuple(src.shape) or weight.dtype != src.dtype):
            self._layout = None  # drop the old layout before making the new one
            self._layout = make()
            self._source = weight.view(tuple(weight.shape))  # keeps the storage (and so its address) alive
        return self._layout

    def clear(self) -> None:
        self._source = None
        self._layout = None


def clear_weight_caches(cell) -> int:
    """Forget every `MatmulWeight` layout held by `cell` and its sub-cells; returns how many."""
    count = 0
    for _, sub in cell.cells_and_names():
        for value in vars(sub).values():
            if isinstance(value, MatmulWeight):
                value.clear()
                count += 1
    return count


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == ms.float32 else t.astype(ms.float32)


def _as(t: Tensor, dtype) -> Tensor:
    return t if t.dtype == dtype else t.astype(dtype)


@functools.lru_cache(maxsize=64)
def _tap_index_tensor(block, sizes, kernel, strides, pads, first: int, end: int) -> Tensor:
    """`tap_index` as a device tensor, memoised: a decode asks for the same few indices many times."""
    return Tensor(tap_index(block, sizes, kernel, strides, pads, first, end))


def _channels_last_rows(x: Tensor, c: int) -> Tensor:
    """(C, T, H, W) -> (T*H*W + 1, C): channels-last rows and one zero row for padded taps."""
    zero = mint.zeros((1, c), dtype=x.dtype)
    if x.shape[1] == 0:
        return zero
    return mint.cat([mint.permute(x, (1, 2, 3, 0)).reshape(-1, c), zero], dim=0)


def _assemble(pieces: List[Tensor], rows: int) -> Tensor:
    """Blocks of (Co, frames, some rows, Wo), in order, -> (Co, To, Ho, Wo)."""
    frames, band = [], []
    for piece in pieces:
        if piece.shape[2] == rows:
            frames.append(piece)
            continue
        band.append(piece)
        if sum(p.shape[2] for p in band) == rows:
            frames.append(mint.cat(band, dim=2))
            band = []
    return frames[0] if len(frames) == 1 else mint.cat(frames, dim=1)


Block = Tuple[int, int, int, int]  # first and end output frame, first and end output row


def output_blocks(out_sizes, bytes_per_position: int, max_bytes: int) -> List[Block]:
    """One sample's output positions in tiles whose im2col matrix fits `max_bytes`: whole frames
    when a frame fits, else bands of rows of one frame; in (frame, row) order."""
    to, ho, wo = out_sizes
    frame_bytes = ho * wo * bytes_per_position
    if frame_bytes <= max_bytes:
        step = max(1, max_bytes // frame_bytes)
        return [(t, min(to, t + step), 0, ho) for t in range(0, to, step)]
    step = max(1, max_bytes // (wo * bytes_per_position))
    return [(t, t + 1, h, min(ho, h + step)) for t in range(to) for h in range(0, ho, step)]


def input_frames(block: Block, frames: int, kernel: int, stride: int, pad: Tuple[int, int]) -> Tuple[int, int]:
    """The input frames [first, end) that the output frames of `block` read (padding excluded)."""
    t0, t1 = block[:2]
    first = min(frames, max(0, t0 * stride - pad[0]))
    return first, max(first, min(frames, (t1 - 1) * stride - pad[0] + kernel))


def tap_index(block: Block, sizes, kernel, strides, pads, first: int, end: int) -> np.ndarray:
    """Row read by every tap of every output position of `block`: int32 (positions, taps).

    Rows are those of input frames [first, end), channels-last, flattened to ((end-first)*H*W, C);
    a tap that falls in the padding reads the zero row after them. Built per axis and summed (the
    index is separable).
    """
    t0, t1, h0, h1 = block
    _, h_in, w_in = sizes
    wo = output_size(w_in, kernel[2], strides[2], pads[2])
    invalid = -(1 << 40)  # any sum holding one of these stays negative (and in int64 range)

    def axis_rows(lo: int, hi: int, axis: int, valid_from: int, valid_to: int, row_stride: int) -> np.ndarray:
        pos = np.arange(lo, hi)[:, None] * strides[axis] - pads[axis][0] + np.arange(kernel[axis])[None, :]
        return np.where((pos >= valid_from) & (pos < valid_to), (pos - valid_from) * row_stride, invalid)

    t_rows = axis_rows(t0, t1, 0, first, end, h_in * w_in)
    h_rows = axis_rows(h0, h1, 1, 0, h_in, w_in)
    w_rows = axis_rows(0, wo, 2, 0, w_in, 1)
    index = (t_rows[:, None, None, :, None, None]
             + h_rows[None, :, None, None, :, None]
             + w_rows[None, None, :, None, None, :])
    index = np.where(index < 0, (end - first) * h_in * w_in, index)
    return index.reshape((t1 - t0) * (h1 - h0) * wo, -1).astype(np.int32)
