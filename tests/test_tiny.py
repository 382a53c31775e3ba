"""tiny.py: a complete random-weight model directory, deterministic, loading through our loaders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from stepvideo_ms.formats import checkpoint
from stepvideo_ms.tools import tiny
from stepvideo_ms.models.vae_config import LATENT_FRAMES_PER_CHUNK
from stepvideo_ms.formats.safetensors_io import SafetensorsFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_FILES = {
    "tiny_model.json",
    "transformer/config.json", f"transformer/{tiny.DIT_INDEX}", *(f"transformer/{s}" for s in tiny.DIT_SHARDS),
    "step_llm/config.json", "step_llm/model.safetensors", "step_llm/step1_chat_tokenizer.model",
    "hunyuan_clip/clip_text_encoder/config.json", "hunyuan_clip/clip_text_encoder/model.safetensors",
    "hunyuan_clip/tokenizer/vocab.txt", "hunyuan_clip/tokenizer/tokenizer_config.json",
    "vae/config.json", "vae/vae_v2.safetensors",
    "scheduler/scheduler_config.json",
}


def listing(root):
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    return tiny.write_tiny_model(str(tmp_path_factory.mktemp("t") / "m"), seed=0, task="t2v")


def test_layout_is_the_released_one(tiny_t2v):
    files = listing(tiny_t2v)
    assert set(files) == EXPECTED_FILES
    index = json.loads(files[f"transformer/{tiny.DIT_INDEX}"])
    assert sorted(set(index["weight_map"].values())) == sorted(tiny.DIT_SHARDS)
    assert all(os.stat(os.path.join(tiny_t2v, f)).st_mode & 0o044 == 0o044 for f in files)
    assert not [n for n in os.listdir(os.path.dirname(tiny_t2v)) if ".tmp-" in n]


def test_same_seed_same_bytes_other_seed_other_weights(tiny_t2v, tmp_path):
    again = listing(tiny.write_tiny_model(str(tmp_path / "again"), seed=0, task="t2v"))
    first = listing(tiny_t2v)
    assert again.keys() == first.keys()
    differ = [k for k in first if first[k] != again[k]]
    assert not differ, f"not deterministic: {differ}"
    other = listing(tiny.write_tiny_model(str(tmp_path / "other"), seed=1, task="t2v"))
    assert other["vae/vae_v2.safetensors"] != first["vae/vae_v2.safetensors"]
    assert other[f"transformer/{tiny.DIT_SHARDS[0]}"] != first[f"transformer/{tiny.DIT_SHARDS[0]}"]
    assert other["step_llm/step1_chat_tokenizer.model"] == first["step_llm/step1_chat_tokenizer.model"]


def test_refuses_to_overwrite_unless_forced(tiny_t2v, tmp_path):
    target = tmp_path / "m"
    tiny.write_tiny_model(str(target), seed=0)
    with pytest.raises(FileExistsError, match="--force"):
        tiny.write_tiny_model(str(target), seed=0)
    tiny.write_tiny_model(str(target), seed=2, force=True)
    assert json.loads((target / "tiny_model.json").read_text())["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or old directories left behind
    with pytest.raises(ValueError, match="task"):
        tiny.write_tiny_model(str(tmp_path / "x"), task="i2v")
    assert not (tmp_path / "x").exists()


def load_dit(folder):
    from stepvideo_ms.models.dit import StepVideoModel

    model = StepVideoModel.from_config(checkpoint.read_config(folder))
    loaded = checkpoint.load_into(model, folder, progress=False)  # strict: every name and shape
    assert len(loaded) == len(list(model.parameters_and_names()))
    return model


def test_every_part_loads_and_the_chain_gives_finite_varied_outputs(tiny_t2v):
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.models.caption import CaptionEncoder
    from stepvideo_ms.models.vae import AutoencoderKL

    dit = load_dit(os.path.join(tiny_t2v, "transformer"))
    caption = CaptionEncoder.from_model_dir(tiny_t2v, progress=False)
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_t2v, "vae"), progress=False)
    sched = FlowMatchScheduler.from_dir(os.path.join(tiny_t2v, "scheduler"))
    assert sched.num_train_timesteps == 1000 and sched.solver == "euler"
    assert dit.in_channels == vae.config.z_channels
    assert caption.caption_channels == [int(c) for c in checkpoint.read_config(
        os.path.join(tiny_t2v, "transformer"))["caption_channels"]]

    emb = caption.encode(["一只熊猫在竹林里吃竹子，镜头缓缓推进。", "A kite circles above a wheat field at dusk."])
    for k in ("y", "clip_embedding"):
        assert np.isfinite(emb[k]).all() and emb[k].std() > 0.1, k
    assert not np.array_equal(emb["y"][0], emb["y"][1])  # different prompts, different embeddings

    f_lat = LATENT_FRAMES_PER_CHUNK
    x = Tensor(np.random.default_rng(0).standard_normal((2, f_lat, dit.in_channels, 2, 2)).astype(np.float32))
    t = Tensor(np.array([0.3, 0.3], np.float32))
    v = dit(x, t, Tensor(emb["y"]), Tensor(emb["y_mask"]), Tensor(emb["clip_embedding"])).asnumpy()
    assert v.shape == x.shape and np.isfinite(v).all() and v.std() > 0.05

    frames = vae.decode(Tensor(v[:1]), progress=False).asnumpy()
    assert frames.ndim == 5 and frames.shape[2] == 3 and np.isfinite(frames).all() and frames.std() > 1e-3
    back = vae.encode(Tensor(np.clip(frames, -1, 1)), seed=0, sample=False, progress=False).asnumpy()
    assert back.shape == v[:1].shape and np.isfinite(back).all()


def test_ti2v_cli(tmp_path):
    out = tmp_path / "ti2v"
    r = subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", "ti2v", "--seed", "3"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GLOG_v": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(out) in r.stdout
    cfg = checkpoint.read_config(str(out / "transformer"))
    assert cfg["use_additional_conditions"] is True
    model = load_dit(str(out / "transformer"))
    assert model.use_additional_conditions
    rng = np.random.default_rng(1)
    shape = (1, LATENT_FRAMES_PER_CHUNK, model.in_channels, 2, 2)
    x, cond = (Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    ch = cfg["caption_channels"]
    y = Tensor(rng.standard_normal((1, 5, ch[0])).astype(np.float32))
    clip = Tensor(rng.standard_normal((1, 3, ch[1])).astype(np.float32))
    mask = Tensor(np.ones((1, 8), np.int64))
    v = model(x, Tensor(np.array([0.5], np.float32)), y, mask, clip, cond, 5.0).asnumpy()
    assert v.shape == shape and np.isfinite(v).all() and v.std() > 0.05
    assert SafetensorsFile(str(out / "transformer" / tiny.DIT_SHARDS[0])).metadata == {"format": "pt"}
    again = subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "GLOG_v": "3"})
    assert again.returncode == 2 and "--force" in again.stderr
