"""Generation settings: the upstream defaults of each task, and their validation.

One place for every default of a generation request (size, frames, steps, guidance, shift,
magic prompts, motion score) and for the shape rules (frames in multiples of 17, height and width
in multiples of 16).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .step_cache import CACHE_DEFAULTS, CACHE_HINTS, CACHE_RANGES, CACHE_SETTINGS
from ..models.vae_config import FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION

FPS = 25

T2V_POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
T2V_NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"
TI2V_POS_MAGIC = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、超高清、"
                  "画面稳定、逼真的细节、专业级构图、超细节、清晰。")
TI2V_NEG_MAGIC = "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指"

# Upstream's argparse default for time_shift is 7.0, but its documented commands and best-practice
# table use 13.0 (17.0 for Turbo): we default to the documented value.
TASK_DEFAULTS = {
    "t2v": dict(num_frames=204, height=544, width=992, infer_steps=50, cfg_scale=9.0, time_shift=13.0,
                motion_score=None, pos_magic=T2V_POS_MAGIC, neg_magic=T2V_NEG_MAGIC),
    "ti2v": dict(num_frames=102, height=544, width=992, infer_steps=50, cfg_scale=9.0, time_shift=13.0,
                 motion_score=5.0, pos_magic=TI2V_POS_MAGIC, neg_magic=TI2V_NEG_MAGIC),
}

# The upstream best-practice sampling of each released model (the launch scripts' --preset, the web
# page's choices): name -> (task, label, the settings that differ per model).
PRESETS = {
    "t2v": dict(infer_steps=50, cfg_scale=9.0, time_shift=13.0),
    "t2v-turbo": dict(infer_steps=15, cfg_scale=5.0, time_shift=17.0),
    "ti2v": dict(infer_steps=50, cfg_scale=9.0, time_shift=13.0, motion_score=5.0),
}
PRESET_TASKS = {"t2v": "t2v", "t2v-turbo": "t2v", "ti2v": "ti2v"}
PRESET_LABELS = {"t2v": "T2V", "t2v-turbo": "T2V-Turbo", "ti2v": "TI2V"}


def labelled_presets() -> dict:
    """The presets as the web page shows them: label -> task and settings."""
    return {PRESET_LABELS[name]: dict(task=PRESET_TASKS[name], **values) for name, values in PRESETS.items()}


# the settings one video may set (beyond its prompt and first image), and the type each takes
PER_VIDEO_SETTINGS = {"num_frames": int, "height": int, "width": int, "infer_steps": int, "cfg_scale": float,
                      "time_shift": float, "motion_score": float, "pos_magic": str, "neg_magic": str, "seed": int,
                      **CACHE_SETTINGS}


# The range of every number a user gives (command line, prompts file, HTTP job, Python API): checked in
# one place (`check_setting`) before anything loads or queues. Sizes are before rounding (a height of 8
# becomes 16). The seed is numpy's: `np.random.default_rng(seed)` draws the initial noise (and the VAE
# server's image latent sample) from PCG64 seeded with the integer as given, identically on every rank;
# 2**63 - 1 is also the largest seed the VAE server takes.
MAX_SEED = 2 ** 63 - 1
SETTING_RANGES = {"num_frames": (1, 1024), "height": (1, 4096), "width": (1, 4096), "infer_steps": (1, 1000),
                  "cfg_scale": (0.0, 100.0), "time_shift": (0.0, 1000.0), "motion_score": (0.0, 100.0),
                  "seed": (0, MAX_SEED), **CACHE_RANGES}
OPEN_BELOW = {"time_shift"}  # the lower bound itself is refused
SETTING_HINTS = {"cfg_scale": "9.0 for Step-Video, 5.0 for Turbo", "time_shift": "13.0 for Step-Video, 17.0 for Turbo",
                 "motion_score": "2 steady, 5 default, 10/20 lively", **CACHE_HINTS}


class SettingError(ValueError):
    """A bad value of one setting; `field` names it (the HTTP API returns it with the 4xx)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def range_text(name: str) -> str:
    low, high = SETTING_RANGES[name]
    if isinstance(low, float):
        return f"above {low:g}, up to {high:g}" if name in OPEN_BELOW else f"from {low:g} to {high:g}"
    return f"from {low} to {high}"


