"""Running `run_parallel.py --serve` under msrun for tests: start, find its URL, list its processes,
stop it with SIGTERM to msrun's process group (what a terminal or a service manager sends)."""
import glob
import os
import re
import signal
import time

from stepvideo_ms.deploy.msrun_process import descendants  # noqa: F401 - msrun's workers: their own sessions
from stepvideo_ms.parallel.msrun import start_msrun

READY_RE = re.compile(r"service ready: (http://\S+/)")


def processes_mentioning(text):
    """Pids of live processes whose command line contains `text` (from /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(pid), cmdline))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class MsrunService:
    def __init__(self, args, workers: int, log_dir: str, extra_env=None):
        self.log_dir = log_dir
        self.proc = start_msrun("run_parallel.py", ["--serve", "--port", "0", "--no_progress", *args], workers,
                                log_dir, extra_env, stdout=open(os.path.join(log_dir + ".out"), "w"))
        self.url = None
        self.pids = []

    def wait_ready(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in glob.glob(os.path.join(self.log_dir, "worker_*.log")):
                with open(path, errors="replace") as fh:
                    match = READY_RE.search(fh.read())
                if match:
                    self.url = match.group(1)
                    self.pids = [self.proc.pid] + descendants(self.proc.pid)
                    return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"the service did not become ready:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(glob.glob(os.path.join(self.log_dir, "*.log"))):
            with open(path, errors="replace") as fh:
                parts.append(f"--- {os.path.basename(path)} ---\n{fh.read()[-4000:]}")
        return "\n".join(parts)

    def terminate(self, timeout: float = 90) -> list:
        """SIGTERM to msrun's process group; -> the processes still alive after `timeout` s (then killed)."""
        self.pids = sorted(set(self.pids + [self.proc.pid] + descendants(self.proc.pid)))
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            if not [p for p in self.pids if alive(p)]:
                return []
            time.sleep(0.5)
        left = [p for p in self.pids if alive(p)]
        self.kill()
        return left

    def kill(self):
        for pid in sorted(set(self.pids + [self.proc.pid] + descendants(self.proc.pid))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
