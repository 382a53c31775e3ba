"""The job API and the web page of `run_parallel.py --serve` (rank 0), on the model servers' machinery
(stepvideo_ms.serving: bearer token, body cap, bounded threaded WSGI server, JSON errors).

    GET    /                   the web page
    GET    /health             task, world, load time, queue counts, presets, limits (no queue wait)
    POST   /jobs               a job: application/json {"prompt": ..., settings...}, or multipart/form-data
                               with a "job" field (that JSON) and, for TI2V, a "first_image" file
                               -> 201 {"id", "state", "position", ...}
    GET    /jobs               every job, oldest first;  GET /jobs/ID  one job (state, step, steps, position)
    GET    /jobs/ID/video      the MP4 (when done);      GET /jobs/ID/record  its JSON record
    DELETE /jobs/ID            cancel a queued job (409 once it runs)
    GET    /metrics            the Prometheus text format (metrics.py; the token unless --metrics_public)
    /v1/videos...              the OpenAI Videos API on the same jobs (openai_videos.py)

Refusals, each before the job reaches the world: 401 token, 404 route or job, 405 method, 411 no
length, 413 body over the cap, 415 content type, 400 not JSON, 422 a bad job (unknown key, wrong
type, sizes over the limits, an image for T2V, no or unreadable image for TI2V), 503 queue full.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from flask import Flask, Response, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from ... import __version__
from ...diffusion.settings import TASK_DEFAULTS, labelled_presets
from ..jobs import loads_json
from ...serving.limits import Limits
from ...serving.server import check_bearer, error_response
from .board import JobBoard, NotCancellable
from .metrics import ServiceMetrics
from .openai_videos import register_openai_videos
from .submission import API_KEYS, MAX_STEPS, Refused, accept_job, finished_files

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


@dataclass
class ServiceState:
    board: JobBoard
    task: str
    limits: Limits
    auth_token: Optional[str]
    upload_dir: str
    info: dict
    defaults: dict = field(default_factory=dict)  # the command line's per-video settings
    started: float = 0.0
    model_name: str = "stepvideo"  # the served model's name (the model folder's): /v1/videos' "model"
    metrics_public: bool = False  # GET /metrics without the token (--metrics_public)
    metrics: Optional[ServiceMetrics] = None  # made by create_app when not given


def _read_submission():
    """-> (job fields dict, uploaded image bytes or None), refusing malformed requests."""
    length = request.content_length
    if length is None:
        raise Refused(411, "the request has no Content-Length: send the body with its length", "Content-Length")
    ctype = (request.mimetype or "").lower()
    if ctype == "application/json":
        try:
            data = loads_json(request.get_data(cache=False).decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is one
            raise Refused(400, f"the body is not JSON: {exc}", "body") from None
        if "first_image" in (data if isinstance(data, dict) else {}):
            raise Refused(422, "send the first image as a multipart 'first_image' file, not in the JSON",
                          "first_image")
        return data, None
    if ctype == "multipart/form-data":
        extra = sorted(set(request.files) - {"first_image"}) + sorted(set(request.form) - {"job"})
        if extra:
            raise Refused(422, f"unknown form part(s) {extra}: send 'job' (JSON) and optionally 'first_image'",
                          extra[0])
        if "job" not in request.form:
            raise Refused(400, "the form has no 'job' field (the job as JSON)", "job")
        try:
            data = loads_json(request.form["job"])
        except ValueError as exc:
            raise Refused(400, f"the 'job' field is not JSON: {exc}", "job") from None
        image = request.files.get("first_image")
        blob = image.read() if image is not None else None
        return data, (blob or None)
    raise Refused(415, f"Content-Type is {request.content_type or 'missing'!r}; send application/json or "
                  "multipart/form-data", "Content-Type")


def create_app(state: ServiceState) -> Flask:
    app = Flask("stepvideo_ms.generation.service")
    app.config["MAX_CONTENT_LENGTH"] = state.limits.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = state.limits.max_body_bytes
    if state.metrics is None:
        state.metrics = ServiceMetrics(state.board)

    @app.before_request
    def _authorize():
        if request.path == "/" and request.method == "GET":
            return None  # the page itself holds nothing; it asks for the token when the API needs one
        if request.path == "/metrics" and state.metrics_public:
            return None
        return check_bearer(state.auth_token)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            return error_response(413, f"the body exceeds this service's limit of {state.limits.max_body_bytes} "
                                  "bytes", "body")
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.get("/")
    def _page():
        with open(PAGE, "r", encoding="utf-8") as fh:
            return Response(fh.read(), content_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-store"})

    @app.get("/health")
    def _health():
        return jsonify({"status": "ok", "version": __version__, "task": state.task, **state.info,
                        "auth": state.auth_token is not None, "jobs": state.board.counts(),
                        "uptime_s": round(time.time() - state.started, 1), "presets": labelled_presets(),
                        "defaults": dict(TASK_DEFAULTS[state.task], **state.defaults), "keys": list(API_KEYS),
                        "limits": {"max_body_bytes": state.limits.max_body_bytes,
                                   "max_frames": state.limits.max_frames, "max_side": state.limits.max_side,
                                   "max_steps": MAX_STEPS, "queue_size": state.board.queue_size}})

    @app.get("/metrics")
    def _metrics():
        body, content_type = state.metrics.exposition()
        return Response(body, content_type=content_type)

    @app.post("/jobs")
    def _submit():
        try:
            data, blob = _read_submission()
            rec = accept_job(state, data, blob)
        except Refused as exc:
            return error_response(exc.status, exc.message, exc.field, exc.headers)
        resp = jsonify(state.board.get(rec.id))
        resp.status_code = 201
        resp.headers["Location"] = f"/jobs/{rec.id}"
        return resp

    @app.get("/jobs")
    def _list():
        return jsonify({"jobs": state.board.listing()})

    @app.get("/jobs/<job_id>")
    def _one(job_id):
        out = state.board.get(job_id)
        return jsonify(out) if out else error_response(404, f"no job {job_id}", "id")

    def _done(job_id):
        try:
            return finished_files(state.board, job_id), None
        except Refused as exc:
            return None, error_response(exc.status, exc.message, exc.field)

    @app.get("/jobs/<job_id>/video")
    def _video(job_id):
        rec, err = _done(job_id)
        return err or send_file(rec.video_path, mimetype="video/mp4", conditional=True)

    @app.get("/jobs/<job_id>/record")
    def _record(job_id):
        rec, err = _done(job_id)
        return err or send_file(rec.json_path, mimetype="application/json")

    @app.delete("/jobs/<job_id>")
    def _cancel(job_id):
        try:
            state.board.cancel(job_id)
        except KeyError:
            return error_response(404, f"no job {job_id}", "id")
        except NotCancellable as exc:
            return error_response(409, str(exc), "id")
        return jsonify(state.board.get(job_id))

    register_openai_videos(app, state)
    return app
