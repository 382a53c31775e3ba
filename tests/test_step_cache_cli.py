"""The step cache's settings end to end on the tiny model (2 blocks: probe = block 0, middle = block 1):
run_parallel.py flags and the JSON record's `cache` entry, a prompts file whose jobs set their own
threshold, the Python API (the same latents as the command line), and the checks before loading."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stepvideo_ms.formats.safetensors_io import load_file
from stepvideo_ms.generation import cli

SMALL = ["--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "6"]
CACHE = ["--cache_warmup", "1", "--cache_first", "1", "--cache_last", "0", "--cache_max_skip", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_cli") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out)], check=True, cwd=REPO, capture_output=True)
    return str(out)


def base(tiny, tmp_path):
    return ["--model_dir", tiny, "--caption_url", "local", "--vae_url", "local", "--seed", "4",
            "--save_path", str(tmp_path), "--no_progress"] + SMALL + CACHE


def test_command_line_records_the_cached_steps_and_equals_the_api(tiny, tmp_path):
    from stepvideo_ms import StepVideoPipeline

    args = base(tiny, tmp_path) + ["--prompt", "a red house", "--output_file_name", "cached", "--cache_threshold",
                                   "0.5", "--save_latents", str(tmp_path / "cached.safetensors")]
    assert cli.main(args) == 0
    record = json.loads((tmp_path / "cached.json").read_text())["cache"]
    assert record["threshold"] == 0.5 and record["first"] == 1 and record["steps"] == 6
    assert record["cached_steps"] and 0 not in record["cached_steps"]
    assert record["blocks_skipped"] == len(record["cached_steps"]) and record["blocks_run"] == 12 - record["blocks_skipped"]
    pipe = StepVideoPipeline.from_pretrained(tiny, device="CPU", progress=False)
    latents = pipe("a red house", output_type="latent", seed=4, num_frames=17, height=48, width=80, infer_steps=6,
                   cache_threshold=0.5, cache_warmup=1, cache_first=1, cache_last=0, cache_max_skip=2)
    assert pipe.last_cache["cached_steps"] == record["cached_steps"]
    np.testing.assert_allclose(load_file(str(tmp_path / "cached.safetensors"))["latents"], latents, rtol=0, atol=1e-6)
    plain = pipe("a red house", output_type="latent", seed=4, num_frames=17, height=48, width=80, infer_steps=6)
    assert pipe.last_cache["cached_steps"] == [] and pipe.last_cache["blocks_run"] == 12
    assert not np.allclose(plain, latents)


def test_prompts_file_jobs_set_their_own_threshold(tiny, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a kite", "output_file_name": "off", "cache_threshold": 0}) + "\n"
                    + json.dumps({"prompt": "a kite", "output_file_name": "on"}) + "\n")
    assert cli.main(base(tiny, tmp_path) + ["--prompts_file", str(jobs), "--cache_threshold", "0.5"]) == 0
    off = json.loads((tmp_path / "off.json").read_text())
    on = json.loads((tmp_path / "on.json").read_text())
    assert off["cache"]["threshold"] == 0.0 and off["cache"]["cached_steps"] == [] and off["cache"]["blocks_run"] == 12
    assert on["cache"]["threshold"] == 0.5 and on["cache"]["cached_steps"]
    assert on["settings"]["cache_threshold"] == 0.5 and off["settings"]["cache_threshold"] == 0.0


def test_settings_the_model_cannot_take_stop_before_loading(tiny, tmp_path, capsys):
    args = base(tiny, tmp_path) + ["--prompt", "a red house", "--cache_threshold", "0.1", "--cache_first", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--cache_first 2 + --cache_last 0 leave no middle block of the model's 2" in err
    assert cli.main(base(tiny, tmp_path) + ["--prompt", "a", "--cache_threshold", "-1"]) == 2
    assert "cache_threshold" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_service_job_sets_its_own_threshold(tmp_path):
    """The service takes the cache settings like any per-video setting (generation/jobs.py), checked."""
    from stepvideo_ms.generation.service.app import ServiceState, create_app
    from stepvideo_ms.generation.service.board import JobBoard
    from stepvideo_ms.serving.limits import Limits

    state = ServiceState(JobBoard(4), "t2v", Limits(max_body_bytes=64 * 1024), None, str(tmp_path / "uploads"),
                         {"load_s": 1.0}, {"num_frames": 17, "height": 48, "width": 80, "cache_threshold": 0.1})
    c = create_app(state).test_client()
    own = c.post("/jobs", json={"prompt": "x", "cache_threshold": 0.25, "cache_max_skip": 3})
    assert own.status_code == 201, own.get_json()
    assert own.get_json()["settings"]["cache_threshold"] == 0.25 and own.get_json()["settings"]["cache_max_skip"] == 3
    default = c.post("/jobs", json={"prompt": "y"}).get_json()
    assert default["settings"]["cache_threshold"] == 0.1 and default["settings"]["cache_first"] == 8
    bad = c.post("/jobs", json={"prompt": "z", "cache_threshold": 11})
    assert bad.status_code in (400, 422) and "cache_threshold" in json.dumps(bad.get_json())
