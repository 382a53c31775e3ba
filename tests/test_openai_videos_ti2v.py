"""/v1/videos on a TI2V service (msrun, 1 rank, the tiny TI2V model) with the real `openai` package: a job
whose first frame is the multipart `input_reference` file; then a job accepted through /v1/videos survives a
SIGKILL of every process and a restart on the same save folder, and finishes under its id."""
import os
import subprocess
import sys
import time

import numpy as np
import openai
import pytest

from conftest import REPO
from service_support import MsrunService

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK: OpenAI's own service closes
TIMEOUT = 420
DEMO = os.path.join(REPO, "assets", "demo.png")
ARGS = ["--caption_url", "local", "--vae_url", "local", "--num_frames", "17", "--height", "48", "--width", "80",
        "--infer_steps", "2"]


def frames_of(path):
    import imageio.v3 as iio
    return np.stack(list(iio.imiter(str(path))))


@pytest.mark.slow  # two starts of a service (about 80 s on 2 cores); -m slow runs it
@pytest.mark.timeout(3 * TIMEOUT)
def test_ti2v_with_input_reference_and_a_v1_job_survives_sigkill_and_restart(tmp_path):
    model = tmp_path / "stepvideo-ti2v-tiny"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(model), "--task", "ti2v"], check=True,
                   cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    videos = tmp_path / "videos"
    args = ["--model_dir", str(model), *ARGS, "--save_path", str(videos)]
    first = MsrunService(args, 1, str(tmp_path / "logs1"))
    try:
        client = openai.OpenAI(base_url=first.wait_ready() + "v1", api_key="none", max_retries=0, timeout=60)
        with open(DEMO, "rb") as image:
            video = client.videos.create_and_poll(prompt="the scene comes alive", input_reference=image,
                                                  extra_body={"motion_score": 10, "seed": 7}, poll_interval_ms=200)
        assert (video.status, video.model, video.size) == ("completed", "stepvideo-ti2v-tiny", "80x48"), video
        client.videos.download_content(video.id).write_to_file(tmp_path / "ti2v.mp4")
        assert frames_of(tmp_path / "ti2v.mp4").shape == (17, 48, 80, 3)
        assert (videos / "uploads" / f"{video.id}.png").read_bytes() == open(DEMO, "rb").read()
        with pytest.raises(openai.UnprocessableEntityError) as no_image:
            client.videos.create(prompt="no first frame")
        assert "send the first image as a 'input_reference' file" in no_image.value.message
        # a long job through /v1/videos, killed (every process, SIGKILL) while it runs
        with open(DEMO, "rb") as image:
            long = client.videos.create(prompt="a long one", input_reference=image,
                                        extra_body={"num_inference_steps": 12, "seed": 8})
        deadline = time.monotonic() + TIMEOUT
        while client.videos.retrieve(long.id).progress < 1:
            assert time.monotonic() < deadline, first.logs()
            time.sleep(0.1)
    finally:
        first.kill()
    assert not (videos / f"{long.id}.mp4").exists()
    second = MsrunService(args, 1, str(tmp_path / "logs2"))
    try:
        client = openai.OpenAI(base_url=second.wait_ready() + "v1", api_key="none", max_retries=0, timeout=60)
        assert "1 job(s) to run" in second.logs()
        done = client.videos.poll(long.id, poll_interval_ms=200)
        assert (done.status, done.progress) == ("completed", 100), done
        assert [v.id for v in client.videos.list(order="asc")] == [video.id, long.id]
        client.videos.download_content(long.id).write_to_file(tmp_path / "long.mp4")
        assert frames_of(tmp_path / "long.mp4").shape == (17, 48, 80, 3)
    finally:
        left = second.terminate()
    assert not left, f"processes left after SIGTERM: {left}\n{second.logs()}"
