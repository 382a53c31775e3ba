"""/v1/videos and /metrics on the service's app alone (no world, Flask's test client): the field mapping
onto our settings, refusals in the OpenAI error shape, paging, deleting (also across a journal replay), the
progress of a video object, and the counters. Fast; the live service with the real SDK is in
test_openai_videos.py."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stepvideo_ms.generation.service.app import ServiceState, create_app
from stepvideo_ms.generation.service.board import JobBoard
from stepvideo_ms.generation.service.journal import Journal
from stepvideo_ms.serving.limits import Limits

DEFAULTS = {"num_frames": 17, "height": 48, "width": 80, "infer_steps": 2}


def client(tmp_path, token=None, metrics_public=False, journal=None):
    board = JobBoard(4, journal=journal)
    if journal is not None:
        board.restore("t2v")
    state = ServiceState(board, "t2v", Limits(), token, str(tmp_path / "uploads"), {}, DEFAULTS,
                         model_name="stepvideo-t2v", metrics_public=metrics_public)
    return create_app(state).test_client(), board


def samples(c, **kwargs) -> dict:
    r = c.get("/metrics", **kwargs)
    assert r.status_code == 200, r.data
    return {s.name: s.value for f in text_string_to_metric_families(r.data.decode()) for s in f.samples
            if not s.labels}


def test_fields_map_onto_our_settings_and_the_record_says_how(tmp_path):
    c, board = client(tmp_path)
    r = c.post("/v1/videos", json={"prompt": "a kite", "model": "stepvideo-t2v", "size": "160x96", "seconds": "2",
                                   "num_inference_steps": 7, "guidance_scale": 6.5, "flow_shift": 11.0,
                                   "negative_prompt": "blur", "seed": 9})
    assert r.status_code == 200, r.get_json()
    video = r.get_json()
    s = board.record(video["id"]).job.settings
    assert (s.width, s.height, s.infer_steps, s.cfg_scale, s.time_shift, s.neg_magic, s.seed) == \
        (160, 96, 7, 6.5, 11.0, "blur", 9)
    assert s.num_frames == 34 and s.notes == ["seconds=2: num_frames=50 (round(seconds x 25 fps))",
                                              "num_frames=50 is not a multiple of 17: using num_frames=34"]
    assert (video["status"], video["progress"], video["size"], video["seconds"], video["model"]) == \
        ("queued", 0, "160x96", "1.36", "stepvideo-t2v")
    # multipart (what the SDK sends): every value arrives as text and is read as the type of its field
    r = c.post("/v1/videos", data={"prompt": "x", "infer_steps": "3", "cfg_scale": "4.5", "time_shift": "13"},
               content_type="multipart/form-data")
    s = board.record(r.get_json()["id"]).job.settings
    assert (s.infer_steps, s.cfg_scale, s.time_shift, s.num_frames) == (3, 4.5, 13.0, 17)
    # the step cache's settings are settings like any other (extra_body), with their own checks
    r = c.post("/v1/videos", data={"prompt": "x", "cache_threshold": "0.12", "cache_warmup": "1"},
               content_type="multipart/form-data")
    s = board.record(r.get_json()["id"]).job.settings
    assert (s.cache_threshold, s.cache_warmup) == (0.12, 1)
    r = c.post("/v1/videos", json={"prompt": "x", "cache_threshold": -1})
    assert r.status_code == 422 and r.get_json()["error"]["param"] == "cache_threshold", r.get_json()


@pytest.mark.parametrize("body,status,param,message", [
    ({"prompt": "x", "size": "80x48", "width": 96}, 422, "size", "size and width both set width"),
    ({"prompt": "x", "seconds": 2, "num_frames": 17}, 422, "seconds", "seconds and num_frames both set"),
    ({"prompt": "x", "infer_steps": 2, "num_inference_steps": 3}, 422, "num_inference_steps", "give one"),
    ({"prompt": "x", "seconds": "-1"}, 422, "seconds", "seconds must be a positive number"),
    ({"prompt": "x", "seconds": 100}, 422, "seconds", "from seconds: num_frames=2500 is over the limit of 1024"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps", "from num_inference_steps: infer_steps=0 is under"),
    ({"prompt": "x", "model": "sora-2"}, 422, "model", "this service serves 'stepvideo-t2v'"),
    ({"prompt": "x", "input_reference": {"image_url": "http://a/b.png"}}, 422, "input_reference", "multipart"),
    ({"size": "80x48"}, 422, "prompt", "missing key 'prompt'"),
])
def test_refusals_come_in_the_openai_error_shape(tmp_path, body, status, param, message):
    c, board = client(tmp_path)
    r = c.post("/v1/videos", json=body)
    error = r.get_json()["error"]
    assert r.status_code == status and error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert board.counts()["queued"] == 0


def test_token_unknown_route_and_metrics_access(tmp_path):
    c, _ = client(tmp_path, token="t0k")
    r = c.get("/v1/videos")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_api_key"
    assert r.get_json()["error"]["type"] == "authentication_error"
    assert c.get("/jobs").get_json()["field"] == "Authorization"  # /jobs keeps its own shape
    r = c.get("/v1/nothing", headers={"Authorization": "Bearer t0k"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    assert c.get("/metrics").status_code == 401
    assert samples(c, headers={"Authorization": "Bearer t0k"})["stepvideo_jobs_waiting"] == 0
    public, _ = client(tmp_path, token="t0k", metrics_public=True)
    assert public.get("/metrics").status_code == 200 and public.get("/v1/videos").status_code == 401


def test_list_pages_progress_and_delete(tmp_path):
    c, board = client(tmp_path)
    ids = [c.post("/v1/videos", json={"prompt": f"p{i}"}).get_json()["id"] for i in range(3)]
    page = c.get("/v1/videos?limit=2").get_json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"] and page["last_id"] == ids[1]
    rest = c.get(f"/v1/videos?limit=2&after={ids[1]}").get_json()
    assert [v["id"] for v in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert [v["id"] for v in c.get("/v1/videos?order=asc").get_json()["data"]] == ids
    for query, param in (("limit=0", "limit"), ("order=up", "order")):
        assert c.get("/v1/videos?" + query).get_json()["error"]["param"] == param
    rec = board.take(0.1)
    board.progress(rec, 1, 2)
    assert c.get(f"/v1/videos/{ids[0]}").get_json()["progress"] == 45
    assert c.delete(f"/v1/videos/{ids[0]}").status_code == 409  # running
    board.progress(rec, 2, 2)
    video = c.get(f"/v1/videos/{ids[0]}").get_json()
    assert (video["status"], video["progress"]) == ("in_progress", 90)  # decoding
    board.fail(rec, "decoding failed: boom")
    video = c.get(f"/v1/videos/{ids[0]}").get_json()
    assert video["status"] == "failed" and video["error"] == {"code": "generation_failed",
                                                              "message": "decoding failed: boom"}
    assert c.get(f"/v1/videos/{ids[0]}/content").status_code == 409
    assert c.get(f"/v1/videos/{ids[0]}/content?variant=spritesheet").status_code == 400
    assert c.delete(f"/v1/videos/{ids[1]}").get_json() == {"id": ids[1], "object": "video.deleted", "deleted": True}
    assert c.get(f"/v1/videos/{ids[1]}").status_code == 404 and c.get(f"/jobs/{ids[1]}").status_code == 404
    counted = samples(c)
    assert (counted["stepvideo_jobs_accepted_total"], counted["stepvideo_jobs_failed_total"],
            counted["stepvideo_jobs_cancelled_total"], counted["stepvideo_jobs_waiting"]) == (3, 1, 1, 1)


def test_a_deleted_job_stays_deleted_after_a_restart(tmp_path):
    journal = Journal(str(tmp_path / "videos"))
    c, board = client(tmp_path, journal=journal)
    ids = [c.post("/v1/videos", json={"prompt": f"p{i}"}).get_json()["id"] for i in range(2)]
    assert c.delete(f"/v1/videos/{ids[0]}").status_code == 200
    journal.close()
    c, board = client(tmp_path, journal=Journal(str(tmp_path / "videos")))
    assert [v["id"] for v in c.get("/v1/videos?order=asc").get_json()["data"]] == [ids[1]]
    assert c.post("/v1/videos", json={"prompt": "next"}).get_json()["id"] == "job00003"  # no id reused
    board.journal.close()


def test_a_journal_entry_that_cannot_be_read_back_is_listed_as_failed_without_a_size(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "service-journal.jsonl").write_text(
        '{"event":"accepted","id":"job00001","job":{"settings":{"prompt":"old","bogus":1}},"upload":null,"time":1}\n')
    c, board = client(tmp_path, journal=Journal(str(folder)))
    video = c.get("/v1/videos/job00001").get_json()
    assert (video["status"], video["size"], video["seconds"], video["prompt"]) == ("failed", "", "0", "old")
    assert video["error"]["message"].startswith("not resumed")
    board.journal.close()
