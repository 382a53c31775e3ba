"""The OpenAI Videos API face of `run_parallel.py --serve`: the same jobs, queue, journal and token as
`/jobs`, in the shape the `openai` package's `client.videos` (and SGLang Diffusion's, NVIDIA Dynamo's
clients) speak.

    POST   /v1/videos                  multipart/form-data (what the SDK sends) or application/json:
                                       prompt, model, size, seconds, input_reference (TI2V: the first frame),
                                       and the settings of FIELD_MAP (SDK: extra_body) -> the video object
    GET    /v1/videos?after=&limit=&order=   a page of video objects (newest first unless order=asc)
    GET    /v1/videos/ID               one video object
    DELETE /v1/videos/ID               cancel a waiting job / remove a finished one's files
    GET    /v1/videos/ID/content?variant=video|thumbnail   the MP4, or its first frame as a PNG

Every field goes through the checks of every other entry (submission.accept_job, diffusion/settings.py);
errors come as {"error": {"message", "type", "param", "code"}} with the statuses of `/jobs`, so that the
SDK raises its own typed errors (422 UnprocessableEntityError, 401 AuthenticationError, ...).
"""
from __future__ import annotations

import json
import math
import os
import re
from io import BytesIO

from flask import jsonify, request, send_file

from ...diffusion.settings import FPS, PER_VIDEO_SETTINGS
from ..jobs import loads_json
from .board import CANCELLED, DECODING, DONE, FAILED, QUEUED, RUNNING, NotCancellable
from .submission import Refused, accept_job, finished_files

# the fields SGLang Diffusion's clients send, each onto one of our settings (the rest keep their names)
FIELD_MAP = {"num_inference_steps": "infer_steps", "guidance_scale": "cfg_scale", "flow_shift": "time_shift",
             "negative_prompt": "neg_magic"}
FIELD_TYPES = dict(PER_VIDEO_SETTINGS, **{k: PER_VIDEO_SETTINGS[v] for k, v in FIELD_MAP.items()},
                   prompt=str, model=str, size=str, seconds=float)
IMAGE_FIELD = "input_reference"
STATUS = {QUEUED: "queued", RUNNING: "in_progress", DECODING: "in_progress", DONE: "completed", FAILED: "failed",
          CANCELLED: "failed"}
DENOISE_PERCENT = 90  # progress: the denoising steps fill 0-90, the decode and the write 90-100
VARIANTS = ("video", "thumbnail")
MAX_LIMIT = 100
ERROR_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
               409: "conflict", 411: "length_required", 413: "request_too_large", 415: "unsupported_media_type",
               422: "invalid_value", 503: "queue_full"}


def _from_form(name: str, text: str):
    """A multipart field's text as the type the field takes (the checks then refuse what is still wrong)."""
    kind = FIELD_TYPES.get(name, str)
    if kind is int and re.fullmatch(r"[+-]?\d{1,4000}", text.strip()):
        return int(text)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _read_request():
    """-> (fields, image bytes or None)."""
    ctype = (request.mimetype or "").lower()
    if request.content_length is None:
        raise Refused(411, "the request has no Content-Length: send the body with its length", "Content-Length")
    if ctype == "application/json":
        try:
            data = loads_json(request.get_data(cache=False).decode("utf-8"))
        except ValueError as exc:
            raise Refused(400, f"the body is not JSON: {exc}", "body") from None
        if not isinstance(data, dict):
            raise Refused(422, f"the body must be a JSON object, got {type(data).__name__}", "body")
        if IMAGE_FIELD in data:
            raise Refused(422, f"send {IMAGE_FIELD} as a multipart/form-data image file, not in the JSON",
                          IMAGE_FIELD)
        return data, None
    if ctype == "multipart/form-data":
        other_files = sorted(set(request.files) - {IMAGE_FIELD})
        refs = sorted(k for k in request.form if k == IMAGE_FIELD or k.startswith(IMAGE_FIELD + "["))
        if other_files or refs:
            raise Refused(422, f"{(other_files + refs)[0]}: the only file is '{IMAGE_FIELD}', an uploaded image "
                          "(image_url and file_id references are not supported)", IMAGE_FIELD)
        data = {k: _from_form(k, v) for k, v in request.form.items() if v != ""}
        image = request.files.get(IMAGE_FIELD)
        return data, (image.read() or None) if image is not None else None
    raise Refused(415, f"Content-Type is {request.content_type or 'missing'!r}; send multipart/form-data or "
                  "application/json", "Content-Type")


