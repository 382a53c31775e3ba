"""The quickstart's first command, `bash scripts/demo.sh`, run as a user runs it: from another folder,
with a relative output folder. It must write both videos, and end every process it started on
success, on a failed job and on Ctrl-C (read from /proc afterwards), leaving no temporary files.
"""
import json
import os
import signal
import subprocess
import time

import imageio.v3 as iio
import pytest

from conftest import REPO
from service_support import processes_mentioning

DEMO = os.path.join(REPO, "scripts", "demo.sh")
TIMEOUT = 300


def demo_env(tmp_path, **extra):
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPVIDEO_")}
    env.update(TMPDIR=str(temp), **extra)
    return env


def user_folder(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    return folder


def assert_nothing_left(tmp_path):
    assert processes_mentioning(str(tmp_path)) == []
    assert os.listdir(tmp_path / "tmp") == []  # the demo's own bookkeeping is gone too
    assert not (tmp_path / "user" / "demo_out" / "logs" / "servers.json").exists()


@pytest.mark.timeout(TIMEOUT + 60)
def test_demo_writes_both_videos_and_leaves_nothing_running(tmp_path):
    cwd = user_folder(tmp_path)
    done = subprocess.run(["bash", DEMO, "demo_out"], cwd=cwd, env=demo_env(tmp_path), capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    out = cwd / "demo_out"
    for task, name in (("t2v", "t2v_demo"), ("ti2v", "ti2v_demo")):
        frames = iio.imread(out / f"{name}.mp4")
        assert frames.shape == (34, 48, 80, 3), frames.shape
        record = json.loads((out / f"{name}.json").read_text())
        assert record["arguments"]["num_frames"] == 34
        # each job's lines carry its name: the two jobs run side by side
        assert f"[{task}] [run_parallel] {task}: 34 frames 48x80" in text, text
        assert f"[{task}] [run_parallel] video: {out / name}.mp4" in text, text
    assert "[demo] done in " in done.stdout
    assert "[WARNING]" not in text and "Traceback" not in text  # a quiet console
    assert_nothing_left(tmp_path)


@pytest.mark.slow  # 26-51 s; the stop on failure is msrun_process's (test_msrun_process.py), the cleanup Ctrl-C's
@pytest.mark.timeout(TIMEOUT + 60)
def test_a_failed_job_ends_the_demo_and_everything_it_started(tmp_path):
    cwd = user_folder(tmp_path)
    env = demo_env(tmp_path, STEPVIDEO_INJECT_FAULT="42:1")  # both jobs (seed 42) fail after their first step
    done = subprocess.run(["bash", DEMO, "demo_out"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed (exit 1); the logs are in " in done.stderr and "injected fault" in done.stdout, done.stderr
    assert not list((cwd / "demo_out").glob("*.mp4"))
    assert_nothing_left(tmp_path)


@pytest.mark.timeout(TIMEOUT + 60)
def test_ctrl_c_while_the_jobs_run_stops_everything(tmp_path):
    cwd = user_folder(tmp_path)
    # as a terminal's shell starts a foreground job: SIGINT at its default, whatever this suite inherited (a
    # suite started in the background has it ignored, and bash cannot trap a signal ignored on entry)
    proc = subprocess.Popen(["bash", DEMO, "demo_out"], cwd=cwd, env=demo_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[t2v] [run_t2v.sh] "):  # msrun is starting its workers
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
                break
        else:
            raise AssertionError("the T2V job never started:\n" + "".join(seen))
        interrupted = time.monotonic()
        seen.append(proc.stdout.read())
        assert proc.wait(timeout=60) == 130, "".join(seen)
        assert time.monotonic() - interrupted < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_nothing_left(tmp_path)
