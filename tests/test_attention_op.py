"""The CPU attention: blocked over queries, equal to the one-shot formula, bounded score memory."""
import numpy as np
import pytest
from mindspore import Tensor

from stepvideo_ms.ops import attention
from stepvideo_ms.ops.attention import query_block_size


def reference(q, k, v, key_mask=None, bias=None, causal=False):
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if key_mask is not None:
        s = np.where(key_mask[:, None, None, :], s, -np.inf)
    if causal:
        n = q.shape[1]
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("max_bytes", [None, 4 * 2 * 3 * 37])  # one block, then 3 queries per block
def test_blocked_attention_matches_reference(max_bytes):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 37, 3, 16)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 37), bool)
    mask[1, 20:] = False
    bias = rng.standard_normal((1, 3, 37, 37)).astype(np.float32)
    kw = {} if max_bytes is None else {"max_score_bytes": max_bytes}
    for causal in (False, True):
        out = attention(Tensor(q), Tensor(k), Tensor(v), key_mask=Tensor(mask), bias=Tensor(bias), causal=causal, **kw)
        np.testing.assert_allclose(out.asnumpy(), reference(q, k, v, mask, bias, causal), atol=2e-5)


def test_block_size_bounds_the_score_matrix():
    # 76k video tokens, 48 heads / 8 ranks, batch 2: never the whole seq x seq at once
    block = query_block_size(2, 6, 76_000, 76_000, 128 * 1024 * 1024)
    assert block * 2 * 6 * 76_000 * 4 <= 128 * 1024 * 1024
    assert 1 <= block < 76_000


def test_cross_shapes_and_errors():
    q = Tensor(np.zeros((1, 5, 2, 8), np.float32))
    kv = Tensor(np.zeros((1, 7, 2, 8), np.float32))
    assert attention(q, kv, kv).shape == (1, 5, 2, 8)
    with pytest.raises(ValueError, match="causal"):
        attention(q, kv, kv, causal=True)
    with pytest.raises(ValueError, match="batch, seq, heads"):
        attention(Tensor(np.zeros((5, 2, 8), np.float32)), kv, kv)


def test_grouped_key_value_heads_serve_consecutive_query_heads():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 6, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 6, 2, 16)).astype(np.float32) for _ in range(2))
    out = attention(Tensor(q), Tensor(k), Tensor(v), causal=True)
    np.testing.assert_allclose(out.asnumpy(), reference(q, k.repeat(2, axis=2), v.repeat(2, axis=2), causal=True),
                               atol=2e-5)
    with pytest.raises(ValueError, match="divid"):
        attention(Tensor(q), Tensor(k[:, :, :1].repeat(3, axis=2)), Tensor(v[:, :, :1].repeat(3, axis=2)))
