"""Launching a Python script on N local workers with MindSpore's `msrun` (tests and benchmarks).

msrun starts a scheduler and N workers, each running `python SCRIPT ARGS` with its rank in the
environment, and writes their output to LOG_DIR/worker_<rank>.log. msrun runs in its own session
and each worker in one of its own, so that a hung collective can be ended with everything it started.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

TAIL_CHARS = 6000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MsrunResult:
    returncode: Optional[int]  # None when the job was ended for taking too long
    log_dir: str
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def logs(self, tail: int = TAIL_CHARS) -> str:
        """The launcher's output and the end of every worker's log, for a failure report."""
        parts = [f"--- msrun (exit {self.returncode}) ---\n{self.output[-tail:]}"]
        for path in sorted(glob.glob(os.path.join(self.log_dir, "*.log"))):
            with open(path, "r", encoding="utf-8", errors="replace") as fh:
                parts.append(f"--- {os.path.basename(path)} ---\n{fh.read()[-tail:]}")
        return "\n".join(parts)


def start_msrun(script: str, args: Sequence[str], workers: int, log_dir: str,
                extra_env: Optional[Dict[str, str]] = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start `script` on `workers` local msrun workers in a new session; returns the msrun process."""
    python_dir = os.path.dirname(sys.executable)
    msrun = os.path.join(python_dir, "msrun")
    if not os.path.isfile(msrun):
        raise FileNotFoundError(f"msrun not found beside {sys.executable}: install mindspore in this environment")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PATH"] = python_dir + os.pathsep + env.get("PATH", "")  # msrun runs `python` from PATH
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GLOG_v", "3")
    env.update(extra_env or {})
    os.makedirs(log_dir, exist_ok=True)
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", script, *args]
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=repo)


def run_msrun(script: str, args: Sequence[str], workers: int, log_dir: str, timeout: float,
              extra_env: Optional[Dict[str, str]] = None) -> MsrunResult:
    """Run `script` on `workers` local msrun workers; waits at most `timeout` seconds."""
    proc = start_msrun(script, args, workers, log_dir, extra_env)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return MsrunResult(proc.returncode, log_dir, output)
    except subprocess.TimeoutExpired:
        from ..deploy.msrun_process import end_tree

        end_tree(proc.pid)  # msrun's group (msrun, scheduler) and each worker's: every worker has its own session
        output, _ = proc.communicate()
        return MsrunResult(None, log_dir, output + f"\n[ended after {timeout:.0f} s]")
