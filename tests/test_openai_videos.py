"""The OpenAI Videos API face of `run_parallel.py --serve` and its /metrics, with the real `openai` package
against one live service (msrun, 1 rank, the tiny T2V model, a token): create and poll, download and read
the frames, the thumbnail, list, delete; extra_body settings reach the job's record; the SDK's typed errors
carry our messages; /jobs sees the same jobs; /metrics (parsed by prometheus_client) counts jobs that finish
and fail. (TI2V with input_reference and the journal across a SIGKILL: test_openai_videos_ti2v.py.)"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from service_support import MsrunService

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK: OpenAI's own service closes
TIMEOUT = 420
TOKEN = "s3cret-videos"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAULT_SEED = 666  # the denoising loop raises after step 1 of the jobs with this seed
TINY = ["--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "2"]  # every job's defaults


def frames_of(path):
    import imageio.v3 as iio
    return np.stack(list(iio.imiter(str(path))))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    out = tmp_path_factory.mktemp("v1_t2v")
    model = out / "stepvideo-tiny"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(model), "--task", "t2v"], check=True,
                   cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    svc = MsrunService(["--model_dir", str(model), "--caption_url", "local", "--vae_url", "local",
                        "--save_path", str(out / "videos"), "--auth_token", TOKEN, *TINY], 1, str(out / "logs"),
                       {"STEPVIDEO_INJECT_FAULT": f"{FAULT_SEED}:1"})
    svc.wait_ready()
    yield svc, out
    left = svc.terminate()
    assert not left, f"processes left after SIGTERM: {left}\n{svc.logs()}"


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service[0].url + "v1", api_key=TOKEN, max_retries=0, timeout=60)


def metrics(url, headers=AUTH) -> dict:
    """{sample name (+ labels): value} of GET /metrics, read by prometheus_client's parser."""
    r = requests.get(url + "metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
            if s.name == "stepvideo_service_info":
                out["info"] = s.labels
    return out


@pytest.mark.timeout(TIMEOUT)
def test_create_poll_download_list_and_delete_with_the_sdk(service, client):
    svc, out = service
    video = client.videos.create_and_poll(prompt="a red house under the sun", size="80x48", seconds="0.68",
                                          extra_body={"num_inference_steps": 2, "guidance_scale": 5.0, "seed": 3,
                                                      "flow_shift": 9.0},
                                          poll_interval_ms=200)
    assert (video.status, video.progress, video.object) == ("completed", 100, "video"), video
    assert (video.size, video.seconds, video.model, video.error) == ("80x48", "0.68", "stepvideo-tiny", None)
    assert video.completed_at >= video.created_at
    client.videos.download_content(video.id).write_to_file(out / "dl.mp4")
    frames = frames_of(out / "dl.mp4")
    assert frames.shape == (17, 48, 80, 3)
    client.videos.download_content(video.id, variant="thumbnail").write_to_file(out / "thumb.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "thumb.png").convert("RGB")), frames[0])
    # extra_body reached the job: its record shows our settings, and how seconds became frames
    record = requests.get(f"{svc.url}jobs/{video.id}/record", headers=AUTH, timeout=10).json()
    s = record["settings"]
    assert (s["infer_steps"], s["cfg_scale"], s["seed"], s["time_shift"], s["num_frames"]) == (2, 5.0, 3, 9.0, 17)
    assert s["notes"][0] == "seconds=0.68: num_frames=17 (round(seconds x 25 fps))", s["notes"]
    # the page's /jobs and /v1/videos see the same jobs
    second = client.videos.create(prompt="a blue boat", extra_body={"seed": 4})
    ids_v1 = [v.id for v in client.videos.list(order="asc", limit=100)]
    ids_jobs = [j["id"] for j in requests.get(svc.url + "jobs", headers=AUTH, timeout=10).json()["jobs"]]
    assert ids_v1 == ids_jobs and {video.id, second.id} <= set(ids_v1)
    page = client.videos.list(limit=1)  # newest first, one per page: the SDK follows `after`
    assert page.data[0].id == ids_v1[-1] and page.has_more
    assert [v.id for v in page] == ids_v1[::-1]  # auto-paging over every page
    assert client.videos.poll(second.id, poll_interval_ms=200).status == "completed"
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert not (out / "videos" / f"{video.id}.mp4").exists() and not (out / "videos" / f"{video.id}.json").exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert requests.get(f"{svc.url}jobs/{video.id}", headers=AUTH, timeout=10).status_code == 404
    journal = [json.loads(line) for line in (out / "videos" / "service-journal.jsonl").read_text().splitlines()]
    assert [e["event"] for e in journal if e.get("id") == video.id][-1] == "deleted"


def test_the_sdk_raises_its_typed_errors_with_our_messages(service, client):
    svc, _ = service
    with pytest.raises(openai.UnprocessableEntityError) as bad_size:
        client.videos.create(prompt="x", size="big")
    assert bad_size.value.status_code == 422 and bad_size.value.param == "size"
    assert "size must be 'WIDTHxHEIGHT' (e.g. '992x544'), got 'big'" in bad_size.value.message
    with pytest.raises(openai.UnprocessableEntityError) as nan:
        client.videos.create(prompt="x", extra_body={"guidance_scale": float("nan")})
    assert nan.value.param == "guidance_scale"
    assert "from guidance_scale: cfg_scale=nan is not a finite number" in nan.value.message
    with pytest.raises(openai.UnprocessableEntityError) as over:
        client.videos.create(prompt="x", size="99999x48")
    assert "width=99999 is over" in over.value.message and over.value.param == "size"
    with pytest.raises(openai.UnprocessableEntityError) as model:
        client.videos.create(prompt="x", model="sora-2")
    assert "this service serves 'stepvideo-tiny'" in model.value.message
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.videos.create(prompt="x", extra_body={"steps": 3})
    assert "unknown field(s) ['steps']" in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError) as image:
        client.videos.create(prompt="x", input_reference=("a.png", open(os.path.join(REPO, "assets", "demo.png"),
                                                                        "rb")))
    assert "input_reference is for TI2V" in image.value.message
    with pytest.raises(openai.AuthenticationError) as auth:
        openai.OpenAI(base_url=svc.url + "v1", api_key="wrong", max_retries=0).videos.list()
    assert "missing or wrong token" in auth.value.message and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.retrieve("job99999")
    assert "no video job99999" in missing.value.message
    with pytest.raises(openai.BadRequestError) as variant:
        client.videos.download_content("job99999", variant="spritesheet")
    assert "variant='spritesheet' is not available here" in variant.value.message
    # a JSON body (curl) with a NaN literal: the same 400 as POST /jobs, in the OpenAI error shape
    r = requests.post(svc.url + "v1/videos", data=b'{"prompt": "a", "guidance_scale": NaN}', timeout=10,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not JSON: NaN is not JSON")
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _wait(svc, job_id):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        state = requests.get(f"{svc.url}jobs/{job_id}", headers=AUTH, timeout=10).json()["state"]
        if state in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"{job_id} did not finish")


@pytest.mark.timeout(TIMEOUT)
def test_metrics_count_jobs_that_finish_fail_and_are_cancelled(service, client):
    svc, _ = service
    assert requests.get(svc.url + "metrics", timeout=10).status_code == 401  # behind the token
    before = metrics(svc.url)
    info = before["info"]
    assert info["layout"] == "cfg1-ulysses1-pp1" and info["device"] == "CPU" and info["mindspore_version"]
    failing = client.videos.create(prompt="a failing job", extra_body={"seed": FAULT_SEED})
    good = client.videos.create(prompt="a good job", extra_body={"seed": 5})
    waiting = requests.post(svc.url + "jobs", json={"prompt": "cancelled", "seed": 6}, headers=AUTH, timeout=10)
    assert requests.delete(f"{svc.url}jobs/{waiting.json()['id']}", headers=AUTH, timeout=10).status_code == 200
    failed = client.videos.poll(failing.id, poll_interval_ms=200)
    assert failed.status == "failed" and failed.error.code == "generation_failed"
    assert "injected fault at step 1" in failed.error.message
    assert client.videos.poll(good.id, poll_interval_ms=200).status == "completed"
    after = metrics(svc.url)
    moved = {k: after[k] - before.get(k, 0) for k in after if k.startswith("stepvideo_jobs_") and k.endswith("_total")}
    assert moved == {"stepvideo_jobs_accepted_total": 3, "stepvideo_jobs_completed_total": 1,
                     "stepvideo_jobs_failed_total": 1, "stepvideo_jobs_cancelled_total": 1}, moved
    assert after["stepvideo_jobs_waiting"] == 0
    stage = "stepvideo_job_stage_seconds_count{stage=%s}"
    assert after[stage % "encode"] - before[stage % "encode"] == 2  # both ran the encoder
    assert after[stage % "denoise"] - before[stage % "denoise"] == 1  # one finished denoising
    assert after[stage % "write"] - before[stage % "write"] == 1
    steps = after["stepvideo_denoise_step_seconds_count"] - before["stepvideo_denoise_step_seconds_count"]
    assert steps == 2  # the good job's 2 steps (the failing one raised in its first)
    assert after["stepvideo_denoise_step_seconds_sum"] > before["stepvideo_denoise_step_seconds_sum"]
