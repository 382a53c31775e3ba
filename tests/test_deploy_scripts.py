"""The deployment scripts, run for real as a user runs them (CPU, tiny model), plus their argument checks.

The real run: start_servers.sh (token required), run_t2v.sh --ulysses 2 and run_ti2v.sh --pp 2 from
another working directory with relative paths, a two-host launch simulated on this machine (two
run_t2v.sh invocations, --nnodes 2, node ranks 0 and 1, master 127.0.0.1) whose latents must equal
one process's, then stop_servers.sh: afterwards no process of the run is left (read from /proc) and
the token is in no file and no console line.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO
from service_support import processes_mentioning
from stepvideo_ms.generation import cli
from stepvideo_ms.formats.safetensors_io import load_file

SCRIPTS = os.path.join(REPO, "scripts")
TOKEN = "s3cret-deploy-token"
SMALL = ["--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "2", "--seed", "11",
         "--no_progress"]
RUN_TIMEOUT = 400


def script(name, *args, cwd=REPO, env=None, timeout=60, prompt=True):
    """Run scripts/NAME; the run scripts get upstream's example prompt first unless `prompt` is False or
    the arguments give one (--prompt is required)."""
    full_env = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_AUTH_TOKEN"}
    full_env.update(env or {})
    task = {"run_t2v.sh": "t2v", "run_ti2v.sh": "ti2v"}.get(name)
    if task and prompt and not {"--prompt", "--help", "-h"} & set(map(str, args)):
        from stepvideo_ms.deploy.msrun_job import DEFAULT_PROMPTS

        args = ("--prompt", DEFAULT_PROMPTS[task], *args)
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    for task in ("t2v", "ti2v"):  # same seed: the T2V directory's servers serve both
        subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(root / "models" / task), "--task", task],
                       check=True, cwd=REPO, capture_output=True)
    return root


# ---- help and argument checks (no process started) ------------------------------------------
@pytest.mark.parametrize("name", ["start_servers.sh", "stop_servers.sh", "run_t2v.sh", "run_ti2v.sh", "demo.sh"])
def test_every_script_answers_help(name):
    r = script(name, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr
    assert r.stderr == ""


def test_test_sh_has_its_own_help():
    r = script("test.sh", "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "usage: bash scripts/test.sh [PYTEST ARGUMENTS]" and len(lines) < 30, r.stdout
    assert "slow" in r.stdout and "minutes" in r.stdout and "tests/test_plan.py" in r.stdout
    assert "[setup]" not in r.stdout  # help installs nothing


@pytest.mark.parametrize("args,message", [
    (["--ulysses", "2", "--pp", "1", "--cards", "0,1,2"], "lists 3 cards, but this host runs 2 workers"),
    (["--ulysses", "3", "--pp", "1", "--nnodes", "2"], "do not split evenly over --nnodes 2"),
    (["--ulysses", "2", "--pp", "1", "--nnodes", "2", "--node_rank", "2"], "--node_rank 2"),
    (["--ulysses", "0"], "--ulysses 0"),
    (["--ulysses", "2", "--pp", "1", "--", "--height", "0"], "height=0"),
])
def test_launch_arguments_are_checked_before_msrun(models, args, message):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and "msrun" not in r.stdout


def test_a_run_without_prompt_is_refused_as_run_parallel_refuses_it(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "1", "--dry-run",
               prompt=False)
    assert r.returncode == 2 and "run_t2v.sh: error: --prompt is required: give the text of the video" in r.stderr
    assert "msrun" not in r.stdout  # no silent demo prompt


def test_wrong_layout_is_answered_in_the_caller_s_flags_with_layouts_the_model_takes(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "3", "--dry-run")
    assert r.returncode == 2, r.stdout + r.stderr
    # the tiny model: 2 heads, 2 layers; pp 3 or 6 would be refused too, so neither is advised
    assert "run_t2v.sh: error: --ulysses 3 does not divide num_attention_heads=2" in r.stderr, r.stderr
    assert "--ulysses 2 --pp 1" in r.stderr and "_degree" not in r.stderr and "--pp 3" not in r.stderr
    assert r.stderr.count("\n") == 1
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses_degree", "2", "--dry-run")
    assert r.returncode == 2 and "takes --ulysses N" in r.stderr, r.stderr


def test_a_folder_of_models_is_answered_with_the_models_inside(models):
    r = script("run_t2v.sh", "--model_dir", "models", "--ulysses", "2", "--pp", "1", "--dry-run", cwd=models)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is a folder of models, not a model" in r.stderr and "models/transformer/config.json" in r.stderr
    assert str(models / "models" / "t2v") in r.stderr and str(models / "models" / "ti2v") in r.stderr
    servers = script("start_servers.sh", "--model_dir", "models", "--log_dir", "logs", cwd=models)
    assert servers.returncode == 2 and "is a folder of models, not a model" in servers.stderr, servers.stderr
    assert str(models / "models" / "t2v") in servers.stderr and not (models / "logs").exists()
    empty = models / "empty_model"
    empty.mkdir(exist_ok=True)
    r = script("run_t2v.sh", "--model_dir", "empty_model", "--ulysses", "2", "--pp", "1", "--dry-run", cwd=models)
    assert r.returncode == 2 and "is not a model folder" in r.stderr and "step_llm/" in r.stderr, r.stderr


def test_weights_of_the_other_task_name_the_other_script(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "ti2v", "--ulysses", "2", "--pp", "1", "--dry-run")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "holds TI2V weights" in r.stderr and os.path.join(SCRIPTS, "run_ti2v.sh") in r.stderr
    assert "--first_image_path" not in r.stderr
    r = script("run_ti2v.sh", "--model_dir", models / "models" / "t2v", "--first_image_path",
               os.path.join(REPO, "assets", "demo.png"), "--ulysses", "2", "--pp", "1", "--dry-run")
    assert r.returncode == 2 and "holds T2V weights" in r.stderr and "run_t2v.sh" in r.stderr, r.stderr


def test_servers_not_started_is_a_pre_launch_mistake_pointing_to_start_servers(models, tmp_path):
    from stepvideo_ms.parallel.msrun import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "1",
               "--caption_url", url, "--vae_url", url, "--log_dir", "logs", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the caption server does not answer" in r.stderr and "call_remote_server" not in r.stderr
    assert f"bash {os.path.join(SCRIPTS, 'start_servers.sh')} --model_dir {models / 'models' / 't2v'}" in r.stderr
    assert "msrun" not in r.stdout


def test_stop_servers_speaks_as_itself(tmp_path):
    r = script("stop_servers.sh", "--log_dir", "logs", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("stop_servers.sh: no run file"), r.stderr
    assert "start_servers.sh" not in r.stderr


def test_run_parallel_settings_are_taken_without_the_double_dash(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "1",
               "--num_frames", "17", "--height", "48", "--width", "80", "--infer_steps", "3", "--seed", "5",
               "--cfg_scale", "4.5", "--time_shift", "11", "--output_file_name", "cat", "--overwrite",
               "--no_progress", "--dry-run")
    assert r.returncode == 0, r.stderr
    for part in ("--num_frames 17", "--height 48", "--width 80", "--infer_steps 3", "--seed 5",
                 "--cfg_scale 4.5", "--time_shift 11.0", "--output_file_name cat", "--overwrite", "--no_progress"):
        assert part in r.stdout, r.stdout
    assert "--infer_steps 50" not in r.stdout and "--cfg_scale 9.0" not in r.stdout  # the preset yields to them
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--bogus", "2", "--dry-run")
    assert r.returncode == 2 and "unrecognized arguments: --bogus 2" in r.stderr and "--help" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    help_text = script("run_ti2v.sh", "--help").stdout
    assert "--num_frames" in help_text and "--output_file_name" in help_text and "--ulysses_degree" not in help_text


def test_two_host_dry_run_maps_onto_msrun_options(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "2",
               "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.1.2.3", "--cards", "4,5",
               "--preset", "t2v-turbo", "--dry-run", "--", "--auth_token", TOKEN)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the msrun of the environment the scripts use (.venv, or $STEPVIDEO_VENV: the suite's own)
    # this host's 2 workers are told they share it (the planner's host memory per host)
    assert out.startswith("ASCEND_RT_VISIBLE_DEVICES=4,5 STEPVIDEO_RANKS_PER_HOST=2 "
                          + os.path.join(os.path.dirname(sys.executable), "msrun"))
    for part in ("--worker_num=4 --local_worker_num=2 --master_addr=10.1.2.3 --master_port=8118",
                 "--node_rank=1", f"python {os.path.join(REPO, 'run_parallel.py')} --model_dir",
                 "--cfg_degree 1 --ulysses_degree 2 --pp_degree 2", "--infer_steps 15 --cfg_scale 5.0 --time_shift 17.0"):
        assert part in out, out
    assert TOKEN not in out and "auth_token" not in out


def test_two_host_dry_run_counts_this_host_s_workers_whatever_the_caller_set(models):
    """The launcher's own checks and its workers count this host's 2 workers (msrun's --local_worker_num),
    not a STEPVIDEO_RANKS_PER_HOST left in the caller's environment (3 does not divide the world of 4)."""
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "2",
               "--nnodes", "2", "--node_rank", "0", "--cards", "0,1", "--dry-run",
               env={"STEPVIDEO_RANKS_PER_HOST": "3"})
    assert r.returncode == 0, r.stderr
    assert "STEPVIDEO_RANKS_PER_HOST=2 " in r.stdout and "--local_worker_num=2" in r.stdout, r.stdout