def _seconds(value) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise Refused(422, f"seconds must be a positive number of seconds (frames = round(seconds x {FPS} fps)), "
                      f"got {value!r}", "seconds")
    return float(value)


def to_job(fields: dict, model_name: str):
    """The /v1/videos fields -> (a job's JSON keys, {our key: the client's field}, notes for the record)."""
    unknown = sorted(set(fields) - set(FIELD_TYPES))
    if unknown:
        raise Refused(422, f"unknown field(s) {[k[:40] for k in unknown]}; /v1/videos takes {sorted(FIELD_TYPES)} "
                      f"and an '{IMAGE_FIELD}' image file", unknown[0])
    model = fields.get("model")
    if model is not None and model != model_name:
        raise Refused(422, f"model {str(model)[:60]!r} is not served here: this service serves {model_name!r} "
                      "(give that or leave model out)", "model")
    job, sent_as, notes = {}, {}, []
    for name, value in fields.items():
        if name in ("model", "size", "seconds"):
            continue
        key = FIELD_MAP.get(name, name)
        if key in job:
            raise Refused(422, f"{name} and {sent_as[key]} are the same setting ({key}): give one", name)
        job[key], sent_as[key] = value, name
    if "size" in fields:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", str(fields["size"]).strip())
        if not match:
            raise Refused(422, f"size must be 'WIDTHxHEIGHT' (e.g. '992x544'), got {str(fields['size'])[:40]!r}",
                          "size")
        for key, text in (("width", match.group(1)), ("height", match.group(2))):
            if key in job:
                raise Refused(422, f"size and {sent_as[key]} both set {key}: give one", "size")
            job[key], sent_as[key] = int(text), "size"
    if "seconds" in fields:
        if "num_frames" in job:
            raise Refused(422, "seconds and num_frames both set the length: give one", "seconds")
        seconds = _seconds(fields["seconds"])
        job["num_frames"], sent_as["num_frames"] = int(round(min(seconds, 1e7) * FPS)), "seconds"
        notes.append(f"seconds={seconds:g}: num_frames={job['num_frames']} (round(seconds x {FPS} fps))")
    return job, sent_as, notes


