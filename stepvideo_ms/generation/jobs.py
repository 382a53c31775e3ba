"""One video to make (a job) and the prompts file of a batch run.

A job is a prompt plus any per-video setting; whatever it leaves out comes from the command line,
then from the task's defaults (diffusion/settings.py). `job_from_dict` checks a job completely
(names, types, sizes, the first image is readable) so that a bad job is refused before any weight
is read; the batch run and the generation service both use it.

Prompts file (`run_parallel.py --prompts_file jobs.jsonl`): one JSON object per line, e.g.

    {"prompt": "a cat playing the piano", "seed": 7, "output_file_name": "cat"}
    {"prompt": "a kite", "first_image_path": "kite.png", "motion_score": 10, "num_frames": 51}

Blank lines are skipped. Keys: prompt (required), first_image_path (TI2V), output_file_name,
and the settings of PER_VIDEO_SETTINGS.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from ..diffusion.settings import PER_VIDEO_SETTINGS, GenerationSettings, SettingError, check_setting, check_text

JOB_KEYS = ("prompt", "first_image_path", "output_file_name", *PER_VIDEO_SETTINGS)
MAX_PROMPTS_FILE_BYTES = 64 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,119}$")


@dataclass
class Job:
    settings: GenerationSettings  # resolved
    output_file_name: str = ""    # empty: the writer names the file from the prompt
    name_suffix: str = ""         # appended to the file name (run_parallel.py --name_suffix)
    save_latents: Optional[str] = None  # also write the final latents there (safetensors, key 'latents')
    no_video: bool = False        # stop after the latents: no VAE decode, no MP4

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "output_file_name": self.output_file_name,
                "name_suffix": self.name_suffix, "save_latents": self.save_latents, "no_video": self.no_video}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Job":
        """A job resolved elsewhere (rank 0), rebuilt on another rank: no re-validation."""
        return cls(GenerationSettings(**data["settings"]), data["output_file_name"], data.get("name_suffix", ""),
                   data.get("save_latents"), bool(data.get("no_video", False)))


def defaults_from(args) -> dict:
    """The per-video settings given on the command line: the defaults of every job, each checked (a
    ValueError naming the flag) so that a bad one stops the run before anything loads."""
    out = {}
    for name in PER_VIDEO_SETTINGS:
        value = getattr(args, name, None)
        if value is not None:
            try:
                out[name] = check_setting(name, value)
            except SettingError as exc:
                raise SettingError(name, f"--{exc}") from None
    return out


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity): give a finite number")


def loads_json(text):
    """json.loads for what a user sends (a prompts-file line, an HTTP body or form field), refusing what is
    not JSON: NaN / Infinity literals, over-long integer literals, nesting deeper than Python's stack.
    Raises ValueError with the reason."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # the hook's refusal, or an integer literal over Python's digit limit
        raise ValueError(str(exc).split(";")[0]) from None


def job_from_dict(data, task: str, defaults: Optional[Mapping] = None, check_image: bool = True) -> Job:
    """A checked, resolved Job from a JSON object; `defaults` fill the settings it leaves out.
    Raises SettingError (a ValueError) naming the key (`.field`) and the fix; every number is checked by
    diffusion.settings.check_setting (finite, in range, integers not booleans)."""
    from .. import video

    if not isinstance(data, dict):
        raise SettingError("job", f"a job must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(JOB_KEYS))
    if unknown:
        raise SettingError(unknown[0], f"unknown key(s) {[_short(k) for k in unknown]}; a job takes {list(JOB_KEYS)}")
    if "prompt" not in data:
        raise SettingError("prompt", "missing key 'prompt'")
    prompt = check_text("prompt", data["prompt"])
    values = {k: v for k, v in (defaults or {}).items() if k in PER_VIDEO_SETTINGS and v is not None}
    for name in PER_VIDEO_SETTINGS:
        if name in data and data[name] is not None:
            values[name] = check_setting(name, data[name])
    image = data.get("first_image_path")
    if image is not None:
        image = check_text("first_image_path", image)
        if task == "t2v":
            raise SettingError("first_image_path", "first_image_path is for TI2V, but the model is T2V: drop the image")
    if task == "t2v" and "motion_score" in data:
        raise SettingError("motion_score", "motion_score is for TI2V, but the model is T2V: drop it")
    name = data.get("output_file_name") or ""
    if name:
        name = check_text("output_file_name", name)
        if not _NAME_RE.match(name) or name.endswith("."):
            raise SettingError("output_file_name", f"output_file_name={_short(name)!r}: use letters, digits, '.', "
                               "'_', '-' and spaces (no path), at most 120 characters")
    settings = GenerationSettings(prompt=prompt, task=task, first_image_path=image, **values).resolved()
    if task == "ti2v" and check_image:
        try:
            video.load_image(settings.first_image_path)
        except ValueError as exc:
            raise SettingError("first_image_path", str(exc)) from None
    return Job(settings, name)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_prompts_file(path: str, task: str, defaults: Optional[Mapping] = None
                      ) -> Tuple[List[Tuple[int, Job]], List[str]]:
    """([(line number, job)], [error naming its line]) for every non-blank line of a JSONL file."""
    import os
    import warnings

    if not os.path.isfile(path):
        raise ValueError(f"--prompts_file {path}: no such file")
    if os.path.getsize(path) > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(f"--prompts_file {path} is over {MAX_PROMPTS_FILE_BYTES // 2**20} MiB: split it")
    jobs: List[Tuple[int, Job]] = []
    errors: List[str] = []
    names: Dict[str, int] = {}
    with open(path, "r", encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompts_file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                data = loads_json(line)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rounding notes travel in settings.notes
                job = job_from_dict(data, task, defaults)
            if job.output_file_name:
                if job.output_file_name in names:
                    raise ValueError(f"output_file_name {job.output_file_name!r} is also used on line "
                                     f"{names[job.output_file_name]}: give each video its own name")
                names[job.output_file_name] = number
            jobs.append((number, job))
        except ValueError as exc:
            errors.append(f"{path} line {number}: {exc}")
    return jobs, errors
