"""StepVideoPipeline in one process on the tiny model: T2V and TI2V to a playable MP4 + JSON."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stepvideo_ms.diffusion.backends import InProcessBackends
from stepvideo_ms.diffusion.pipeline import StepVideoPipeline
from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
from stepvideo_ms.diffusion.settings import GenerationSettings
from stepvideo_ms.models.dit import StepVideoModel

DEMO_IMAGE = os.path.join(REPO, "assets", "demo.png")


@pytest.fixture(scope="module", params=["t2v", "ti2v"])
def pipeline(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"tiny_{request.param}") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(model_dir), "--task", request.param],
                   check=True, cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    transformer = str(model_dir / "transformer")
    model = StepVideoModel.from_pretrained(transformer, progress=False)
    backends = InProcessBackends.from_model_dir(str(model_dir), progress=False)
    scheduler = FlowMatchScheduler.from_dir(str(model_dir / "scheduler"))
    return request.param, StepVideoPipeline(model, scheduler, backends, backends, progress=False)


def settings(task, **kw):
    base = dict(prompt="a red house under the sun", task=task, num_frames=17, height=48, width=80, infer_steps=2,
                seed=5)
    if task == "ti2v":
        base.update(first_image_path=DEMO_IMAGE, motion_score=5.0)
    base.update(kw)
    return GenerationSettings(**base)


def test_writes_a_playable_mp4_and_its_json(pipeline, tmp_path):
    import imageio.v3 as iio
    task, pipe = pipeline
    result = pipe.generate(settings(task), save_path=str(tmp_path), output_file_name="clip")
    assert result.video_path == str(tmp_path / "clip.mp4")
    frames = np.stack(list(iio.imiter(result.video_path)))
    assert frames.shape == (17, 48, 80, 3) and frames.dtype == np.uint8
    meta = iio.immeta(result.video_path, plugin="FFMPEG") if hasattr(iio, "immeta") else {}
    if "fps" in meta:
        assert meta["fps"] == pytest.approx(25)
    record = json.loads((tmp_path / "clip.json").read_text())
    assert record["settings"]["task"] == task and record["settings"]["seed"] == 5
    assert record["frames"] == 17 and record["size"] == [48, 80]
    assert {"encode_s", "denoise_s", "decode_s"} <= set(record["timings"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]


def test_same_seed_same_latents_other_seed_other_latents(pipeline):
    task, pipe = pipeline
    a = pipe.generate(settings(task)).latents
    b = pipe.generate(settings(task)).latents
    c = pipe.generate(settings(task, seed=6)).latents
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_ti2v_conditions_frame_zero_only(pipeline):
    task, pipe = pipeline
    if task != "ti2v":
        pytest.skip("TI2V only")
    cond = pipe.encode_conditions(settings(task).resolved())
    assert cond.condition.shape == (2, 3, 8, 3, 5) and cond.motion_score == 5.0
    assert np.abs(cond.condition[:, 0]).max() > 0 and not np.any(cond.condition[:, 1:])
    np.testing.assert_array_equal(cond.condition[0], cond.condition[1])


def test_argument_errors_come_before_any_work(pipeline, tmp_path):
    task, pipe = pipeline
    with pytest.raises(ValueError, match="height=0"):
        pipe.generate(settings(task, height=0), save_path=str(tmp_path))
    other = "t2v" if task == "ti2v" else "ti2v"
    with pytest.raises(ValueError, match="does not fit this transformer|first image"):
        pipe.generate(settings(other, first_image_path=DEMO_IMAGE if other == "ti2v" else None), save_path=str(tmp_path))
    if task == "ti2v":
        with pytest.raises(ValueError, match="first_image_path"):
            pipe.generate(settings(task, first_image_path=None))
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        with pytest.raises(ValueError, match="not a readable image"):
            pipe.generate(settings(task, first_image_path=str(bad)))
    assert not any(p.suffix == ".mp4" for p in tmp_path.iterdir())
