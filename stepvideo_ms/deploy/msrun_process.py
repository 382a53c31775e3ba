"""msrun as a child process that ends with its caller, whatever ends the caller.

msrun starts a scheduler in its own process group and each worker as the leader of a new session
(setsid), and it stops its workers only on SIGINT. Three things follow, each handled here:
- a shell starts background commands with SIGINT ignored, and an ignored signal stays ignored
  across exec: msrun is started with SIGINT (and SIGTERM) back at their defaults, or the stop
  below would not reach it;
- a Ctrl-C or SIGTERM that arrives while msrun is being started is held and acted on as soon as
  msrun exists, never lost between the fork and the stop path;
- stopping: SIGINT to msrun (it kills its workers' groups), then SIGKILL to what is left of the
  tree: msrun's group and the group of every process found under msrun before the stop (killing
  msrun's group alone would leave the workers running in their own sessions);
- a failed job ends promptly: when a worker fails, msrun SIGKILLs the others, then waits for its
  scheduler, which waits about 30 s for those killed workers to time out. Once msrun has logged a
  worker's failure, the rest of the tree gets FAILED_GRACE_S, then SIGKILL.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, List, Optional, Set

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_WAIT_S = 60.0  # msrun's own stop of its workers, before SIGKILL
POLL_S = 0.5
FAILED_GRACE_S = 5.0  # after msrun logs a worker's failure: its own stop of the others, before we end the rest
WORKER_FAILED = (b"Worker process", b"exit with exception")  # msrun's log line for a failed worker


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _default_stop_signals() -> None:  # in the child, between fork and exec
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def descendants(pid: int) -> List[int]:
    """Every live process under `pid`, from /proc (children of children included)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_groups(pids: List[int]) -> None:
    """SIGKILL to the process group of each pid (each msrun worker leads its own)."""
    groups: Set[int] = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(leader: int, also: List[int] = ()) -> None:
    """SIGKILL to the group of `leader`, a process started in a new session (its pid is its group id,
    so this reaches its group even after it exited and was reaped), and to the group of every process
    still under it and of `also` (msrun's workers lead their own)."""
    under = descendants(leader)  # first: once the leader dies, its children are no longer under it
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_groups([*also, *under])


class MsrunProcess:
    """`with MsrunProcess(cmd, env) as job: rc = job.run(on_stdout)`: msrun started and ended with us."""

    def __init__(self, cmd: List[str], env: dict):
        self.cmd, self.env = cmd, env
        self.proc: subprocess.Popen = None
        self.stderr_lines: List[bytes] = []
        self._held: List[int] = []
        self._previous = {}
        self._failed_at: Optional[float] = None  # when msrun logged a worker's failure
        self.cut_short = False  # the tree was ended FAILED_GRACE_S after a worker failed

    def __enter__(self) -> "MsrunProcess":
        # the stop signals this process answers (an ignored one stays ignored here), held until msrun exists
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, lambda signum, _frame: self._held.append(signum))
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True, preexec_fn=_default_stop_signals)
        except BaseException:
            self._restore()
            raise
        for sig in self._previous:
            signal.signal(sig, _interrupt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            end_tree(self.proc.pid)  # tail helpers, anything msrun left
        finally:
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def run(self, on_stdout: Callable[[bytes], None], on_stderr: Optional[Callable[[bytes], None]] = None) -> int:
        """Forward msrun's stdout to `on_stdout` and keep its stderr lines (each also to `on_stderr`)
        until it exits; -> its exit code, or 130 when a stop signal ended it."""
        errors = threading.Thread(target=self._keep_stderr, args=(on_stderr,), daemon=True)
        errors.start()
        try:
            if self._held:
                raise KeyboardInterrupt(f"signal {self._held[0]} while msrun was starting")
            self._pump_stdout(on_stdout)
            rc = 1 if self.cut_short else self.proc.wait()
        except KeyboardInterrupt:
            self.stop()
            rc = 130  # msrun itself exits 0 after stopping its workers on SIGINT
        errors.join(timeout=5)
        return rc

    def stop(self) -> None:
        """SIGINT to msrun (it stops its workers); SIGKILL to the whole tree if it is not gone in time."""
        tree = descendants(self.proc.pid)
        try:
            os.kill(self.proc.pid, signal.SIGINT)
            self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            end_tree(self.proc.pid, tree)
            self.proc.wait()
        except ProcessLookupError:
            self.proc.wait()
        kill_groups(tree)  # a worker that outlived msrun (msrun killed before it reached its own stop)

    def _keep_stderr(self, on_stderr) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if self._failed_at is None and all(mark in line for mark in WORKER_FAILED):
                self._failed_at = time.monotonic()
            if on_stderr is not None:
                on_stderr(line)

    def _pump_stdout(self, on_stdout: Callable[[bytes], None]) -> None:
        """Until msrun exits (not until the pipe closes: a helper may hold it)."""
        fd = self.proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    break
                on_stdout(data)
            elif self.proc.poll() is not None:
                break
            if (self._failed_at is not None and time.monotonic() - self._failed_at > FAILED_GRACE_S
                    and self.proc.poll() is None):  # msrun waits for its scheduler: end them both
                self.cut_short = True
                end_tree(self.proc.pid)
                self.proc.wait()
                break
