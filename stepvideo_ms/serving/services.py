"""The two services a model server can hold: what each endpoint reads, checks and runs.

A service knows its model and the request schema of its endpoints; it knows nothing of HTTP.
Each endpoint is a pair: `parse(message) -> job` (every check, raising RequestError, before any
model work) and `run(job) -> (fields, tensors, bf16 names)`, which the server calls on the
device's worker thread.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..models.vae_config import (
    FRAMES_PER_CHUNK, IMAGE_FRAMES, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION,
)
from ..diffusion.settings import MAX_SEED  # one range for every seed: the jobs' and this server's
from . import protocol
from .limits import Limits, check_bool, check_choice, check_fields, check_float_tensor, check_int, check_prompts
from .protocol import Message, RequestError

Result = Tuple[dict, Dict[str, np.ndarray], Tuple[str, ...]]
Endpoints = Dict[str, Tuple[Callable[[Message], object], Callable[[object], Result]]]
RESPONSE_DTYPES = ("float32", "bfloat16")


def cell_bytes(*cells) -> int:
    """Bytes of the weights (parameters) of these MindSpore cells."""
    return sum(int(p.nbytes) for cell in cells for p in cell.get_parameters())


def _check_output(name: str, arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise FloatingPointError(f"the model produced non-finite values in {name!r}")
    return arr


class CaptionService:
    """Step-1 + HunyuanCLIP: POST /caption-api {prompts} -> y, y_mask, clip_embedding."""

    name = "caption"

    def __init__(self, encoder, where: Optional[dict] = None):
        self.encoder = encoder
        self.where = where or {}

    @classmethod
    def load(cls, model_dir: str, llm_dir: str, clip_dir: str, dtype=None, progress: bool = True) -> "CaptionService":
        from ..models.caption import CaptionEncoder

        enc = CaptionEncoder.from_model_dir(model_dir, llm_dir=llm_dir, clip_dir=clip_dir, dtype=dtype,
                                            progress=progress)
        return cls(enc, {"model_dir": os.path.abspath(model_dir), "llm_dir": llm_dir, "clip_dir": clip_dir})

    def paths(self) -> List[str]:
        return [protocol.CAPTION_PATH]

    def weight_bytes(self) -> int:
        return cell_bytes(self.encoder.llm.model, self.encoder.clip.model)

    def describe(self) -> dict:
        return {**self.where, "llm_dtype": _dtype_name(self.encoder.llm.model.dtype),
                "caption_channels": self.encoder.caption_channels,
                "llm_length": self.encoder.llm_length, "clip_length": self.encoder.clip_length}

    def endpoints(self, limits: Limits) -> Endpoints:
        def parse(msg: Message) -> List[str]:
            check_fields(msg, required=("prompts",))
            return check_prompts(msg.fields["prompts"], limits)

        def run(prompts: List[str]) -> Result:
            from ..models.caption import BF16_OUTPUTS

            out = {k: _check_output(k, np.asarray(v)) for k, v in self.encoder.encode(prompts).items()}
            return {"api": "caption"}, out, tuple(k for k in BF16_OUTPUTS if k in out)

        return {protocol.CAPTION_PATH: (parse, run)}


class VaeService:
    """AutoencoderKL v2: POST /vae-api {latents} -> frames and POST /vae-encode-api {frames} -> latents."""

    name = "vae"

    def __init__(self, vae, where: Optional[dict] = None):
        self.vae = vae
        self.where = where or {}

    @classmethod
    def load(cls, vae_dir: str, dtype=None, progress: bool = True, tile_size=None,
             budget_gb: Optional[float] = None) -> "VaeService":
        """tile_size / budget_gb: spatial tiles for every decode, or when one is predicted not to fit."""
        from ..models.vae import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir, dtype=dtype, progress=progress)
        vae.set_decode_tiling(tile_size, budget_gb)
        return cls(vae, {"vae_dir": os.path.abspath(vae_dir)})

    @property
    def z_channels(self) -> int:
        return int(self.vae.config.z_channels)

    def paths(self) -> List[str]:
        return [protocol.VAE_DECODE_PATH, protocol.VAE_ENCODE_PATH]

    def weight_bytes(self) -> int:
        return cell_bytes(self.vae)

    def describe(self) -> dict:
        return {**self.where, "dtype": _dtype_name(self.vae.dtype), "z_channels": self.z_channels,
                "spatial_compression": SPATIAL_COMPRESSION,
                "latent_frames_per_chunk": LATENT_FRAMES_PER_CHUNK, "frames_per_chunk": FRAMES_PER_CHUNK,
                "decode_tile": _tiling(self.vae)}

    def endpoints(self, limits: Limits) -> Endpoints:
        z, sf = self.z_channels, SPATIAL_COMPRESSION

        def parse_decode(msg: Message):
            check_fields(msg, optional=("response_dtype",), tensors=("latents",))
            out_dtype = check_choice(msg, "response_dtype", "float32", RESPONSE_DTYPES)
            latents = check_float_tensor(
                msg, "latents", ("batch", "frames", "channels", "height", "width"),
                {"batch": (1, limits.max_batch), "frames": (1, limits.max_latent_frames), "channels": (z, z),
                 "height": (1, limits.max_latent_side), "width": (1, limits.max_latent_side)},
                {"frames": LATENT_FRAMES_PER_CHUNK})
            return latents, out_dtype

        def run_decode(job) -> Result:
            latents, out_dtype = job
            frames = _check_output("frames", self.vae.decode_numpy(latents, progress=False))
            return {"api": "vae"}, {"frames": frames}, ("frames",) if out_dtype == "bfloat16" else ()

        def parse_encode(msg: Message):
            check_fields(msg, optional=("seed", "sample", "response_dtype"), tensors=("frames",))
            seed = check_int(msg, "seed", 0, 0, MAX_SEED)
            sample = check_bool(msg, "sample", True)
            out_dtype = check_choice(msg, "response_dtype", "float32", RESPONSE_DTYPES)
            frames = check_float_tensor(
                msg, "frames", ("batch", "frames", "channels", "height", "width"),
                {"batch": (1, limits.max_batch), "frames": (1, limits.max_frames), "channels": (3, 3),
                 "height": (sf, limits.max_side), "width": (sf, limits.max_side)},
                {"height": sf, "width": sf})
            self.check_frame_count(frames.shape[1])
            return frames, seed, sample, out_dtype

        def run_encode(job) -> Result:
            frames, seed, sample, out_dtype = job
            latents = _check_output("latents", self.vae.encode_numpy(frames, seed=seed, sample=sample, progress=False))
            return {"api": "vae-encode"}, {"latents": latents}, ("latents",) if out_dtype == "bfloat16" else ()

        return {protocol.VAE_DECODE_PATH: (parse_decode, run_decode),
                protocol.VAE_ENCODE_PATH: (parse_encode, run_encode)}

    @staticmethod
    def check_frame_count(n: int):
        if n != IMAGE_FRAMES and n % FRAMES_PER_CHUNK:
            raise RequestError(f"frames: frames={n} must be {IMAGE_FRAMES} (an image) or a multiple of "
                               f"{FRAMES_PER_CHUNK}", "frames", 422)


def _dtype_name(dtype) -> str:
    return str(dtype).lower()


def _tiling(vae) -> str:
    tile = getattr(vae, "decode_tile_size", None)
    budget = getattr(vae, "decode_budget_bytes", None)
    if tile is not None:
        return f"{tile[0]}x{tile[1]} latent positions"
    if budget is not None:
        return f"when predicted over {budget / 2 ** 30:g} GiB"
    return "off"
