"""The Python API and the one-process command line on the tiny model.

- the README's Python example, run as written: only its two configuration lines (`model_dir = ...`
  and `preview = ...`) are replaced, by the tiny model's folder and a 48x80, 2-step preview;
- `run_parallel.py --caption_url local --vae_url local` (no server) for T2V and TI2V, whose latents
  equal the Python API's for the same settings;
- the API's argument errors (unknown setting, an image for T2V, bad output type, save refusing to
  replace a file) before any model work.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stepvideo_ms.generation import cli
from stepvideo_ms.formats.safetensors_io import load_file

DEMO_IMAGE = os.path.join(REPO, "assets", "demo.png")
SMALL = dict(num_frames=17, height=48, width=80, infer_steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(task) -> a tiny model directory, built once per task for this module."""
    built = {}

    def make(task):
        if task not in built:
            out = tmp_path_factory.mktemp(f"api_{task}") / "model"
            subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", task], check=True,
                           cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
            built[task] = str(out)
        return built[task]
    return make


def readme_example() -> str:
    """The Python API's example (docs/python-api.md), which the README shows word for word."""
    with open(os.path.join(REPO, "docs", "python-api.md"), encoding="utf-8") as fh:
        text = fh.read()
    match = re.search(r"## The Python API.*?```python\n(.*?)```", text, re.S)
    assert match, "docs/python-api.md has no ```python block under '## The Python API'"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        assert "```python\n" + match.group(1) + "```" in fh.read(), "the README's example is not docs/python-api.md's"
    return match.group(1)


@pytest.fixture(scope="module", params=["t2v", "ti2v"])
def api(request, tiny):
    from stepvideo_ms import StepVideoPipeline
    model = tiny(request.param)
    return request.param, model, StepVideoPipeline.from_pretrained(model, device="CPU", progress=False)


def test_readme_example_runs_as_written_twice(tmp_path, tiny):
    """As a user runs it: a fresh interpreter in the user's folder, twice; the second run keeps the first
    run's videos, and nothing but the example's own lines reaches the console."""
    code = readme_example()
    model = tiny("t2v")
    lines = code.splitlines()
    config = [i for i, line in enumerate(lines) if re.match(r"(model_dir|preview) = ", line)]
    assert len(config) == 2, "the example must keep its two configuration lines (model_dir, preview)"
    for i in config:
        name = lines[i].split(" = ")[0]
        lines[i] = f"{name} = {model!r}" if name == "model_dir" else f"preview = {SMALL!r}"
    assert len(lines) <= 12, "the README example should stay about ten lines"
    env = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env["PYTHONPATH"] = REPO
    import imageio.v3 as iio
    for run, names in enumerate([("preview_0.mp4", "preview_1.mp4"), ("preview_0-1.mp4", "preview_1-1.mp4")]):
        r = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, f"run {run + 1}: {r.stderr[-3000:]}"
        assert r.stdout.count("(17, 48, 80, 3) uint8") == 2 and all(n in r.stdout for n in names), r.stdout
        assert "None of PyTorch" not in r.stderr + r.stdout, r.stderr
        for name in names:
            frames = np.stack(list(iio.imiter(str(tmp_path / name))))
            assert frames.shape == (17, 48, 80, 3)
    assert sorted(os.listdir(tmp_path)) == ["preview_0-1.mp4", "preview_0.mp4", "preview_1-1.mp4", "preview_1.mp4"]


def test_call_returns_frames_or_latents(api, tmp_path):
    task, _, pipe = api
    image = DEMO_IMAGE if task == "ti2v" else None
    latents = pipe("a red house", first_image=image, output_type="latent", seed=3, **SMALL)
    assert latents.shape == (1, 3, 8, 3, 5) and latents.dtype == np.float32
    frames = pipe("a red house", first_image=image, seed=3, **SMALL)
    assert frames.shape == (17, 48, 80, 3) and frames.dtype == np.uint8
    path = pipe.save(frames, str(tmp_path / "a.mp4"))
    assert pipe.save(frames, path) == str(tmp_path / "a-1.mp4")  # never replaced: numbered as the command line
    assert pipe.save(frames, path, overwrite=True) == path
    assert sorted(os.listdir(tmp_path)) == ["a-1.mp4", "a.mp4"]


def test_api_errors_name_the_argument(api, tmp_path):
    task, _, pipe = api
    image = DEMO_IMAGE if task == "ti2v" else None
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['steps'\]"):
        pipe("x", first_image=image, steps=3)
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", first_image=image, output_type="pil")
    with pytest.raises(ValueError, match="height=0"):
        pipe("x", first_image=image, height=0)
    with pytest.raises(ValueError, match="cfg_scale=nan is not a finite number"):
        pipe("x", first_image=image, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="seed=-1 is under the allowed range"):
        pipe("x", first_image=image, seed=-1)
    if task == "t2v":
        with pytest.raises(ValueError, match="first_image is for TI2V"):
            pipe("x", first_image=DEMO_IMAGE)
    else:
        with pytest.raises(ValueError, match="first image"):
            pipe("x")
    with pytest.raises(ValueError, match="uint8"):
        pipe.save(np.zeros((2, 8, 8, 3), np.float32), str(tmp_path / "b.mp4"))
    with pytest.raises(ValueError, match=r"\.mp4"):
        pipe.save(np.zeros((2, 8, 8, 3), np.uint8), str(tmp_path / "b.avi"))
    assert not any(tmp_path.iterdir())
    # a folder that cannot be written: said as the command line says it, before anything is written
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"pipe.save: the folder .*a_file is a file: give a folder"):
        pipe.save(np.zeros((2, 8, 8, 3), np.uint8), str(tmp_path / "a_file" / "b.mp4"))
    from stepvideo_ms.diffusion.settings import GenerationSettings

    settings = GenerationSettings("x", task, first_image_path=image, **SMALL)
    with pytest.raises(ValueError, match=r"save_path .*a_file/videos cannot be created: .*a_file is a file"):
        pipe.generate(settings, save_path=str(tmp_path / "a_file" / "videos"))  # before the generation
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_from_pretrained_checks_paths_first(tmp_path):
    from stepvideo_ms import StepVideoPipeline
    with pytest.raises(ValueError, match="model_dir"):
        StepVideoPipeline.from_pretrained(str(tmp_path / "missing"))


def test_one_process_command_line_equals_the_api(api, tmp_path):
    """run_parallel.py --caption_url local --vae_url local: no server, same latents as the API."""
    task, model, pipe = api
    args = ["--model_dir", model, "--caption_url", "local", "--vae_url", "local", "--prompt", "a red house",
            "--seed", "4", "--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "2",
            "--save_path", str(tmp_path), "--output_file_name", "one", "--no_progress",
            "--save_latents", str(tmp_path / "latents.safetensors")]
    image = None
    if task == "ti2v":
        image = DEMO_IMAGE
        args += ["--first_image_path", image, "--motion_score", "5"]
    assert cli.main(args) == 0
    latents = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    expected = pipe("a red house", first_image=image, output_type="latent", seed=4, **SMALL)
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-5)
    record = json.loads((tmp_path / "one.json").read_text())
    assert record["arguments"]["caption_url"] == "local" and (tmp_path / "one.mp4").is_file()
