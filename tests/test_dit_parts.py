"""RoPE positions, the text mask and the DiT's configuration rules."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from stepvideo_ms.models.dit import StepVideoModel, text_key_mask
from stepvideo_ms.models.rope import Rope3D, grid_positions, rope_channel_split
from stepvideo_ms.tools.describe import build_empty


def test_grid_positions_follow_frame_row_column_order():
    pos = grid_positions(2, 3, 4)
    assert pos.shape == (24, 3)
    # token index = (f * h + y) * w + x
    for idx, (f, y, x) in enumerate(pos):
        assert idx == (f * 3 + y) * 4 + x
    np.testing.assert_array_equal(grid_positions(2, 3, 4, 5, 11), pos[5:11])


def test_channel_split_is_derived_from_head_dim():
    assert rope_channel_split(128) == (64, 32, 32)
    assert rope_channel_split(64) == (32, 16, 16)
    with pytest.raises(ValueError, match="attention_head_dim"):
        rope_channel_split(12)


def test_rope_rotates_each_axis_part_by_its_own_position():
    head_dim = 16
    f, h, w = 3, 2, 2
    rope = Rope3D.for_grid(f, h, w, head_dim)
    x = np.random.default_rng(0).standard_normal((1, f * h * w, 1, head_dim)).astype(np.float32)
    out = rope.apply(Tensor(x)).asnumpy()
    # reference: per part (8, 4, 4) rotate-half RoPE with base 1e4 at that axis' coordinate
    pos = grid_positions(f, h, w)
    ref, start = [], 0
    for axis, d in enumerate((8, 4, 4)):
        part = x[..., start:start + d]
        inv = 1.0 / (1e4 ** (np.arange(0, d, 2) / d))
        ang = pos[:, axis][:, None] * inv[None, :]
        ang = np.concatenate([ang, ang], -1)[None, :, None, :]
        rot = np.concatenate([-part[..., d // 2:], part[..., : d // 2]], -1)
        ref.append(part * np.cos(ang) + rot * np.sin(ang))
        start += d
    np.testing.assert_allclose(out, np.concatenate(ref, -1), atol=1e-5)
    # norms are preserved by a rotation; token 0 (all positions 0) is unchanged
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)


def test_rope_of_a_slice_equals_the_slice_of_the_full_table():
    full = Rope3D.for_grid(2, 3, 5, 32)
    part = Rope3D.for_grid(2, 3, 5, 32, start=7, stop=19)
    np.testing.assert_array_equal(part.cos.asnumpy(), full.cos.asnumpy()[7:19])
    np.testing.assert_array_equal(part.sin.asnumpy(), full.sin.asnumpy()[7:19])


def test_text_mask_uses_the_valid_length_and_cuts_to_the_longest():
    context = Tensor(np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1))
    mask = Tensor(np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=np.int64))
    cut, keep = text_key_mask(context, mask)
    assert cut.shape == (2, 5, 1)
    np.testing.assert_array_equal(keep.keep.asnumpy(), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_text_mask_refuses_a_sample_without_text():
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        text_key_mask(Tensor(np.zeros((1, 3, 1), np.float32)), Tensor(np.zeros((1, 3), np.int64)))


def test_masked_text_tokens_do_not_change_the_output():
    """Padding text beyond the valid length must not influence the result."""
    model = StepVideoModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                           num_layers=1, caption_channels=[8, 6])
    rng = np.random.default_rng(1)
    for _, p in model.parameters_and_names():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    x = Tensor(rng.standard_normal((1, 2, 4, 2, 2)).astype(np.float32))
    t = Tensor(np.array([0.5], np.float32))
    clip = Tensor(rng.standard_normal((1, 2, 6)).astype(np.float32))
    text = rng.standard_normal((1, 5, 8)).astype(np.float32)
    mask = Tensor(np.array([[1, 1, 1, 1, 1, 0, 0]], np.int64))  # 2 clip + 3 valid text tokens
    a = model(x, t, Tensor(text), mask, clip).asnumpy()
    text2 = text.copy()
    text2[:, 3:] = 100.0
    b = model(x, t, Tensor(text2), mask, clip).asnumpy()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_ti2v_config_doubles_the_patch_input_and_adds_the_motion_embedder():
    t2v = build_empty({"num_layers": 1})
    ti2v = build_empty({"num_layers": 1, "use_additional_conditions": True})
    assert tuple(t2v.pos_embed.proj.weight.shape) == (6144, 64, 1, 1)
    assert tuple(ti2v.pos_embed.proj.weight.shape) == (6144, 128, 1, 1)
    names = {n for n, _ in ti2v.parameters_and_names()}
    assert "adaln_single.emb.motion_score_embedder.linear_1.weight" in names


def test_released_size_is_about_30b_parameters():
    model = build_empty({})
    assert model.num_layers == 48 and model.inner_dim == 6144
    assert 29.0e9 < model.num_parameters() < 30.5e9


def test_ti2v_model_needs_its_condition():
    model = StepVideoModel(num_attention_heads=1, attention_head_dim=16, in_channels=2, out_channels=2,
                           num_layers=1, caption_channels=[4, 4], use_additional_conditions=True)
    x = Tensor(np.zeros((1, 1, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="condition_hidden_states"):
        model(x, Tensor(np.zeros(1, np.float32)), Tensor(np.zeros((1, 2, 4), np.float32)),
              Tensor(np.ones((1, 2), np.int64)))