def video_object(pub: dict, model_name: str) -> dict:
    """A job (JobBoard.get) as an OpenAI video object (with num_frames, our extension). A job the journal
    could not read back (listed as failed, board._placeholder_settings) has no size: "" and "0"."""
    s = pub["settings"]
    state, steps = pub["state"], pub["steps"] or 1
    progress = {QUEUED: 0, DECODING: DENOISE_PERCENT, DONE: 100}.get(state,
                                                                     DENOISE_PERCENT * pub["step"] // steps)
    error = None
    if state == FAILED:
        error = {"code": "generation_failed", "message": pub["error"] or "the job failed"}
    elif state == CANCELLED:
        error = {"code": "cancelled", "message": pub["error"] or "cancelled by a client before it ran"}
    finished = pub["finished"] if state in (DONE, FAILED, CANCELLED) else None
    return {"id": pub["id"], "object": "video", "model": model_name, "status": STATUS[state], "progress": progress,
            "created_at": int(pub["submitted"]), "completed_at": int(finished) if finished else None,
            "expires_at": None, "size": f"{s['width']}x{s['height']}" if s["width"] and s["height"] else "",
            "seconds": f"{s['num_frames'] / FPS:g}" if s["num_frames"] else "0",
            "num_frames": s["num_frames"], "prompt": pub["prompt"], "remixed_from_video_id": None, "error": error}


def openai_error(status: int, message: str, param=None) -> dict:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": ERROR_CODES.get(status, "server_error" if status >= 500 else "invalid_request")}}


def _first_frame_png(path: str) -> bytes:
    import imageio.v3 as iio
    from PIL import Image

    for frame in iio.imiter(path):
        buf = BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        return buf.getvalue()
    raise Refused(404, f"{os.path.basename(path)} has no frame", "id")


def register_openai_videos(app, state) -> None:
    """Add the /v1/videos routes and the OpenAI error shape of everything under /v1/ to the service's app."""

    def fail(exc: Refused):
        resp = jsonify(openai_error(exc.status, exc.message, exc.field))
        resp.status_code = exc.status
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.after_request
    def _openai_errors(resp):  # the token's 401, an unknown route's 404, the body cap's 413, ...
        if request.path.startswith("/v1/") and resp.status_code >= 400 and resp.is_json:
            body = resp.get_json(silent=True)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                resp.set_data(json.dumps(openai_error(resp.status_code, body["error"], body.get("field"))))
        return resp

    def one(video_id: str) -> dict:
        pub = state.board.get(video_id)
        if pub is None:
            raise Refused(404, f"no video {video_id}", "id")
        return video_object(pub, state.model_name)

    @app.post("/v1/videos")
    def _v1_create():
        sent_as = {}
        try:
            fields, blob = _read_request()
            data, sent_as, notes = to_job(fields, state.model_name)
            rec = accept_job(state, data, blob, IMAGE_FIELD, notes)
        except Refused as exc:
            if exc.field in sent_as and sent_as[exc.field] != exc.field:
                exc = Refused(exc.status, f"from {sent_as[exc.field]}: {exc.message}", sent_as[exc.field],
                              exc.headers)
            return fail(exc)
        return jsonify(one(rec.id))

    @app.get("/v1/videos")
    def _v1_list():
        try:
            order = request.args.get("order", "desc")
            if order not in ("asc", "desc"):
                raise Refused(422, f"order must be 'asc' or 'desc', got {order[:20]!r}", "order")
            limit = request.args.get("limit", "20")
            if not re.fullmatch(r"\d{1,4}", limit) or not 1 <= int(limit) <= MAX_LIMIT:
                raise Refused(422, f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit[:20]!r}", "limit")
            pubs = state.board.listing()  # oldest first
            if order == "desc":
                pubs.reverse()
            after = request.args.get("after")
            if after:
                ids = [p["id"] for p in pubs]
                if after not in ids:
                    raise Refused(404, f"after={after[:40]!r}: no such video", "after")
                pubs = pubs[ids.index(after) + 1:]
        except Refused as exc:
            return fail(exc)
        page = [video_object(p, state.model_name) for p in pubs[:int(limit)]]
        return jsonify({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                        "last_id": page[-1]["id"] if page else None, "has_more": len(pubs) > int(limit)})

    @app.get("/v1/videos/<video_id>")
    def _v1_retrieve(video_id):
        try:
            return jsonify(one(video_id))
        except Refused as exc:
            return fail(exc)

    @app.delete("/v1/videos/<video_id>")
    def _v1_delete(video_id):
        try:
            rec = state.board.delete(video_id)
        except KeyError:
            return fail(Refused(404, f"no video {video_id}", "id"))
        except NotCancellable as exc:
            return fail(Refused(409, str(exc), "id"))
        for path in (rec.video_path, rec.json_path, rec.upload_path):
            if path and os.path.isfile(path):
                os.unlink(path)
        return jsonify({"id": video_id, "object": "video.deleted", "deleted": True})

    @app.get("/v1/videos/<video_id>/content")
    def _v1_content(video_id):
        variant = request.args.get("variant", "video")
        try:
            if variant not in VARIANTS:
                raise Refused(400, f"variant={variant[:40]!r} is not available here: use 'video' (the MP4) or "
                              "'thumbnail' (its first frame, a PNG)", "variant")
            rec = finished_files(state.board, video_id)
            if variant == "video":
                return send_file(rec.video_path, mimetype="video/mp4", conditional=True)
            return send_file(BytesIO(_first_frame_png(rec.video_path)), mimetype="image/png")
        except Refused as exc:
            return fail(exc)
