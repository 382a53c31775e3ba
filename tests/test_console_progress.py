"""Progress when the output is not a terminal (a log file, a pipe, msrun's worker logs): plain lines at
most every LINE_INTERVAL_S seconds and one at the end, never carriage-return bar updates."""
import io
import os
import subprocess
import sys

import pytest

from conftest import REPO
from stepvideo_ms import console


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_line_progress_prints_at_a_sane_rate_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = console.LineProgress(range(100), desc="denoising", unit="step", file=out, interval=10.0, clock=clock)
    for _ in bar:
        clock.now += 0.35  # 100 steps over 35 s: lines at 10, 20 and 30 s, then the last one
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4, lines
    assert lines[0] == "denoising: 29/100 steps (29%), 00:10"
    assert lines[-1] == "denoising: 100/100 steps, in 00:35"


def test_a_short_transient_bar_says_nothing_and_bytes_read_as_bytes():
    out, clock = io.StringIO(), Clock()
    for _ in console.LineProgress(range(49), desc="loading", unit="tensor", leave=False, file=out, clock=clock):
        clock.now += 0.01
    assert out.getvalue() == ""  # quick and transient: as on a terminal, where the bar disappears
    with console.LineProgress(total=3 * 2 ** 20, desc="a.bin", unit="B", unit_scale=True, unit_divisor=1024,
                              file=out, clock=clock) as bar:
        bar.update(2 ** 20)
        clock.now += 12
        bar.update(2 ** 21)
    assert out.getvalue().splitlines() == ["a.bin: 3.00MB/3.00MB (100%), 00:12", "a.bin: 3.00MB/3.00MB, in 00:12"]


def test_the_choice_follows_the_terminal_unless_the_launcher_says(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    assert console.live_bars(Tty()) and not console.live_bars(io.StringIO())
    assert isinstance(console.progress(range(2), file=io.StringIO()), console.LineProgress)
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    assert not console.live_bars(Tty())
    monkeypatch.setenv(console.PROGRESS_ENV, "bars")
    assert console.live_bars(io.StringIO())


def test_msrun_workers_get_lines_when_the_launcher_s_output_is_not_a_terminal(monkeypatch):
    from stepvideo_ms.deploy import msrun_job

    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    args = msrun_job.build_parser("t2v").parse_args(["--model_dir", "m"])
    assert msrun_job.job_environment(args, None)[console.PROGRESS_ENV] == "lines"  # pytest captures stdout


def test_waiting_prints_lines_while_it_waits():
    import time

    out = io.StringIO()
    with console.Waiting("VAE server decoding", stream=out, interval=0.2):
        time.sleep(0.5)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines[0] == "[run_parallel] VAE server decoding ..."
    assert len(lines) >= 3 and lines[-1].startswith("[run_parallel] VAE server decoding: done in ")


@pytest.mark.timeout(300)
def test_a_redirected_run_logs_plain_progress_lines(tmp_path):
    model = tmp_path / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(model)], check=True, cwd=REPO,
                   capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != console.PROGRESS_ENV}
    r = subprocess.run([sys.executable, "run_parallel.py", "--model_dir", str(model), "--caption_url", "local",
                        "--vae_url", "local", "--prompt", "a red house", "--num_frames", "17", "--height", "48",
                        "--width", "80", "--infer_steps", "2", "--save_path", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "\r" not in text, text
    assert "denoising: 2/2 steps, in " in r.stderr and "VAE decoding: done in" in r.stderr, r.stderr
    assert "VAE server" not in text  # --vae_url local: the decode runs in this process
