"""Run under the device ascend-sim (by tests/test_ascend_sim.py): the product's Ascend branches on CPU.

Each check runs an Ascend branch through the simulation's strict emulators and compares it with the
CPU implementation in float32; prints "all checks passed" at the end.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops as msops

from stepvideo_ms import runtime

rt = runtime.init()  # the device comes from $STEPVIDEO_DEVICE
assert rt.device == "ascend-sim" and runtime.is_ascend() and runtime.is_simulated(), rt
assert rt.compute_dtype == ms.bfloat16

from stepvideo_ms import ops  # noqa: E402
from stepvideo_ms.ops.attention import KeyMask, _attention_blocked, repeat_heads  # noqa: E402
from stepvideo_ms.ops.conv import _conv_matmul  # noqa: E402

BF16 = ms.bfloat16
calls = []
_fused = msops.flash_attention_score


def recording(*args, **kwargs):
    mask = kwargs.get("attn_mask")
    calls.append((kwargs.get("sparse_mode", 0), None if mask is None else tuple(mask.shape)))
    return _fused(*args, **kwargs)


msops.flash_attention_score = recording


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def close(ours, ref, atol, what):
    ours = ours.astype(ms.float32).asnumpy()
    err = float(np.abs(ours - ref).max())
    assert err <= atol, f"{what}: max error {err} > {atol}"
    print(f"ok {what} (max error {err:.2e})")


def blocked(q, k, v, keep=None, bias=None, causal=False, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    as32 = lambda a: Tensor(a.astype(ms.float32).asnumpy())
    return _attention_blocked(as32(q), as32(k), as32(v), keep, bias, causal, scale, 1 << 26).asnumpy()


# attention: key mask (cross-attention, BERT), bias + causal (Step-1), causal one head (VAE)
q, k, v = (Tensor(rand(2, 6, 2, 32, seed=i)).astype(BF16) for i in range(3))
keep = Tensor(np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool))
mask = KeyMask(keep)
calls.clear()
close(ops.attention(q, k, v, key_mask=mask), blocked(q, k, v, keep), 0.05, "fused attention with a key mask")
assert calls == [(0, (2, 1, 6, 6))], calls
assert mask.discard(6) is mask.discard(6)
bias = Tensor(-np.abs(rand(1, 2, 6, 6, seed=5)))
calls.clear()
close(ops.attention(q, k, v, bias=bias, causal=True), blocked(q, k, v, None, bias, True), 0.05,
      "fused causal attention with a (1, h, s, s) bias")
assert calls == [(2, (2048, 2048))], calls
calls.clear()
close(ops.attention(q, k, v, key_mask=mask, causal=True), blocked(q, k, v, keep, None, True), 0.05,
      "fused causal attention with a key mask (one full mask)")
assert calls == [(0, (2, 1, 6, 6))], calls
kg, vg = (Tensor(rand(2, 6, 1, 32, seed=7 + i)).astype(BF16) for i in range(2))  # one key/value head for two
calls.clear()
close(ops.attention(q, kg, vg, bias=bias, causal=True),
      blocked(q, repeat_heads(kg, 2), repeat_heads(vg, 2), None, bias, True), 0.05, "fused grouped-query causal attention (key/value heads as they are)")
assert calls == [(2, (2048, 2048))], calls
calls.clear()
q32 = Tensor(rand(1, 5, 2, 24))
out32 = ops.attention(q32, q32, q32, key_mask=Tensor(np.ones((1, 5), bool)))
assert calls == [] and out32.dtype == ms.float32, "float32 (and head_dim 24) must take the blocked path"
print("ok float32 attention takes the blocked path")

# conv3d: bf16 through mint's conv3d after the explicit causal pad
x, w, b = Tensor(rand(1, 4, 3, 5, 6)).astype(BF16), Tensor(rand(6, 4, 3, 3, 3, seed=1)).astype(BF16), \
    Tensor(rand(6, seed=2)).astype(BF16)
pads = ((2, 0), (1, 1), (1, 1))
as32 = lambda a: Tensor(a.astype(ms.float32).asnumpy())
ref = _conv_matmul(as32(x), as32(w), as32(b), (1, 1, 1), pads, 1 << 26).asnumpy()
out = ops.conv3d(x, w, b, 1, pads)
assert out.dtype == BF16 and out.shape == ref.shape
close(out, ref, 0.1, "bf16 causal conv3d")
close(ops.conv3d(x, w, b, (1, 2, 2), ((2, 0), (0, 1), (0, 1))),
      _conv_matmul(as32(x), as32(w), as32(b), (1, 2, 2), ((2, 0), (0, 1), (0, 1)), 1 << 26).asnumpy(), 0.1,
      "bf16 strided conv3d with uneven padding")

x2, w2 = Tensor(rand(1, 4, 5, 6)).astype(BF16), Tensor(rand(6, 4, 3, 3, seed=1)).astype(BF16)
close(ops.conv2d(x2, w2, None, 2, ((0, 1), (0, 1))),
      _conv_matmul(as32(x2).expand_dims(2), as32(w2).expand_dims(2), None, (1, 2, 2), ((0, 0), (0, 1), (0, 1)),
                   1 << 26).asnumpy()[:, :, 0], 0.1, "bf16 conv2d with uneven padding")

# norms and embedding
xg = Tensor(rand(2, 8, 3, 4)).astype(BF16)
xgf = xg.astype(ms.float32).asnumpy().reshape(2, 2, -1)
ref = ((xgf - xgf.mean(-1, keepdims=True)) / np.sqrt(xgf.var(-1, keepdims=True) + 1e-5)).reshape(2, 8, 3, 4)
close(ops.group_norm(xg, 2, None, None, 1e-5), ref, 0.05, "group_norm")
xn = Tensor(rand(2, 3, 32)).astype(BF16)
g = Tensor(rand(32, seed=3)).astype(BF16)
xf, gf = xn.astype(ms.float32).asnumpy(), g.astype(ms.float32).asnumpy()
close(ops.rms_norm(xn, g, 1e-6), xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6) * gf, 0.05, "rms_norm")
centred = xf - xf.mean(-1, keepdims=True)
close(ops.layer_norm(xn, g, None, 1e-5), centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * gf,
      0.05, "layer_norm")
table = Tensor(rand(10, 16)).astype(BF16)
close(ops.embedding(Tensor(np.array([[3, 9]], np.int64)), table), table.astype(ms.float32).asnumpy()[[[3, 9]]], 0,
      "embedding")

# a tiny DiT forward in bf16: the key mask's fused form is built once for all layers
from stepvideo_ms.models.dit import StepVideoModel  # noqa: E402

dit = StepVideoModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=3,
                     caption_channels=[16, 8], dtype=BF16)
inputs = dit.embed(Tensor(rand(1, 2, 4, 2, 2)), Tensor(np.array([0.5], np.float32)), Tensor(rand(1, 5, 16)),
                   Tensor(np.array([[1, 1, 1, 0, 0]], np.int64)), Tensor(rand(1, 3, 8)))
calls.clear()
out = dit.finish(dit.run_blocks(inputs.tokens, inputs, dit.rope_for(inputs.grid)), inputs)
assert out.dtype == BF16 and out.shape == (1, 2, 4, 2, 2)
assert len(calls) == 6 and len(inputs.key_mask._drop) == 1, (calls, inputs.key_mask._drop)
print("ok tiny DiT forward: 6 fused attentions, one key mask")
print("all checks passed")
