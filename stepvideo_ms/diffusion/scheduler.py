"""Flow-matching Euler scheduler with the SD3-style time shift (upstream FlowMatchDiscreteScheduler).

sigmas = shift(linspace(1, 0, steps + 1)), shift(t) = s*t / (1 + (s-1)*t); with reverse=False (the
upstream default) the schedule is 1 - sigmas, running from 0 (noise) to 1 (data). The model is fed
sigmas[i] as its timestep and the Euler step is x + v * (sigmas[i+1] - sigmas[i]).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

SCHEDULER_CONFIG = "scheduler_config.json"


def shift_time(t: np.ndarray, time_shift: float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float32)
    s = np.float32(time_shift)
    return (s * t) / (np.float32(1) + (s - np.float32(1)) * t)


@dataclass
class FlowMatchScheduler:
    num_train_timesteps: int = 1000
    reverse: bool = False
    solver: str = "euler"

    def __post_init__(self):
        if self.solver != "euler":
            raise ValueError(f"solver={self.solver!r} is not supported: use 'euler'")
        self.sigmas: Optional[np.ndarray] = None

    @classmethod
    def from_dir(cls, path: Optional[str]) -> "FlowMatchScheduler":
        """From a `scheduler/` folder (or its scheduler_config.json); defaults when absent."""
        if path is None:
            return cls()
        cfg_path = path if path.endswith(".json") else os.path.join(path, SCHEDULER_CONFIG)
        if not os.path.isfile(cfg_path):
            return cls()
        with open(cfg_path, "r", encoding="utf-8") as fh:
            cfg = json.load(fh)
        return cls(**{k: cfg[k] for k in ("num_train_timesteps", "reverse", "solver") if k in cfg})

    def set_timesteps(self, num_inference_steps: int, time_shift: float = 13.0) -> np.ndarray:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1")
        if time_shift <= 0:
            raise ValueError(f"time_shift={time_shift} must be positive (Step-Video uses 13, Turbo 17)")
        sigmas = shift_time(np.linspace(1.0, 0.0, int(num_inference_steps) + 1, dtype=np.float32), time_shift)
        if not self.reverse:
            sigmas = np.float32(1) - sigmas
        self.sigmas = sigmas.astype(np.float32)
        return self.timesteps

    @property
    def timesteps(self) -> np.ndarray:
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps before asking for timesteps")
        return self.sigmas[:-1]

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """One Euler step from sigmas[step_index] to sigmas[step_index + 1], in float32."""
        dt = float(self.sigmas[step_index + 1] - self.sigmas[step_index])
        return sample.astype(ms.float32) + model_output.astype(ms.float32) * dt
