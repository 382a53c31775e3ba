"""The CPU fast paths of stepvideo_ms.ops against numpy references (float32, small shapes)."""
import math

import numpy as np
import pytest
from mindspore import Tensor

from stepvideo_ms import ops
from stepvideo_ms.models.rope import Rope3D, grid_positions, rotate_half_matrix
from stepvideo_ms.ops import broadcast

RNG = np.random.default_rng(5)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def np_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    return out * (1 if w is None else w) + (0 if b is None else b)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_numpy(bias):
    x, w, b = rand(2, 5, 7), rand(3, 7), rand(3)
    out = ops.linear(Tensor(x), Tensor(w), Tensor(b) if bias else None).asnumpy()
    assert out.shape == (2, 5, 3)
    np.testing.assert_allclose(out, x @ w.T + (b if bias else 0), rtol=1e-5, atol=1e-5)


def test_linear_rejects_wrong_width():
    with pytest.raises(ValueError, match="linear: input has 6 features"):
        ops.linear(Tensor(rand(2, 6)), Tensor(rand(3, 7)))


def test_linear_heads_equals_split_of_fused_projection():
    heads, hd, parts = 3, 4, 3
    x, w = rand(2, 5, 8), rand(heads * parts * hd, 8)
    fused = (x @ w.T).reshape(2, 5, heads, parts * hd)
    outs = ops.linear_heads(Tensor(x), Tensor(w), heads, hd, parts)
    assert len(outs) == parts
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out.asnumpy(), fused[..., i * hd:(i + 1) * hd], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="heads\\*parts\\*head_dim"):
        ops.linear_heads(Tensor(x), Tensor(w), heads, hd, 2)


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_matches_numpy(affine):
    x, w, b = rand(2, 6, 16) * 3 + 1, rand(16), rand(16)
    args = (Tensor(w), Tensor(b)) if affine else (None, None)
    out = ops.layer_norm(Tensor(x), *args, 1e-5).asnumpy()
    np.testing.assert_allclose(out, np_layer_norm(x, w if affine else None, b if affine else None, 1e-5),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_modulated_layer_norm_matches_norm_then_modulation(affine, rows):
    x, w, b = rand(2, 6, 16), rand(16), rand(16)
    scale, shift = rand(rows, 1, 16), rand(rows, 1, 16)
    args = (Tensor(w), Tensor(b)) if affine else (None, None)
    out = ops.modulated_layer_norm(Tensor(x), *args, Tensor(scale), Tensor(shift), 1e-6).asnumpy()
    ref = np_layer_norm(x, w if affine else None, b if affine else None, 1e-6) * (1 + scale) + shift
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_modulated_layer_norm_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="one row per sample"):
        ops.modulated_layer_norm(Tensor(rand(2, 3, 8)), None, None, Tensor(rand(3, 1, 8)), Tensor(rand(3, 1, 8)), 1e-6)


def test_rms_norm_matches_numpy():
    x, w = rand(2, 5, 3, 8), rand(8)
    out = ops.rms_norm(Tensor(x), Tensor(w), 1e-6).asnumpy()
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_matches_formula():
    x = np.linspace(-8, 8, 401, dtype=np.float32)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ops.gelu_tanh(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_broadcast_mul_add_expand_and_repeat():
    a, b = rand(2, 1, 4), rand(2, 3, 4)
    np.testing.assert_array_equal(broadcast.mul(Tensor(a), Tensor(b)).asnumpy(), a * b)
    np.testing.assert_array_equal(broadcast.add(Tensor(b), Tensor(a[0, 0])).asnumpy(), b + a[0, 0])
    np.testing.assert_array_equal(broadcast.expand(Tensor(a), (3, 2, 5, 4)).asnumpy(), np.broadcast_to(a, (3, 2, 5, 4)))
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast.mul(Tensor(rand(2, 3)), Tensor(rand(4, 3)))
    x = rand(2, 3, 4)
    for axis in range(3):
        np.testing.assert_array_equal(broadcast.repeat_axis(Tensor(x), axis, 2).asnumpy(), np.repeat(x, 2, axis=axis))


def test_rope_apply_matches_rotate_half_reference():
    f, h, w, hd = 2, 3, 2, 16
    rope = Rope3D.for_grid(f, h, w, hd)
    x = rand(2, f * h * w, 3, hd)
    out = rope.apply(Tensor(x)).asnumpy()
    cos, sin = rope.cos.asnumpy(), rope.sin.asnumpy()
    start, rotated = 0, []
    for size in rope.split:
        part = x[..., start:start + size]
        rotated.append(np.concatenate([-part[..., size // 2:], part[..., :size // 2]], axis=-1))
        start += size
    ref = x * cos + np.concatenate(rotated, axis=-1) * sin
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    turn = rotate_half_matrix((4, 2, 2))
    assert sorted(np.abs(turn).sum(axis=0)) == [1.0] * 8  # a signed permutation
    assert grid_positions(f, h, w).shape == (f * h * w, 3)
