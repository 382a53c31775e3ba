"""The VAE decoder run in spatial tiles, exactly: the same frames as the untiled decoder, less memory.

Why naive tiles differ: every group norm of the decoder takes its statistics over a whole frame,
and the mid attention attends over all positions. So the tiles here are not independent decodes:

- the low-resolution front (conv_in, unpatchify, the mid blocks with the attention) runs untiled
  (it works on (h*2) x (w*2) positions of the latent's 2x2 unpatchified grid: small);
- from the first up level on, the decoder runs layer by layer in lock step over a grid of tiles.
  Each convolution computes one tile of its output at a time from the tile's input region plus a
  halo of kernel//2 positions (zeros only at the frame's own edges), with the group norm and SiLU
  before it and the nearest upsampling before it applied to that region only, so the full-size
  normalised or upsampled tensor never exists; every group norm uses statistics of the whole
  frame, computed from the full tensor it normalises (per-plane sums, then centred sums of
  squares, combined per group in float64).

A layer's input and output are held whole (that is what lets the next layer read any halo), so
the peak is about three tensors of the largest level instead of the untiled decoder's
normalised copies, upsampled copies and residual sums. Every tile is exact (up to float
summation order), at any tile size: there are no seams to blend.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from .. import ops
from ..ops import host
from ..ops.broadcast import repeat_axis
from .vae_blocks import (
    Conv3d, FrameConv2d, FrameGroupNorm, Res3DBlockUpsample, Resnet3DBlock, Upsample2D, Upsample3D, duplicate_up,
)
from .vae_config import DECODER_CROPPED_FRAMES, PATCH_FACTOR

Region = Tuple[int, int, int, int]  # rows [y0, y1), columns [x0, x1) of one tile


def tile_grid(height: int, width: int, tile: Tuple[int, int]) -> List[Region]:
    """Row-major tiles of at most `tile` (rows, columns) covering a height x width frame."""
    th, tw = tile
    return [(y, min(y + th, height), x, min(x + tw, width))
            for y in range(0, height, th) for x in range(0, width, tw)]


def as_tile(tile_size) -> Tuple[int, int]:
    """tile_size (latent positions): an int (square) or (rows, columns), each >= 1."""
    if isinstance(tile_size, (int, np.integer)):
        pair = (tile_size, tile_size)
    else:
        pair = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                 for v in pair):
        raise ValueError(f"tile_size={tile_size!r} must be a positive int or (rows, columns) of positive ints "
                         f"(latent positions, 16x16 pixels each)")
    return int(pair[0]), int(pair[1])


# ---- group norm with whole-frame statistics ---------------------------------------------------

class FrameStats:
    """Scale and shift per (sample, channel, frame) that make `norm(x)` an elementwise x*scale+shift."""

    def __init__(self, norm: FrameGroupNorm, x: Tensor):
        b, c, t, _, _ = x.shape
        groups = norm.groups
        per_group = c // groups
        count = per_group * x.shape[3] * x.shape[4]

        def group_sum(plane: np.ndarray) -> np.ndarray:  # (b, c, t) -> (b, c, t): the group's total
            return np.repeat(plane.reshape(b, groups, per_group, t).sum(axis=2), per_group, axis=1)

        mean = group_sum(_plane_sums(x, None)) / count
        var = group_sum(_plane_sums(x, mean)) / count
        weight = norm.weight.astype(ms.float32).asnumpy().astype(np.float64)[None, :, None]
        bias = norm.bias.astype(ms.float32).asnumpy().astype(np.float64)[None, :, None]
        scale = weight / np.sqrt(var + norm.eps)
        self.scale, self.shift = scale, bias - mean * scale
        self.dtype = x.dtype

    def apply(self, x: Tensor, silu: bool) -> Tensor:
        scale = self.scale.astype(np.float32)[..., None, None]
        shift = self.shift.astype(np.float32)[..., None, None]
        if host.blas_ready(x):  # CPU float32: numpy on a view, one fused pass
            out = host.view(x) * scale
            out += shift
            y = host.wrap(out)
        else:
            # float32 arithmetic, one rounding to x's dtype: as a fused group-norm kernel does
            y = (x.astype(ms.float32) * Tensor(scale) + Tensor(shift)).astype(x.dtype)
        return ops.silu(y) if silu else y


def _plane_sums(x: Tensor, mean: Optional[np.ndarray]) -> np.ndarray:
    """Per (sample, channel, frame) sums of x (mean None) or of (x - mean)^2, in float64."""
    if host.blas_ready(x):
        xn = host.view(x)
        b, c, t, h, w = xn.shape
        planes = xn.reshape(b, c, t, h * w)
        if mean is None:
            return planes.sum(axis=-1, dtype=np.float64)
        centred = planes - mean.astype(xn.dtype)[..., None]
        return np.einsum("bctk,bctk->bct", centred, centred).astype(np.float64)
    # other dtypes (bf16 on Ascend): float32 sums over bands of rows, so that no float32 copy of the
    # whole tensor is made
    rows = x.shape[3]
    band = max(1, -(-rows // 8))
    total = None
    centre = None if mean is None else Tensor(mean.astype(np.float32)[..., None, None])
    for y in range(0, rows, band):
        xf = x[:, :, :, y:y + band].astype(ms.float32)
        if centre is not None:
            xf = xf - centre
            xf = xf * xf
        part = mint.sum(xf, dim=(3, 4)).asnumpy().astype(np.float64)
        total = part if total is None else total + part
    return total


# ---- one convolution, tile by tile ------------------------------------------------------------

class _Output:
    """The whole output of a tiled layer, written tile by tile (in place on CPU float32, else joined)."""

    def __init__(self, regions: Sequence[Region]):
        self.regions = list(regions)
        self.buffer: Optional[np.ndarray] = None
        self.rows: List[List[Tensor]] = []
        self.row_key = None

    def put(self, region: Region, tile: Tensor, full_hw: Tuple[int, int]) -> None:
        y0, y1, x0, x1 = region
        if host.blas_ready(tile):
            if self.buffer is None:
                self.buffer = np.empty(tuple(tile.shape[:3]) + full_hw, dtype=host.view(tile).dtype)
            self.buffer[:, :, :, y0:y1, x0:x1] = host.view(tile)
            return
        if self.row_key != y0:
            self.rows.append([])
            self.row_key = y0
        self.rows[-1].append(tile)

    def result(self) -> Tensor:
        if self.buffer is not None:
            return host.wrap(self.buffer)
        rows = [r[0] if len(r) == 1 else mint.cat(r, dim=4) for r in self.rows]
        return rows[0] if len(rows) == 1 else mint.cat(rows, dim=3)


def _conv_tiled(conv, x: Tensor, tile: Tuple[int, int], up: int = 1, up_time: bool = False,
                pre: Optional[FrameStats] = None, pre_silu: bool = True, add=None) -> Tensor:
    """conv(pre(upsample(x))) [+ add(region, upsampled input region)] computed per output tile.

    conv: a Conv3d or FrameConv2d cell of stride 1 (so the output grid is the upsampled input grid);
    up: nearest upsampling of height and width (and frames with up_time) before the norm;
    pre: the group norm (whole-frame statistics, of the upsampled tensor) and SiLU before the conv;
    add(region, up_tile): a tensor added to the tile (a residual)."""
    if isinstance(conv, FrameConv2d):
        weight, time_pad = conv.weight.expand_dims(2), (0, 0)
        kh, kw = conv.weight.shape[2], conv.weight.shape[3]
    elif isinstance(conv, Conv3d):
        weight, time_pad = conv.weight, tuple(conv.padding[0])
        kh, kw = conv.kernel[1], conv.kernel[2]
    else:
        raise TypeError(f"tiled VAE decode: no tiled form for {type(conv).__name__}")
    height, width = x.shape[3] * up, x.shape[4] * up
    regions = tile_grid(height, width, tile)
    out = _Output(regions)
    hy, hx = kh // 2, kw // 2
    for region in regions:
        y0, y1, x0, x1 = region
        a0, a1, b0, b1 = max(y0 - hy, 0), min(y1 + hy, height), max(x0 - hx, 0), min(x1 + hx, width)
        piece = _upsampled_region(x, (a0, a1, b0, b1), up, up_time)
        normed = piece if pre is None else pre.apply(piece, pre_silu)
        pads = (time_pad, (a0 - (y0 - hy), (y1 + hy) - a1), (b0 - (x0 - hx), (x1 + hx) - b1))
        y = ops.conv3d(normed, weight, conv.bias, 1, pads, weight_cache=conv.matmul_weight)
        if add is not None:
            inner = piece[:, :, :, y0 - a0:y0 - a0 + (y1 - y0), x0 - b0:x0 - b0 + (x1 - x0)]
            y = y + add(region, inner)
        out.put(region, y, (height, width))
    return out.result()


def _upsampled_region(x: Tensor, region: Region, up: int, up_time: bool) -> Tensor:
    """Rows/columns `region` of x upsampled (nearest) by `up` in height and width (and x2 in frames)."""
    a0, a1, b0, b1 = region
    if up == 1:
        return x[:, :, :, a0:a1, b0:b1]
    piece = x[:, :, :, a0 // up:-(-a1 // up), b0 // up:-(-b1 // up)]
    piece = repeat_axis(repeat_axis(piece, 3, up), 4, up)
    if up_time:
        piece = repeat_axis(piece, 2, up)
    oy, ox = a0 - (a0 // up) * up, b0 - (b0 // up) * up
    return piece[:, :, :, oy:oy + (a1 - a0), ox:ox + (b1 - b0)]


# ---- the decoder's blocks -----------------------------------------------------------------------

def _resnet(block: Resnet3DBlock, x: Tensor, tile) -> Tensor:
    h = _conv_tiled(block.conv1.conv, x, tile, pre=FrameStats(block.norm1, x))
    if block.nin_shortcut is None:
        def shortcut(region, _):
            y0, y1, x0, x1 = region
            return x[:, :, :, y0:y1, x0:x1]
    else:
        short = block.nin_shortcut.conv

        def shortcut(region, _):
            y0, y1, x0, x1 = region
            return ops.conv3d(x[:, :, :, y0:y1, x0:x1], short.weight, short.bias, 1, 0,
                              weight_cache=short.matmul_weight)
    return _conv_tiled(block.conv2.conv, h, tile, pre=FrameStats(block.norm2, h), add=shortcut)


def _upsample3d(up: Upsample3D, x: Tensor, tile) -> Tensor:
    """Nearest x2 in frames, rows and columns, then Res3DBlockUpsample, tile by tile."""
    res: Res3DBlockUpsample = up.conv3d
    h1 = _conv_tiled(res.conv1.conv, x, tile, up=2, up_time=True)
    h2 = _conv_tiled(res.conv2.conv, h1, tile, pre=FrameStats(res.norm1, h1))
    del h1
    stats = FrameStats(res.norm2, h2)
    height, width = h2.shape[3], h2.shape[4]
    out = _Output(tile_grid(height, width, tile))
    for region in out.regions:
        y0, y1, x0, x1 = region
        residual = _upsampled_region(x, region, 2, True)
        y = ops.silu(stats.apply(h2[:, :, :, y0:y1, x0:x1], silu=False) + residual) + residual
        out.put(region, y, (height, width))
    return out.result()


def decode_tiled(decoder, z: Tensor, tile_size) -> Tensor:
    """`decoder(z)` for one chunk z (b, z, 3, h, w), the up path in tiles of `tile_size` latent positions."""
    tile_lat = as_tile(tile_size)
    h = decoder.conv_in(z) + duplicate_up(z, decoder.patch_channels, 1)
    h = decoder.conv_unpatchify(h) + duplicate_up(h, decoder.block_in, PATCH_FACTOR)
    h = decoder.mid(h)
    scale = PATCH_FACTOR  # positions of h per latent position, per axis

    def tile():
        return tile_lat[0] * scale, tile_lat[1] * scale

    for i in reversed(range(len(decoder.up))):
        level = decoder.up[i]
        for block in level.block:
            h = _resnet(block, h, tile())
        if level.has_resample:
            sampler = getattr(level, level.resample_attr)
            scale *= 2
            if isinstance(sampler, Upsample3D):
                h = _upsample3d(sampler, h, tile())
            elif isinstance(sampler, Upsample2D):
                h = _conv_tiled(sampler.conv, h, tile(), up=2)
            else:
                raise TypeError(f"tiled VAE decode: no tiled form for {type(sampler).__name__}")
    h = _conv_tiled(decoder.conv_out, h, tile(), pre=FrameStats(decoder.norm_out, h))
    return h[:, :, DECODER_CROPPED_FRAMES:]


# ---- how much memory a decode needs, and the tile that fits a budget -----------------------------

# Peak of one chunk's decode, calibrated on the CPU backend by bench/bench_vae_tile.py (decoder ch 64,
# 6x6 latents: untiled 916 MiB, tiles of 2 and 1 latent positions 513 and 257 MiB): untiled, about
# 10 of the up path's largest tensor; tiled, 2 of them (a block's input, its middle and its output)
# plus about 32 tensors of one tile with its halo (the CPU convolution's im2col holds the 27 kernel
# taps of a tile's input; the untiled decode also holds one capped im2col block, the CPU conv's
# 96 MiB: it matters at small sizes, ch 32: 555 MiB measured). Elsewhere (the Ascend kernels keep
# other temporaries) a prediction.
UNTILED_PEAK_TENSORS = 10.0
UNTILED_WORKSPACE_BYTES = 96 * 2 ** 20
TILED_PEAK_TENSORS = 2.0
TILE_WORKING_TENSORS = 32.0


def _up_path_tensors(config, latent_h: int, latent_w: int):
    """(channels, frames, rows, columns) of the up path's activations for one chunk (batch 1)."""
    from .vae_config import DECODER_TEMPORAL_UP_LEVELS, LATENT_FRAMES_PER_CHUNK

    widths = config.decoder.widths()
    frames = LATENT_FRAMES_PER_CHUNK * PATCH_FACTOR - (PATCH_FACTOR - 1)
    scale, block_in, out = PATCH_FACTOR, widths[-1], []
    for i in reversed(range(len(widths))):
        out.append((max(block_in, widths[i]), frames, scale * latent_h, scale * latent_w))
        block_in = widths[i]
        if i:
            frames *= 2 if i in DECODER_TEMPORAL_UP_LEVELS else 1
            scale *= 2
            out.append((block_in, frames, scale * latent_h, scale * latent_w))
    return out


