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
