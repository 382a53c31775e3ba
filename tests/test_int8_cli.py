"""--weights int8 as users give it: run_parallel.py (one process, released folder quantized while loading
or a converted int8 folder), the Python API, the deploy script, and the checks before loading."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stepvideo_ms.generation import cli
from stepvideo_ms.formats.safetensors_io import load_file

SMALL = ["--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "2", "--seed", "4"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_cli") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", "t2v"], check=True, cwd=REPO,
                   capture_output=True, env={**os.environ, "GLOG_v": "3"})
    subprocess.run([sys.executable, "convert.py", "--quantize", "int8", "--model_dir", str(out), "--no_progress"],
                   check=True, cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return str(out)


def run(model, out_dir, *extra):
    latents = os.path.join(out_dir, "latents.safetensors")
    args = ["--model_dir", model, "--caption_url", "local", "--vae_url", "local", "--prompt", "a red house",
            *SMALL, "--no_video", "--no_progress", "--save_latents", latents, *extra]
    assert cli.main(args) == 0
    return load_file(latents)["latents"]


@pytest.fixture(scope="module")
def int8_latents(model, tmp_path_factory):
    return run(model, str(tmp_path_factory.mktemp("a")), "--weights", "int8")


def test_a_converted_folder_gives_the_same_latents_as_quantizing_while_loading(model, int8_latents, tmp_path,
                                                                               capsys):
    capsys.readouterr()
    converted = run(model, str(tmp_path), "--transformer_dir", "transformer_int8")  # int8 read from config.json
    world = [line for line in capsys.readouterr().out.splitlines() if "; world 1 = " in line]
    assert len(world) == 1 and ", int8 weights" in world[0], world  # said without --weights int8
    np.testing.assert_array_equal(converted, int8_latents)
    full = run(model, str(tmp_path / "full"))
    diff = np.abs(full - int8_latents)
    assert 0 < diff.mean() < 0.05 * np.abs(full).mean(), "int8 changes the result a little, not a lot"


def test_the_int8_folder_has_the_usual_permissions(model):
    """Made in a private temporary folder, renamed into place: the folder gets 0777 less the umask, as
    its files get 0666 less it (the test runs under the umask of the conversion)."""
    umask = os.umask(0o022)
    os.umask(umask)
    folder = os.path.join(model, "transformer_int8")
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(folder):
        assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_the_api_takes_weights(model, int8_latents):
    from stepvideo_ms import StepVideoPipeline

    pipe = StepVideoPipeline.from_pretrained(model, device="CPU", progress=False, weights="int8")
    assert pipe.transformer.weights == "int8"
    latents = pipe("a red house", output_type="latent", seed=4, num_frames=17, height=48, width=80, infer_steps=2)
    np.testing.assert_allclose(latents, int8_latents, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--weights full"):
        StepVideoPipeline.from_pretrained(model, device="CPU", progress=False, weights="full",
                                          transformer_dir="transformer_int8")


def test_checks_before_loading(model, tmp_path, capsys):
    args = ["--model_dir", model, "--prompt", "x", "--caption_url", "local", "--vae_url", "local",
            "--save_path", str(tmp_path)]
    assert cli.main(args + ["--transformer_dir", "transformer_int8", "--weights", "full"]) == 2
    assert "--weights full" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--weights", "int4"])
    assert exit_.value.code == 2
    assert not any(tmp_path.iterdir())


def test_the_deploy_script_passes_weights_on(model):
    env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_AUTH_TOKEN"}
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "run_t2v.sh"), "--model_dir", model, "--ulysses", "2",
                        "--pp", "1", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.1.2.3", "--cards", "0",
                        "--prompt", "a red house", "--weights", "int8", "--dry-run", "--", "--shard_weights"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "--weights int8" in r.stdout and "--shard_weights" in r.stdout
