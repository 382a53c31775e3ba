"""Ulysses sequence-parallel self-attention.

Each rank of an SP group of size P holds n = ceil(N / P) consecutive tokens of the N video tokens
(the last ranks pad with zero tokens when P does not divide N). Self-attention swaps the split:
an all-to-all turns (b, n, heads, d) into (b, P*n, heads/P, d) (all tokens, a share of the heads),
every rank attends its heads over all tokens, and a second all-to-all restores (b, n, heads, d).
After the first all-to-all the padding rows are exactly the last P*n - N of the sequence, so
they are kept out of the keys and values by attending to the first N only: the effect of a key
mask, without building one (the fused Ascend kernel would need it as a (b, 1, P*n, P*n) tensor).
Padding rows still run as queries and are dropped at the end. Cross-attention and everything
token-local needs no communication. RoPE tables cover each rank's own real positions; padding
rows get the identity rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from .. import ops
from ..models.rope import Rope3D, rope_channel_split
from .comm import Communicator


@dataclass(frozen=True)
class TokenShard:
    """Tokens start..stop of `total` held by SP rank `index` of `degree`, padded to `local` rows."""

    total: int
    degree: int
    index: int

    def __post_init__(self):
        if self.total < 1 or self.degree < 1 or not 0 <= self.index < self.degree:
            raise ValueError(f"invalid token shard: {self.total} tokens, SP rank {self.index} of {self.degree}")

    @property
    def local(self) -> int:
        return -(-self.total // self.degree)

    @property
    def padded_total(self) -> int:
        return self.local * self.degree

    @property
    def start(self) -> int:
        return min(self.index * self.local, self.total)

    @property
    def stop(self) -> int:
        return min((self.index + 1) * self.local, self.total)

    @property
    def real(self) -> int:
        return self.stop - self.start

    @property
    def has_padding(self) -> bool:
        return self.padded_total != self.total

    def take(self, tokens: Tensor) -> Tensor:
        """This rank's rows of (b, total, ...) tokens, zero-padded to (b, local, ...)."""
        if tokens.shape[1] != self.total:
            raise ValueError(f"expected {self.total} tokens on axis 1, got {tuple(tokens.shape)}")
        pad = self.local - self.real
        own = tokens[:, self.start:self.stop] if self.real else None
        if not pad:
            return own
        zeros = mint.zeros((tokens.shape[0], pad) + tuple(tokens.shape[2:]), dtype=tokens.dtype)
        return zeros if own is None else mint.cat([own, zeros], dim=1)

    def rope(self, model, grid: Tuple[int, int, int]) -> Rope3D:
        """RoPE tables of this rank's rows: its real grid positions, then identity rows for padding."""
        if not self.has_padding or self.real == self.local:
            return model.rope_for(grid, self.start, self.stop)
        head_dim, dtype, pad = model.attention_head_dim, model.dtype, self.local - self.real
        cos = [Tensor(np.ones((pad, 1, head_dim), np.float32), dtype)]
        sin = [Tensor(np.zeros((pad, 1, head_dim), np.float32), dtype)]
        if self.real:
            real = model.rope_for(grid, self.start, self.stop)
            cos.insert(0, real.cos)
            sin.insert(0, real.sin)
        return Rope3D(cos=mint.cat(cos, dim=0), sin=mint.cat(sin, dim=0), split=rope_channel_split(head_dim))


class UlyssesAttention:
    """The self-attention core `core(q, k, v)` on (b, local, heads, d) for one SP group.

    `idle()` makes the same collectives with zeros: a rank with no work in a pipeline tick calls it
    when its communicator is lockstep (the CPU world-collective emulation).
    """

    def __init__(self, comm: Communicator, group: Sequence[int], shard: TokenShard, batch: int,
                 heads: int, head_dim: int, dtype=ms.float32):
        self.comm, self.group, self.shard = comm, tuple(group), shard
        if len(self.group) != shard.degree:
            raise ValueError(f"SP group {self.group} has {len(self.group)} ranks but the tokens are split {shard.degree} ways")
        if heads % shard.degree:
            raise ValueError(f"{heads} heads cannot be split over ulysses_degree={shard.degree}")
        self.batch, self.heads, self.head_dim, self.dtype = batch, heads, head_dim, dtype

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if len(self.group) == 1:
            return ops.attention(q, k, v)
        d = q.shape[-1]
        qkv = mint.cat([q, k, v], dim=-1)  # one exchange for the three
        full = self.comm.all_to_all(qkv, self.group, scatter_axis=2, gather_axis=1)  # (b, P*n, heads/P, 3d)
        q, k, v = ops.split(full, [d, d, d], dim=-1)
        if self.shard.has_padding:  # the padding is the tail: attend to the N real keys only
            k, v = k[:, :self.shard.total], v[:, :self.shard.total]
        out = ops.attention(q, k, v)
        return self.comm.all_to_all(out, self.group, scatter_axis=1, gather_axis=2)  # (b, local, heads, d)

    def idle(self) -> None:
        if len(self.group) == 1:
            return
        shape = (self.batch, self.shard.local, self.heads, self.head_dim)
        self.comm.all_to_all(mint.zeros(shape[:-1] + (3 * self.head_dim,), dtype=self.dtype), self.group, 2, 1)
        back = (self.batch, self.shard.padded_total, self.heads // len(self.group), self.head_dim)
        self.comm.all_to_all(mint.zeros(back, dtype=self.dtype), self.group, 1, 2)
