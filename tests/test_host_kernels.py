"""The CPU path's numpy kernels (stepvideo_ms.ops.host: BLAS products and layouts on zero-copy views)
against MindSpore's own CPU kernels, which the same functions use when the numpy path is switched
off; strided inputs; dtypes numpy cannot serve (bfloat16) or multiplies slowly (float16) fall back."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, mint, ops as msops

from stepvideo_ms import ops
from stepvideo_ms.models.rope import Rope3D
from stepvideo_ms.ops import blas, broadcast, host
from stepvideo_ms.ops.conv import conv3d_native

RNG = np.random.default_rng(18)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


@pytest.fixture
def mindspore_only(monkeypatch):
    """Run a callable with the numpy path off (MindSpore's kernels only)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(host, "blas_ready", lambda *t: False)
            m.setattr(host, "has_numpy", lambda *t: False)
            m.setattr(host, "view", _forbidden)  # proves the reference never reaches numpy
            return fn(*args, **kwargs)

    return run


def _forbidden(*args):
    raise AssertionError("the MindSpore-only path reached host.view")


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * (1 + np.abs(b).max()))


def test_views_are_zero_copy_and_keep_their_storage():
    from stepvideo_ms.capabilities import cpu_zero_copy_asnumpy

    t = Tensor(rand(3, 4)) * 2
    a = host.view(t)
    np.testing.assert_array_equal(a, t.asnumpy())
    # a view of the operator's output where MindSpore gives one (2.7.1 on); 2.7.0's asnumpy copies (same values)
    assert (a.ctypes.data == t.data_ptr()) == cpu_zero_copy_asnumpy()
    arr = rand(5, 6)
    w = host.wrap(arr)
    arr[0, 0] = 123.0  # the tensor is on the array's buffer (every version; 2.7.0 has no data_ptr for it yet)
    assert float(w.asnumpy()[0, 0]) == 123.0
    expect = arr.copy()
    del arr
    [np.full((5, 6), 9, np.float32) for _ in range(20)]
    np.testing.assert_array_equal((w + 0).asnumpy(), expect)
    strided = rand(6, 5).T  # a strided array is copied once, contiguous
    np.testing.assert_array_equal(host.wrap(strided).asnumpy(), strided)


def test_dtype_gates():
    f32, f16 = Tensor(rand(2)), Tensor(rand(2, dtype=np.float16))
    bf16 = f32.astype(ms.bfloat16)
    assert host.blas_ready(f32, f32) and not host.blas_ready(f16) and not host.blas_ready(bf16)
    assert not host.blas_ready(f32, Tensor(rand(2).astype(np.float64)))  # mixed dtypes: MindSpore's rules
    assert host.has_numpy(f16) and not host.has_numpy(bf16)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_host_matmul_equals_mindspore_matmul(transpose_b):
    a, b = rand(3, 17, 9), rand(3, 11, 9) if transpose_b else rand(3, 9, 11)
    ref = msops.BatchMatMul(transpose_b=transpose_b)(Tensor(a), Tensor(b)).asnumpy()
    close(host.matmul(Tensor(a), Tensor(b), transpose_b=transpose_b).asnumpy(), ref)
    with pytest.raises(TypeError, match="float32/float64"):
        host.matmul(Tensor(a).astype(ms.float16), Tensor(b).astype(ms.float16))


