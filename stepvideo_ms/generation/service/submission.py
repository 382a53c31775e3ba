"""Taking a job into the service, whichever face it came through (`POST /jobs` or `POST /v1/videos`):
the same checks (jobs.job_from_dict, hence diffusion/settings.py), the service's limits, the uploaded
first image saved and named after the job's id, the job queued and journaled. Every refusal is a
`Refused` with its HTTP status and the field it is about, raised before the job reaches the world."""
from __future__ import annotations

import os
import re
import uuid
import warnings
from typing import Optional, Sequence

from ...diffusion.settings import SETTING_RANGES
from ...formats.atomic import atomic_output
from ...serving.limits import Limits
from ..jobs import JOB_KEYS, job_from_dict
from .board import DONE, BoardFull, JobRecord

API_KEYS = tuple(k for k in JOB_KEYS if k not in ("first_image_path", "output_file_name"))
MAX_STEPS = SETTING_RANGES["infer_steps"][1]
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
# what a job's check says, in the API's words: the JSON key it is about, and no command-line flags
FIELD_NAMES = tuple(API_KEYS) + ("first_image_path",)
API_FIELD = {"first_image_path": "first_image"}


class Refused(ValueError):
    def __init__(self, status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


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


def check_limits(job, limits: Limits, data: dict):
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


def save_upload(upload_dir: str, limits: Limits, blob: bytes, field: str = "first_image") -> str:
    """The checked image under a name of its own until the job gets its id (`bind_files`)."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(blob)) as img:
            kind = img.format
            img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise Refused(422, f"{field} is not a readable image ({exc}); send a PNG or JPEG", field) from None
    if kind not in IMAGE_SUFFIXES:
        raise Refused(422, f"{field} is {kind}; send a PNG or JPEG", field)
    if img.width > limits.max_side * 4 or img.height > limits.max_side * 4:
        raise Refused(422, f"{field} is {img.width}x{img.height}, over {limits.max_side * 4} a side", field)
    path = os.path.join(upload_dir, f"upload-{uuid.uuid4().hex}{IMAGE_SUFFIXES[kind]}")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the journal says the job was accepted
    return path


def bind_files(job_id: str, job, upload: Optional[str]) -> Optional[str]:
    """Name a job's files after its id: the video and record JOBID.mp4/.json, the upload JOBID.png."""
    job.output_file_name = job_id
    if upload is None:
        return None
    path = os.path.join(os.path.dirname(upload), job_id + os.path.splitext(upload)[1])
    os.replace(upload, path)
    job.settings.first_image_path = path
    return path


def accept_job(state, data, blob: Optional[bytes], image_field: str = "first_image",
               notes: Sequence[str] = ()) -> JobRecord:
    """Check `data` (a job's JSON keys: API_KEYS) and the first image, and queue the job. `notes` go first in
    the job's notes (and so in its record). Raises Refused: 422 a bad job, 503 the queue full."""
    if not isinstance(data, dict):
        raise Refused(422, f"a job must be a JSON object, got {type(data).__name__}", "job")
    unknown = sorted(set(data) - set(API_KEYS))
    if unknown:
        raise Refused(422, f"unknown key(s) {[k if len(k) <= 40 else k[:37] + '...' for k in unknown]}; a job takes "
                      f"{list(API_KEYS)} (and a '{image_field}' file for TI2V)", unknown[0])
    if state.task == "t2v" and blob is not None:
        raise Refused(422, f"{image_field} is for TI2V, but this service runs a T2V model: drop the image",
                      image_field)
    if state.task == "ti2v" and blob is None:
        raise Refused(422, f"this service runs a TI2V model: send the first image as a '{image_field}' file",
                      image_field)
    try:
        upload = save_upload(state.upload_dir, state.limits, blob, image_field) if blob is not None else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rounding notes are in the job's "notes"
                job = job_from_dict(dict(data, first_image_path=upload), state.task, state.defaults)
            job.settings.notes[:0] = list(notes)
            check_limits(job, state.limits, data)
            return state.board.submit(job, upload, bind=bind_files)  # the id is taken only now
        except BaseException:
            if upload and os.path.exists(upload):
                os.unlink(upload)
            raise
    except Refused:
        raise
    except BoardFull as exc:
        raise Refused(503, f"{exc}; retry later", "queue", {"Retry-After": "5"}) from None
    except ValueError as exc:  # a SettingError names its field; other checks are read for the key they name
        field = getattr(exc, "field", None)
        field = {"first_image_path": image_field}.get(field, field) if field else field_of(str(exc))
        message = api_message(str(exc)).replace("a 'first_image' file", f"a '{image_field}' file")
        raise Refused(422, message, field) from None


def finished_files(board, job_id: str) -> JobRecord:
    """The record of a done job whose video and record are on disk; Refused 404 / 409 otherwise."""
    rec = board.record(job_id)
    if rec is None:
        raise Refused(404, f"no job {job_id}", "id")
    if rec.state != DONE:
        raise Refused(409, f"job {job_id} is {rec.state}: its files exist once it is done", "id")
    if not (rec.video_path and os.path.isfile(rec.video_path) and rec.json_path and os.path.isfile(rec.json_path)):
        raise Refused(404, f"job {job_id} is done but its files are no longer in the save folder", "id")
    return rec
