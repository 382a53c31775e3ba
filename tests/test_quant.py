"""Int8 weights (W8A16): the quantization, the int8 linear on CPU, loading, and the strict emulator of
WeightQuantBatchMatmul refusing every documented rule it enforces."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from mindspore.ops import auto_generate

from stepvideo_ms.ops.linear import linear_int8
from stepvideo_ms.ops.quant import dequantize_rows, quantize_rows, row_scales
from stepvideo_ms.testing.ascend_sim import quant_matmul

BF16 = ms.bfloat16
WQBMM = quant_matmul.emulator(auto_generate.WeightQuantBatchMatmul)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_quantize_rows_bounds_the_error_by_half_a_step_and_keeps_bf16_exact_scales():
    w = rand(64, 96) * np.linspace(0.01, 3, 64, dtype=np.float32)[:, None]
    w[5] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q.astype(np.int32)).max() <= 127
    bits = s.view(np.uint32)
    assert not (bits & 0xFFFF).any(), "scales are exact bfloat16 values"
    assert (s >= np.abs(w).max(axis=1) / 127).all()
    err = np.abs(dequantize_rows(q, s) - w)
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert s[5] == 1.0 and not q[5].any()
    np.testing.assert_array_equal(row_scales(w), s)


def test_quantize_rows_in_chunks_equals_one_piece(monkeypatch):
    from stepvideo_ms.ops import quant
    w = rand(40, 16, seed=3)
    whole = quantize_rows(w)
    monkeypatch.setattr(quant, "_ROWS_PER_CHUNK_BYTES", 16 * 4 * 3)  # 3 rows a chunk
    parts = quantize_rows(w)
    np.testing.assert_array_equal(whole[0], parts[0])
    np.testing.assert_array_equal(whole[1], parts[1])


def test_cpu_int8_linear_is_the_linear_of_the_dequantized_weight():
    w, x, b = rand(24, 32, seed=1), rand(2, 5, 32, seed=2), rand(24, seed=4)
    q, s = quantize_rows(w)
    out = linear_int8(Tensor(x), Tensor(q), Tensor(s), Tensor(b)).asnumpy()
    ref = x @ dequantize_rows(q, s).T + b
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="int8"):
        linear_int8(Tensor(x), Tensor(w), Tensor(s))


# ---- the emulator: bound to the real signatures, each documented rule refusing ------------------------
def call(x, w, scale, offset=None, bias=None, transpose_weight=True, **kw):
    return WQBMM(transpose_x=False, transpose_weight=transpose_weight)(x, w, scale, offset, None, None, bias, **kw)


def good(n=24, k=32, m=5, dtype=BF16):
    q, s = quantize_rows(rand(n, k, seed=5))
    return Tensor(rand(m, k, seed=6)).astype(dtype), Tensor(q), Tensor(s).astype(dtype)


def test_emulator_matches_the_documented_result_and_both_weight_layouts():
    x, w, s = good()
    b = Tensor(rand(24, seed=7))
    off = Tensor(np.full(24, 0.5, np.float32)).astype(BF16)
    out = call(x, w, s, off, b)
    assert out.dtype == BF16 and tuple(out.shape) == (5, 24)
    xf = x.astype(ms.float32).asnumpy()
    wf = (w.asnumpy().astype(np.float32) + 0.5) * s.astype(ms.float32).asnumpy()[:, None]
    np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), xf @ wf.T + b.asnumpy(), rtol=1e-2, atol=2e-2)
    untransposed = call(x, Tensor(w.asnumpy().T.copy()), s.reshape(1, -1), transpose_weight=False)
    np.testing.assert_array_equal(untransposed.astype(ms.float32).asnumpy(), call(x, w, s).astype(ms.float32).asnumpy())


def test_emulator_binds_the_real_signatures():
    x, w, s = good()
    with pytest.raises(TypeError, match="transpose_b"):  # the real init takes transpose_x / transpose_weight
        WQBMM(transpose_b=True)
    with pytest.raises(TypeError, match="scale"):
        WQBMM(transpose_weight=True)(x, w, scale=s)
    with pytest.raises(TypeError, match="bool"):
        WQBMM(transpose_weight=1)
    with pytest.raises(NotImplementedError):
        WQBMM(antiquant_group_size=32)


def test_emulator_refuses_x_that_is_not_2d_fp16_bf16():
    x, w, s = good()
    with pytest.raises(TypeError, match="dtype of 'x'"):
        call(x.astype(ms.float32), w, s.astype(ms.float32))
    with pytest.raises(ValueError, match="2-D"):
        call(x.reshape(1, 5, 32), w, s)


def test_emulator_refuses_a_weight_that_is_not_int8_or_does_not_fit():
    x, w, s = good()
    with pytest.raises(TypeError, match="dtype of 'weight'"):
        call(x, w.astype(BF16), s)
    with pytest.raises(ValueError, match="k=32"):
        call(x, w, s, transpose_weight=False)


def test_emulator_refuses_k_or_n_beyond_65535():
    x = Tensor(np.zeros((1, 65536), np.float32)).astype(BF16)
    w = Tensor(np.zeros((2, 65536), np.int8))
    with pytest.raises(ValueError, match="k=65536"):
        call(x, w, Tensor(np.ones(2, np.float32)).astype(BF16))
    x = Tensor(np.zeros((1, 2), np.float32)).astype(BF16)
    w = Tensor(np.zeros((65536, 2), np.int8))
    with pytest.raises(ValueError, match="n=65536"):
        call(x, w, Tensor(np.ones(65536, np.float32)).astype(BF16))


def test_emulator_refuses_a_scale_or_offset_of_another_dtype_or_shape():
    x, w, s = good()
    with pytest.raises(TypeError, match="antiquant_scale"):
        call(x, w, s.astype(ms.float32))
    with pytest.raises(ValueError, match="antiquant_scale"):
        call(x, w, s.reshape(24, 1))
    with pytest.raises(TypeError, match="antiquant_offset"):
        call(x, w, s, s.astype(ms.float16))
    with pytest.raises(ValueError, match="shape of antiquant_scale"):
        call(x, w, s, s.reshape(1, -1))


def test_emulator_refuses_a_bias_that_is_not_float32_with_bf16_x():
    x, w, s = good()
    with pytest.raises(TypeError, match="bias must be Float32"):
        call(x, w, s, bias=Tensor(rand(24)).astype(BF16))
    with pytest.raises(ValueError, match="bias"):
        call(x, w, s, bias=Tensor(rand(23)))
    xh, wh, sh = good(dtype=ms.float16)
    with pytest.raises(TypeError, match="bias must be Float16"):
        call(xh, wh, sh, bias=Tensor(rand(24)))


def test_emulator_refuses_output_quantization():
    x, w, s = good()
    with pytest.raises(NotImplementedError):
        WQBMM(transpose_weight=True)(x, w, s, None, Tensor(np.ones(24, np.float32)))
