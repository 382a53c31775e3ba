"""3D rotary position embedding of Step-Video's DiT.

The head dimension is split into (frame, height, width) parts; each part is rotated by the
standard 1D RoPE (rotate-half form, base 1e4) of its own axis position. Tables are built in
numpy for any slice of the flattened (f, h, w) token grid, so a sequence-parallel rank gets the
positions of exactly the tokens it holds.

Rounding follows upstream (`freqs = einsum(t, inv_freq).to(dtype)`, then `freqs.cos()`): the
float32 angles are first rounded to the compute dtype, then cos/sin of those rounded angles are
taken (in float32) and rounded again. Under bfloat16 the angle rounding dominates (angles reach
hundreds of radians with 8 significant bits), so taking cos/sin of the exact angles would give
other tables than upstream's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..ops import host
from ..ops.broadcast import expand
from ..ops.split import split
from ..runtime import is_ascend

ROPE_BASE = 1e4
# CPU: the cos/sin tables are tiled to the rotated tensor's full shape (once per shape and forward)
# while both together stay under this many bytes; beyond it they are broadcast (slower on CPU).
MAX_FULL_TABLE_BYTES = 512 * 1024 * 1024


def rope_channel_split(head_dim: int) -> Tuple[int, int, int]:
    """(frame, height, width) channels of a head: half for time, a quarter each for space (64/32/32 at 128)."""
    if head_dim % 8:
        raise ValueError(f"attention_head_dim={head_dim} must be a multiple of 8 for the 3D RoPE split")
    return head_dim // 2, head_dim // 4, head_dim // 4


def grid_positions(f: int, h: int, w: int, start: int = 0, stop: int = None) -> np.ndarray:
    """(n, 3) integer (frame, row, column) of tokens start..stop of the flattened f*h*w grid."""
    stop = f * h * w if stop is None else stop
    idx = np.arange(start, stop, dtype=np.int64)
    return np.stack([idx // (h * w), (idx // w) % h, idx % w], axis=1)


def _axis_angles(dim: int, pos: np.ndarray) -> np.ndarray:
    inv_freq = (1.0 / (np.float32(ROPE_BASE) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.concatenate([freqs, freqs], axis=-1)  # (n, dim)


def round_to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """float32 values rounded to `dtype` as a cast does (nearest, ties to even), returned as float32.
    Done on the host: the tables are host data, so no device round trip."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == ms.float32:
        return values
    if dtype == ms.float16:
        return values.astype(np.float16).astype(np.float32)
    if dtype != ms.bfloat16:
        raise ValueError(f"RoPE tables in {dtype} are not supported: use float32, float16 or bfloat16")
    bits = values.view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


@dataclass
class Rope3D:
    """cos/sin tables (n, 1, head_dim) for a set of token positions, and how to apply them."""

    cos: Tensor
    sin: Tensor
    split: Tuple[int, int, int]
    _full: Dict[tuple, Tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def for_positions(cls, positions: np.ndarray, head_dim: int, dtype=ms.float32) -> "Rope3D":
        split = rope_channel_split(head_dim)
        angles = np.concatenate([_axis_angles(d, positions[:, i]) for i, d in enumerate(split)], axis=-1)
        angles = round_to_dtype(angles, dtype)
        cos = Tensor(np.cos(angles)[:, None, :], dtype)
        sin = Tensor(np.sin(angles)[:, None, :], dtype)
        return cls(cos=cos, sin=sin, split=split)

    @classmethod
    def for_grid(cls, f: int, h: int, w: int, head_dim: int, start: int = 0, stop: int = None, dtype=ms.float32):
        return cls.for_positions(grid_positions(f, h, w, start, stop), head_dim, dtype)

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x (b, n, heads, head_dim); n must equal the table length."""
        if is_ascend():  # pragma: no cover - needs an NPU
            parts = split(x, self.split, dim=-1)
            rotated = []
            for part in parts:
                a, b = mint.chunk(part, 2, dim=-1)
                rotated.append(mint.cat([-b, a], dim=-1))
            return x * self.cos + mint.cat(rotated, dim=-1) * self.sin
        if host.blas_ready(x) and self.cos.dtype == x.dtype:
            # CPU float32: numpy on views; rotate-half of every part is one BLAS product by a signed
            # permutation matrix (exact), the (n, 1, d) tables broadcast over the heads
            xn = host.view(x)
            head_dim = xn.shape[-1]
            turn = self._host_turn(xn.dtype)
            rotated = (xn.reshape(-1, head_dim) @ turn).reshape(xn.shape)
            rotated *= host.view(self.sin)
            out = xn * host.view(self.cos)
            out += rotated
            return host.wrap(out)
        # CPU: rotate-half of every part is one product by a signed permutation matrix (exact), and
        # the tables are tiled to x's shape so that every product is between equal shapes
        cos, sin, turn = self._cpu_tables(tuple(x.shape), x.dtype)
        head_dim = x.shape[-1]
        rotated = mint.matmul(x.reshape(-1, head_dim), turn).reshape(x.shape)
        return x * cos + rotated * sin

    def _host_turn(self, dtype) -> np.ndarray:
        key = ("host", np.dtype(dtype).str)
        if key not in self._full:
            self._full[key] = rotate_half_matrix(self.split).astype(dtype)
        return self._full[key]

    def _cpu_tables(self, shape: tuple, dtype) -> Tuple[Tensor, Tensor, Tensor]:
        key = (shape, dtype)
        if key not in self._full:
            turn = Tensor(rotate_half_matrix(self.split), dtype)
            cos, sin = self.cos.astype(dtype), self.sin.astype(dtype)
            if 2 * int(np.prod(shape)) * 4 <= MAX_FULL_TABLE_BYTES:
                cos, sin = expand(cos, shape), expand(sin, shape)
            self._full[key] = (cos, sin, turn)
        return self._full[key]


def rotate_half_matrix(split: Sequence[int]) -> np.ndarray:
    """(d, d) signed permutation R with x @ R = each part of x rotated by half: (a, b) -> (-b, a)."""
    dim = int(sum(split))
    turn = np.zeros((dim, dim), dtype=np.float32)
    start = 0
    for size in split:
        half = size // 2
        for j in range(half):
            turn[start + half + j, start + j] = -1.0  # first half of the output: -b
            turn[start + j, start + half + j] = 1.0   # second half: a
        start += size
    return turn