def test_one_card_without_layout_flags_lets_the_planner_choose(models):
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--cards", "0", "--caption_url", "local",
               "--vae_url", "local", "--dry-run", "--", "--card_gb", "8", "--device", "CPU", "--num_frames", "17",
               "--height", "64", "--width", "96")
    assert r.returncode == 0, r.stderr
    assert "[run_parallel] layout for 1 card(s) of 8 GiB (CPU backend, 17 frames 64x96, rank 0 also holding the " \
           "local encoders/VAE" in r.stdout and "): --ulysses_degree 1 --pp_degree 1;" in r.stdout, r.stdout
    assert "--worker_num=1 --local_worker_num=1" in r.stdout and "ASCEND_RT_VISIBLE_DEVICES=0 " in r.stdout
    assert "--ulysses_degree" not in r.stdout.splitlines()[-1]  # each worker's run_parallel.py makes the same choice
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--cards", "0", "--caption_url", "local",
               "--vae_url", "local", "--dry-run", "--", "--card_gb", "0.000001", "--device", "CPU")
    assert r.returncode == 2 and "no layout of 1 card(s) of 1e-06 GiB is predicted to fit" in r.stderr, r.stderr


def test_cards_without_card_gb_plan_for_the_first_card_s_own_memory(models):
    """On Ascend (simulated: a 64 GiB card, or $STEPVIDEO_SIM_CARD_GB) the launcher reads the first card's
    memory in a child process that opens the card and exits, plans for it, and passes that size to
    every worker as --card_gb (so each makes the same choice without reading a card itself)."""
    common = ["--model_dir", models / "models" / "t2v", "--cards", "3,5", "--caption_url", "local", "--vae_url",
              "local", "--dry-run", "--", "--num_frames", "17", "--height", "64", "--width", "96"]
    sim = {"STEPVIDEO_DEVICE": "ascend-sim"}
    r = script("run_t2v.sh", *common, env=sim)
    assert r.returncode == 0, r.stderr
    assert "[run_parallel] layout for 2 card(s) of 64 GiB (Ascend 910B, 17 frames 64x96" in r.stdout, r.stdout
    command = r.stdout.splitlines()[-1]
    assert command.startswith("ASCEND_RT_VISIBLE_DEVICES=3,5 ") and command.endswith(" --card_gb 64"), command
    r = script("run_t2v.sh", *common, env={**sim, "STEPVIDEO_SIM_CARD_GB": "0.001"})
    assert r.returncode == 2 and "the card reports 0.001 GiB (pass --card_gb to plan for another size): " in r.stderr
    r = script("run_t2v.sh", *common, "--card_gb", "32", env=sim)  # a size given: no card is read
    assert r.returncode == 0 and "of 32 GiB" in r.stdout and r.stdout.count("--card_gb 32") == 1, r.stdout + r.stderr
    r = script("run_ti2v.sh", "--model_dir", models / "models" / "ti2v", "--cards", "0", "--first_image_path",
               os.path.join(REPO, "assets", "demo.png"), "--caption_url", "local", "--vae_url", "local", "--dry-run",
               env=sim)  # TI2V too (its planning once failed for want of the image it does not read)
    assert r.returncode == 0 and "[run_parallel] layout for 1 card(s) of 64 GiB" in r.stdout, r.stdout + r.stderr


