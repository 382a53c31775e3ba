"""The generation service's HTTP app alone (no world): token, limits, the queue bound, cancelling,
TI2V uploads, and the job board's order. Fast: Flask's test client, no model."""
import io
import json
import os

import pytest
from PIL import Image

from conftest import REPO
from stepvideo_ms.generation.service.app import ServiceState, create_app
from stepvideo_ms.generation.service.board import JobBoard
from stepvideo_ms.serving.limits import Limits


def client(tmp_path, task="t2v", token=None, queue_size=2, max_body=64 * 1024):
    board = JobBoard(queue_size)
    state = ServiceState(board, task, Limits(max_body_bytes=max_body), token, str(tmp_path / "uploads"),
                         {"load_s": 1.0}, {"num_frames": 17, "height": 48, "width": 80, "infer_steps": 2})
    return create_app(state).test_client(), board


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_and_health(tmp_path):
    c, _ = client(tmp_path)
    page = c.get("/")
    assert page.status_code == 200 and b"<form" in page.data and b"/jobs" in page.data
    health = c.get("/health").get_json()
    assert health["task"] == "t2v" and set(health["presets"]) == {"T2V", "T2V-Turbo", "TI2V"}
    assert health["defaults"]["num_frames"] == 17  # the command line's settings are the defaults


