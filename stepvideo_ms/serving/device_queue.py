"""One job at a time on the device; the others wait, first come first served, in a bounded queue.

A single worker thread runs the jobs, so the models only ever see one caller. A request that
finds the queue full, or waits longer than `wait_s` for the device, gets `QueueFull` at once
(the server answers 503 with a Retry-After estimated from recent job times).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Deque, Optional

RECENT_JOBS = 20


class QueueFull(RuntimeError):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error", "started")

    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None
        self.started = False


class DeviceQueue:
    def __init__(self, queue_size: int, wait_s: float, name: str = "device"):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.queue_size = queue_size
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._waiting: Deque[_Job] = collections.deque()
        self._running = False
        self._closed = False
        self._durations: Deque[float] = collections.deque(maxlen=RECENT_JOBS)
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._work, name=f"{name}-worker", daemon=True)
        self._thread.start()

    # ---- what /health reports ------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        with self._cond:
            return len(self._waiting) + int(self._running)

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running, "capacity": self.queue_size,
                    "completed": self.completed, "failed": self.failed, "rejected": self.rejected,
                    "mean_job_s": round(self._mean_duration(), 4), "busy_s": round(self.busy_s, 3)}

    def _mean_duration(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else 0.0

    def _retry_after(self) -> int:
        return max(1, int(round(self._mean_duration() * (len(self._waiting) + 1))))

    # ---- submitting ----------------------------------------------------------------------
    def run(self, fn: Callable, *args):
        """Run fn(*args) on the worker thread and return its result (or raise its exception)."""
        job = _Job(fn, args)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down", 1)
            if len(self._waiting) >= self.queue_size:
                self.rejected += 1
                raise QueueFull(f"the device queue is full ({self.queue_size} waiting)", self._retry_after())
            self._waiting.append(job)
            self._cond.notify_all()
            deadline = time.monotonic() + self.wait_s
            while not job.started:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.remove(job)
                    self.rejected += 1
                    raise QueueFull(f"waited {self.wait_s:.0f} s for the device", self._retry_after())
                self._cond.wait(left)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self):
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                job.started = True
                self._running = True
                self._cond.notify_all()
            start = time.monotonic()
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the caller; the worker keeps serving
                job.error = exc
            elapsed = time.monotonic() - start
            with self._cond:
                self._running = False
                self._durations.append(elapsed)
                self.busy_s += elapsed
                if job.error is None:
                    self.completed += 1
                else:
                    self.failed += 1
            job.done.set()

    def close(self, timeout: float = 5.0):
        """Stop taking jobs; the worker finishes those already queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
