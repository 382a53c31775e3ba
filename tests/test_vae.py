"""The video VAE: golden agreement, shape rules, seeded sampling, loading, input checks."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from stepvideo_ms.tools import verify
from stepvideo_ms.formats.checkpoint import CheckpointError
from stepvideo_ms.models import vae_config
from stepvideo_ms.models.vae import (
    FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION, AutoencoderKL, VAEConfig, blend_chunks,
)
from stepvideo_ms.formats.safetensors_io import save_file_atomic
from stepvideo_ms.tools.tiny import set_small_random_weights

TINY = {"z_channels": 2, "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1},
        "decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}, "version": 2}


def _randomise(model, seed=0):
    """Small random weights; group-norm scales around 1."""
    return set_small_random_weights(model, np.random.default_rng(seed), 0.05)


@pytest.fixture(scope="module")
def tiny():
    return _randomise(AutoencoderKL.from_config(TINY))


def _video(frames, h=16, w=16, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (1, frames, 3, h, w)).astype(np.float32)


def test_golden_vae_passes(golden_dir, capsys):
    assert verify.main(["--golden", golden_dir, "--case", "vae"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("vae")][0]
    assert "PASS" in line and "encoder_raw=" in line and "decoded_unmixed=" in line


def test_shape_rules(tiny):
    z = TINY["z_channels"]
    raw = tiny.encode_raw(_video(FRAMES_PER_CHUNK, 16, 32), progress=False)
    assert raw.shape == (1, LATENT_FRAMES_PER_CHUNK, 2 * z, 1, 2)
    image = tiny.encode(_video(1), progress=False)  # TI2V: a first image -> one latent frame
    assert image.shape == (1, 1, z, 1, 1)
    latents = np.random.default_rng(2).standard_normal((1, LATENT_FRAMES_PER_CHUNK, z, 1, 2)).astype(np.float32)
    frames = tiny.decode(latents, progress=False)
    assert frames.shape == (1, FRAMES_PER_CHUNK, 3, SPATIAL_COMPRESSION, 2 * SPATIAL_COMPRESSION)
    assert np.isfinite(frames.asnumpy()).all()
    assert vae_config.latent_frames(34) == 6 and vae_config.video_frames(6) == 34


def test_decode_is_per_chunk_then_blended(tiny):
    z = TINY["z_channels"]
    latents = np.random.default_rng(3).standard_normal((1, 6, z, 1, 1)).astype(np.float32)
    blended = tiny.decode(latents, progress=False).asnumpy()
    first = tiny.decode_chunks(latents[:, :3], progress=False).asnumpy()
    second = tiny.decode_chunks(latents[:, 3:], progress=False).asnumpy()
    chunks = np.concatenate([first, second], axis=1)  # chunks are decoded independently
    np.testing.assert_allclose(blended, blend_chunks(Tensor(chunks)).asnumpy(), atol=1e-6)
    np.testing.assert_allclose(blended[:, :16], first[:, :16], atol=1e-6)  # only the boundary pair changes
    np.testing.assert_allclose(blended[:, 18:], second[:, 1:], atol=1e-6)
    assert np.abs(blended[:, 16:18] - chunks[:, 16:18]).max() > 1e-4


def test_blend_matches_upstreams_in_place_order():
    x = np.random.default_rng(4).standard_normal((2, 51, 1, 2, 2)).astype(np.float32)
    expect = x.copy()
    front, back = slice(16, 50, 17), slice(17, 51, 17)
    expect[:, back] = expect[:, back] * 0.6 + expect[:, front] * 0.4
    expect[:, front] = expect[:, front] * 0.6 + expect[:, back] * 0.4  # uses the new back frames
    np.testing.assert_allclose(blend_chunks(Tensor(x)).asnumpy(), expect, atol=1e-6)
    np.testing.assert_array_equal(blend_chunks(Tensor(x[:, :17])).asnumpy(), x[:, :17])


def test_seeded_sampling(tiny):
    video = _video(FRAMES_PER_CHUNK)
    a = tiny.encode(video, seed=7, progress=False).asnumpy()
    b = tiny.encode(video, seed=7, progress=False).asnumpy()
    c = tiny.encode(video, seed=8, progress=False).asnumpy()
    mean = tiny.encode(video, sample=False, progress=False).asnumpy()
    raw = tiny.encode_raw(video, progress=False).asnumpy()
    z = TINY["z_channels"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    np.testing.assert_array_equal(mean, raw[:, :, :z])
    std = np.exp(0.5 * np.clip(raw[:, :, z:], -30, 20))
    noise = np.random.default_rng(7).standard_normal(mean.shape, dtype=np.float32)
    np.testing.assert_allclose(a, mean + std * noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,match", [
    ((1, 16, 3, 16, 16), "multiple of 17"),
    ((1, 17, 3, 20, 16), "multiples of 16"),
    ((1, 17, 4, 16, 16), "channels"),
    ((17, 3, 16, 16), "batch, frames"),
])
def test_encode_rejects_bad_frames(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(np.zeros(shape, np.float32), progress=False)


@pytest.mark.parametrize("shape,match", [
    ((1, 4, 2, 1, 1), "multiple of 3"),
    ((1, 3, 5, 1, 1), "z_channels=2"),
    ((3, 2, 1, 1), "batch, latent frames"),
])
def test_decode_rejects_bad_latents(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.decode(np.zeros(shape, np.float32), progress=False)


def test_config_defaults_and_checks():
    released = VAEConfig.from_dict({})
    assert released == VAEConfig()
    assert (released.z_channels, released.encoder.ch, released.encoder.ch_mult) == (64, 32, (4, 8, 16, 16))
    assert (released.decoder.ch, released.decoder.ch_mult, released.decoder.num_res_blocks) == (128, (1, 2, 4, 4), 2)
    assert VAEConfig.from_dict(released.to_dict()) == released
    partial = VAEConfig.from_dict({"z_channels": 8, "decoder": {"ch": 32}})
    assert partial.decoder.ch_mult == (1, 2, 4, 4) and partial.encoder == released.encoder
    with pytest.raises(ValueError, match="version"):
        VAEConfig.from_dict({"version": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        VAEConfig.from_dict({"z_channel": 8})
    with pytest.raises(ValueError, match="multiples of 32"):
        VAEConfig.from_dict({"encoder": {"ch": 24}})
    # the decoder builds num_res_blocks + 1 blocks per level (as upstream), so 0 is one block; the encoder needs one
    one_block = AutoencoderKL.from_config({"z_channels": 8, "decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1],
                                                                        "num_res_blocks": 0}})
    assert [len(level.block) for level in one_block.decoder.up] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="encoder.num_res_blocks=0 must be >= 1"):
        VAEConfig.from_dict({"encoder": {"num_res_blocks": 0}})


def test_released_parameter_names():
    """Widths differ between levels in the released model: the 1x1x1 shortcuts appear, named as upstream."""
    with ms.nn.utils.no_init_parameters():
        model = AutoencoderKL.from_config({})
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    assert shapes["encoder.down.0.block.0.nin_shortcut.conv.weight"] == (128, 32, 1, 1, 1)
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.down.1.downsample.conv.conv.weight"] == (256, 256, 3, 3, 3)
    assert shapes["encoder.conv_patchify.conv.conv.weight"] == (256, 512, 3, 3, 3)
    assert shapes["encoder.conv_out.conv.weight"] == (128, 2048, 3, 3, 3)
    assert shapes["decoder.conv_in.conv.weight"] == (2048, 64, 3, 3, 3)
    assert shapes["decoder.conv_unpatchify.conv.conv.weight"] == (4096, 2048, 3, 3, 3)
    assert shapes["decoder.up.1.block.0.nin_shortcut.conv.weight"] == (256, 512, 1, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (256, 256, 3, 3)
    assert shapes["decoder.up.3.upsample.conv3d.conv2.conv.weight"] == (512, 512, 3, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3, 3)
    assert not any(n.startswith("decoder.up.0.upsample") or n.startswith("encoder.down.3.downsample") for n in shapes)


def test_from_pretrained_folder_and_file(tiny, tmp_path):
    tensors = {n: p.asnumpy() for n, p in tiny.parameters_and_names()}
    save_file_atomic(tensors, str(tmp_path / "vae_v2.safetensors"))
    tiny.save_config(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["z_channels"] == 2
    for path in (tmp_path, tmp_path / "vae_v2.safetensors"):
        loaded = AutoencoderKL.from_pretrained(str(path), dtype=ms.float32, progress=False)
        assert loaded.config == tiny.config
        got = dict((n, p.asnumpy()) for n, p in loaded.parameters_and_names())
        for name, value in tensors.items():
            np.testing.assert_array_equal(got[name], value)
    (tmp_path / "config.json").unlink()  # without config.json: released widths, which these weights do not fit
    with pytest.raises(CheckpointError, match="does not fit"):
        AutoencoderKL.from_pretrained(str(tmp_path), dtype=ms.float32, progress=False)
    with pytest.raises(FileNotFoundError, match="vae_v2.safetensors"):
        AutoencoderKL.from_pretrained(str(tmp_path / "missing"), progress=False)


def test_loading_new_weights_into_a_used_model_decodes_with_the_new_ones(tmp_path):
    """The conv cells keep their weights' CPU matmul layout between calls: loading other weights into
    a model that already decoded must give exactly what a fresh model with those weights gives."""
    from stepvideo_ms.formats import checkpoint

    files = []
    for seed in (0, 1):
        tensors = {n: p.asnumpy() for n, p in _randomise(AutoencoderKL.from_config(TINY), seed).parameters_and_names()}
        files.append(str(tmp_path / f"w{seed}.safetensors"))
        save_file_atomic(tensors, files[-1])
    latents = np.random.default_rng(3).standard_normal((1, 3, TINY["z_channels"], 1, 2)).astype(np.float32)
    used = AutoencoderKL.from_config(TINY)
    checkpoint.load_into(used, files[0], progress=False)
    first = used.decode(latents, progress=False).asnumpy()
    checkpoint.load_into(used, files[1], progress=False)
    again = used.decode(latents, progress=False).asnumpy()
    fresh = AutoencoderKL.from_config(TINY)
    checkpoint.load_into(fresh, files[1], progress=False)
    np.testing.assert_array_equal(again, fresh.decode(latents, progress=False).asnumpy())
    assert np.abs(again - first).max() > 1e-3
