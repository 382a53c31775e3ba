"""Timestep, motion-score and caption embeddings of the DiT (AdaLN-single, PixArt-alpha style)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from .. import ops
from .common import Linear

TIME_PROJ_CHANNELS = 256
TIMESTEP_RESCALE = 1000.0


def sinusoidal_embedding(t: Tensor, dim: int = TIME_PROJ_CHANNELS, max_period: float = 10000.0) -> Tensor:
    """[cos | sin] of t * exp(-ln(max_period) * i / half): flip_sin_to_cos=True, no frequency shift."""
    half = dim // 2
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(np.float32))
    args = t.astype(ms.float32)[:, None] * freqs[None, :]
    emb = mint.cat([mint.cos(args), mint.sin(args)], dim=-1)
    if dim % 2:
        emb = mint.cat([emb, mint.zeros((emb.shape[0], 1), dtype=emb.dtype)], dim=-1)
    return emb


class TimestepEmbedding(nn.Cell):
    def __init__(self, in_channels: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.linear_1 = Linear(in_channels, dim, dtype=dtype)
        self.linear_2 = Linear(dim, dim, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_2(ops.silu(self.linear_1(x)))


class CombinedTimestepEmbeddings(nn.Cell):
    """Timestep embedding, plus the motion-score embedding when additional conditions are used (TI2V)."""

    def __init__(self, dim: int, use_additional_conditions: bool, dtype=ms.float32):
        super().__init__()
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_CHANNELS, dim, dtype)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            self.motion_score_embedder = TimestepEmbedding(TIME_PROJ_CHANNELS, dim, dtype)

    def construct(self, timestep: Tensor, motion_score: Optional[Tensor] = None) -> Tensor:
        emb = self.timestep_embedder(sinusoidal_embedding(timestep).astype(self.dtype))
        if self.use_additional_conditions:
            if motion_score is None:
                raise ValueError("this model was built with use_additional_conditions=True: pass motion_score")
            emb = emb + self.motion_score_embedder(sinusoidal_embedding(motion_score.reshape(-1)).astype(self.dtype))
        return emb


class AdaLayerNormSingle(nn.Cell):
    """adaLN-single: one embedding of the timestep gives the 6 modulation vectors of every block."""

    def __init__(self, dim: int, use_additional_conditions: bool = False, dtype=ms.float32):
        super().__init__()
        self.emb = CombinedTimestepEmbeddings(dim, use_additional_conditions, dtype)
        self.linear = Linear(dim, 6 * dim, dtype=dtype)

    def construct(self, timestep: Tensor, motion_score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        embedded = self.emb(timestep * TIMESTEP_RESCALE, motion_score)
        return self.linear(ops.silu(embedded)), embedded


class PixArtAlphaTextProjection(nn.Cell):
    def __init__(self, in_features: int, hidden_size: int, dtype=ms.float32):
        super().__init__()
        self.linear_1 = Linear(in_features, hidden_size, dtype=dtype)
        self.linear_2 = Linear(hidden_size, hidden_size, dtype=dtype)

    def construct(self, caption: Tensor) -> Tensor:
        return self.linear_2(ops.gelu_tanh(self.linear_1(caption)))