def test_host_permute_equals_mindspore_permute_for_numpy_and_bf16_dtypes():
    x = rand(2, 3, 4, 5)
    out = host.permute(Tensor(x), (0, 2, 3, 1))
    assert out.is_contiguous()
    np.testing.assert_array_equal(out.asnumpy(), x.transpose(0, 2, 3, 1))
    bf = host.permute(Tensor(x).astype(ms.bfloat16), (3, 1, 0, 2))  # no numpy bfloat16: MindSpore's copy
    assert bf.dtype == ms.bfloat16
    close(bf.astype(ms.float32).asnumpy(), x.transpose(3, 1, 0, 2), tol=1e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_blas_equals_mindspore_kernel(mindspore_only, bias):
    x, w, b = rand(2, 33, 24), rand(40, 24), rand(40)
    args = (Tensor(x), Tensor(w), Tensor(b) if bias else None)
    close(ops.linear(*args).asnumpy(), mindspore_only(ops.linear, *args).asnumpy())


def test_linear_takes_strided_inputs():
    x, w = rand(4, 2, 24), rand(8, 24)
    view = mint.permute(Tensor(x), (1, 0, 2))  # a strided view, not contiguous
    close(ops.linear(view, Tensor(w)).asnumpy(), x.transpose(1, 0, 2) @ w.T)
    q, k, v = ops.linear_heads(view, Tensor(rand(3 * 2 * 4, 24)), heads=2, head_dim=4, parts=3)
    assert q.shape == (2, 4, 2, 4) and q.is_contiguous() and v.is_contiguous()


def test_linear_float16_falls_back_to_mindspore():
    x, w = rand(5, 16), rand(8, 16)
    out = ops.linear(Tensor(x).astype(ms.float16), Tensor(w).astype(ms.float16))
    assert out.dtype == ms.float16
    close(out.astype(ms.float32).asnumpy(), x @ w.T, tol=2e-3)


def test_linear_heads_blas_equals_mindspore_kernel(mindspore_only):
    x, w = rand(2, 9, 12), rand(3 * 4 * 5, 12)
    new = ops.linear_heads(Tensor(x), Tensor(w), 3, 5, 4)
    old = mindspore_only(ops.linear_heads, Tensor(x), Tensor(w), 3, 5, 4)
    for a, b in zip(new, old):
        assert a.is_contiguous()
        close(a.asnumpy(), b.asnumpy())


@pytest.mark.parametrize("case", ["plain", "mask", "bias", "causal", "gqa", "blocks"])
def test_attention_host_equals_mindspore_path(mindspore_only, case):
    b, sq, h, d = 2, 19, 4, 8
    sk = sq if case == "causal" else 13
    hk = 2 if case == "gqa" else h
    q, k, v = Tensor(rand(b, sq, h, d)), Tensor(rand(b, sk, hk, d)), Tensor(rand(b, sk, hk, d))
    kwargs = {}
    if case == "mask":
        keep = np.ones((b, sk), bool)
        keep[1, 7:] = False
        kwargs["key_mask"] = ops.KeyMask(Tensor(keep))
    if case == "bias":
        kwargs["bias"] = Tensor(rand(1, h, sq, sk))
    if case == "causal":
        kwargs["causal"] = True
    if case == "blocks":  # a few queries per block
        kwargs["max_score_bytes"] = b * h * sk * 4 * 5
    new = ops.attention(q, k, v, **kwargs).asnumpy()
    close(new, mindspore_only(ops.attention, q, k, v, **kwargs).asnumpy())


@pytest.mark.parametrize("kernel,stride,padding,cols_bytes", [
    ((3, 3, 3), 1, ((2, 0), (1, 1), (1, 1)), 96 << 20),
    ((3, 3, 3), 1, ((2, 0), (1, 1), (1, 1)), 2000),  # bands of rows of one frame
    ((1, 3, 3), (1, 2, 2), ((0, 0), (0, 1), (0, 1)), 96 << 20),
    ((1, 1, 1), 1, 0, 96 << 20),  # pointwise
    ((3, 3, 3), 2, ((2, 0), (1, 1), (1, 1)), 96 << 20),  # strided in time and space
])
def test_conv_host_equals_mindspore_paths(mindspore_only, kernel, stride, padding, cols_bytes):
    c, co = 5, 7
    x, w, b = rand(2, c, 4, 6, 5), rand(co, c, *kernel), rand(co)
    args = (Tensor(x), Tensor(w), Tensor(b), stride, padding, cols_bytes)
    new = ops.conv3d(*args).asnumpy()
    close(new, mindspore_only(ops.conv3d, *args).asnumpy())
    close(new, conv3d_native(Tensor(x), Tensor(w), Tensor(b), stride, padding).asnumpy())


def test_conv_host_big_kernel_at_few_positions_and_cached_weight():
    x, w = rand(1, 3, 2, 2, 2), rand(40, 3, 3, 3, 3)  # 8 positions < 40 outputs: columns reordered
    pads = ((2, 0), (1, 1), (1, 1))
    ref = conv3d_native(Tensor(x), Tensor(w), None, 1, pads).asnumpy()
    close(ops.conv3d(Tensor(x), Tensor(w), None, 1, pads).asnumpy(), ref)
    cache = ops.MatmulWeight()
    x2 = rand(1, 3, 3, 9, 9)
    ref2 = conv3d_native(Tensor(x2), Tensor(w), None, 1, pads).asnumpy()
    for _ in range(2):
        close(ops.conv3d(Tensor(x2), Tensor(w), None, 1, pads, weight_cache=cache).asnumpy(), ref2)


def test_conv_float16_falls_back_to_mindspore():
    x, w = rand(1, 3, 3, 4, 4), rand(4, 3, 3, 3, 3)
    pads = ((2, 0), (1, 1), (1, 1))
    out = ops.conv3d(Tensor(x).astype(ms.float16), Tensor(w).astype(ms.float16), None, 1, pads)
    assert out.dtype == ms.float16
    close(out.astype(ms.float32).asnumpy(), conv3d_native(Tensor(x), Tensor(w), None, 1, pads).asnumpy(), tol=3e-3)


def test_elementwise_host_paths_equal_mindspore_paths(mindspore_only):
    x, w = rand(2, 6, 3, 16), rand(16)
    close(ops.rms_norm(Tensor(x), Tensor(w), 1e-6).asnumpy(), mindspore_only(ops.rms_norm, Tensor(x), Tensor(w), 1e-6).asnumpy())
    close(ops.rms_norm(Tensor(x), None, 1e-6).asnumpy(), mindspore_only(ops.rms_norm, Tensor(x), None, 1e-6).asnumpy())
    h = rand(2, 7, 32) * 4
    close(ops.gelu_tanh(Tensor(h)).asnumpy(), mindspore_only(ops.gelu_tanh, Tensor(h)).asnumpy())
    assert np.isfinite(ops.gelu_tanh(Tensor(np.array([-200.0, 200.0], np.float32))).asnumpy()).all()
    xs, sc, sh, lw, lb = rand(2, 5, 32), rand(2, 1, 32), rand(2, 1, 32), rand(32), rand(32)
    for weight, bias in ((None, None), (lw, lb)):
        args = (Tensor(xs), None if weight is None else Tensor(weight), None if bias is None else Tensor(bias),
                Tensor(sc), Tensor(sh), 1e-5)
        close(ops.modulated_layer_norm(*args).asnumpy(), mindspore_only(ops.modulated_layer_norm, *args).asnumpy())
    a, b = rand(2, 1, 4), rand(2, 3, 4)
    close(broadcast.mul(Tensor(a), Tensor(b)).asnumpy(), mindspore_only(broadcast.mul, Tensor(a), Tensor(b)).asnumpy())
    close(broadcast.add(Tensor(b), Tensor(a)).asnumpy(), mindspore_only(broadcast.add, Tensor(b), Tensor(a)).asnumpy())
    rope = Rope3D.for_grid(2, 3, 2, 16)
    xr = Tensor(rand(2, 12, 3, 16))
    close(rope.apply(xr).asnumpy(), mindspore_only(Rope3D.for_grid(2, 3, 2, 16).apply, xr).asnumpy())


def test_blas_threads_round_trip():
    before = blas.get_threads()
    if before is None:
        pytest.skip("numpy is not linked to OpenBLAS here")
    try:
        blas.set_threads(1)
        assert blas.get_threads() == 1
    finally:
        blas.set_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        blas.set_threads(0)


def test_gates_refuse_on_ascend(monkeypatch):
    """Ascend (real or simulated) never views a device tensor in numpy, whichever branch asks."""
    t = Tensor(rand(2))
    monkeypatch.setattr(host, "is_ascend", lambda: True)
    assert not host.blas_ready(t) and not host.has_numpy(t)


def test_frame_group_norm_and_silu_host_equal_mindspore_paths(mindspore_only):
    from stepvideo_ms.ops.frame_norm import frame_group_norm

    x, w, b = rand(2, 8, 3, 4, 5) * 3 + 1, rand(8), rand(8)
    args = (Tensor(x), 4, Tensor(w), Tensor(b), 1e-5)
    close(frame_group_norm(*args).asnumpy(), mindspore_only(frame_group_norm, *args).asnumpy())
    close(ops.silu(Tensor(x)).asnumpy(), mindspore_only(ops.silu, Tensor(x)).asnumpy())
    assert np.isfinite(ops.silu(Tensor(np.array([-200.0, 200.0], np.float32))).asnumpy()).all()
