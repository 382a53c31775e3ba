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

Refusals, each before the job reaches the world: 401 token, 404 route or job, 405 method, 411 no
length, 413 body over the cap, 415 content type, 400 not JSON, 422 a bad job (unknown key, wrong
type, sizes over the limits, an image for T2V, no or unreadable image for TI2V), 503 queue full.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

from flask import Flask, Response, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from ... import __version__
from ...formats.atomic import atomic_output
from ...diffusion.settings import SETTING_RANGES, TASK_DEFAULTS, labelled_presets
from ..jobs import JOB_KEYS, job_from_dict, loads_json
from ...serving.limits import Limits
from ...serving.server import check_bearer, error_response
from .board import BoardFull, JobBoard, NotCancellable

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
API_KEYS = tuple(k for k in JOB_KEYS if k not in ("first_image_path", "output_file_name"))
MAX_STEPS = SETTING_RANGES["infer_steps"][1]
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


class Refused(ValueError):
    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


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


def _check_limits(job, limits: Limits, data: dict):
    """The service's limits, quoted in the numbers the client sent (before any rounding to 17 / 16)."""
    s = job.settings

    def asked(name):
        value = data.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else getattr(s, name)

    if len(s.prompt) > limits.max_prompt_chars:
        raise Refused(422, f"prompt has {len(s.prompt)} characters; the limit is {limits.max_prompt_chars}", "prompt")
    if s.num_frames > limits.max_frames or asked("num_frames") > limits.max_frames:
        raise Refused(422, f"num_frames={asked('num_frames')} is over this service's limit of {limits.max_frames}",
                      "num_frames")
    for name in ("height", "width"):
        if getattr(s, name) > limits.max_side or asked(name) > limits.max_side:
            raise Refused(422, f"{name}={asked(name)} is over this service's limit of {limits.max_side}", name)
    if s.infer_steps > MAX_STEPS:
        raise Refused(422, f"infer_steps={s.infer_steps} is over this service's limit of {MAX_STEPS}", "infer_steps")


# what a job's check says, in the API's words: the JSON key it is about, and no command-line flags
FIELD_NAMES = tuple(API_KEYS) + ("first_image_path",)
API_FIELD = {"first_image_path": "first_image"}


def field_of(message: str) -> str:
    """The job key a check's message is about (the first key it names), 'job' when it names none."""
    found = [(m.start(), key) for key in FIELD_NAMES for m in [re.search(rf"(?<![\w-]){key}(?!\w)", message)] if m]
    key = min(found)[1] if found else "job"
    return API_FIELD.get(key, key)


def api_message(message: str) -> str:
    """A check's message for an HTTP client: the JSON keys instead of the command line's flags."""
    message = re.sub(r' \(--prompt "\.\.\."\)', ' (the "prompt" key)', message)
    message = re.sub(r"--first_image_path( IMAGE)?", "a 'first_image' file", message)
    return re.sub(r"--(\w+)", r'"\1"', message)


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


def _save_upload(state: ServiceState, blob: bytes) -> str:
    """The checked image under a name of its own until the job gets its id (`_bind_files`)."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(blob)) as img:
            kind = img.format
            img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise Refused(422, f"first_image is not a readable image ({exc}); send a PNG or JPEG", "first_image") from None
    if kind not in IMAGE_SUFFIXES:
        raise Refused(422, f"first_image is {kind}; send a PNG or JPEG", "first_image")
    if img.width > state.limits.max_side * 4 or img.height > state.limits.max_side * 4:
        raise Refused(422, f"first_image is {img.width}x{img.height}, over {state.limits.max_side * 4} a side",
                      "first_image")
    import uuid

    path = os.path.join(state.upload_dir, f"upload-{uuid.uuid4().hex}{IMAGE_SUFFIXES[kind]}")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the journal says the job was accepted
    return path


def _bind_files(job_id: str, job, upload: Optional[str]) -> Optional[str]:
    """Name a job's files after its id: the video and record JOBID.mp4/.json, the upload JOBID.png."""
    job.output_file_name = job_id
    if upload is None:
        return None
    path = os.path.join(os.path.dirname(upload), job_id + os.path.splitext(upload)[1])
    os.replace(upload, path)
    job.settings.first_image_path = path
    return path


def create_app(state: ServiceState) -> Flask:
    app = Flask("stepvideo_ms.generation.service")
    app.config["MAX_CONTENT_LENGTH"] = state.limits.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = state.limits.max_body_bytes

    @app.before_request
    def _authorize():
        if request.path == "/" and request.method == "GET":
            return None  # the page itself holds nothing; it asks for the token when the API needs one
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

    @app.post("/jobs")
    def _submit():
        try:
            data, blob = _read_submission()
            if not isinstance(data, dict):
                raise Refused(422, f"a job must be a JSON object, got {type(data).__name__}", "job")
            unknown = sorted(set(data) - set(API_KEYS))
            if unknown:
                raise Refused(422, f"unknown key(s) {[k if len(k) <= 40 else k[:37] + '...' for k in unknown]}; a job takes {list(API_KEYS)} (and a 'first_image' "
                              "file for TI2V)", unknown[0])
            if state.task == "t2v" and blob is not None:
                raise Refused(422, "first_image is for TI2V, but this service runs a T2V model: drop the image",
                              "first_image")
            if state.task == "ti2v" and blob is None:
                raise Refused(422, "this service runs a TI2V model: send the first image as a 'first_image' file",
                              "first_image")
            upload = _save_upload(state, blob) if blob is not None else None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # rounding notes are in the job's "notes"
                    job = job_from_dict(dict(data, first_image_path=upload), state.task, state.defaults)
                _check_limits(job, state.limits, data)
                rec = state.board.submit(job, upload, bind=_bind_files)  # the id is taken only now
            except BaseException:
                if upload and os.path.exists(upload):
                    os.unlink(upload)
                raise
        except Refused as exc:
            return error_response(exc.status, exc.message, exc.field)
        except BoardFull as exc:
            return error_response(503, f"{exc}; retry later", "queue", {"Retry-After": "5"})
        except ValueError as exc:  # a SettingError names its field; other checks are read for the key they name
            message = str(exc)
            field = getattr(exc, "field", None)
            return error_response(422, api_message(message), API_FIELD.get(field, field) if field else field_of(message))
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
        rec = state.board.record(job_id)
        if rec is None:
            return None, error_response(404, f"no job {job_id}", "id")
        if rec.state != "done":
            return None, error_response(409, f"job {job_id} is {rec.state}: its files exist once it is done", "id")
        if not (rec.video_path and os.path.isfile(rec.video_path) and rec.json_path and os.path.isfile(rec.json_path)):
            return None, error_response(404, f"job {job_id} is done but its files are no longer in the save folder",
                                        "id")
        return rec, None

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

    return app
