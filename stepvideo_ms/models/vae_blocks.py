"""Building blocks of the Step-Video VAE v2, on (batch, channels, frames, height, width) tensors.

Facts taken from upstream (stepvideo/vae/vae.py), written anew:
- every 3D convolution is causal in time: zeros in front (kernel-1 frames, plus 1-stride when the
  stride is below 1, i.e. never here), none behind; height/width padded by kernel//2 each side;
- group norms (32 groups, eps 1e-5) are "spatial" in version 2: statistics per frame;
- the mid attention is one head over all frames*height*width positions, causal in that order;
- the patchify/unpatchify paths use a 3D pixel (un)shuffle with a shortcut that averages
  (down) or duplicates (up) channels, and drop/pad the first factor-1 frames.
Parameter names follow upstream so the released state dict loads as is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import mindspore as ms
from mindspore import Tensor, mint, nn

from .. import ops
from ..ops.broadcast import repeat_axis
from ..ops.frame_norm import frame_group_norm
from .common import new_param
from .vae_config import NORM_EPS, NORM_GROUPS

Kernel = Union[int, Tuple[int, int, int]]


def causal_padding(kernel: Tuple[int, int, int], time_stride: int = 1) -> Tuple[Tuple[int, int], ...]:
    """Zero padding of a causal conv: ((front, 0), (kh//2, kh//2), (kw//2, kw//2))."""
    kt, kh, kw = kernel
    front = (kt - 1) + max(1 - time_stride, 0)
    return ((front, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))


class Conv3d(nn.Cell):
    """A 3D convolution with torch's parameter layout and explicit per-side zero padding."""

    def __init__(self, chan_in: int, chan_out: int, kernel: Kernel, stride=1, padding=0, dtype=ms.float32):
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = stride
        self.padding = padding
        self.weight = new_param((chan_out, chan_in) + self.kernel, dtype)
        self.bias = new_param((chan_out,), dtype)
        self.matmul_weight = ops.MatmulWeight()  # the weight's CPU layout, kept between calls

    def construct(self, x: Tensor) -> Tensor:
        return ops.conv3d(x, self.weight, self.bias, self.stride, self.padding, weight_cache=self.matmul_weight)


class FrameConv2d(nn.Cell):
    """A 2D convolution (torch layout weight (out, in, kh, kw)) applied to every frame of x."""

    def __init__(self, chan_in: int, chan_out: int, kernel: int, stride: int = 1,
                 padding: Sequence[Tuple[int, int]] = ((1, 1), (1, 1)), dtype=ms.float32):
        super().__init__()
        self.stride = (1, stride, stride)
        self.padding = ((0, 0),) + tuple(padding)
        self.weight = new_param((chan_out, chan_in, kernel, kernel), dtype)
        self.bias = new_param((chan_out,), dtype)
        self.matmul_weight = ops.MatmulWeight()  # the weight's CPU layout, kept between calls

    def construct(self, x: Tensor) -> Tensor:
        return ops.conv3d(x, self.weight.expand_dims(2), self.bias, self.stride, self.padding,
                          weight_cache=self.matmul_weight)


class CausalConv(nn.Cell):
    """Upstream's CausalConv family: a Conv3d named `conv` with causal padding."""

    def __init__(self, chan_in: int, chan_out: int, kernel: Kernel, stride: int = 1, dtype=ms.float32):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.conv = Conv3d(chan_in, chan_out, kernel, stride, causal_padding(kernel, stride), dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FrameGroupNorm(nn.Cell):
    """Group norm with statistics over (channels of the group, height, width) of each frame."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS, eps: float = NORM_EPS, dtype=ms.float32):
        super().__init__()
        if channels % groups:
            raise ValueError(f"group norm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = new_param((channels,), dtype, ones=True)
        self.bias = new_param((channels,), dtype)

    def construct(self, x: Tensor, silu: bool = False) -> Tensor:
        out = frame_group_norm(x, self.groups, self.weight, self.bias, self.eps)
        return ops.silu(out) if silu else out


def pixel_shuffle_up(x: Tensor, factor: int) -> Tensor:
    """(b, c*f^3, t, h, w) -> (b, c, t*f - (f-1), h*f, w*f): channels to space, first f-1 frames dropped."""
    b, c, t, h, w = x.shape
    f = factor
    x = x.reshape(b, c // f ** 3, f, f, f, t, h, w)
    x = mint.permute(x, (0, 1, 5, 2, 6, 3, 7, 4)).reshape(b, c // f ** 3, t * f, h * f, w * f)
    return x[:, :, f - 1:] if f > 1 else x


def duplicate_up(x: Tensor, out_channels: int, factor: int) -> Tensor:
    """Shortcut of the up path: every channel repeated, then `pixel_shuffle_up`."""
    c = x.shape[1]
    repeats = out_channels * factor ** 3 // c
    return pixel_shuffle_up(repeat_axis(x, 1, repeats), factor)


def pixel_unshuffle_down(x: Tensor, factor: int) -> Tensor:
    """(b, c, t, h, w) -> (b, c*f^3, (t+f-1)/f, h/f, w/f): f-1 zero frames in front, space to channels."""
    f = factor
    if f == 1:
        return x
    b, c, t, h, w = x.shape
    x = mint.cat([mint.zeros((b, c, f - 1, h, w), dtype=x.dtype), x], dim=2)
    t += f - 1
    x = x.reshape(b, c, t // f, f, h // f, f, w // f, f)
    x = mint.permute(x, (0, 1, 3, 5, 7, 2, 4, 6))
    return x.reshape(b, c * f ** 3, t // f, h // f, w // f)


def average_down(x: Tensor, out_channels: int, factor: int) -> Tensor:
    """Shortcut of the down path: `pixel_unshuffle_down`, then the mean of consecutive channel groups."""
    x = pixel_unshuffle_down(x, factor)
    b, c, t, h, w = x.shape
    return mint.mean(x.reshape(b, out_channels, c // out_channels, t, h, w), dim=2)


class ConvPixelShuffleUp(nn.Cell):
    """Causal conv to out*f^3 channels, then `pixel_shuffle_up` (upstream ConvPixelShuffleUpSampleLayer3D)."""

    def __init__(self, chan_in: int, chan_out: int, factor: int, dtype=ms.float32):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, chan_out * factor ** 3, 3, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return pixel_shuffle_up(self.conv(x), self.factor)


class ConvPixelUnshuffleDown(nn.Cell):
    """Causal conv to out/f^3 channels, then `pixel_unshuffle_down` (ConvPixelUnshuffleDownSampleLayer3D)."""

    def __init__(self, chan_in: int, chan_out: int, factor: int, dtype=ms.float32):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, chan_out // factor ** 3, 3, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return pixel_unshuffle_down(self.conv(x), self.factor)


class Resnet3DBlock(nn.Cell):
    """conv2(silu(norm2(conv1(silu(norm1(x)))))) + x (or a 1x1x1 conv of x when widths differ)."""

    def __init__(self, chan_in: int, chan_out: int, dtype=ms.float32):
        super().__init__()
        self.norm1 = FrameGroupNorm(chan_in, dtype=dtype)
        self.conv1 = CausalConv(chan_in, chan_out, 3, dtype=dtype)
        self.norm2 = FrameGroupNorm(chan_out, dtype=dtype)
        self.conv2 = CausalConv(chan_out, chan_out, 3, dtype=dtype)
        self.nin_shortcut = CausalConv(chan_in, chan_out, 1, dtype=dtype) if chan_in != chan_out else None

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class Res3DBlockUpsample(nn.Cell):
    """silu(norm2(conv2(silu(norm1(conv1(x))))) + x) + x (upstream Res3DBlockUpsample, equal widths)."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv1 = CausalConv(channels, channels, 3, dtype=dtype)
        self.norm1 = FrameGroupNorm(channels, dtype=dtype)
        self.conv2 = CausalConv(channels, channels, 3, dtype=dtype)
        self.norm2 = FrameGroupNorm(channels, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        h = self.norm1(self.conv1(x), silu=True)
        h = self.norm2(self.conv2(h))
        return ops.silu(h + x) + x


class AttnBlock(nn.Cell):
    """One-head causal self-attention over all positions, 1x1x1 projections, residual."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.norm = FrameGroupNorm(channels, dtype=dtype)
        self.q = CausalConv(channels, channels, 1, dtype=dtype)
        self.k = CausalConv(channels, channels, 1, dtype=dtype)
        self.v = CausalConv(channels, channels, 1, dtype=dtype)
        self.proj_out = CausalConv(channels, channels, 1, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def tokens(y: Tensor) -> Tensor:  # (b, c, t, h, w) -> (b, t*h*w, 1, c)
            return mint.permute(y.reshape(b, c, t * h * w), (0, 2, 1)).reshape(b, t * h * w, 1, c)

        out = ops.attention(tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed)),
                            causal=True, scale=1.0 / math.sqrt(c))
        out = mint.permute(out.reshape(b, t * h * w, c), (0, 2, 1)).reshape(b, c, t, h, w)
        return self.proj_out(out) + x


class Upsample3D(nn.Cell):
    """Nearest x2 in frames, height and width, then a Res3DBlockUpsample named `conv3d`."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels, dtype)

    def construct(self, x: Tensor) -> Tensor:
        for axis in (2, 3, 4):
            x = repeat_axis(x, axis, 2)
        return self.conv3d(x)


class Upsample2D(nn.Cell):
    """Nearest x2 in height and width of every frame, then a 3x3 conv."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(repeat_axis(repeat_axis(x, 3, 2), 4, 2))


class Downsample2D(nn.Cell):
    """Per frame: one zero row/column after the image, then a 3x3 conv of stride 2."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Downsample3D(nn.Cell):
    """A causal 3x3x3 conv of stride 2 in frames, height and width."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, stride=2, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Level(nn.Cell):
    """One resolution level: its res blocks (`block`) and an optional resampler."""

    def __init__(self, blocks: Sequence[nn.Cell], resample: Optional[nn.Cell], attr: str):
        super().__init__()
        self.block = nn.CellList(list(blocks))
        self.resample_attr = attr
        if resample is not None:
            setattr(self, attr, resample)
        self.has_resample = resample is not None

    def construct(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.has_resample:
            x = getattr(self, self.resample_attr)(x)
        return x


class Mid(nn.Cell):
    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.block_1 = Resnet3DBlock(channels, channels, dtype)
        self.attn_1 = AttnBlock(channels, dtype)
        self.block_2 = Resnet3DBlock(channels, channels, dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
