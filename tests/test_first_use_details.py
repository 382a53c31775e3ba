"""Small things a new user meets first: a mistyped flag gets "did you mean" (run_parallel.py, describe, the
wrappers, start_servers.sh; difflib, as Python 3.11's argparse has no suggest_on_error); start_servers.sh
says a taken port in its own flags before it starts anything; the README's example folders (logs/,
models/) are ignored by git, the package's models/ is not."""
import os
import shutil
import socket
import subprocess

import pytest

from conftest import REPO
from service_support import processes_mentioning
from stepvideo_ms.generation import cli
from stepvideo_ms.tools import describe

SCRIPTS = os.path.join(REPO, "scripts")


def bash(name, *args, cwd=REPO, timeout=120):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_run_parallel_and_describe_suggest_the_flag_meant(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--model_dir", "m", "--promt", "a cat"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --promt (did you mean --prompt?) a cat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        describe.main(["--plan", "--cards", "1", "--host-gb", "48"])
    assert "--host-gb (did you mean --host_gb?) 48" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model_dir", "m", "--prompt", "x", "--zzzz"])  # nothing close: no suggestion
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzz" in err and "did you mean" not in err


def test_the_wrappers_suggest_the_flag_meant(tmp_path):
    r = bash("run_t2v.sh", "--model_dir", tmp_path, "--prompt", "x", "--ulyses", "2")
    assert r.returncode == 2 and "--ulyses (did you mean --ulysses?) 2" in r.stderr, r.stderr
    r = bash("start_servers.sh", "--model_dir", tmp_path, "--vae-port", "5001")
    assert r.returncode == 2 and "--vae-port (did you mean --vae_port?) 5001" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["caption", "vae"])
def test_start_servers_names_its_own_port_flag_when_a_port_is_taken(tmp_path, which):
    (tmp_path / "model").mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        ports = {"caption": 0, "vae": 0, which: port}
        r = bash("start_servers.sh", "--model_dir", "model", "--caption_port", ports["caption"], "--vae_port",
                 ports["vae"], "--log_dir", "logs", cwd=tmp_path)
    flag = f"--{which}_port"
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"start_servers.sh: {flag} {port}: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert f"pick another {flag}" in r.stderr and "pick another --port" not in r.stderr
    assert not (tmp_path / "logs").exists() and processes_mentioning(str(tmp_path)) == []  # nothing started


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git"))
                    and not os.path.isfile(os.path.join(REPO, ".git")), reason="not a git checkout")
def test_the_readme_s_example_folders_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "logs/msrun/worker_0.log", "models/stepvideo-t2v/x",
                              "stepvideo_ms/models/new_module.py"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["logs/msrun/worker_0.log", "models/stepvideo-t2v/x"]
