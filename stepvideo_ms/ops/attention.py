"""Scaled dot-product attention over (batch, seq, heads, head_dim) tensors.

CPU: computed in blocks of queries so that at most `max_score_bytes` of scores exist at once
(never seq x seq for long sequences). float32: the products and the layout in numpy (BLAS reads
the (b, s, h, d) tensors per head in place, no transposed copies), the softmax by MindSpore's
kernel on a zero-copy view; other dtypes: MindSpore's kernels throughout. Ascend: the fused `flash_attention_score` kernel for
float16/bfloat16 with a head_dim it supports (a multiple of 16, at most 512); float32 inputs
(HunyuanCLIP runs in float32, as upstream) take the blocked path, which the kernel does not serve.
Causal attention passes the kernel's compressed 2048x2048 causal mask (`sparse_mode` 2), built once;
a key mask is prepared once per forward (`KeyMask`) and reused by every layer.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend
from . import host
from .broadcast import add, expand

# Upper bound on the score block held at once on CPU (float32 bytes).
DEFAULT_MAX_SCORE_BYTES = 128 * 1024 * 1024
# flash_attention_score: the compressed causal mask of sparse_mode 2/3 is this square.
COMPRESSED_MASK_SIZE = 2048
LEFT_UP_CAUSAL = 2  # sparse_mode: query i sees keys j <= i


class KeyMask:
    """Which keys each sample may attend, prepared once per forward and shared by every layer.

    keep: bool (b, sk), True where the key may be attended. The fused kernel's form, bool
    (b, 1, sq, sk) with 1 = discard, is built once per query length and kept.
    """

    def __init__(self, keep: Tensor):
        if keep.ndim != 2:
            raise ValueError(f"key mask must be (batch, keys), got {tuple(keep.shape)}")
        self.keep = keep if keep.dtype == ms.bool_ else keep.astype(ms.bool_)
        self._drop: Dict[int, Tensor] = {}

    @property
    def shape(self):
        return self.keep.shape

    def __getitem__(self, index) -> "KeyMask":
        """The mask of some samples (a micro-batch): `mask[start:stop]`."""
        return KeyMask(self.keep[index])

    def discard(self, sq: int) -> Tensor:
        """bool (b, 1, sq, sk), True where the key is discarded (flash_attention_score's polarity)."""
        if sq not in self._drop:
            b, sk = self.keep.shape
            self._drop[sq] = mint.logical_not(self.keep).reshape(b, 1, 1, sk).broadcast_to((b, 1, sq, sk))
        return self._drop[sq]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Union[Tensor, KeyMask]] = None,
    bias: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
) -> Tensor:
    """softmax(q k^T * scale + bias, masked) v.

    q: (b, sq, h, d); k, v: (b, sk, hk, d) with hk dividing h (grouped-query attention: query head i
        reads key/value head i // (h // hk); the fused kernel takes the groups as they are).
    key_mask: bool (b, sk), True where the key may be attended, or a `KeyMask` (prepared once).
    bias: float, broadcastable to (b, h, sq, sk), added to the scores (ALiBi and friends).
    causal: query i sees keys j <= i (sq == sk).
    Returns (b, sq, h, d) in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (batch, seq, heads, head_dim) tensors, got q{q.shape} k{k.shape} v{v.shape}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: k{k.shape} and v{v.shape} must match q{q.shape} in batch and head_dim, "
                         f"with key/value heads dividing the query heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if is_ascend() and fused_supported(q):
        mask = key_mask if key_mask is None or isinstance(key_mask, KeyMask) else KeyMask(key_mask)
        return _attention_ascend(q, k, v, mask, bias, causal, scale)
    if isinstance(key_mask, KeyMask):
        key_mask = key_mask.keep
    if host.blas_ready(q, k, v) and (bias is None or host.has_numpy(bias)):
        return _attention_host(q, k, v, key_mask, bias, causal, scale, max_score_bytes)
    if k.shape[2] != q.shape[2]:
        k, v = repeat_heads(k, q.shape[2]), repeat_heads(v, q.shape[2])
    return _attention_blocked(q, k, v, key_mask, bias, causal, scale, max_score_bytes)


def repeat_heads(x: Tensor, heads: int) -> Tensor:
    """(b, s, hk, d) -> (b, s, heads, d): each key/value head serves heads // hk consecutive query heads."""
    b, s, hk, d = x.shape
    return x.reshape(b, s, hk, 1, d).broadcast_to((b, s, hk, heads // hk, d)).reshape(b, s, heads, d)


def fused_supported(q: Tensor) -> bool:
    """flash_attention_score serves float16/bfloat16 with head_dim a multiple of 16, at most 512."""
    d = q.shape[-1]
    return q.dtype in (ms.float16, ms.bfloat16) and d % 16 == 0 and d <= 512


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


def _attention_host(q, k, v, key_mask, bias, causal, scale, max_score_bytes):
    """The CPU path for float32/float64: numpy products on per-head strided views, blocks of queries."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qn = host.view(q) * np.asarray(scale, dtype=host.view(q).dtype)  # (b, sq, h, d), scaled copy
    kn, vn = host.view(k), host.view(v)
    if hk != h:  # grouped-query attention: each key/value head serves h // hk consecutive query heads
        kn, vn = np.repeat(kn, h // hk, axis=2), np.repeat(vn, h // hk, axis=2)
    q_heads = qn.transpose(0, 2, 1, 3)  # (b, h, sq, d), views: BLAS reads them with a leading stride
    k_heads_t = kn.transpose(0, 2, 3, 1)  # (b, h, d, sk)
    v_heads = vn.transpose(0, 2, 1, 3)  # (b, h, sk, d)
    drop = None if key_mask is None else ~host.view(key_mask.astype(ms.bool_)).reshape(b, 1, 1, sk)
    bias_n = None
    if bias is not None:
        bias_n = host.view(bias).astype(qn.dtype, copy=False)
        bias_n = bias_n.reshape((1,) * (4 - bias_n.ndim) + bias_n.shape)
    neg = np.finfo(qn.dtype).min
    out = np.empty((b, sq, h, d), dtype=qn.dtype)
    qblock = query_block_size(b, h, sq, sk, max_score_bytes)
    for start in range(0, sq, qblock):
        stop = min(sq, start + qblock)
        scores = np.matmul(q_heads[:, :, start:stop], k_heads_t)  # (b, h, n, sk)
        if bias_n is not None:
            scores += bias_n if bias_n.shape[2] == 1 else bias_n[:, :, start:stop]
        if drop is not None:
            np.copyto(scores, neg, where=drop)
        if causal:
            np.copyto(scores, neg, where=np.arange(sk)[None, :] > np.arange(start, stop)[:, None])
        probs = host.view(mint.softmax(host.wrap(scores), dim=-1))
        out[:, start:stop] = np.matmul(probs, v_heads).transpose(0, 2, 1, 3)
    return host.wrap(out)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == ms.float32 else t.astype(ms.float32)


@functools.lru_cache(maxsize=1)
def compressed_causal_mask() -> Tensor:
    """flash_attention_score's (2048, 2048) causal mask for sparse_mode 2/3 (1 = discard), built once."""
    n = COMPRESSED_MASK_SIZE
    return Tensor(np.triu(np.ones((n, n), dtype=np.bool_), k=1))


def _attention_ascend(q, k, v, key_mask: Optional[KeyMask], bias, causal, scale):
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    drop, sparse_mode = None, 0
    if causal and key_mask is not None:  # no caller does this: one full mask, built per call
        future = Tensor(np.triu(np.ones((sq, sk), dtype=np.bool_), k=1)).reshape(1, 1, sq, sk)
        drop = mint.logical_or(key_mask.discard(sq), future)
    elif causal:
        drop, sparse_mode = compressed_causal_mask(), LEFT_UP_CAUSAL
    elif key_mask is not None:
        drop = key_mask.discard(sq)
    real_shift = None
    if bias is not None:  # (b or 1, h, sq, sk) as the kernel takes it; only missing axes are broadcast
        real_shift = bias.astype(q.dtype) if bias.dtype != q.dtype else bias
        while real_shift.ndim < 4:
            real_shift = real_shift.expand_dims(0)
        lead = real_shift.shape[0] if real_shift.shape[0] in (1, b) else b
        if tuple(real_shift.shape) != (lead, h, sq, sk):
            real_shift = real_shift.broadcast_to((lead, h, sq, sk))
    return ops.flash_attention_score(
        q, k, v, head_num=h, real_shift=real_shift, attn_mask=drop, scalar_value=scale,
        input_layout="BSND", sparse_mode=sparse_mode,
    )
