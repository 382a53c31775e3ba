"""The text encoders and the VAE in this process, behind the same methods as the HTTP client
(`caption`, `vae_decode`, `vae_encode`), so the pipeline runs with either."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np


class InProcessBackends:
    def __init__(self, caption_encoder=None, vae=None, progress: bool = True):
        self.caption_encoder = caption_encoder
        self.vae = vae
        self.progress = progress

    @classmethod
    def from_model_dir(cls, model_dir: str, llm_dir: str = "step_llm", clip_dir: str = "hunyuan_clip",
                       vae_dir: str = "vae", progress: bool = True) -> "InProcessBackends":
        from ..models.caption import CaptionEncoder
        from ..models.vae import AutoencoderKL

        encoder = CaptionEncoder.from_model_dir(model_dir, llm_dir=llm_dir, clip_dir=clip_dir, progress=progress)
        vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, vae_dir), progress=progress)
        return cls(encoder, vae, progress)

    def caption(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        if self.caption_encoder is None:
            raise RuntimeError("no caption encoder loaded in this process")
        return self.caption_encoder.encode(list(prompts))

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        if self.vae is None:
            raise RuntimeError("no VAE loaded in this process")
        return self.vae.decode_numpy(latents, progress=self.progress)

    def vae_encode(self, frames: np.ndarray, seed: int = 0, sample: bool = True) -> np.ndarray:
        if self.vae is None:
            raise RuntimeError("no VAE loaded in this process")
        return self.vae.encode_numpy(frames, seed=seed, sample=sample, progress=self.progress)
