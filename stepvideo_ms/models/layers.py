"""The DiT's transformer block: self-attention with 3D RoPE, cross-attention, feed-forward.

Self-attention takes its attention core as an argument (`core(q, k, v) -> out`, all
(b, n, heads, head_dim)): the plain one by default, the Ulysses sequence-parallel one when the
tokens are split over ranks. Nothing else in the block knows about parallelism.
"""
from __future__ import annotations

from typing import Callable, Optional

import mindspore as ms
from mindspore import Tensor, mint, nn

from .. import ops
from .common import LayerNorm, RMSNorm, make_linear, new_param
from .rope import Rope3D

AttentionCore = Callable[[Tensor, Tensor, Tensor], Tensor]
BLOCK_NORM_EPS = 1e-5  # upstream's block layer norms keep their own default, not the model's norm_eps


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return ops.attention(q, k, v)


class SelfAttention(nn.Cell):
    def __init__(self, dim: int, head_dim: int, dtype=ms.float32, weights: str = "full"):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = dim // head_dim
        self.wqkv = make_linear(dim, 3 * dim, False, dtype, weights)
        self.wo = make_linear(dim, dim, False, dtype, weights)
        self.q_norm = RMSNorm(head_dim, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, dtype=dtype)

    def construct(self, x: Tensor, rope: Rope3D, core: Optional[AttentionCore] = None) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.wqkv.heads(x, self.n_heads, self.head_dim, 3)
        q = rope.apply(self.q_norm(q))
        k = rope.apply(self.k_norm(k))
        out = (core or plain_attention)(q, k, v)
        return self.wo(out.reshape(b, n, self.n_heads * self.head_dim))


class CrossAttention(nn.Cell):
    def __init__(self, dim: int, head_dim: int, dtype=ms.float32, weights: str = "full"):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = dim // head_dim
        self.wq = make_linear(dim, dim, False, dtype, weights)
        self.wkv = make_linear(dim, 2 * dim, False, dtype, weights)
        self.wo = make_linear(dim, dim, False, dtype, weights)
        self.q_norm = RMSNorm(head_dim, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, dtype=dtype)

    def construct(self, x: Tensor, context: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.wq(x).reshape(b, n, self.n_heads, self.head_dim))
        k, v = self.wkv.heads(context, self.n_heads, self.head_dim, 2)
        out = ops.attention(q, self.k_norm(k), v, key_mask=key_mask)
        return self.wo(out.reshape(b, n, self.n_heads * self.head_dim))


class GELUProj(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int, dtype=ms.float32, weights: str = "full"):
        super().__init__()
        self.proj = make_linear(dim_in, dim_out, False, dtype, weights)

    def construct(self, x: Tensor) -> Tensor:
        return ops.gelu_tanh(self.proj(x))


class FeedForward(nn.Cell):
    """net.0 = tanh-GELU projection, net.1 = identity (kept for the upstream indices), net.2 = output."""

    def __init__(self, dim: int, mult: int = 4, dtype=ms.float32, weights: str = "full"):
        super().__init__()
        self.net = nn.CellList([GELUProj(dim, dim * mult, dtype, weights), nn.Identity(),
                                make_linear(dim * mult, dim, False, dtype, weights)])

    def construct(self, x: Tensor) -> Tensor:
        for cell in self.net:
            x = cell(x)
        return x


def tokenwise(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: Optional[int]) -> Tensor:
    """fn(x) for an fn that works token by token ((b, n, ...) -> (b, n, ...)), run on `chunk` tokens at a
    time when n is larger: the same result, with fn's intermediates (the 4x-wide feed-forward, float32
    norm temporaries) the size of one chunk instead of the whole sequence."""
    n = int(x.shape[1])
    if not chunk or n <= chunk:
        return fn(x)
    return mint.cat([fn(x[:, i:min(i + chunk, n)]) for i in range(0, n, chunk)], dim=1)


class StepVideoTransformerBlock(nn.Cell):
    """weights "int8": every linear layer of the block (attention q/k/v/out, cross-attention, feed-forward)
    holds int8 weights with per-output-channel scales; norms and the modulation table stay in dtype."""

    def __init__(self, dim: int, head_dim: int, dtype=ms.float32, weights: str = "full"):
        super().__init__()
        self.dim = dim
        self.weights = weights
        self.norm1 = LayerNorm(dim, eps=BLOCK_NORM_EPS, dtype=dtype)
        self.attn1 = SelfAttention(dim, head_dim, dtype, weights)
        self.norm2 = LayerNorm(dim, eps=BLOCK_NORM_EPS, dtype=dtype)
        self.attn2 = CrossAttention(dim, head_dim, dtype, weights)
        self.ff = FeedForward(dim, dtype=dtype, weights=weights)
        self.scale_shift_table = new_param((6, dim), dtype)

    def construct(self, x: Tensor, context: Tensor, t6: Tensor, key_mask: Optional[Tensor],
                  rope: Rope3D, core: Optional[AttentionCore] = None, chunk: Optional[int] = None) -> Tensor:
        """`chunk`: run the token-wise parts (modulated norms, cross-attention queries, feed-forward) on
        that many tokens at a time (tokenwise); the self-attention sees the whole sequence."""
        mods = self.scale_shift_table[None] + t6.reshape(-1, 6, self.dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mint.chunk(mods, 6, dim=1)
        h = tokenwise(lambda t: ops.modulated_layer_norm(t, self.norm1.weight, self.norm1.bias, scale_msa, shift_msa,
                                                         self.norm1.eps), x, chunk)
        x = ops.broadcast.mul(gate_msa, self.attn1(h, rope, core)) + x
        del h

        def rest(t: Tensor) -> Tensor:
            t = self.attn2(t, context, key_mask) + t
            h2 = ops.modulated_layer_norm(t, self.norm2.weight, self.norm2.bias, scale_mlp, shift_mlp, self.norm2.eps)
            return ops.broadcast.mul(gate_mlp, self.ff(h2)) + t

        return tokenwise(rest, x, chunk)


class PatchEmbed(nn.Cell):
    """Conv2d(kernel=stride=patch) from latent channels to the model width, as `proj`."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, dtype=ms.float32):
        super().__init__()
        self.proj = _ConvParams(embed_dim, in_channels, patch_size, dtype)

    def construct(self, x: Tensor) -> Tensor:
        return ops.patch_embed(x, self.proj.weight, self.proj.bias)


class _ConvParams(nn.Cell):
    def __init__(self, out_ch: int, in_ch: int, k: int, dtype):
        super().__init__()
        self.weight = new_param((out_ch, in_ch, k, k), dtype)
        self.bias = new_param((out_ch,), dtype)
