"""The service's jobs: a bounded queue of waiting jobs and every job's state, read by the HTTP
threads and advanced by the rank loop (one job runs at a time). With a journal (journal.py) every
change of state is on disk before it is visible, and `restore` brings a journal's jobs back."""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

from ..jobs import Job
from .journal import Journal, JournalError

LOG = logging.getLogger("stepvideo_ms.generation.service")

QUEUED, RUNNING, DECODING, DONE, FAILED, CANCELLED = "queued", "running", "decoding", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DECODING, DONE, FAILED, CANCELLED)
ID_PREFIX = "job"
ID_RE = re.compile(r"^job(\d{5,})(?:[-.]|$)")


def job_id(number: int) -> str:
    return f"{ID_PREFIX}{number:05d}"


def last_id_in(*folders: str) -> int:
    """The highest job number named by a file in `folders` (the videos, records and uploads an earlier run of
    the service left), 0 if none: with the journal (which keeps the sequence itself) this also covers files
    of a folder whose journal was removed, so a restarted service never reuses an id."""
    last = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = ID_RE.match(name)
            if match:
                last = max(last, int(match.group(1)))
    return last


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
    attempts: int = 0  # times it started running (across restarts, from the journal)

    def elapsed_s(self) -> Optional[float]:
        """Seconds since the job started (until it finished), None before it starts."""
        if self.started is None:
            return None
        return round((self.finished or time.time()) - self.started, 1)

    def public(self, position: Optional[int]) -> dict:
        s = self.job.settings
        out = {"id": self.id, "state": self.state, "step": self.step, "steps": self.steps, "position": position,
               "prompt": s.prompt, "task": s.task,
               "settings": {k: v for k, v in s.to_dict().items() if k not in ("first_image_path", "notes")},
               "notes": list(s.notes), "error": self.error, "submitted": self.submitted,
               "started": self.started, "finished": self.finished, "elapsed_s": self.elapsed_s()}
        if self.state == DONE:
            out["video"] = f"/jobs/{self.id}/video"
            out["record"] = f"/jobs/{self.id}/record"
        return out


