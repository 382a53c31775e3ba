"""The service's job journal on the board alone (no world, no model): every state change on disk, a
restart lists the finished jobs, queues the waiting and interrupted ones in order and continues the ids;
a job interrupted twice is not run a third time; a torn last line is dropped; one service per folder.
(The real SIGKILL and restart of a running service is in test_generation_service.py.)"""
import json
import os

import pytest

from stepvideo_ms.diffusion.settings import GenerationSettings
from stepvideo_ms.generation.jobs import Job
from stepvideo_ms.generation.service.board import JobBoard
from stepvideo_ms.generation.service.journal import JOURNAL_NAME, MAX_ATTEMPTS, Journal


def job(prompt, **kw):
    return Job(GenerationSettings(prompt=prompt, num_frames=17, height=48, width=80, infer_steps=2, **kw).resolved(),
               "")


def board_on(folder, queue_size=4):
    board = JobBoard(queue_size, journal=Journal(str(folder)))
    restored = board.restore("t2v")
    return board, restored


def events(folder):
    with open(os.path.join(folder, JOURNAL_NAME)) as fh:
        return [json.loads(line) for line in fh]


def test_restart_lists_finished_resumes_waiting_and_continues_ids(tmp_path):
    board, restored = board_on(tmp_path)
    assert restored["resumed"] == 0 and restored["next"] == "job00001"
    ids = [board.submit(job(f"prompt {i}", seed=i)).id for i in range(4)]
    done = board.take(0)
    board.finish(done, "/v/a.mp4", "/v/a.json")
    failed = board.take(0)
    board.fail(failed, "denoising failed: boom")
    board.cancel(ids[3])
    interrupted = board.take(0)  # running when the process dies: no close, no final event
    assert interrupted.id == ids[2]
    assert [e["event"] for e in events(tmp_path)] == ["sequence", "accepted", "accepted", "accepted", "accepted",
                                                      "running", "done", "running", "failed", "cancelled", "running"]
    board.journal.close()  # what the kernel does for a killed process: the lock goes

    again, restored = board_on(tmp_path)
    assert restored["resumed"] == 1 and restored["listed"] == 3 and restored["next"] == "job00005"
    states = {j["id"]: j["state"] for j in again.listing()}
    assert states == {ids[0]: "done", ids[1]: "failed", ids[2]: "queued", ids[3]: "cancelled"}
    assert again.get(ids[1])["error"] == "denoising failed: boom"
    assert again.next_id == "job00005"  # no second job00001
    rec = again.take(0)
    assert rec.id == ids[2] and rec.job.settings.seed == 2 and rec.attempts == 2
    again.journal.close()

    third, restored = board_on(tmp_path)  # interrupted a second time: not run again
    assert restored["resumed"] == 0
    assert third.get(ids[2])["state"] == "failed" and f"stopped {MAX_ATTEMPTS} times" in third.get(ids[2])["error"]
    assert third.next_id == "job00005"  # an id never accepted was never shown to anyone
    third.journal.close()


def test_waiting_jobs_survive_a_stop_and_run_in_order(tmp_path):
    board, _ = board_on(tmp_path, queue_size=2)
    for i in range(2):
        board.submit(job(f"p{i}"))
    assert board.close() == 2  # SIGTERM: kept, not cancelled
    board.journal.close()
    again, restored = board_on(tmp_path, queue_size=1)  # resumed even beyond a smaller queue
    assert restored["resumed"] == 2
    assert [again.take(0).id for _ in range(2)] == ["job00001", "job00002"]
    again.journal.close()


def test_torn_last_line_and_unreadable_entries(tmp_path, monkeypatch):
    board, _ = board_on(tmp_path)
    board.submit(job("kept"))
    image_job = board.submit(job("other model")).id
    board.journal.close()
    path = tmp_path / JOURNAL_NAME
    lines = path.read_text().splitlines(keepends=True)
    lines[-1] = lines[-1].replace('"task":"t2v"', '"task":"ti2v"')  # this service runs T2V: not resumable
    path.write_text("".join(lines) + '{"event":"accepted","id":"job00009","jo')  # a write cut short
    again, restored = board_on(tmp_path)
    assert restored["resumed"] == 1 and restored["next"] == "job00003"
    assert any("torn last line" in n for n in restored["notes"])
    assert again.get(image_job)["state"] == "failed" and "ti2v job" in again.get(image_job)["error"]
    assert path.read_text().endswith("\n")  # rewritten whole
    again.journal.close()


def test_one_service_per_save_folder(tmp_path):
    board, _ = board_on(tmp_path)
    with pytest.raises(ValueError, match="another service is using this folder"):
        Journal(str(tmp_path))
    board.journal.close()
    Journal(str(tmp_path)).close()