def test_bad_save_path_fails_fast_and_writes_nothing(models, tmp_path):
    (tmp_path / "a_file").write_text("x")
    before = sorted(os.listdir(tmp_path))
    t0 = time.monotonic()
    r = script("run_t2v.sh", "--model_dir", models / "models" / "t2v", "--ulysses", "2", "--pp", "1",
               "--save_path", "a_file/videos", "--log_dir", "logs", cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2 and "a_file/videos cannot be created" in r.stderr and "a_file is a file" in r.stderr, r.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert sorted(os.listdir(tmp_path)) == before


def test_start_servers_refuses_a_missing_model_dir_relative_to_the_caller(tmp_path):
    r = script("start_servers.sh", "--model_dir", "nope", cwd=tmp_path)
    assert r.returncode == 2 and f"taken from {tmp_path}" in r.stderr


def test_start_servers_prints_the_log_tail_of_a_server_that_dies(tmp_path):
    (tmp_path / "model" / "vae").mkdir(parents=True)  # no step_llm/: the caption server exits at once
    r = script("start_servers.sh", "--model_dir", "model", "--caption_port", 0, "--vae_port", 0,
               "--log_dir", "logs", cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the caption server exited" in r.stderr and "step_llm is not a directory" in r.stderr
    assert not (tmp_path / "logs" / "servers.json").exists()
    assert processes_mentioning(str(tmp_path)) == []


# ---- the real thing --------------------------------------------------------------------------
def _wait_port(port, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"msrun's scheduler did not listen on {port}")


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_servers_runs_two_hosts_and_stop_for_real(models, capsys):
    from stepvideo_ms.parallel.msrun import free_port

    root = models
    cwd = root / "elsewhere"  # the user's directory: every path below is relative to it
    cwd.mkdir()
    decoy = cwd / "stepvideo_ms"  # another checkout in the user's directory must not be imported
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the stepvideo_ms of the current directory was imported')\n")
    token_env = {"STEPVIDEO_AUTH_TOKEN": TOKEN}
    started = script("start_servers.sh", "--model_dir", "../models/t2v", "--caption_port", 0, "--vae_port", 0,
                     "--log_dir", "logs", cwd=cwd, env=token_env, timeout=RUN_TIMEOUT)
    console = [started.stdout + started.stderr]
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        urls = started.stdout.strip().splitlines()[-1].split()
        assert urls[0] == "--caption_url" and not urls[1].endswith(":0") and not urls[3].endswith(":0")
        pids = [int(line.split("pid ")[1].split(",")[0]) for line in started.stdout.splitlines() if " pid " in line]
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)

        assert f"stop with: bash {os.path.join(SCRIPTS, 'stop_servers.sh')} --run_file" in started.stdout
        t2v = script("run_t2v.sh", "--model_dir", "../models/t2v", "--ulysses", 2, "--pp", 1, *urls,  # no --
                     "--save_path", "out", "--log_dir", "logs/t2v", *SMALL, "--output_file_name", "t2v",
                     "--auth_token", TOKEN, cwd=cwd, timeout=RUN_TIMEOUT)
        console.append(t2v.stdout + t2v.stderr)
        assert t2v.returncode == 0, t2v.stdout + t2v.stderr
        shutil.copyfile(os.path.join(REPO, "assets", "demo.png"), cwd / "img.png")
        with_progress = [a for a in SMALL if a != "--no_progress"]  # the console is a pipe here: plain lines
        ti2v = script("run_ti2v.sh", "--model_dir", "../models/ti2v", "--first_image_path", "img.png",
                      "--ulysses", 1, "--pp", 2, *urls, "--save_path", "out", "--log_dir", "logs/ti2v", "--",
                      *with_progress, "--output_file_name", "ti2v", cwd=cwd, env=token_env, timeout=RUN_TIMEOUT)
        console.append(ti2v.stdout + ti2v.stderr)
        assert ti2v.returncode == 0, ti2v.stdout + ti2v.stderr
        assert "\r" not in ti2v.stdout + ti2v.stderr and "denoising: 2/2 steps, in " in ti2v.stdout + ti2v.stderr
        assert sorted(os.listdir(cwd / "out")) == ["t2v.json", "t2v.mp4", "ti2v.json", "ti2v.mp4"]
        for text in console[1:]:  # quiet: our lines and the progress, no launcher echo or MindSpore log lines
            assert "Event base dispatch" not in text and "Start worker process" not in text
            assert "[WARNING]" not in text and "None of PyTorch" not in text

        # two hosts simulated here: node 0 and node 1 with one worker each, master on 127.0.0.1
        port = free_port()
        common = ["--model_dir", "../models/t2v", "--ulysses", 2, "--pp", 1, *urls, "--nnodes", 2,
                  "--master_addr", "127.0.0.1", "--master_port", port]
        extra = ["--", *SMALL, "--no_video", "--auth_token", TOKEN]
        results = {}
        node0 = threading.Thread(target=lambda: results.setdefault(0, script(
            "run_t2v.sh", *common, "--node_rank", 0, "--log_dir", "logs/node0", *extra,
            "--save_latents", "two_hosts.safetensors", cwd=cwd, timeout=RUN_TIMEOUT)))
        node0.start()
        _wait_port(port)  # host 0's scheduler first, as on a cluster
        results[1] = script("run_t2v.sh", *common, "--node_rank", 1, "--log_dir", "logs/node1", *extra, cwd=cwd,
                            timeout=RUN_TIMEOUT)
        node0.join()
        for rank in (0, 1):
            console.append(results[rank].stdout + results[rank].stderr)
            assert results[rank].returncode == 0, results[rank].stdout + results[rank].stderr
        single = root / "single.safetensors"
        assert cli.main(["--model_dir", str(root / "models" / "t2v"), "--caption_url", urls[1], "--vae_url",
                            urls[3], "--prompt", launch_prompt(), *SMALL, "--no_video", "--save_latents",
                            str(single), "--auth_token", TOKEN]) == 0
        console.append("".join(capsys.readouterr()))
        reference = load_file(str(single))["latents"]
        latents = load_file(str(cwd / "two_hosts.safetensors"))["latents"]
        assert np.abs(latents - reference).max() <= 1e-4 * (1 + np.abs(reference).max())
    finally:
        stopped = script("stop_servers.sh", "--log_dir", "logs", cwd=cwd, timeout=60)
    assert stopped.returncode == 0 and stopped.stdout.count(": stopped") == 2, stopped.stdout + stopped.stderr
    assert not os.path.exists(cwd / "logs" / "servers.json")
    again = script("stop_servers.sh", "--log_dir", "logs", cwd=cwd, timeout=60)
    assert again.returncode == 1 and again.stderr.startswith("stop_servers.sh: "), again.stderr
    assert processes_mentioning(str(root)) == [] and not any(os.path.exists(f"/proc/{p}/cmdline") for p in pids)
    # the token: in no output or log file, on no console line
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                assert TOKEN.encode() not in fh.read(), os.path.join(folder, name)
    assert all(TOKEN not in text for text in console)
    record = json.loads((cwd / "out" / "t2v.json").read_text())
    assert record["arguments"]["auth_token"] == "set"


def launch_prompt():
    from stepvideo_ms.deploy.msrun_job import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS["t2v"]


def test_noise_filter_drops_launcher_echo_and_dispatch_lines_keeps_progress():
    import io

    from stepvideo_ms.console import NoiseFilter

    out = io.BytesIO()
    f = NoiseFilter(out)
    stream = (b"Start worker process with rank id:0, log file:x. Execute command: python a.py\n"
              b"Start worker process with rank id:1, log file:y. Environment variable [RANK_ID=1] is exported.\n"  # 2.7
              b"denoising:  50%\rdenoising: 100%\r\n"
              b"[INFO] DISTRIBUTED(1,7f,python):2026 [tcp_server.cc:314] Start] Event base dispatch success!\n"
              # MindSpore 2.7 names the module PS
              b"[INFO] PS(2,7e,python):2026 [mindspore/ccsrc/ps/core/communicator/tcp_client.cc:318] Start] "
              b"Event base dispatch success!\n"
              b"[run_parallel] video: a.mp4\n")
    for i in range(0, len(stream), 7):  # arbitrary chunk borders
        f.feed(stream[i:i + 7])
    f.close()
    assert out.getvalue() == b"denoising:  50%\rdenoising: 100%\r\n[run_parallel] video: a.mp4\n"
    verbose = io.BytesIO()
    NoiseFilter(verbose, enabled=False).feed(stream)
    assert verbose.getvalue() == stream
