"""The Ascend deployment scripts, in --dry-run mode: the commands they would run."""
import subprocess

import pytest

from conftest import REPO


def run(script, *args):
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=30)


def test_start_servers_puts_each_server_on_its_own_card():
    r = run("start_servers.sh", "--model_dir", "/models/stepvideo", "--caption_card", "4", "--vae_card", "5", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ASCEND_RT_VISIBLE_DEVICES=4 ") and "--enable_llm True --enable_vae False" in lines[0]
    assert lines[1].startswith("ASCEND_RT_VISIBLE_DEVICES=5 ") and "--enable_vae True" in lines[1]
    assert "--port 5000" in lines[0] and "--port 5001" in lines[1]
    assert "--caption_url http://127.0.0.1:5000 --vae_url http://127.0.0.1:5001" in r.stdout


@pytest.mark.parametrize("cards,ulysses,pp,visible", [("4", 2, 2, "0\\,1\\,2\\,3"), ("8", 4, 2, "0\\,1\\,2\\,3\\,4\\,5\\,6\\,7")])
def test_t2v_layouts(cards, ulysses, pp, visible):
    r = run("run_t2v.sh", "--model_dir", "/m", "--cards", cards, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"ASCEND_RT_VISIBLE_DEVICES={visible} msrun --worker_num={cards} --local_worker_num={cards}" in out
    assert f"--ulysses_degree {ulysses} --pp_degree {pp}" in out
    assert "--infer_steps 50 --cfg_scale 9.0 --time_shift 13.0" in out and "--first_image_path" not in out


def test_ti2v_passes_image_motion_and_extra_arguments():
    r = run("run_ti2v.sh", "--model_dir", "/m", "--first_image_path", "cat.png", "--motion_score", "10",
            "--dry-run", "--", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "--first_image_path cat.png --motion_score 10" in r.stdout and r.stdout.rstrip().endswith("--seed 7")


@pytest.mark.parametrize("script,args,message", [
    ("run_t2v.sh", ["--dry-run"], "--model_dir is required"),
    ("run_t2v.sh", ["--model_dir", "/m", "--cards", "3", "--dry-run"], "--cards 3"),
    ("run_ti2v.sh", ["--model_dir", "/m", "--dry-run"], "--first_image_path"),
    ("start_servers.sh", ["--dry-run"], "--model_dir is required"),
    ("start_servers.sh", ["--model_dir", "/m", "--bogus"], "unknown argument --bogus"),
])
def test_bad_arguments_are_named(script, args, message):
    r = run(script, *args)
    assert r.returncode == 2 and message in r.stderr
