"""The service's jobs: a bounded queue of waiting jobs and every job's state, read by the HTTP
threads and advanced by the rank loop (one job runs at a time)."""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

from ..jobs import Job

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class BoardFull(RuntimeError):
    pass


class NotCancellable(RuntimeError):
    pass


@dataclass
class JobRecord:
    id: str
    job: Job
    state: str = QUEUED
    step: int = 0
    steps: int = 0
    submitted: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    video_path: Optional[str] = None
    json_path: Optional[str] = None
    upload_path: Optional[str] = None

    def public(self, position: Optional[int]) -> dict:
        s = self.job.settings
        out = {"id": self.id, "state": self.state, "step": self.step, "steps": self.steps, "position": position,
               "prompt": s.prompt, "task": s.task,
               "settings": {k: v for k, v in s.to_dict().items() if k not in ("first_image_path", "notes")},
               "notes": list(s.notes), "error": self.error, "submitted": self.submitted,
               "started": self.started, "finished": self.finished}
        if self.state == DONE:
            out["video"] = f"/jobs/{self.id}/video"
            out["record"] = f"/jobs/{self.id}/record"
        return out


class JobBoard:
    def __init__(self, queue_size: int, keep_finished: int = 1000):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.queue_size = queue_size
        self.keep_finished = keep_finished
        self._records: Dict[str, JobRecord] = {}
        self._waiting: Deque[str] = collections.deque()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self.closed = False

    def new_id(self) -> str:
        with self._cv:
            return f"job{next(self._ids):05d}"

    def submit(self, job_id: str, job: Job, upload_path: Optional[str] = None) -> JobRecord:
        with self._cv:
            if self.closed:
                raise BoardFull("the service is stopping; it takes no more jobs")
            if len(self._waiting) >= self.queue_size:
                raise BoardFull(f"{len(self._waiting)} jobs are waiting (the limit, --queue_size)")
            rec = JobRecord(job_id, job, steps=job.settings.infer_steps, upload_path=upload_path)
            self._records[job_id] = rec
            self._waiting.append(job_id)
            self._forget_old()
            self._cv.notify_all()
            return rec

    def take(self, timeout: float) -> Optional[JobRecord]:
        """The next waiting job, now RUNNING; None when none arrives within `timeout` seconds."""
        with self._cv:
            if not self._waiting:
                self._cv.wait(timeout)
            if not self._waiting or self.closed:
                return None
            rec = self._records[self._waiting.popleft()]
            rec.state, rec.started = RUNNING, time.time()
            return rec

    def progress(self, rec: JobRecord, step: int, steps: int):
        with self._cv:
            rec.step, rec.steps = step, steps

    def finish(self, rec: JobRecord, video_path: str, json_path: str):
        with self._cv:
            rec.state, rec.finished, rec.video_path, rec.json_path = DONE, time.time(), video_path, json_path

    def fail(self, rec: JobRecord, message: str):
        with self._cv:
            rec.state, rec.finished, rec.error = FAILED, time.time(), message

    def cancel(self, job_id: str) -> JobRecord:
        with self._cv:
            rec = self._records.get(job_id)
            if rec is None:
                raise KeyError(job_id)
            if rec.state != QUEUED:
                raise NotCancellable(f"job {job_id} is {rec.state}: only a queued job can be cancelled")
            self._waiting.remove(job_id)
            rec.state, rec.finished = CANCELLED, time.time()
            return rec

    def close(self, reason: str) -> int:
        """Stop taking jobs; every waiting job is cancelled with `reason`. -> how many."""
        with self._cv:
            self.closed = True
            dropped = 0
            while self._waiting:
                rec = self._records[self._waiting.popleft()]
                rec.state, rec.finished, rec.error = CANCELLED, time.time(), reason
                dropped += 1
            self._cv.notify_all()
            return dropped

    def get(self, job_id: str) -> Optional[dict]:
        with self._cv:
            rec = self._records.get(job_id)
            return None if rec is None else rec.public(self._position(job_id))

    def record(self, job_id: str) -> Optional[JobRecord]:
        with self._cv:
            return self._records.get(job_id)

    def listing(self) -> List[dict]:
        with self._cv:
            return [r.public(self._position(r.id)) for r in self._records.values()]

    def counts(self) -> dict:
        with self._cv:
            out = {s: 0 for s in (QUEUED, RUNNING, DONE, FAILED, CANCELLED)}
            for r in self._records.values():
                out[r.state] += 1
            return dict(out, queue_size=self.queue_size, accepting=not self.closed)

    def _position(self, job_id: str) -> Optional[int]:
        try:
            return self._waiting.index(job_id) + 1
        except ValueError:
            return None

    def _forget_old(self):
        finished = [r for r in self._records.values() if r.state in (DONE, FAILED, CANCELLED)]
        for r in finished[:max(0, len(finished) - self.keep_finished)]:
            del self._records[r.id]