def decode_peak_bytes(config, latent_h: int, latent_w: int, dtype_bytes: int, tile_size=None) -> int:
    """Predicted peak bytes of decoding one chunk of latent_h x latent_w positions (see the constants)."""
    tensors = _up_path_tensors(config, latent_h, latent_w)
    largest = max(c * t * h * w for c, t, h, w in tensors) * dtype_bytes
    if tile_size is None:
        return int(UNTILED_PEAK_TENSORS * largest + UNTILED_WORKSPACE_BYTES)
    th, tw = as_tile(tile_size)
    tile = 0
    for c, t, h, w in tensors:
        s = h // latent_h  # pixels per latent position at that level
        tile = max(tile, c * t * (min(th * s, h) + 2) * (min(tw * s, w) + 2))
    return int(TILED_PEAK_TENSORS * largest + TILE_WORKING_TENSORS * tile * dtype_bytes)


def choose_tile(config, latent_h: int, latent_w: int, dtype_bytes: int, budget_bytes: float):
    """None when the untiled decode is predicted to fit `budget_bytes`, else the largest square tile
    (latent positions) predicted to fit; ValueError when none does."""
    if decode_peak_bytes(config, latent_h, latent_w, dtype_bytes) <= budget_bytes:
        return None
    for t in range(max(latent_h, latent_w), 0, -1):
        if decode_peak_bytes(config, latent_h, latent_w, dtype_bytes, t) <= budget_bytes:
            return (t, t)
    need = decode_peak_bytes(config, latent_h, latent_w, dtype_bytes, 1)
    raise ValueError(f"VAE decode budget {budget_bytes / 2 ** 30:.2f} GiB: even 1-position tiles need about "
                     f"{need / 2 ** 30:.2f} GiB (predicted) for {latent_h}x{latent_w} latents: raise the budget "
                     f"or decode a smaller size")
