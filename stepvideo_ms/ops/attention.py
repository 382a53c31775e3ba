"""Scaled dot-product attention over (batch, seq, heads, head_dim) tensors.

CPU: computed in blocks of queries so that at most `max_score_bytes` of scores exist at once
(never seq x seq for long sequences). Ascend: the fused `flash_attention_score` kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from .broadcast import add, expand

# Upper bound on the score block held at once on CPU (float32 bytes).
DEFAULT_MAX_SCORE_BYTES = 128 * 1024 * 1024


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
) -> Tensor:
    """softmax(q k^T * scale + bias, masked) v.

    q: (b, sq, h, d); k, v: (b, sk, h, d).
    key_mask: bool (b, sk), True where the key may be attended.
    bias: float, broadcastable to (b, h, sq, sk), added to the scores (ALiBi and friends).
    causal: query i sees keys j <= i (sq == sk).
    Returns (b, sq, h, d) in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (batch, seq, heads, head_dim) tensors, got q{q.shape} k{k.shape} v{v.shape}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if is_ascend():
        return _attention_ascend(q, k, v, key_mask, bias, causal, scale)
    return _attention_blocked(q, k, v, key_mask, bias, causal, scale, max_score_bytes)


def query_block_size(batch: int, heads: int, sq: int, sk: int, max_score_bytes: int) -> int:
    """How many queries one block holds so that batch*heads*block*sk float32 scores fit the bound."""
    per_query = max(1, batch * heads * sk * 4)
    return int(max(1, min(sq, max_score_bytes // per_query)))


_bmm_bt = ops.BatchMatMul(transpose_b=True)


def _attention_blocked(q, k, v, key_mask, bias, causal, scale, max_score_bytes):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out_dtype = q.dtype
    rows = b * h
    # (b*h, s, d), contiguous: one transpose kernel each (batched matmuls on permuted views copy
    # slowly); the scale goes on the queries (sk/d times fewer products than on the scores)
    qh = ops.transpose(_f32(q) * scale, (0, 2, 1, 3)).reshape(rows, sq, d)
    kh = ops.transpose(_f32(k), (0, 2, 1, 3)).reshape(rows, sk, d)
    vh = ops.transpose(_f32(v), (0, 2, 1, 3)).reshape(rows, sk, d)
    drop = None
    if key_mask is not None:
        drop = mint.logical_not(key_mask.astype(ms.bool_)).reshape(b, 1, 1, sk)
        drop = expand(drop, (b, h, 1, sk)).reshape(rows, 1, sk)
    if bias is not None:
        bias = _f32(bias)
        while bias.ndim < 4:
            bias = bias.expand_dims(0)
        bias = expand(bias, (b, h, bias.shape[2], sk)).reshape(rows, bias.shape[2], sk)
    # whole (sample, head) rows at a time while their scores fit, else query blocks of one row;
    # either way every slice is along the leading axis of a contiguous tensor
    if sq * sk * 4 <= max_score_bytes:
        group, qblock = max(1, max_score_bytes // (sq * sk * 4)), sq
    else:
        group, qblock = 1, query_block_size(1, 1, sq, sk, max_score_bytes)
    neg = Tensor(np.finfo(np.float32).min, ms.float32)
    outs = []
    for r0 in range(0, rows, group):
        r1 = min(rows, r0 + group)
        pieces = []
        for start in range(0, sq, qblock):
            stop = min(sq, start + qblock)
            qb = qh[r0:r1] if qblock == sq else qh[r0:r1, start:stop]
            scores = _bmm_bt(qb, kh[r0:r1])  # g n sk
            if bias is not None:
                scores = add(scores, bias[r0:r1] if bias.shape[1] == 1 or qblock == sq else bias[r0:r1, start:stop])
            block_drop = None if drop is None else expand(drop[r0:r1], scores.shape)
            if causal:
                future = Tensor(np.arange(sk)[None, :] > np.arange(start, stop)[:, None]).reshape(1, stop - start, sk)
                future = expand(future, scores.shape)
                block_drop = future if block_drop is None else mint.logical_or(block_drop, future)
            if block_drop is not None:
                scores = scores.masked_fill(block_drop, neg)
            pieces.append(mint.matmul(mint.softmax(scores, dim=-1), vh[r0:r1]))  # g n d
        outs.append(pieces[0] if len(pieces) == 1 else mint.cat(pieces, dim=1))
    out = outs[0] if len(outs) == 1 else mint.cat(outs, dim=0)
    out = ops.transpose(out.reshape(b, h, sq, d), (0, 2, 1, 3))
    return out if out_dtype == ms.float32 else out.astype(out_dtype)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == ms.float32 else t.astype(ms.float32)


def _attention_ascend(q, k, v, key_mask, bias, causal, scale):  # pragma: no cover - needs an NPU
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    drop = None  # flash_attention_score: 1 = masked out
    if key_mask is not None:
        drop = mint.logical_not(key_mask.astype(ms.bool_)).reshape(b, 1, 1, sk)
        drop = drop.broadcast_to((b, 1, sq, sk))
    if causal:
        future = Tensor(np.triu(np.ones((sq, sk), dtype=np.bool_), k=1)).reshape(1, 1, sq, sk)
        drop = future.broadcast_to((b, 1, sq, sk)) if drop is None else mint.logical_or(drop, future)
    pse = None
    if bias is not None:
        pse = bias.astype(q.dtype)
        while pse.ndim < 4:
            pse = pse.expand_dims(0)
        pse = pse.broadcast_to((b, h, sq, sk))
    return ops.flash_attention_score(
        q, k, v, head_num=h, pse=pse, attn_mask=None if drop is None else drop.astype(ms.uint8),
        scalar_value=scale, input_layout="BSND",
    )
