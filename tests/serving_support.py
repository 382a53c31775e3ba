"""Starting and stopping real model servers (api/call_remote_server.py) as subprocesses on loopback."""
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO, "api", "call_remote_server.py")
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15
URL_RE = re.compile(r"--(caption|vae)_url (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """One server subprocess; its output goes to files (a full pipe would block it)."""

    def __init__(self, model_dir, log_dir, name, *args, env=None):
        self.log_dir = log_dir
        self.name = name
        self.out_path = os.path.join(log_dir, f"{name}.out")
        self.err_path = os.path.join(log_dir, f"{name}.err")
        self.cmd = [sys.executable, SERVER, "--model_dir", str(model_dir), "--host", "127.0.0.1", *map(str, args)]
        inherited = {k: v for k, v in os.environ.items() if k != "STEPVIDEO_AUTH_TOKEN"}
        self.env = {**inherited, "GLOG_v": "3", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = None
        self.urls = {}

    def start(self):
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=self.env, cwd=REPO,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with open(self.out_path) as fh:
                text = fh.read()
            if "pass to run_parallel.py" in text:
                self.urls = dict(URL_RE.findall(text))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server {self.name} did not become ready (exit {self.proc.returncode}):\n"
                           f"{self.output()}")

    def output(self):
        parts = []
        for p in (self.out_path, self.err_path):
            if os.path.exists(p):
                with open(p, errors="replace") as fh:
                    parts.append(fh.read()[-4000:])
        return "\n".join(parts)

    @property
    def url(self):
        return next(iter(self.urls.values()))

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def stop(self):
        """SIGTERM this process (by its pid), then SIGKILL it if it has not exited in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
    return values[k]
