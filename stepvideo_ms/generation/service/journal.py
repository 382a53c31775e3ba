"""The service's journal: the life of every job in SAVE_PATH/service-journal.jsonl, so that nothing
accepted is lost to a crash, a SIGKILL, a world failure or a restart.

One JSON object per line, each appended with one write to a file opened O_APPEND and fsync'ed before the
call returns (a crash leaves at most a torn last line, which the next start drops):

    {"event": "sequence", "next": 42}                         first line after a compaction
    {"event": "accepted", "id": "job00003", "job": {...}, "upload": PATH or null, "time": T, "attempts": 0}
    {"event": "running", "id": "job00003", "time": T}
    {"event": "done", "id": "job00003", "video": PATH, "record": PATH, "time": T}
    {"event": "failed" | "cancelled", "id": "job00003", "error": "...", "time": T}
    {"event": "deleted", "id": "job00003", "time": T}          forgotten (DELETE /v1/videos/ID)

At start the journal is replayed: finished jobs are listed again, waiting ones wait again in their order,
a job that was running when the service stopped runs again first, unless it was already running at
MAX_ATTEMPTS stops (then it fails, so a job that kills the world cannot do so forever); ids continue after
the largest one seen. The file is then rewritten compactly (atomically) with the jobs the board keeps. A
lock file beside it keeps a second service off the same folder.
"""
from __future__ import annotations

import fcntl
import json
import os
from typing import Dict, List, Optional, Tuple

from ...formats.atomic import atomic_output

JOURNAL_NAME = "service-journal.jsonl"
LOCK_NAME = ".service.lock"
MAX_ATTEMPTS = 2
FINAL = ("done", "failed", "cancelled")


class JournalError(OSError):
    """The journal could not be written (a full disk, a read-only folder)."""


def job_number(job_id: str) -> Optional[int]:
    if isinstance(job_id, str) and job_id.startswith("job") and job_id[3:].isdigit():
        return int(job_id[3:])
    return None


class Journal:
    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, JOURNAL_NAME)
        os.makedirs(folder, exist_ok=True)
        self._lock = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ValueError(f"--save_path {folder}: another service is using this folder (its journal "
                             f"{JOURNAL_NAME} is locked): give each service its own --save_path") from None
        self._fd: Optional[int] = None
        self.notes: List[str] = []

    # ---- start: read, then rewrite compactly ----------------------------------------------------
    def replay(self) -> Tuple[List[dict], int]:
        """([job entry, oldest first], next id number). An entry: id, job (Job.to_dict()), upload, state
        (queued / done / failed / cancelled), submitted, started, finished, error, video, record, attempts;
        a job that was running is queued again (or failed after MAX_ATTEMPTS)."""
        entries: Dict[str, dict] = {}
        next_number = 1
        if os.path.exists(self.path):
            with open(self.path, "rb") as fh:
                lines = fh.read().split(b"\n")
            torn = lines.pop()  # the bytes after the last newline: empty unless a write was cut short
            if torn.strip():
                self.notes.append(f"{JOURNAL_NAME}: dropped a torn last line ({len(torn)} bytes, a write cut short)")
            bad = 0
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw.decode("utf-8"))
                    next_number = max(next_number, self._apply(entries, event))
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad += 1
            if bad:
                self.notes.append(f"{JOURNAL_NAME}: skipped {bad} unreadable line(s)")
        for entry in entries.values():
            if entry["state"] == "running":
                if entry["attempts"] >= MAX_ATTEMPTS:
                    entry.update(state="failed", error=f"the service stopped {entry['attempts']} times while this "
                                                       "job ran (a crash, a kill or a world failure): not run again")
                else:
                    entry["state"] = "queued"
        return list(entries.values()), next_number

    @staticmethod
    def _apply(entries: Dict[str, dict], event: dict) -> int:
        kind, job_id = event["event"], event.get("id")
        if kind == "sequence":
            return int(event["next"])
        number = job_number(job_id)
        if number is None:
            raise ValueError(f"bad id {job_id!r}")
        if kind == "accepted":
            entries[job_id] = {"id": job_id, "job": dict(event["job"]), "upload": event.get("upload"),
                               "state": "queued", "submitted": event.get("time"), "started": None,
                               "finished": None, "error": None, "video": None, "record": None,
                               "attempts": int(event.get("attempts", 0))}
        elif job_id in entries:
            entry = entries[job_id]
            if kind == "running":
                entry.update(state="running", started=event.get("time"), attempts=entry["attempts"] + 1)
            elif kind == "deleted":
                del entries[job_id]
            elif kind in FINAL:
                entry.update(state=kind, finished=event.get("time"), error=event.get("error"),
                             video=event.get("video"), record=event.get("record"))
            else:
                raise ValueError(f"unknown event {kind!r}")
        return number + 1

    def rewrite(self, entries: List[dict], next_number: int) -> None:
        """Replace the journal (atomically) by one line per kept job (two for a finished one)."""
        lines = [{"event": "sequence", "next": next_number}]
        for e in entries:
            lines.append({"event": "accepted", "id": e["id"], "job": e["job"], "upload": e["upload"],
                          "time": e["submitted"], "attempts": e["attempts"]})
            if e["state"] in FINAL:
                lines.append({"event": e["state"], "id": e["id"], "time": e["finished"], "error": e["error"],
                              "video": e["video"], "record": e["record"]})
        with atomic_output(self.path) as tmp:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.writelines(_line(event) for event in lines)
                fh.flush()
                os.fsync(fh.fileno())
        self._open()

    # ---- while serving ----------------------------------------------------------------------------
    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, event: dict) -> None:
        """One line, written whole and on disk when this returns; JournalError otherwise (nothing torn left)."""
        if self._fd is None:
            self._open()
        data = _line(event).encode("ascii")
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, f"wrote {written} of {len(data)} bytes")
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)  # leave no torn line behind
            except OSError:
                pass
            raise JournalError(exc.errno, f"cannot write the job journal {self.path}: {exc.strerror or exc}") \
                from None

    def close(self) -> None:
        for fd in (self._fd, self._lock):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._lock = None


def _line(event: dict) -> str:
    return json.dumps(event, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n"