def test_token_required_on_the_api_not_on_the_page(tmp_path):
    c, _ = client(tmp_path, token="s3cret")
    assert c.get("/").status_code == 200
    assert c.get("/health").status_code == 401
    assert c.post("/jobs", json={"prompt": "x"}).status_code == 401
    assert c.post("/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.post("/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 201 and ok.get_json()["settings"]["num_frames"] == 17


def test_limits_queue_bound_and_cancel(tmp_path):
    c, board = client(tmp_path, queue_size=2)
    big = c.post("/jobs", data=b"{" + b" " * 70000 + b"}", headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert c.post("/jobs", data=b"", headers={"Content-Type": "application/json",
                                               "Transfer-Encoding": "chunked"}).status_code in (400, 411)
    first = c.post("/jobs", json={"prompt": "one"}).get_json()
    second = c.post("/jobs", json={"prompt": "two"}).get_json()
    assert (first["position"], second["position"]) == (1, 2)
    full = c.post("/jobs", json={"prompt": "three"})
    assert full.status_code == 503 and full.headers["Retry-After"]
    assert c.get("/jobs/" + first["id"] + "/video").status_code == 409  # not done yet
    assert c.delete("/jobs/" + second["id"]).get_json()["state"] == "cancelled"
    running = board.take(0.1)
    assert running.id == first["id"]
    assert c.delete("/jobs/" + first["id"]).status_code == 409
    assert c.delete("/jobs/nope").status_code == 404
    assert c.put("/jobs").status_code == 405
    assert c.get("/nowhere").status_code == 404
    assert [j["state"] for j in c.get("/jobs").get_json()["jobs"]] == ["running", "cancelled"]


def test_ti2v_needs_a_readable_image(tmp_path):
    c, board = client(tmp_path, task="ti2v")
    job = {"job": json.dumps({"prompt": "x", "motion_score": 10})}
    assert "first image" in c.post("/jobs", json={"prompt": "x"}).get_json()["error"]
    bad = c.post("/jobs", data={**job, "first_image": (io.BytesIO(b"not an image"), "a.png")},
                 content_type="multipart/form-data")
    assert bad.status_code == 422 and "not a readable image" in bad.get_json()["error"]
    extra = c.post("/jobs", data={**job, "other": (io.BytesIO(b"x"), "x")}, content_type="multipart/form-data")
    assert extra.status_code == 422
    ok = c.post("/jobs", data={**job, "first_image": (io.BytesIO(png_bytes()), "a.png")},
                content_type="multipart/form-data")
    assert ok.status_code == 201, ok.get_json()
    rec = board.record(ok.get_json()["id"])
    assert os.path.isfile(rec.job.settings.first_image_path) and rec.job.settings.motion_score == 10
    assert "first_image_path" not in ok.get_json()["settings"]  # server paths stay private
    assert sorted(os.listdir(tmp_path / "uploads")) == [os.path.basename(rec.upload_path)]
    path_in_json = c.post("/jobs", json={"prompt": "x", "first_image_path": os.path.join(REPO, "assets", "demo.png")})
    assert path_in_json.status_code == 422  # a client cannot point the service at a server file


# ---- issue 20's hostile requests: each refused before it reaches the queue ----------------------------
HOSTILE = [
    ('{"prompt": "a", "cfg_scale": NaN}', 400, "body", "NaN is not JSON"),
    ('{"prompt": "a", "cfg_scale": Infinity}', 400, "body", "Infinity is not JSON"),
    ('{"prompt": "a", "time_shift": -Infinity}', 400, "body", "-Infinity is not JSON"),
    ('{"prompt": "a", "cfg_scale": 1e400}', 422, "cfg_scale", "cfg_scale=inf is not a finite number"),
    ('{"prompt": "a", "cfg_scale": 1' + "0" * 400 + '}', 422, "cfg_scale", "is too large"),
    ('{"prompt": "a", "seed": 1' + "0" * 40 + '}', 422, "seed", "seed=an integer of 41 digits is over the limit"),
    ('{"prompt": "a", "seed": -1}', 422, "seed", "give an integer from 0 to 9223372036854775807"),
    ('{"prompt": "a", "seed": true}', 422, "seed", "seed must be an integer, got True"),
    ('{"prompt": "a", "infer_steps": 3.0}', 422, "infer_steps", "infer_steps must be an integer"),
    ('{"prompt": "a", "cfg_scale": 101}', 422, "cfg_scale", "cfg_scale=101.0 is over the limit of 100.0"),
    ('{"prompt": "a", "motion_score": 5}', 422, "motion_score", "motion_score is for TI2V"),
    ('{"prompt": "\\ud800"}', 422, "prompt", "prompt is not valid Unicode text"),
    ('{"prompt": "a", "seed": 1' + "0" * 5000 + '}', 400, "body", "not JSON"),
    ("[" * 20000 + "]" * 20000, 400, "body", "nested too deeply"),
]


@pytest.mark.parametrize("body,status,field,message", HOSTILE, ids=[h[3] for h in HOSTILE])
def test_hostile_numbers_are_refused_naming_the_field(tmp_path, body, status, field, message):
    c, board = client(tmp_path, max_body=1 << 20)
    r = c.post("/jobs", data=body.encode(), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.get_json()["field"]) == (status, field), r.get_json()
    assert message in r.get_json()["error"]
    form = c.post("/jobs", data={"job": body}, content_type="multipart/form-data")
    assert form.status_code == status and message in form.get_json()["error"]
    assert board.counts()["queued"] == 0


def test_finite_numbers_in_range_are_accepted_as_their_types(tmp_path):
    c, board = client(tmp_path)
    r = c.post("/jobs", json={"prompt": "a", "cfg_scale": 100, "time_shift": 0.5, "seed": 2 ** 63 - 1})
    assert r.status_code == 201, r.get_json()
    s = board.record(r.get_json()["id"]).job.settings
    assert (s.cfg_scale, s.time_shift, s.seed) == (100.0, 0.5, 2 ** 63 - 1) and type(s.cfg_scale) is float


def test_refused_submissions_take_no_job_id(tmp_path):
    c, board = client(tmp_path, queue_size=2)
    assert c.post("/jobs", json={"prompt": "one"}).get_json()["id"] == "job00001"
    for bad in ({"seed": 3}, {"prompt": "x", "num_frames": 5000}, {"prompt": "x", "steps": 3}, ["x"]):
        assert c.post("/jobs", json=bad).status_code == 422
    assert c.post("/jobs", json={"prompt": "two"}).get_json()["id"] == "job00002"
    assert c.post("/jobs", json={"prompt": "three"}).status_code == 503  # full: no id either
    board.take(0.1)
    assert c.post("/jobs", json={"prompt": "four"}).get_json()["id"] == "job00003"


def test_ids_go_on_after_a_restart(tmp_path):
    from stepvideo_ms.generation.service.board import last_id_in

    save = tmp_path / "videos"
    (save / "uploads").mkdir(parents=True)
    for name in ("job00006.mp4", "job00006.json", "job00001-1.mp4", "notes.txt", "jobless.mp4"):
        (save / name).write_text("")
    (save / "uploads" / "job00007.png").write_text("")
    assert last_id_in(str(save), str(save / "uploads")) == 7
    board = JobBoard(2, last_id=last_id_in(str(save), str(save / "uploads")))
    state = ServiceState(board, "t2v", Limits(), None, str(save / "uploads"), {}, {})
    assert create_app(state).test_client().post("/jobs", json={"prompt": "x"}).get_json()["id"] == "job00008"
    assert last_id_in(str(tmp_path / "none")) == 0


@pytest.mark.parametrize("job,field,message", [
    ({"seed": 3}, "prompt", "missing key 'prompt'"),
    ({"prompt": "  "}, "prompt", "prompt is empty"),
    ({"prompt": "x", "seed": "7"}, "seed", "seed must be an integer"),
    ({"prompt": "x", "height": 0}, "height", "height=0"),
    ({"prompt": "x", "cfg_scale": -1}, "cfg_scale", "cfg_scale=-1"),
    ({"prompt": "x", "motion_score": 5}, "motion_score", "motion_score is for TI2V"),
    ({"prompt": "x", "num_frames": 5000}, "num_frames", "num_frames=5000 is over the limit of 1024"),
    ({"prompt": "x", "width": 4100}, "width", "width=4100 is over the limit of 4096"),
])
def test_every_422_names_its_field_in_the_client_s_words(tmp_path, job, field, message):
    c, _ = client(tmp_path)
    r = c.post("/jobs", json=job)
    body = r.get_json()
    assert r.status_code == 422 and body["field"] == field and message in body["error"], body
    assert "--" not in body["error"]  # no command-line flag for an HTTP client


def test_a_job_shows_decoding_after_its_last_step_and_its_elapsed_time(tmp_path):
    c, board = client(tmp_path)
    job_id = c.post("/jobs", json={"prompt": "x"}).get_json()["id"]
    assert c.get("/jobs/" + job_id).get_json()["elapsed_s"] is None
    rec = board.take(0.1)
    board.progress(rec, 1, 2)
    assert c.get("/jobs/" + job_id).get_json()["state"] == "running"
    board.progress(rec, 2, 2)
    shown = c.get("/jobs/" + job_id).get_json()
    assert shown["state"] == "decoding" and shown["step"] == 2 and shown["elapsed_s"] >= 0
    assert c.get("/health").get_json()["jobs"]["decoding"] == 1
    board.finish(rec, "v.mp4", "v.json")
    assert c.get("/jobs/" + job_id).get_json()["state"] == "done"
