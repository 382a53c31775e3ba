"""`run_parallel.py --serve` without msrun, as a service manager or `nohup ... &` runs it (one process,
tiny model, in-process encoders and VAE):

- started by a shell that exits at once (the service is reparented), it keeps answering /health after
  its parent is gone (the parent watch is for msrun ranks only), stops on SIGTERM with exit status 0
  and leaves no process;
- on a port another program holds, it says so in its own words (naming --port), not werkzeug's.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import REPO
from service_support import alive, processes_mentioning

READY_RE = re.compile(r"service ready: (http://\S+/)")
ENV = {**os.environ, "GLOG_v": "3"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("standalone") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", "t2v"], check=True, cwd=REPO,
                   capture_output=True, env=ENV)
    return str(out)


def serve_args(model, save_path, port="0"):
    return [sys.executable, os.path.join(REPO, "run_parallel.py"), "--serve", "--port", str(port), "--model_dir",
            model, "--caption_url", "local", "--vae_url", "local", "--save_path", str(save_path), "--no_progress"]


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def wait_for_ready(log, pid, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        match = READY_RE.search(log.read_text(errors="replace"))
        if match:
            return match.group(1)
        time.sleep(0.3)
    return None


@pytest.mark.timeout(300)
def test_a_service_started_by_a_shell_that_exits_runs_until_sigterm(model, tmp_path):
    log = tmp_path / "service.log"
    log.touch()  # the shell truncates it
    marker = str(tmp_path / "videos")  # in the service's command line only: finds its processes
    # a shell starts the service in the background and waits on its stdin; closed once the service is ready,
    # the shell exits: the service's parent ends while it serves, as with `nohup ... &` in a shell that returns
    script = f'{" ".join(serve_args(model, marker))} > "{log}" 2>&1 & echo $!; read _ || true'
    shell = subprocess.Popen(["sh", "-c", script],
                             cwd=tmp_path, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(shell.stdout.readline())
    try:
        url = wait_for_ready(log, pid)
        assert url, f"the service did not become ready:\n{log.read_text()[-3000:]}"
        assert parent_of(pid) == shell.pid
        shell.stdin.close()
        assert shell.wait(30) == 0
        assert requests.get(url + "health", timeout=10).status_code == 200
        time.sleep(4)  # several heartbeats (1 s) with its parent gone: the old watch stopped within one
        assert alive(pid), f"the service stopped with its parent:\n{log.read_text()[-3000:]}"
        assert requests.get(url + "health", timeout=10).status_code == 200
        assert "service stopped" not in log.read_text()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.3)
        assert not alive(pid), "SIGTERM did not stop the service within 60 s"
        text = log.read_text()
        assert "service stopped (SIGTERM)" in text, text[-3000:]
        assert processes_mentioning(marker) == [], "a process of the service is left"
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait(10)
        for leftover, _ in processes_mentioning(marker):
            os.kill(leftover, signal.SIGKILL)


@pytest.mark.timeout(200)
def test_a_taken_port_is_said_in_our_words(model, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = subprocess.run(serve_args(model, tmp_path / "videos", port), cwd=REPO, env=ENV, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=180)
    assert done.returncode != 0
    assert f"--serve cannot listen on 127.0.0.1:{port} (Address already in use)" in done.stderr, done.stderr[-3000:]
    assert "pick another --port" in done.stderr
    assert "in use by another program" not in done.stderr + done.stdout  # werkzeug's own advice
