"""scripts/start_servers.sh and scripts/stop_servers.sh: the caption and VAE servers as real processes.

start: each server is `python api/call_remote_server.py ...` itself (no wrapper shell), in its own
session so that it outlives this command; its pid and start time go to a run file (JSON) at once, so
that a stop finds exactly these processes even if the start is interrupted. The start then waits
until each server announces its address and answers GET /health; it prints the URLs actually bound
(a --port 0 becomes the real port). If a server exits or does not become ready in time, the tail
of its log is printed, everything started is stopped, and the exit status is 1.

stop: reads the run file and ends those processes only (SIGTERM, then SIGKILL after a grace
period); a pid now owned by another program (its start time differs) is left alone.
The token (STEPVIDEO_AUTH_TOKEN) is passed through the environment, never on a command line.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from ..formats.atomic import write_json
from ..console import SuggestingParser, quiet_environment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_SCRIPT = os.path.join(REPO, "api", "call_remote_server.py")
STOP_SCRIPT = os.path.join(REPO, "scripts", "stop_servers.sh")
RUN_FILE_NAME = "servers.json"
READY_MARK = "pass to run_parallel.py"
URL_RE = re.compile(r"--(caption|vae)_url (\S+)")
STOP_GRACE_S = 20.0
TAIL_LINES = 30
PROG, STOP_PROG = "start_servers.sh", "stop_servers.sh"
POLL_S = 0.2


def build_parser(prog: str = "start_servers.sh") -> argparse.ArgumentParser:
    p = SuggestingParser(
        prog=prog, description="Start the caption server (Step-1 + HunyuanCLIP) and the VAE server, each on its "
        "own card, wait until both answer /health, and print the --caption_url/--vae_url for run_t2v.sh / "
        "run_ti2v.sh. Stop them with stop_servers.sh (or --stop) and the same --log_dir/--run_file.",
        epilog="Set STEPVIDEO_AUTH_TOKEN to require a token on every request (give run_parallel.py the same).")
    p.add_argument("--model_dir", help="the downloaded model directory (relative to the current directory)")
    p.add_argument("--caption_card", default="6", help="card of the caption server (ASCEND_RT_VISIBLE_DEVICES)")
    p.add_argument("--vae_card", default="7", help="card of the VAE server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--caption_port", type=int, default=5000, help="0 picks a free port")
    p.add_argument("--vae_port", type=int, default=5001, help="0 picks a free port")
    p.add_argument("--device", default=None, help="Ascend, CPU or ascend-sim (default: Ascend when present)")
    p.add_argument("--log_dir", default="logs", help="folder of the server logs and of the run file")
    p.add_argument("--run_file", default=None, help=f"pid file of the started servers (default LOG_DIR/{RUN_FILE_NAME})")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait until both answer /health")
    p.add_argument("--stop", action="store_true", help="stop the servers of the run file instead of starting")
    p.add_argument("--verbose", action="store_true", help="servers log MindSpore's warnings too")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the commands, start nothing")
    return p


def run_file_of(args) -> str:
    return os.path.abspath(args.run_file or os.path.join(args.log_dir, RUN_FILE_NAME))


def server_commands(args) -> Dict[str, List[str]]:
    model = os.path.abspath(args.model_dir)
    common = [sys.executable, SERVER_SCRIPT, "--model_dir", model, "--host", args.host, "--device_id", "0"]
    if args.device:
        common += ["--device", args.device]
    return {"caption": common + ["--enable_llm", "True", "--enable_vae", "False", "--port", str(args.caption_port)],
            "vae": common + ["--enable_llm", "False", "--enable_vae", "True", "--port", str(args.vae_port)]}


# ---- processes, identified by pid and start time ------------------------------------------------
def start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def is_same_process(entry: dict) -> bool:
    return start_time(entry["pid"]) == entry["start_time"]


def end_processes(entries: List[dict], grace_s: float = STOP_GRACE_S) -> List[dict]:
    """SIGTERM every live entry, SIGKILL what is still there after `grace_s`; -> the entries that were live."""
    live = [e for e in entries if is_same_process(e)]
    for e in live:
        os.kill(e["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for e in live:
        while is_same_process(e) and time.monotonic() < deadline:
            _reap(e["pid"])
            time.sleep(POLL_S)
        if is_same_process(e):
            os.kill(e["pid"], signal.SIGKILL)
            while is_same_process(e):
                _reap(e["pid"])
                time.sleep(POLL_S)
    return live


def _reap(pid: int) -> None:
    try:  # our own child (the start path): collect it, or it stays a zombie with the same start time
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- start / stop ----------------------------------------------------------------------------------
def start(args) -> int:
    if not args.model_dir:
        return _fail("--model_dir is required (the downloaded model directory)", 2)
    if not os.path.isdir(args.model_dir):
        return _fail(f"--model_dir {args.model_dir} does not exist (relative paths are taken from "
                     f"{os.getcwd()})", 2)
    from ..diffusion.backends import model_folder_problem, model_folders_in

    parts = ("step_llm", "hunyuan_clip", "vae")
    model = os.path.abspath(args.model_dir)
    if model_folders_in(model, parts):  # one level up: name the models inside (else a server says what lacks)
        problem = model_folder_problem(model, parts)
        if problem:
            return _fail(problem, 2)
    commands = server_commands(args)
    cards = {"caption": args.caption_card, "vae": args.vae_card}
    log_dir = os.path.abspath(args.log_dir)
    run_file = run_file_of(args)
    if args.dry_run:
        for name, cmd in commands.items():
            print(f"ASCEND_RT_VISIBLE_DEVICES={cards[name]} {shlex.join(cmd)} > {log_dir}/{name}_server.log 2>&1 &")
        print(f"run file: {run_file}")
        return 0
    if os.path.exists(run_file):
        live = [e for e in _read_run_file(run_file) if is_same_process(e)]
        if live:
            return _fail(f"servers of {run_file} are still running (pids {', '.join(str(e['pid']) for e in live)}): "
                         f"stop them first with bash {STOP_SCRIPT} --run_file {run_file}, or give another --run_file", 2)
    from ..serving.main import port_problem

    for name in commands:  # a taken port, in this script's own flags, before any server starts
        flag, port = f"--{name}_port", getattr(args, f"{name}_port")
        problem = port_problem(args.host, port)
        if problem:
            return _fail(f"{flag} {port}: cannot listen on {args.host}:{port} ({problem}): another server may hold "
                         f"it; pick another {flag} (0 picks a free one)", 2)
    os.makedirs(log_dir, exist_ok=True)
    entries = []
    try:
        for name, cmd in commands.items():
            log = os.path.join(log_dir, f"{name}_server.log")
            env = quiet_environment(args.verbose, dict(os.environ, ASCEND_RT_VISIBLE_DEVICES=str(cards[name]),
                                                       PYTHONUNBUFFERED="1"))
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            entries.append({"name": name, "pid": proc.pid, "start_time": start_time(proc.pid), "log": log,
                            "card": str(cards[name]), "url": None})
            write_json(run_file, {"servers": entries})
        _wait_ready(entries, args.timeout)
        write_json(run_file, {"servers": entries})
    except (RuntimeError, KeyboardInterrupt) as exc:
        end_processes(entries)
        _remove(run_file)
        return _fail(str(exc) if isinstance(exc, RuntimeError) else "interrupted: the servers were stopped", 1)
    for e in entries:
        print(f"{e['name']} server: pid {e['pid']}, card {e['card']}, {e['url']}, log {e['log']}")
    print(f"run file: {run_file} (stop with: bash {STOP_SCRIPT} --run_file {run_file})")
    urls = {e["name"]: e["url"] for e in entries}
    print(f"--caption_url {urls['caption']} --vae_url {urls['vae']}", flush=True)
    return 0


def _wait_ready(entries: List[dict], timeout: float) -> None:
    from ..serving.client import RemoteClient, RemoteServerError

    deadline = time.monotonic() + timeout
    for e in entries:
        while True:
            if not is_same_process(e) or _exited(e["pid"]):
                raise RuntimeError(f"the {e['name']} server exited; the end of {e['log']}:\n{tail(e['log'])}")
            if e["url"] is None:
                with open(e["log"], errors="replace") as fh:
                    text = fh.read()
                if READY_MARK in text:
                    e["url"] = dict(URL_RE.findall(text))[e["name"]]
            if e["url"] is not None:
                try:
                    with RemoteClient(e["url"], retries=0, connect_timeout=2, read_timeout=10) as client:
                        client.health()
                    break
                except RemoteServerError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {e['name']} server did not answer /health within {timeout:.0f} s; "
                                   f"the end of {e['log']}:\n{tail(e['log'])}")
            time.sleep(POLL_S)


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def stop(args) -> int:
    run_file = run_file_of(args)
    if not os.path.exists(run_file):
        return _fail(f"no run file {run_file}: no servers started with this --log_dir/--run_file are running "
                     "(stopped already, or started with another --log_dir)", 1, STOP_PROG)
    entries = _read_run_file(run_file)
    ended = end_processes(entries)
    for e in entries:
        state = "stopped" if e in ended else "was not running"
        print(f"{e['name']} server (pid {e['pid']}): {state}")
    _remove(run_file)
    return 0


def _read_run_file(path: str) -> List[dict]:
    import json

    with open(path) as fh:
        return json.load(fh)["servers"]


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fail(message: str, code: int, prog: str = PROG) -> int:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(STOP_PROG if "--stop" in argv else PROG).parse_args(argv)
    return stop(args) if args.stop else start(args)


if __name__ == "__main__":
    sys.exit(main())