class JobBoard:
    def __init__(self, queue_size: int, keep_finished: int = 1000, journal: Optional[Journal] = None,
                 last_id: int = 0):
        """`last_id`: the highest job number already used (e.g. `last_id_in(save folder)`); ids continue after
        it, and after the journal's own sequence once `restore` has read it."""
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.queue_size = queue_size
        self.keep_finished = keep_finished
        self.journal = journal
        self._records: Dict[str, JobRecord] = {}
        self._waiting: Deque[str] = collections.deque()
        self._last_id = int(last_id)
        self._cv = threading.Condition()
        self.closed = False
        # told of every accepted job and every end ("accepted", "done", "failed", "cancelled"): the metrics
        self.on_event: Optional[Callable[[str, JobRecord], None]] = None

    def restore(self, task: str) -> dict:
        """Bring back the journal's jobs (before serving): finished ones listed, waiting and interrupted ones
        queued in their order (beyond --queue_size if need be), ids continuing. -> counts for the log."""
        if self.journal is None:
            return {}
        entries, next_number = self.journal.replay()
        resumed = failed = 0
        for e in entries:
            job = None
            try:
                job = Job.from_dict(e["job"])
                if e["state"] == QUEUED:
                    _check_resumable(job, task, e["upload"])
            except Exception as exc:  # an entry this service cannot run: listed as failed, with the reason
                if e["state"] == QUEUED:
                    e.update(state=FAILED, finished=time.time(), error=f"not resumed: {exc}")
                    self.journal.notes.append(f"{e['id']} not resumed: {exc}")
            if job is None or not isinstance(job.settings.infer_steps, int):
                job = Job(_placeholder_settings(e, task))
            rec = JobRecord(e["id"], job, state=e["state"], steps=job.settings.infer_steps,
                            submitted=e["submitted"] or time.time(), started=e["started"], finished=e["finished"],
                            error=e["error"], video_path=e["video"], json_path=e["record"], upload_path=e["upload"],
                            attempts=e["attempts"])
            if rec.state == "done":
                rec.step = rec.steps
            self._records[rec.id] = rec
            if rec.state == QUEUED:
                self._waiting.append(rec.id)
                resumed += 1
            elif rec.state == FAILED:
                failed += 1
        self._forget_old()
        self._last_id = max(self._last_id, next_number - 1)
        next_number = self._last_id + 1
        self.journal.rewrite([_entry(r) for r in self._records.values()], next_number)
        return {"resumed": resumed, "listed": len(self._records) - resumed, "next": job_id(next_number),
                "notes": list(self.journal.notes)}

    @property
    def next_id(self) -> str:
        """The id the next accepted job will get (refused submissions take none)."""
        with self._cv:
            return job_id(self._last_id + 1)

    def submit(self, job: Job, upload_path: Optional[str] = None,
               bind: Optional[Callable[[str, Job, Optional[str]], Optional[str]]] = None) -> JobRecord:
        """Queue a checked job under the next id, in the journal before anyone is told. The id is taken only
        when the job is accepted (a refused submission takes none); `bind(id, job, upload_path)` names the
        job's files after its id (run while the id is held) and returns the upload's new path."""
        with self._cv:
            if self.closed:
                raise BoardFull("the service is stopping; it takes no more jobs")
            if len(self._waiting) >= self.queue_size:
                raise BoardFull(f"{len(self._waiting)} jobs are waiting, this service's limit")
            new_id = job_id(self._last_id + 1)
            if bind is not None:
                upload_path = bind(new_id, job, upload_path)
            rec = JobRecord(new_id, job, steps=job.settings.infer_steps, upload_path=upload_path)
            if self.journal is not None:
                try:  # on disk before anyone is told it was accepted
                    self.journal.append({"event": "accepted", "id": new_id, "job": job.to_dict(),
                                         "upload": upload_path, "time": rec.submitted, "attempts": 0})
                except JournalError as exc:
                    raise BoardFull(f"the job cannot be recorded ({exc.strerror})") from None
            self._last_id += 1
            self._records[new_id] = rec
            self._waiting.append(new_id)
            self._forget_old()
            self._cv.notify_all()
            self._tell("accepted", rec)
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
            rec.attempts += 1
            self._log({"event": "running", "id": rec.id, "time": rec.started})
            return rec

    def progress(self, rec: JobRecord, step: int, steps: int):
        """A denoising step done; after the last one the job is decoding (VAE) and writing its files."""
        with self._cv:
            rec.step, rec.steps = step, steps
            if steps and step >= steps and rec.state == RUNNING:
                rec.state = DECODING

    def finish(self, rec: JobRecord, video_path: str, json_path: str):
        with self._cv:
            rec.state, rec.finished, rec.video_path, rec.json_path = DONE, time.time(), video_path, json_path
            self._log({"event": DONE, "id": rec.id, "time": rec.finished, "video": video_path, "record": json_path})
            self._tell(DONE, rec)

    def fail(self, rec: JobRecord, message: str):
        with self._cv:
            rec.state, rec.finished, rec.error = FAILED, time.time(), message
            self._log({"event": FAILED, "id": rec.id, "time": rec.finished, "error": message})
            self._tell(FAILED, rec)

    def cancel(self, job_id: str) -> JobRecord:
        with self._cv:
            rec = self._records.get(job_id)
            if rec is None:
                raise KeyError(job_id)
            if rec.state != QUEUED:
                raise NotCancellable(f"job {job_id} is {rec.state}: only a queued job can be cancelled")
            self._waiting.remove(job_id)
            rec.state, rec.finished = CANCELLED, time.time()
            rec.error = "cancelled by a client before it ran"
            self._log({"event": CANCELLED, "id": rec.id, "time": rec.finished, "error": rec.error})
            self._tell(CANCELLED, rec)
            return rec

    def delete(self, job_id: str) -> JobRecord:
        """Forget a job (a waiting one is cancelled first; a running one cannot be): gone from every listing
        and, through the journal, from the next start. -> its record, whose files the caller removes."""
        with self._cv:
            rec = self._records.get(job_id)
            if rec is None:
                raise KeyError(job_id)
            if rec.state in (RUNNING, DECODING):
                raise NotCancellable(f"job {job_id} is {rec.state}: it can be deleted once it has finished")
            if rec.state == QUEUED:
                self.cancel(job_id)
            self._log({"event": "deleted", "id": rec.id, "time": time.time()})
            del self._records[job_id]
            return rec

    def close(self) -> int:
        """Stop taking jobs; the waiting ones stay waiting (in the journal: for the next start). -> how many."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()
            return len(self._waiting)

    def _tell(self, kind: str, rec: JobRecord) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, rec)
            except Exception as exc:  # pragma: no cover - a metric is never worth a job
                LOG.warning("job event %s of %s not counted: %s", kind, rec.id, exc)

    def _log(self, event: dict) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(event)
        except JournalError as exc:  # the job goes on; after a crash it would run again
            LOG.warning("%s", exc)
            print(f"run_parallel.py: warning: {exc}", flush=True)

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
            out = {s: 0 for s in STATES}
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


def _entry(rec: JobRecord) -> dict:
    """A record as a journal entry (journal.Journal.rewrite)."""
    state = rec.state if rec.state not in (RUNNING, DECODING) else QUEUED
    return {"id": rec.id, "job": rec.job.to_dict(), "upload": rec.upload_path, "state": state,
            "submitted": rec.submitted, "started": rec.started, "finished": rec.finished, "error": rec.error,
            "video": rec.video_path, "record": rec.json_path, "attempts": rec.attempts}


def _check_resumable(job: Job, task: str, upload: Optional[str]) -> None:
    s = job.settings
    if s.task != task:
        raise ValueError(f"it is a {s.task} job and this service runs a {task} model")
    if upload is not None and not os.path.isfile(upload):
        raise ValueError(f"its uploaded image {upload} is gone")
    type(s)(**{k: v for k, v in s.to_dict().items() if k != "notes"}).resolved()  # still every check


def _placeholder_settings(entry: dict, task: str):
    """Settings to list an entry whose own cannot be read (its prompt, when there is one)."""
    from ...diffusion.settings import GenerationSettings

    settings = entry.get("job", {}).get("settings", {}) if isinstance(entry.get("job"), dict) else {}
    prompt = settings.get("prompt") if isinstance(settings.get("prompt"), str) else "?"
    return GenerationSettings(prompt=prompt, task=task, infer_steps=0)