def check_setting(name: str, value):
    """`value` of the per-video setting `name` as its type (int, float, str), or SettingError naming it:
    integers are integers (not booleans, not 7.0), numbers are finite and within SETTING_RANGES."""
    kind = PER_VIDEO_SETTINGS[name]
    hint = f" ({SETTING_HINTS[name]})" if name in SETTING_HINTS else ""
    if kind is str:
        return check_text(name, value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        what = "an integer" if kind is int else "a number"
        raise SettingError(name, f"{name} must be {what}, got {_shown(value)}")
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise SettingError(name, f"{name} must be an integer, got {_shown(value)}")
        value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:
            raise SettingError(name, f"{name}={_shown(value)} is too large: give a number {range_text(name)}"
                                     f"{hint}") from None
        if not math.isfinite(value):
            raise SettingError(name, f"{name}={value} is not a finite number: give a number {range_text(name)}{hint}")
    low, high = SETTING_RANGES[name]
    if value < low or (name in OPEN_BELOW and value == low):
        raise SettingError(name, f"{name}={_shown(value)} is under the allowed range: give "
                                 f"{'an integer' if kind is int else 'a number'} {range_text(name)}{hint}")
    if value > high:
        raise SettingError(name, f"{name}={_shown(value)} is over the limit of {high}: give "
                                 f"{'an integer' if kind is int else 'a number'} {range_text(name)}{hint}")
    return value


def check_text(name: str, value) -> str:
    """A string that can travel (UTF-8, no NUL), or SettingError naming `name`."""
    if not isinstance(value, str):
        raise SettingError(name, f"{name} must be a string, got {_shown(value)}")
    if "\x00" in value:
        raise SettingError(name, f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SettingError(name, f"{name} is not valid Unicode text ({exc.reason} at character {exc.start})") \
            from None
    return value


def _shown(value) -> str:
    """A value for a message, short even for a 5000-digit integer."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class GenerationSettings:
    prompt: str
    task: str = "t2v"
    first_image_path: Optional[str] = None
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    infer_steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    time_shift: Optional[float] = None
    motion_score: Optional[float] = None
    pos_magic: Optional[str] = None
    neg_magic: Optional[str] = None
    seed: int = 1234
    cache_threshold: Optional[float] = None  # the step cache (diffusion/step_cache.py); None: its default
    cache_warmup: Optional[int] = None
    cache_first: Optional[int] = None
    cache_last: Optional[int] = None
    cache_max_skip: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    def resolved(self) -> "GenerationSettings":
        """A copy with the task's defaults filled in, shapes rounded (with a warning) and every value checked."""
        if self.task not in TASK_DEFAULTS:
            raise SettingError("task", f"task={self.task!r} is not supported: use 't2v' or 'ti2v'")
        values = dataclasses.asdict(self)
        for key, default in dict(TASK_DEFAULTS[self.task], **CACHE_DEFAULTS).items():
            if values[key] is None:
                values[key] = default
        s = GenerationSettings(**values)
        s.notes = []
        s._check()
        s.num_frames = s._round("num_frames", s.num_frames, FRAMES_PER_CHUNK)
        s.height = s._round("height", s.height, SPATIAL_COMPRESSION)
        s.width = s._round("width", s.width, SPATIAL_COMPRESSION)
        return s

    def _round(self, name: str, value: int, multiple: int) -> int:
        used = max(multiple, value // multiple * multiple)
        if used != value:
            note = f"{name}={value} is not a multiple of {multiple}: using {name}={used}"
            warnings.warn(note, stacklevel=3)
            self.notes.append(note)
        return used

    def _check(self):
        check_text("prompt", self.prompt)
        if not self.prompt.strip():
            raise SettingError("prompt", "prompt is empty: pass a text prompt (--prompt \"...\")")
        for name in PER_VIDEO_SETTINGS:
            value = getattr(self, name)
            if value is None and name == "motion_score" and self.task == "t2v":
                continue  # T2V has no motion score
            setattr(self, name, check_setting(name, value))
        if self.task == "ti2v":
            if not isinstance(self.first_image_path, str) or not self.first_image_path:
                raise SettingError("first_image_path", "task ti2v needs a first image: pass --first_image_path IMAGE")
            if not os.path.isfile(self.first_image_path):
                raise SettingError("first_image_path", f"first_image_path={self.first_image_path!r}: no such file")

    def latent_shape(self, channels: int, batch: int = 1):
        """(batch, latent frames, channels, height/16, width/16) of a resolved request."""
        return (batch, self.num_frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK, channels,
                self.height // SPATIAL_COMPRESSION, self.width // SPATIAL_COMPRESSION)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
