"""Generation settings: the upstream defaults of each task, and their validation.

One place for every default of a generation request (size, frames, steps, guidance, shift,
magic prompts, motion score) and for the shape rules (frames in multiples of 17, height and width
in multiples of 16).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

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


# the best-practice presets of the README's table (the web page's choices)
PRESETS = {
    "T2V": dict(task="t2v", num_frames=204, infer_steps=50, cfg_scale=9.0, time_shift=13.0),
    "T2V-Turbo": dict(task="t2v", num_frames=204, infer_steps=15, cfg_scale=5.0, time_shift=17.0),
    "TI2V": dict(task="ti2v", num_frames=102, infer_steps=50, cfg_scale=9.0, time_shift=13.0, motion_score=5.0),
}

# the settings one video may set (beyond its prompt and first image), and the type each takes
PER_VIDEO_SETTINGS = {"num_frames": int, "height": int, "width": int, "infer_steps": int, "cfg_scale": float,
                      "time_shift": float, "motion_score": float, "pos_magic": str, "neg_magic": str, "seed": int}


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
    notes: List[str] = field(default_factory=list)

    def resolved(self) -> "GenerationSettings":
        """A copy with the task's defaults filled in, shapes rounded (with a warning) and every value checked."""
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"task={self.task!r} is not supported: use 't2v' or 'ti2v'")
        values = dataclasses.asdict(self)
        for key, default in TASK_DEFAULTS[self.task].items():
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
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt is empty: pass a text prompt (--prompt \"...\")")
        for name in ("num_frames", "height", "width", "infer_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0 (9.0 for Step-Video, 5.0 for Turbo)")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift={self.time_shift} must be positive (13.0 for Step-Video, 17.0 for Turbo)")
        if self.task == "ti2v":
            if not self.first_image_path:
                raise ValueError("task ti2v needs a first image: pass --first_image_path IMAGE")
            if not os.path.isfile(self.first_image_path):
                raise ValueError(f"first_image_path={self.first_image_path!r}: no such file")
            if self.motion_score is None or self.motion_score < 0:
                raise ValueError(f"motion_score={self.motion_score} must be >= 0 (2 steady, 5 default, 10/20 lively)")

    def latent_shape(self, channels: int, batch: int = 1):
        """(batch, latent frames, channels, height/16, width/16) of a resolved request."""
        return (batch, self.num_frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK, channels,
                self.height // SPATIAL_COMPRESSION, self.width // SPATIAL_COMPRESSION)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
