"""The matmul-based CPU convolution against MindSpore's own conv3d/conv2d."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from stepvideo_ms.ops import conv as conv_mod
from stepvideo_ms.ops.conv import conv2d, conv3d, conv3d_native

CAUSAL3 = ((2, 0), (1, 1), (1, 1))

CASES_3D = [
    # x shape, weight shape, stride, padding
    ((1, 4, 5, 6, 7), (3, 4, 3, 3, 3), 1, CAUSAL3),            # causal k3 (the VAE's CausalConv)
    ((2, 4, 17, 8, 10), (5, 4, 3, 3, 3), 2, CAUSAL3),          # Downsample3D: causal, stride 2, batch 2
    ((1, 3, 4, 9, 8), (6, 3, 1, 3, 3), (1, 2, 2), ((0, 0), (0, 1), (0, 1))),  # Downsample2D per frame
    ((1, 4, 3, 5, 5), (4, 4, 1, 1, 1), 1, 0),                  # pointwise (attention projections)
    ((2, 6, 3, 5, 4), (8, 6, 1, 1, 1), 1, 0),                  # pointwise, batch 2, widening
    ((1, 4, 6, 5, 7), (2, 4, 2, 3, 1), (2, 1, 3), ((1, 0), (0, 2), (1, 1))),  # odd kernel/stride mix
    ((1, 8, 5, 4, 6), (8, 8, 3, 3, 3), 1, 1),                  # symmetric padding
    ((1, 5, 3, 6, 6), (4, 5, 1, 1, 1), 2, 0),                  # strided pointwise
    ((1, 4, 2, 2, 2), (40, 4, 3, 3, 3), 1, CAUSAL3),           # more output channels than positions
]


def _rand(shape, seed):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("xs,ws,stride,padding", CASES_3D)
def test_conv3d_matches_native(xs, ws, stride, padding):
    x, w, b = _rand(xs, 1), _rand(ws, 2), _rand(ws[:1], 3)
    ref = conv3d_native(x, w, b, stride, padding).asnumpy()
    ours = conv3d(x, w, b, stride, padding).asnumpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * (1 + np.abs(ref).max()))


def test_native_reference_is_ops_conv3d_with_explicit_zero_padding():
    """The reference itself: asymmetric (causal) padding = ops.pad with zeros + an unpadded ops.conv3d."""
    x, w = _rand((1, 3, 4, 5, 6), 4), _rand((2, 3, 3, 3, 3), 5)
    direct = ops.conv3d(ops.pad(x, (1, 1, 1, 1, 2, 0)), w, None)
    np.testing.assert_allclose(conv3d_native(x, w, None, 1, CAUSAL3).asnumpy(), direct.asnumpy(), atol=1e-6)


@pytest.mark.parametrize("budget", [3000, 2 * 7 * 9 * 4 * 6 * 27, 3 * 2 * 4 * 5 * 4 * 6 * 27])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_tiles_give_the_same_result(budget, stride):
    """Small im2col budgets force row bands (3000 bytes) or blocks of 2-3 frames: same numbers."""
    x, w, b = _rand((2, 6, 5, 7, 9), 6), _rand((5, 6, 3, 3, 3), 7), _rand((5,), 8)
    whole = conv3d(x, w, b, stride, CAUSAL3).asnumpy()
    tiled = conv3d(x, w, b, stride, CAUSAL3, max_cols_bytes=budget).asnumpy()
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    np.testing.assert_allclose(whole, conv3d_native(x, w, b, stride, CAUSAL3).asnumpy(), atol=1e-4)


def test_output_blocks_cover_every_position_once():
    for budget in (1, 500, 5000, 10 ** 9):
        blocks = conv_mod.output_blocks((4, 5, 6), 100, budget)
        seen = np.zeros((4, 5), int)
        for t0, t1, h0, h1 in blocks:
            seen[t0:t1, h0:h1] += 1
        assert (seen == 1).all()


def test_conv3d_without_bias_keeps_a_half_input_dtype():
    x, w = _rand((1, 4, 3, 4, 4), 9), _rand((4, 4, 3, 3, 3), 10)
    ref = conv3d_native(x, w, None, 1, CAUSAL3).asnumpy()
    half = conv3d(x.astype(ms.float16), w.astype(ms.float16), None, 1, CAUSAL3)
    assert half.dtype == ms.float16
    np.testing.assert_allclose(half.asnumpy().astype(np.float32), ref, atol=1e-2 * (1 + np.abs(ref).max()))


def test_conv2d_matches_native():
    x, w, b = _rand((3, 4, 9, 8), 11), _rand((5, 4, 3, 3), 12), _rand((5,), 13)
    ref = ops.conv2d(ops.pad(x, (0, 1, 0, 1)), w, b, stride=2).asnumpy()
    ours = conv2d(x, w, b, 2, ((0, 1), (0, 1))).asnumpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5 * (1 + np.abs(ref).max()))
    ref1 = ops.conv2d(x, w, b, pad_mode="pad", padding=1).asnumpy()
    np.testing.assert_allclose(conv2d(x, w, b, 1, 1).asnumpy(), ref1, atol=1e-5 * (1 + np.abs(ref1).max()))


def test_conv_rejects_bad_arguments():
    x = _rand((1, 4, 3, 4, 4), 14)
    with pytest.raises(ValueError, match="channels"):
        conv3d(x, _rand((2, 3, 3, 3, 3), 15))
    with pytest.raises(ValueError, match="5-D"):
        conv3d(x[0], _rand((2, 4, 3, 3, 3), 15))
    with pytest.raises(ValueError, match="padding"):
        conv3d(x, _rand((2, 4, 3, 3, 3), 15), padding=(1, 1))
    with pytest.raises(ValueError, match="stride"):
        conv3d(x, _rand((2, 4, 3, 3, 3), 15), stride=0)
    with pytest.raises(ValueError, match="smaller than kernel"):
        conv3d(x, _rand((2, 4, 5, 3, 3), 15))
    with pytest.raises(ValueError, match="bias"):
        conv3d(x, _rand((2, 4, 3, 3, 3), 15), _rand((3,), 16))


def test_cpu_path_is_the_default_off_ascend(monkeypatch):
    """On CPU, a 3x3x3 conv must not fall back to the slow native kernel (pointwise ones may)."""
    monkeypatch.setattr(conv_mod.ops, "conv3d", None)  # any native call would now fail
    x, w = _rand((1, 4, 3, 4, 4), 17), _rand((4, 4, 3, 3, 3), 18)
    assert conv3d(x, w, None, 1, CAUSAL3).shape == (1, 4, 3, 4, 4)
    assert conv3d(x, w, None, 2, CAUSAL3).shape == (1, 4, 2, 2, 2)



def test_matmul_weight_is_laid_out_once_and_remade_after_set_data(monkeypatch):
    """The cached layout gives the uncached result, is built once per weight, and is remade every time
    set_data gives the weight new values, however many loads come between two calls (the allocator
    reuses freed addresses: the cache must not take a new weight for the old one)."""
    x, b = _rand((1, 4, 3, 5, 6), 1), _rand((5,), 3)
    w = ms.Parameter(_rand((5, 4, 3, 3, 3), 2), name="w")
    cache, layouts = conv_mod.MatmulWeight(), []
    real_layout = conv_mod._matmul_layout
    monkeypatch.setattr(conv_mod, "_matmul_layout", lambda weight: layouts.append(1) or real_layout(weight))

    def cached():
        return conv3d(x, w, b, 1, CAUSAL3, weight_cache=cache).asnumpy()

    def uncached():
        return conv3d_native(x, w, b, 1, CAUSAL3).asnumpy()

    first = cached()
    np.testing.assert_array_equal(cached(), first)
    assert len(layouts) == 1  # the second call reused the layout
    for seed in range(10, 22):
        for extra in range(seed % 3):  # 0-2 loads between two calls, each freeing the previous storage
            w.set_data(_rand(w.shape, 100 * seed + extra))
        w.set_data(_rand(w.shape, seed))
        ref = uncached()
        np.testing.assert_allclose(cached(), ref, rtol=0, atol=1e-5 * (1 + np.abs(ref).max()))
    assert len(layouts) == 13  # once per new weight, never per call


def test_clear_weight_caches_forgets_every_layout():
    from stepvideo_ms.models.vae_blocks import CausalConv, FrameConv2d

    class Two(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = CausalConv(4, 4, 3)
            self.b = FrameConv2d(4, 4, 3)

        def construct(self, x):
            return self.b(self.a(x))

    model = Two()
    for _, p in model.parameters_and_names():
        p.set_data(_rand(p.shape, 5))
    out = model(_rand((1, 4, 2, 4, 4), 6)).asnumpy()
    assert out.shape == (1, 4, 2, 4, 4)
    caches = [model.a.conv.matmul_weight, model.b.matmul_weight]
    assert all(c._layout is not None for c in caches)
    assert conv_mod.clear_weight_caches(model) == 2
    assert all(c._layout is None and c._source is None for c in caches)
    np.testing.assert_array_equal(model(_rand((1, 4, 2, 4, 4), 6)).asnumpy(), out)
