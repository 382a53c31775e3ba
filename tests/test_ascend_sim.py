"""The Ascend simulation: strict emulators of the NPU-only calls, and the Ascend branches run on CPU.

The emulators are checked here in this (CPU) process by calling them directly, without installing
them; the product's Ascend branches run in subprocesses started with the device `ascend-sim`.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, mint, ops

from stepvideo_ms.models.rope import Rope3D, grid_positions
from stepvideo_ms.ops.attention import KeyMask
from stepvideo_ms.testing.ascend_sim import bf16_cpu, flash_attention, npu_ops
from stepvideo_ms.testing.ascend_sim.patching import bind

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FA = flash_attention.emulator(ops.flash_attention_score)
BF16 = ms.bfloat16


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), by bits: independent of MindSpore's cast."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def as_bf16(x):
    return Tensor(x).astype(BF16)


def to_np(t):
    return t.astype(ms.float32).asnumpy()


def reference_attention(q, k, v, keep, bias=None, scale=1.0):
    """(b, s, n, d) numpy attention in float64; keep: broadcastable to (b, n, sq, sk)."""
    qh, kh, vh = (np.transpose(a.astype(np.float64), (0, 2, 1, 3)) for a in (q, k, v))
    s = qh @ np.swapaxes(kh, -1, -2) * scale
    if bias is not None:
        s = s + bias
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.transpose(p @ vh, (0, 2, 1, 3))


# ---- the simulation refuses what the device refuses --------------------------------------------------
def test_flash_attention_refuses_the_old_pse_keyword():
    q = as_bf16(rand(1, 4, 2, 16))
    with pytest.raises(TypeError, match="pse"):
        FA(q, q, q, head_num=2, pse=as_bf16(rand(1, 2, 4, 4)), input_layout="BSND")


def test_flash_attention_refuses_float32():
    q = Tensor(rand(1, 4, 2, 16))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        FA(q, q, q, head_num=2, input_layout="BSND")


def test_flash_attention_refuses_a_full_mask_with_sparse_mode_2():
    q = as_bf16(rand(2, 4, 2, 16))
    mask = Tensor(np.triu(np.ones((2, 1, 4, 4), bool), 1))
    with pytest.raises(RuntimeError, match="2048"):
        FA(q, q, q, head_num=2, attn_mask=mask, input_layout="BSND", sparse_mode=2)


def test_flash_attention_refuses_bad_head_dims_masks_and_shifts():
    q = as_bf16(rand(1, 4, 2, 8))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        FA(q, q, q, head_num=2, input_layout="BSND")
    q = as_bf16(rand(1, 4, 2, 16))
    with pytest.raises(TypeError, match="bool or uint8"):
        FA(q, q, q, head_num=2, attn_mask=Tensor(np.zeros((4, 4), np.float32)), input_layout="BSND")
    with pytest.raises(TypeError, match="real_shift"):
        FA(q, q, q, head_num=2, real_shift=Tensor(rand(1, 2, 4, 4)), input_layout="BSND")
    with pytest.raises(RuntimeError, match="real_shift"):
        FA(q, q, q, head_num=2, real_shift=as_bf16(rand(1, 1, 4, 4)), input_layout="BSND")
    with pytest.raises(RuntimeError, match="head_num"):
        FA(q, q, q, head_num=4, input_layout="BSND")
    with pytest.raises(ValueError, match="input_layout"):
        FA(q, q, q, head_num=2, input_layout="BSDN")
    wrong = Tensor(np.tril(np.ones((2048, 2048), bool)))  # retention polarity: 1 must mean discard
    with pytest.raises(ValueError, match="compression mask"):
        FA(q, q, q, head_num=2, attn_mask=wrong, input_layout="BSND", sparse_mode=2)


def test_ops_conv3d_refuses_bfloat16():
    conv = npu_ops.ops_conv3d_emulator(ops.conv3d)
    x, w = as_bf16(rand(1, 2, 3, 4, 4)), as_bf16(rand(2, 2, 1, 1, 1))
    with pytest.raises(TypeError, match="float16, Float32|Float16, Float32"):
        conv(x, w)


def test_rms_norm_emulator_keeps_the_2_10_signature():
    real = ops.rms_norm
    norm = npu_ops.rms_norm_emulator(real)
    x, g = as_bf16(rand(2, 3, 16)), as_bf16(rand(16, seed=1))
    y, rstd = norm(x, gamma=g, epsilon=1e-6)
    xf, gf = to_np(x), to_np(g)
    expected = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-6) * gf
    np.testing.assert_array_equal(to_np(y), bf16_round(expected.astype(np.float32)))
    assert y.dtype == BF16 and rstd.dtype == ms.float32 and rstd.shape == (2, 3, 1)
    with pytest.raises(TypeError, match="weight"):  # the announced future signature fails loudly
        norm(x, (16,), weight=g, eps=1e-6)
    with pytest.raises(TypeError, match="dtype of x"):
        norm(x, Tensor(rand(16)))


def test_binding_follows_the_documented_signature_of_an_overloaded_function():
    args = bind(mint.nn.functional.conv3d, "conv3d", (1, 2), {"padding": 1})  # read from its docstring
    assert args == {"input": 1, "weight": 2, "bias": None, "stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    with pytest.raises(TypeError, match="pad_mode"):
        bind(mint.nn.functional.conv3d, "conv3d", (1, 2), {"pad_mode": "pad"})


# ---- the emulators compute the documented result -----------------------------------------------------
def test_flash_attention_emulator_matches_the_reference():
    b, s, n, d = 2, 5, 2, 16
    q, k, v = (bf16_round(rand(b, s, n, d, seed=i)) for i in range(3))
    bias = bf16_round(rand(1, n, s, s, seed=4))
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    drop = Tensor(~keep[:, None, None, :].repeat(s, axis=2))  # (b, 1, sq, sk), 1 = discard
    out = FA(as_bf16(q), as_bf16(k), as_bf16(v), head_num=n, real_shift=as_bf16(bias), attn_mask=drop,
             scalar_value=0.25, input_layout="BSND")
    ref = reference_attention(q, k, v, keep[:, None, None, :], bias, 0.25)
    assert out.dtype == BF16 and out.shape == (b, s, n, d)
    np.testing.assert_allclose(to_np(out), ref, atol=3e-2, rtol=2e-2)
    causal = FA(as_bf16(q), as_bf16(k), as_bf16(v), head_num=n, attn_mask=Tensor(flash_attention.compressed_causal_mask()),
                scalar_value=0.25, input_layout="BSND", sparse_mode=2)
    ref = reference_attention(q, k, v, np.tril(np.ones((s, s), bool)), None, 0.25)
    np.testing.assert_allclose(to_np(causal), ref, atol=3e-2, rtol=2e-2)


def test_bf16_wrapper_computes_in_float32_and_rounds():
    matmul = bf16_cpu.in_float32(mint.matmul)
    a, b = bf16_round(rand(3, 8)), bf16_round(rand(8, 4, seed=1))
    out = matmul(as_bf16(a), as_bf16(b))
    assert out.dtype == BF16
    np.testing.assert_array_equal(to_np(out), bf16_round((a @ b).astype(np.float32)))
    f32 = matmul(Tensor(a), Tensor(b))  # float32 passes through untouched
    assert f32.dtype == ms.float32


# ---- product pieces the Ascend branches rely on -------------------------------------------------------
def test_key_mask_is_built_once_per_query_length():
    mask = KeyMask(Tensor(np.array([[1, 1, 0], [1, 0, 0]], np.int64)))
    drop = mask.discard(4)
    assert drop is mask.discard(4) and drop.dtype == ms.bool_ and drop.shape == (2, 1, 4, 3)
    np.testing.assert_array_equal(drop.asnumpy()[:, 0, 2], [[0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(mask[1:].keep.asnumpy(), [[1, 0, 0]])


def axis_angles(dim, pos):
    """float32 angles of one axis, [freqs, freqs] (base 1e4), as upstream's RoPE1D builds them."""
    inv_freq = (1.0 / (np.float32(1e4) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.concatenate([freqs, freqs], axis=-1)


def test_rope_rounds_the_angles_to_the_compute_dtype_before_cos_sin():
    """Upstream: freqs = einsum(t, inv_freq).to(bf16); cos = freqs.cos() (in bf16)."""
    positions = grid_positions(36, 34, 62)[::97]
    rope = Rope3D.for_positions(positions, 128, dtype=BF16)
    raw = np.concatenate([axis_angles(dim, positions[:, i]) for i, dim in enumerate((64, 32, 32))], axis=-1)
    expected_cos = bf16_round(np.cos(bf16_round(raw)))
    expected_sin = bf16_round(np.sin(bf16_round(raw)))
    np.testing.assert_array_equal(to_np(rope.cos)[:, 0], expected_cos)
    np.testing.assert_array_equal(to_np(rope.sin)[:, 0], expected_sin)
    late_rounding = bf16_round(np.cos(raw))  # the old order: exact angle, rounded cosine
    assert np.abs(late_rounding - expected_cos).max() > 0.05


# ---- hal's device queries for the simulated card ------------------------------------------------------
def test_device_properties_follow_the_documented_contract(monkeypatch):
    from mindspore import hal
    from stepvideo_ms.testing.ascend_sim import device_info

    state = {"initialized": False}
    query = device_info._make_get_device_properties(hal.get_device_properties, lambda target: state["initialized"])
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(device_info.SIM_CARD_ENV, "32")
    with pytest.raises(TypeError, match="device_type"):
        query(0, device_type="Ascend")  # bound to the real signature (device_id, device_target=None)
    with pytest.raises(TypeError, match="must be int"):
        query("0", "Ascend")
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        query(8, "Ascend")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "6,7")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        query(2)
    before = query(0, "Ascend")
    assert before.total_memory == 0 and before.free_memory == 0  # the device is not initialized yet
    state["initialized"] = True
    assert query(1).total_memory == 32 * 2 ** 30  # the default target is the simulated Ascend
    assert query(0, "CPU") is None  # MindSpore's own answer for CPU
    monkeypatch.setenv(device_info.SIM_CARD_ENV, "lots")
    with pytest.raises(ValueError, match="STEPVIDEO_SIM_CARD_GB"):
        device_info.card_bytes()
    is_initialized = device_info._make_is_initialized(hal.is_initialized)
    assert is_initialized("Ascend") == hal.is_initialized("CPU")
    with pytest.raises(TypeError):
        is_initialized()


# ---- the Ascend branches, run under the simulation in subprocesses ------------------------------------
def run_sim(args, timeout=600):
    env = {**os.environ, "GLOG_v": "3", "STEPVIDEO_DEVICE": "ascend-sim"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_verify_passes_under_ascend_sim(golden_dir):
    """The six float32 kinds with the float32 policy and the three bf16 cases with the bf16 policy."""
    proc = run_sim(["-m", "stepvideo_ms", "verify", "--golden", golden_dir, "--device", "ascend-sim"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if " PASS " in line}
    assert {"clip", "dit_t2v", "dit_ti2v", "sampler", "step_llm", "vae"} <= set(lines), proc.stdout
    for name in ("dit_t2v_bf16", "dit_ti2v_bf16", "vae_bf16"):
        assert name in lines, proc.stdout
        ratios = [float(r) for r in re.findall(r"=x([0-9.]+)", lines[name])]
        assert ratios and max(ratios) <= 1.0, lines[name]
    assert "9 passed, 0 failed" in proc.stdout


def test_ascend_branches_under_the_simulation():
    proc = run_sim([os.path.join(REPO, "tests", "ascend_sim_checks.py")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout


# ---- the caption and VAE servers serve under the simulation ------------------------------------------
@pytest.fixture(scope="module")
def sim_server(tmp_path_factory):
    from serving_support import ServerProcess
    from stepvideo_ms.tools.tiny import write_tiny_model

    model = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0, task="t2v")
    srv = ServerProcess(model, str(tmp_path_factory.mktemp("logs")), "sim", "--port", 0,
                        env={"STEPVIDEO_DEVICE": "ascend-sim"}).start()
    yield model, srv
    srv.stop()


def test_a_vae_server_on_a_card_tiles_its_decode_to_what_the_card_has_left(tmp_path):
    """No --vae_tile / --vae_budget_gb: the VAE server's decode budget is the card's memory (simulated: 10
    GiB) less the weights it holds and the runtime reserve; a card the weights and reserve fill refuses."""
    from serving_support import ServerProcess
    from stepvideo_ms.parallel.plan import Hardware
    from stepvideo_ms.serving.client import RemoteClient
    from stepvideo_ms.tools.tiny import write_tiny_model

    model = write_tiny_model(str(tmp_path / "model"), seed=0, task="t2v")
    sim = {"STEPVIDEO_DEVICE": "ascend-sim", "STEPVIDEO_SIM_CARD_GB": "10"}
    srv = ServerProcess(model, str(tmp_path), "vae", "--enable_vae", "True", "--enable_llm", "False", "--port", 0,
                        env=sim).start()
    try:
        with RemoteClient(srv.url, read_timeout=60, retries=0) as client:
            tiling = client.health()["loaded"]["vae"]["decode_tile"]
    finally:
        srv.stop()
    budget = float(re.match(r"when predicted over ([0-9.]+) GiB", tiling).group(1))
    left = 10 - Hardware().reserve_gib
    assert left - 0.01 < budget < left, tiling  # the tiny VAE's weights: under 10 MiB
    full = ServerProcess(model, str(tmp_path), "full", "--port", 0,
                         env={**sim, "STEPVIDEO_SIM_CARD_GB": str(Hardware().reserve_gib)})
    with pytest.raises(RuntimeError, match="leaving nothing for the VAE decode"):
        full.start()


def test_servers_serve_under_ascend_sim(sim_server):
    from stepvideo_ms.models.caption import CaptionEncoder
    from stepvideo_ms.models.vae import AutoencoderKL
    from stepvideo_ms.serving.client import RemoteClient

    model, srv = sim_server
    prompts = ["A paper boat drifts along a rainy harbour.", ""]
    latents = rand(1, 3, 8, 1, 2, seed=1)
    image = np.random.default_rng(2).uniform(-1, 1, (1, 1, 3, 16, 32)).astype(np.float32)
    with RemoteClient(srv.url, read_timeout=120, retries=0) as client:
        health = client.health()
        assert health["device"] == "ascend-sim" and health["dtype"] == "bfloat16", health
        remote = client.caption(prompts)
        frames = client.vae_decode(latents)
        latent = client.vae_encode(image, seed=0, sample=False)
    # against the CPU float32 models in this process: the same answers up to bf16 rounding
    local = CaptionEncoder.from_model_dir(model, progress=False).encode(prompts)
    for key in local:
        assert remote[key].shape == local[key].shape and remote[key].dtype == local[key].dtype, key
        scale = 1.0 + float(np.abs(local[key]).max())
        assert np.abs(remote[key].astype(np.float64) - local[key]).max() <= 0.05 * scale, key
    np.testing.assert_array_equal(remote["y_mask"], local["y_mask"])
    vae = AutoencoderKL.from_pretrained(f"{model}/vae", progress=False)
    ref = vae.decode(Tensor(latents), progress=False).asnumpy()
    assert frames.shape == ref.shape and np.abs(frames - ref).max() <= 0.05 * (1 + np.abs(ref).max())
    ref = vae.encode(Tensor(image), seed=0, sample=False, progress=False).asnumpy()
    assert latent.shape == ref.shape and np.abs(latent - ref).max() <= 0.05 * (1 + np.abs(ref).max())
