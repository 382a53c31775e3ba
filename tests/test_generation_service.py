"""Load once, generate many, under msrun with 2 ranks (ulysses 2) and in-process encoders and VAE:

- `--prompts_file` with 5 lines, line 2 invalid and line 3 not JSON (a NaN): reported by their line
  numbers before the load; line 4 fails inside the denoising loop (an injected fault on every rank)
  and fails alone: the other two are written (exit 1);
- `--serve`: 3 jobs submitted over HTTP run in order with step progress; their MP4s decode to the
  same frames as the prompts-file run's for the same settings; bad submissions get 4xx and the
  service stays up; a job whose denoising loop raises fails alone with its error in its record and
  the next job runs; SIGTERM to msrun's process group finishes the running job, keeps the waiting one
  in the journal and stops every rank, leaving no process;
- SIGKILL of every process of a service with jobs running and waiting, then a restart on the same
  save folder: the jobs are finished and the ids continue.
(The token, body cap, queue bound and cancelling are checked on the app alone in test_service_app.py.)
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from conftest import REPO
from service_support import MsrunService
from stepvideo_ms.parallel.msrun import run_msrun

TIMEOUT = 420
SMALL = {"num_frames": 17, "height": 48, "width": 80, "infer_steps": 3}
JOBS = [dict(prompt="a red house under the sun", seed=3, **SMALL),
        dict(prompt="a blue boat on a lake", seed=4, **SMALL),
        dict(prompt="a red house under the sun", seed=5, cfg_scale=5.0, **SMALL)]


def frames_of(path):
    import imageio.v3 as iio
    return np.stack(list(iio.imiter(str(path))))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("svc_t2v") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", "t2v"], check=True, cwd=REPO,
                   capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return str(out)


WORLD = ["--caption_url", "local", "--vae_url", "local", "--ulysses_degree", "2"]
FAULT_SEED = 666  # the denoising loop raises after step 2 of the jobs with this seed, on every rank
FAULT_ENV = {"STEPVIDEO_INJECT_FAULT": f"{FAULT_SEED}:2"}


@pytest.fixture(scope="module")
def batch(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    lines = [json.dumps(dict(JOBS[0], output_file_name="first")),
             json.dumps({"prompt": "an invalid line", "steps": 3}),
             '{"prompt": "a", "cfg_scale": NaN}',
             json.dumps(dict(JOBS[1], seed=FAULT_SEED, output_file_name="faulty")),
             json.dumps(dict(JOBS[1], output_file_name="second"))]
    jobs = out / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    result = run_msrun("run_parallel.py", ["--model_dir", model, *WORLD, "--prompts_file", str(jobs),
                                           "--save_path", str(out / "videos"), "--no_progress"],
                       2, str(out / "logs"), TIMEOUT, FAULT_ENV)
    return result, out


@pytest.mark.timeout(TIMEOUT + 60)
def test_prompts_file_reports_the_bad_line_and_writes_the_others(batch):
    result, out = batch
    assert result.returncode == 1, result.logs()  # one line was bad
    logs = result.logs()
    assert "jobs.jsonl line 2: unknown key(s) ['steps']" in logs
    assert logs.index("line 2: unknown key") < logs.index("loaded in")  # reported before the load
    assert "jobs.jsonl line 3: not valid JSON (NaN is not JSON" in logs
    assert "jobs.jsonl line 4: denoising failed: InjectedFault: injected fault at step 2" in logs  # alone:
    assert "batch done: 2 written, 1 failed, 2 bad line(s)" in logs  # line 5 ran after it
    written = sorted(p.name for p in (out / "videos").iterdir())
    assert written == ["first.json", "first.mp4", "second.json", "second.mp4"], logs
    record = json.loads((out / "videos" / "first.json").read_text())
    assert record["settings"]["seed"] == 3 and record["prompts_file"]["line"] == 1
    assert record["parallel"]["ulysses_degree"] == 2 and "load_s" in record["timings"]
    assert frames_of(out / "videos" / "first.mp4").shape == (17, 48, 80, 3)


@pytest.fixture(scope="module")
def service(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("service")
    svc = MsrunService(["--model_dir", model, *WORLD, "--save_path", str(out / "videos")], 2, str(out / "logs"),
                       FAULT_ENV)
    svc.wait_ready()
    yield svc, out
    left = svc.terminate()
    assert not left, f"processes left after SIGTERM: {left}\n{svc.logs()}"


def wait_done(url, job_id, timeout=TIMEOUT):
    seen_steps = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{url}jobs/{job_id}", timeout=10).json()
        if job["state"] == "running":
            seen_steps.add(job["step"])
        if job["state"] in ("done", "failed", "cancelled"):
            return job, seen_steps
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not finish")


@pytest.mark.timeout(TIMEOUT + 120)
def test_three_jobs_run_in_order_with_progress_and_match_the_command_line(service, batch):
    svc, out = service
    url = svc.url
    ids = []
    for job in JOBS:
        r = requests.post(url + "jobs", json=job, timeout=10)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    assert requests.get(f"{url}jobs/{ids[2]}", timeout=10).json()["state"] in ("queued", "running")
    results = [wait_done(url, i) for i in ids]
    for job, _ in results:
        assert job["state"] == "done", job
        assert job["step"] == job["steps"] == 3
    assert any(steps for _, steps in results)  # progress was seen while running
    starts = [job["started"] for job, _ in results]
    ends = [job["finished"] for job, _ in results]
    assert starts == sorted(starts) and all(ends[i] <= starts[i + 1] for i in range(2))  # one at a time, in order
    video = requests.get(f"{url}jobs/{ids[0]}/video", timeout=30)
    assert video.status_code == 200 and video.headers["Content-Type"] == "video/mp4"
    (out / "job0.mp4").write_bytes(video.content)
    _, batch_out = batch
    np.testing.assert_array_equal(frames_of(out / "job0.mp4"), frames_of(batch_out / "videos" / "first.mp4"))
    np.testing.assert_array_equal(frames_of(out / "videos" / f"{ids[1]}.mp4"),
                                  frames_of(batch_out / "videos" / "second.mp4"))
    record = requests.get(f"{url}jobs/{ids[2]}/record", timeout=10).json()
    assert record["settings"]["cfg_scale"] == 5.0 and record["job_id"] == ids[2]
    health = requests.get(url + "health", timeout=10).json()
    assert health["jobs"]["done"] >= 3 and health["parallel"]["world_size"] == 2


with open(os.path.join(REPO, "assets", "demo.png"), "rb") as _fh:
    DEMO_PNG = _fh.read()

BAD = [
    ("unknown setting", dict(json={"prompt": "x", "steps": 3}), 422, "unknown key"),
    ("image for T2V", dict(data={"job": json.dumps({"prompt": "x"})},
                            files={"first_image": ("a.png", DEMO_PNG)}),
     422, "first_image is for TI2V"),
    ("not JSON", dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "not JSON"),
    ("wrong content type", dict(data=b"prompt=x", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    ("empty prompt", dict(json={"prompt": "  "}), 422, "prompt is empty"),
    ("wrong type", dict(json={"prompt": "x", "seed": "7"}), 422, "seed must be an integer"),
    ("too many frames", dict(json={"prompt": "x", "num_frames": 5100}), 422, "num_frames=5100 is over"),
    ("not an object", dict(json=["x"]), 422, "JSON object"),
]


@pytest.mark.parametrize("kind,request_kwargs,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_submissions_get_4xx_and_the_service_stays_up(service, kind, request_kwargs, status, message):
    svc, _ = service
    r = requests.post(svc.url + "jobs", timeout=30, **request_kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert requests.get(svc.url + "health", timeout=10).json()["status"] == "ok"
    assert requests.get(svc.url + "jobs/nope", timeout=10).status_code == 404


HOSTILE = [
    ("NaN", dict(data=b'{"prompt": "a", "cfg_scale": NaN}', headers={"Content-Type": "application/json"}),
     400, "NaN is not JSON"),
    ("Infinity", dict(data=b'{"prompt": "a", "cfg_scale": Infinity}', headers={"Content-Type": "application/json"}),
     400, "Infinity is not JSON"),
    ("1e400", dict(data=b'{"prompt": "a", "cfg_scale": 1e400}', headers={"Content-Type": "application/json"}),
     422, "cfg_scale=inf is not a finite number"),
    ("seed 10**40", dict(json={"prompt": "a", "seed": 10 ** 40}), 422, "seed=an integer of 41 digits is over"),
    ("lone surrogate", dict(data=b'{"prompt": "\\ud800"}', headers={"Content-Type": "application/json"}),
     422, "prompt is not valid Unicode text"),
]


@pytest.mark.timeout(TIMEOUT + 120)
def test_hostile_requests_are_refused_and_a_failing_job_fails_alone(service):
    svc, out = service
    url = svc.url
    for kind, request_kwargs, status, message in HOSTILE:
        r = requests.post(url + "jobs", timeout=30, **request_kwargs)
        assert r.status_code == status and message in r.json()["error"], (kind, r.text)
    faulty = requests.post(url + "jobs", json=dict(JOBS[1], seed=FAULT_SEED), timeout=10).json()["id"]
    after = requests.post(url + "jobs", json=JOBS[1], timeout=10).json()["id"]
    failed, _ = wait_done(url, faulty)
    assert failed["state"] == "failed", failed
    assert failed["error"].startswith("denoising failed: InjectedFault: injected fault at step 2"), failed
    assert wait_done(url, after)[0]["state"] == "done"  # the world went on with the next job
    assert not (out / "videos" / f"{faulty}.mp4").exists()
    assert requests.get(url + "health", timeout=10).json()["jobs"]["failed"] >= 1


@pytest.mark.timeout(TIMEOUT + 120)
def test_sigterm_finishes_the_running_job_keeps_the_queue_and_stops_every_rank(service):
    svc, out = service
    running = requests.post(svc.url + "jobs", json=dict(JOBS[0], infer_steps=6), timeout=10).json()["id"]
    waiting = requests.post(svc.url + "jobs", json=JOBS[1], timeout=10).json()["id"]
    deadline = time.monotonic() + TIMEOUT
    while requests.get(f"{svc.url}jobs/{running}", timeout=10).json()["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    left = svc.terminate()
    assert not left, f"processes left after SIGTERM: {left}\n{svc.logs()}"
    logs = svc.logs()
    # msrun's workers run in sessions of their own: they see msrun end and stop by themselves
    assert f"{running} done" in logs and "; 1 waiting job(s) kept in the journal" in logs, logs
    assert (out / "videos" / f"{running}.mp4").is_file() and not (out / "videos" / f"{waiting}.mp4").exists()
    journal = [json.loads(line) for line in (out / "videos" / "service-journal.jsonl").read_text().splitlines()]
    assert [e["event"] for e in journal if e.get("id") == waiting] == ["accepted"]  # runs at the next start
    assert [e["event"] for e in journal if e.get("id") == running][-1] == "done"


@pytest.mark.timeout(3 * TIMEOUT)
def test_sigkill_then_restart_finishes_the_jobs_and_continues_the_ids(model, tmp_path):
    """A crash: every process of the service killed with SIGKILL while one job runs and two wait."""
    videos = str(tmp_path / "videos")
    first = MsrunService(["--model_dir", model, *WORLD, "--save_path", videos], 2, str(tmp_path / "logs1"))
    first.wait_ready()
    try:
        ids = [requests.post(first.url + "jobs", json=dict(job, infer_steps=steps), timeout=10).json()["id"]
               for job, steps in ((JOBS[0], 12), (JOBS[1], 3), (JOBS[2], 3))]
        deadline = time.monotonic() + TIMEOUT
        while requests.get(f"{first.url}jobs/{ids[0]}", timeout=10).json()["step"] < 1:
            assert time.monotonic() < deadline, first.logs()
            time.sleep(0.1)
    finally:
        first.kill()  # SIGKILL to msrun and every worker: no handler runs
    assert ids == ["job00001", "job00002", "job00003"]
    assert not os.listdir(videos) or not any(name.endswith(".mp4") for name in os.listdir(videos))
    second = MsrunService(["--model_dir", model, *WORLD, "--save_path", videos], 2, str(tmp_path / "logs2"))
    url = second.wait_ready()
    try:
        assert "journal " in second.logs() and "3 job(s) to run, 0 finished listed, next id job00004" in second.logs()
        done = [wait_done(url, job_id)[0] for job_id in ids]
        assert [(j["id"], j["state"]) for j in done] == [(i, "done") for i in ids], done
        assert done[0]["steps"] == 12 and done[0]["started"] < done[1]["started"]  # the interrupted one first
        fourth = requests.post(url + "jobs", json=JOBS[1], timeout=10).json()
        assert fourth["id"] == "job00004"  # no second job00001
        listed = [j["id"] for j in requests.get(url + "jobs", timeout=10).json()["jobs"]]
        assert listed == ids + ["job00004"]
        assert wait_done(url, "job00004")[0]["state"] == "done"
    finally:
        left = second.terminate()
    assert not left, f"processes left after SIGTERM: {left}\n{second.logs()}"
    for job_id in ids + ["job00004"]:
        assert os.path.isfile(os.path.join(videos, f"{job_id}.mp4"))


# ---- refused before anything loads (no world is started) -------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--serve", "--host", "0.0.0.0"], "is not loopback: give --auth_token"),
    (["--serve", "--queue_size", "0"], "--queue_size 0"),
    (["--prompts_file", "/nonexistent/jobs.jsonl"], "no such file"),
    (["--serve", "--seed", "-1"], "--seed=-1 is under the allowed range"),  # a default of every job
    (["--prompts_file", "/nonexistent/jobs.jsonl", "--cfg_scale", "101"], "--cfg_scale=101.0 is over the limit"),
])
def test_mode_arguments_are_checked_first(model, tmp_path, capsys, monkeypatch, extra, message):
    from stepvideo_ms.generation import cli
    monkeypatch.delenv("STEPVIDEO_AUTH_TOKEN", raising=False)
    assert cli.main(["--model_dir", model, "--caption_url", "local", "--vae_url", "local",
                        "--save_path", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_prompts_file_without_a_usable_line_stops_before_loading(model, tmp_path, capsys):
    from stepvideo_ms.generation import cli
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "x", "first_image_path": "a.png"}\n\nnot json\n')
    assert cli.main(["--model_dir", model, "--prompts_file", str(jobs), "--save_path", str(tmp_path / "out"),
                        "--caption_url", "local", "--vae_url", "local"]) == 2
    err = capsys.readouterr().err
    assert "jobs.jsonl line 1: first_image_path is for TI2V" in err and "jobs.jsonl line 3: not valid JSON" in err
    assert "no usable line (2 bad)" in err and not (tmp_path / "out").exists()


def test_exactly_one_mode(model, capsys):
    from stepvideo_ms.generation import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model_dir", model, "--prompt", "x", "--serve"])
    assert exc.value.code == 2 and "exactly one of --prompt, --prompts_file, --serve" in capsys.readouterr().err


def test_single_video_flags_are_refused_for_many(model, capsys):
    from stepvideo_ms.generation import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model_dir", model, "--serve", "--first_image_path", "a.png", "--save_latents", "l.safetensors"])
    assert exc.value.code == 2
    assert "--first_image_path, --save_latents belong(s) to one video" in capsys.readouterr().err


@pytest.mark.slow  # a third msrun world (about a minute on a loaded machine); -m slow runs it
@pytest.mark.timeout(TIMEOUT + 120)
def test_a_fault_on_one_rank_is_a_world_failure_said_as_such_and_the_jobs_stay_in_the_journal(model, tmp_path):
    """Rank 1 alone raises inside the loop while rank 0 waits in a collective: the world cannot go on.
    It stops (msrun ends), the log says so, and the journal keeps both jobs for the next start."""
    videos = tmp_path / "videos"
    svc = MsrunService(["--model_dir", model, *WORLD, "--save_path", str(videos)], 2, str(tmp_path / "logs"),
                       {"STEPVIDEO_INJECT_FAULT": f"{FAULT_SEED}:2:1", "STEPVIDEO_AGREE_TIMEOUT_S": "60"})
    svc.wait_ready()
    try:
        ids = [requests.post(svc.url + "jobs", json=dict(JOBS[1], seed=seed), timeout=10).json()["id"]
               for seed in (FAULT_SEED, 1)]
        svc.proc.wait(TIMEOUT)
    finally:
        left = svc.terminate(30)
    assert not left and svc.proc.returncode != 0, svc.logs()
    assert "world failure on rank 1" in svc.logs()
    journal = [json.loads(line) for line in (videos / "service-journal.jsonl").read_text().splitlines()]
    assert [e["event"] for e in journal if e.get("id") == ids[0]] == ["accepted", "running"]  # runs again
    assert [e["event"] for e in journal if e.get("id") == ids[1]] == ["accepted"]  # waits for the next start
