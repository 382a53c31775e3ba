"""The denoising loop: [cond, uncond] batch, classifier-free guidance, scheduler steps."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint
from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from .scheduler import FlowMatchScheduler

# predict(latent_batch, timestep_batch) -> velocity of the same shape as latent_batch
Predictor = Callable[[Tensor, Tensor], Tensor]
# on_step(steps_done, steps_total), called after every scheduler step (progress reports)
StepCallback = Callable[[int, int], None]


def uses_guidance(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def guide(prediction: Tensor, guidance_scale: float) -> Tensor:
    """uncond + g * (cond - uncond) for a prediction batched as [cond, uncond]."""
    cond, uncond = mint.chunk(prediction, 2, dim=0)
    return uncond + guidance_scale * (cond - uncond)


def denoise(predict: Predictor, latents: Tensor, scheduler: FlowMatchScheduler, num_inference_steps: int,
            time_shift: float, guidance_scale: float, model_dtype=ms.float32, progress: bool = True,
            on_step: Optional[StepCallback] = None) -> Tensor:
    """Run the flow-matching loop from `latents` (noise, float32); returns the final latents (float32)."""
    scheduler.set_timesteps(num_inference_steps, time_shift)
    latents = latents.astype(ms.float32)
    cfg = uses_guidance(guidance_scale)
    for i, t in enumerate(progress_bar(scheduler.timesteps, desc="denoising", unit="step", disable=not progress)):
        batch = mint.cat([latents, latents], dim=0) if cfg else latents
        timestep = Tensor(np.full((batch.shape[0],), t, dtype=np.float32)).astype(model_dtype)
        velocity = predict(batch.astype(model_dtype), timestep)
        if cfg:
            velocity = guide(velocity, guidance_scale)
        latents = scheduler.step(velocity, i, latents)
        if on_step is not None:
            on_step(i + 1, int(num_inference_steps))
    return latents
