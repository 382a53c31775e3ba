"""StepVideoPipeline: prompt (and first image) in, video out, for T2V and TI2V.

The Python API (one process, everything loaded once):

    pipe = StepVideoPipeline.from_pretrained(model_dir)        # encoders and VAE in-process
    frames = pipe("a cat on a piano", infer_steps=30, seed=7)  # (t, h, w, 3) uint8
    pipe.save(frames, "cat.mp4")

The steps are separate so that a multi-rank run can place them: `encode_conditions` (text and
image embeddings, rank 0), `initial_noise` (every rank, from the seed), `denoise` (one
process; a parallel run calls `parallel.parallel_denoise` with the same Conditions), `decode` and
`write_outputs` (rank 0). `generate` chains them in one process for a GenerationSettings. The
pipeline talks to the text encoders and the VAE through two small interfaces, implemented both by
the HTTP client and by in-process models.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol, Tuple

import numpy as np
from mindspore import Tensor

from ..formats.atomic import write_json
from ..models.dit import StepVideoModel
from ..ops.quant import resolve_weights
from .. import capabilities
from ..runtime import device_name
from .. import video as video_io
from .sampling import denoise
from .scheduler import FlowMatchScheduler
from .settings import PER_VIDEO_SETTINGS, GenerationSettings
from .step_cache import CacheSettings, StepCache

CALL_SETTINGS = tuple(PER_VIDEO_SETTINGS)  # what `pipe(prompt, **settings)` accepts
OUTPUT_TYPES = ("np", "latent")


class TextEncoder(Protocol):
    def caption(self, prompts) -> Dict[str, np.ndarray]: ...  # y, y_mask, clip_embedding


class VideoVAE(Protocol):
    def vae_decode(self, latents: np.ndarray) -> np.ndarray: ...
    def vae_encode(self, frames: np.ndarray, seed: int = 0) -> np.ndarray: ...


@dataclass
class Conditions:
    """Everything the denoising loop needs besides the noise; plain numpy, so it can be broadcast."""

    y: np.ndarray                 # (2, Lt, C_llm) [cond, uncond]
    y_mask: np.ndarray            # (2, Lclip + Lt)
    clip_embedding: np.ndarray    # (2, Lclip, C_clip)
    condition: Optional[np.ndarray] = None  # TI2V: (2, f_lat, C, h, w), image latent at frame 0
    motion_score: Optional[float] = None

    def tensors(self, dtype) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(y, y_mask, clip_embedding, condition) as the DiT takes them: floats in `dtype`, the mask as is."""
        condition = None if self.condition is None else Tensor(self.condition, dtype)
        return Tensor(self.y, dtype), Tensor(self.y_mask), Tensor(self.clip_embedding, dtype), condition

    def check_finite(self) -> None:
        """Refuse NaN or inf in the embeddings or the image latent (a server's fault, before any step runs)."""
        for name, array in self.arrays().items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise FloatingPointError(f"the {name} from the encoders holds non-finite values (NaN or inf)")

    def arrays(self) -> Dict[str, np.ndarray]:
        out = {"y": self.y, "y_mask": self.y_mask, "clip_embedding": self.clip_embedding}
        if self.condition is not None:
            out["condition"] = self.condition
        return out


def single_process_denoise(model: StepVideoModel, cond: Conditions, noise: np.ndarray,
                           settings: GenerationSettings, scheduler: FlowMatchScheduler, progress: bool = True,
                           cache: Optional[StepCache] = None) -> np.ndarray:
    """The loop in this process; with an enabled step `cache` the DiT runs on a one-rank mesh (the same
    cached forward as every parallel layout), else the plain model."""
    y, mask, clip, condition = cond.tensors(model.dtype)
    if cache is not None and cache.settings.enabled:
        from ..parallel import Conditioning, Mesh, make_communicator, parallel_denoise

        mesh = Mesh.create(1, 0)
        out = parallel_denoise(mesh, make_communicator(mesh), model, Tensor(noise),
                               Conditioning(y, mask, clip, condition, cond.motion_score), scheduler,
                               settings.infer_steps, settings.time_shift, settings.cfg_scale, progress=progress,
                               cache=cache)
        return out.asnumpy()

    def predict(latents: Tensor, timestep: Tensor) -> Tensor:
        return model(latents, timestep, y, mask, clip, condition, cond.motion_score)

    out = denoise(predict, Tensor(noise), scheduler, settings.infer_steps, settings.time_shift,
                  settings.cfg_scale, model_dtype=model.dtype, progress=progress)
    return out.asnumpy()


@dataclass
class GenerationResult:
    latents: np.ndarray
    video_path: Optional[str] = None
    json_path: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)


class StepVideoPipeline:
    def __init__(self, transformer: StepVideoModel, scheduler: FlowMatchScheduler,
                 text_encoder: Optional[TextEncoder] = None, vae: Optional[VideoVAE] = None,
                 progress: bool = True):
        self.transformer = transformer
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.vae = vae
        self.progress = progress
        self.last_cache: Optional[dict] = None  # the step cache's record of the last denoising loop

    @classmethod
    def from_pretrained(cls, model_dir: str, device: Optional[str] = None, caption_url: Optional[str] = None,
                        vae_url: Optional[str] = None, auth_token: Optional[str] = None,
                        transformer_dir: str = "transformer", progress: bool = True,
                        weights: Optional[str] = None) -> "StepVideoPipeline":
        """Load a released model directory: the DiT, the scheduler, and the text encoders and VAE in this
        process, or HTTP clients of the servers at `caption_url` / `vae_url` ('local' = in-process).
        `device`: 'Ascend' or 'CPU' (default: Ascend when present). `weights`: 'int8' holds the DiT blocks'
        linear weights in int8 with per-channel scales (quantized while loading released weights), 'full'
        the working dtype; default: what the transformer folder holds. Every path and server is checked
        before any weight is read."""
        from ..formats import checkpoint
        from .. import runtime
        from .backends import check_local_dirs, model_folder_problem, open_backends

        if not os.path.isdir(model_dir):
            raise ValueError(f"model_dir={model_dir!r} is not a directory: pass the downloaded model folder")
        problem = model_folder_problem(model_dir, [os.path.join(transformer_dir, "config.json")], "model_dir")
        if problem:
            raise ValueError(problem)
        transformer = os.path.join(model_dir, transformer_dir)
        config = checkpoint.read_config(transformer)
        checkpoint.checkpoint_files(transformer)
        weights = resolve_weights(weights, config, transformer)
        check_local_dirs(model_dir, caption_url, vae_url)
        rt = runtime.init(device)
        text, vae = open_backends(model_dir, caption_url, vae_url, token=auth_token, progress=progress)
        model = StepVideoModel.from_pretrained(transformer, config=config, dtype=rt.compute_dtype, progress=progress,
                                               weights=weights)
        scheduler = FlowMatchScheduler.from_dir(os.path.join(model_dir, "scheduler"))
        return cls(model, scheduler, text, vae, progress=progress)

    def settings_for(self, prompt: str, first_image: Optional[str] = None, **settings) -> GenerationSettings:
        """The resolved GenerationSettings of a call (task defaults, rounding notes, every check)."""
        unknown = sorted(set(settings) - set(CALL_SETTINGS))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}: pipe(prompt, first_image=..., **settings) takes "
                             f"{list(CALL_SETTINGS)}")
        if first_image is not None and not isinstance(first_image, (str, os.PathLike)):
            raise ValueError(f"first_image must be the path of a PNG or JPEG file, got {type(first_image).__name__}")
        if self.task == "t2v" and first_image is not None:
            raise ValueError("first_image is for TI2V, but this transformer is T2V: drop it or load the TI2V weights")
        s = GenerationSettings(prompt=prompt, task=self.task,
                               first_image_path=None if first_image is None else os.fspath(first_image),
                               **settings).resolved()
        if s.task == "ti2v":
            video_io.load_image(s.first_image_path)  # readable, before any model work
        return s

    def __call__(self, prompt: str, first_image: Optional[str] = None, output_type: str = "np",
                 **settings) -> np.ndarray:
        """Generate one video: frames (t, h, w, 3) uint8, or the final latents (1, f, c, h/16, w/16)
        float32 with output_type='latent'. `settings`: any of CALL_SETTINGS (defaults: the task's)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: use one of {list(OUTPUT_TYPES)}")
        s = self.settings_for(prompt, first_image, **settings)
        latents = self.denoise(s, self.encode_conditions(s), self.initial_noise(s))
        if output_type == "latent":
            return latents
        return video_io.frames_to_uint8(self.decode(latents)[0])

    @staticmethod
    def save(frames: np.ndarray, path: str, overwrite: bool = False) -> str:
        """Write frames (t, h, w, 3) uint8 as an H.264 MP4 at 25 fps (atomically) -> the path written. An
        existing file is never replaced unless overwrite=True: the video goes to NAME-1.mp4, NAME-2.mp4, ...
        as on the command line, so running the same script twice keeps both."""
        from ..formats.output_names import check_save_folder, free_stem

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (t, h, w, 3) uint8 as pipe(...) returns, got {frames.shape} {frames.dtype}")
        path = os.fspath(path)
        if not path.lower().endswith(".mp4"):
            raise ValueError(f"path={path!r}: give a file name ending in .mp4")
        if os.path.isdir(path):
            raise ValueError(f"path={path!r} is a folder: give a file name ending in .mp4")
        folder, name = os.path.split(os.path.abspath(path))
        check_save_folder(folder, "pipe.save: the folder")  # a clear refusal, not a temporary file's traceback
        stem = free_stem(folder, name[:-4], overwrite, extensions=(name[-4:],))
        return video_io.write_mp4(frames, os.path.join(os.path.dirname(path), stem + name[-4:]))

    @property
    def task(self) -> str:
        return "ti2v" if self.transformer.use_additional_conditions else "t2v"

    # ---- the steps ---------------------------------------------------------------------
    def encode_conditions(self, s: GenerationSettings) -> Conditions:
        if self.text_encoder is None:
            raise RuntimeError("this pipeline has no text encoder: give it a caption client or a CaptionEncoder")
        data = self.text_encoder.caption([s.prompt + s.pos_magic, s.neg_magic])
        cond = Conditions(np.asarray(data["y"], np.float32), np.asarray(data["y_mask"]),
                          np.asarray(data["clip_embedding"], np.float32))
        if s.task == "ti2v":
            if self.vae is None:
                raise RuntimeError("TI2V needs a VAE to encode the first image: give the pipeline a VAE client")
            image = video_io.image_to_condition(video_io.load_image(s.first_image_path), s.height, s.width)
            latent = np.asarray(self.vae.vae_encode(image, seed=s.seed), np.float32)  # (1, 1, C, h, w)
            shape = s.latent_shape(self.transformer.in_channels)
            if latent.shape[2:] != shape[2:]:
                raise RuntimeError(f"the VAE encoded the first image to {latent.shape}, expected (1, 1) + {shape[2:]}")
            condition = np.zeros(shape, np.float32)
            condition[:, :1] = latent[:, :1]
            cond.condition = np.concatenate([condition, condition], axis=0)  # the same for cond and uncond
            cond.motion_score = float(s.motion_score)
        return cond

    def initial_noise(self, s: GenerationSettings) -> np.ndarray:
        """Standard normal latents from the seed: identical on every rank."""
        rng = np.random.default_rng(s.seed)
        return rng.standard_normal(s.latent_shape(self.transformer.in_channels), dtype=np.float32)

    def denoise(self, s: GenerationSettings, cond: Conditions, noise: np.ndarray) -> np.ndarray:
        cond.check_finite()
        cache = StepCache(CacheSettings.of(s))
        latents = single_process_denoise(self.transformer, cond, noise, s, self.scheduler, self.progress, cache)
        if not cache.settings.enabled:
            cache.step = s.infer_steps  # the plain loop ran every block of every step
            cache.num_layers = self.transformer.num_layers
        self.last_cache = cache.record()  # the `cache` entry of the run's record
        if not np.isfinite(latents).all():
            raise FloatingPointError("the denoising gave non-finite latents (NaN or inf)")
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.vae is None:
            raise RuntimeError("this pipeline has no VAE: give it a VAE client or an in-process VAE")
        return np.asarray(self.vae.vae_decode(latents), np.float32)

    def write_outputs(self, frames: np.ndarray, s: GenerationSettings, save_path: str, output_file_name: str = "",
                      name_suffix: str = "", extra: Optional[dict] = None, overwrite: bool = False) -> (str, str):
        """Write the MP4 (uint8, 540p centre crop when larger, 25 fps) and a JSON of the run beside it,
        under a name no earlier video holds (`output_stem`) unless `overwrite`."""
        clip = video_io.crop_to_540p(video_io.frames_to_uint8(frames[0]))
        os.makedirs(save_path, exist_ok=True)
        stem = output_stem(save_path, s.prompt, output_file_name, name_suffix, overwrite)
        mp4 = video_io.write_mp4(clip, os.path.join(save_path, f"{stem}.mp4"))
        record = {"settings": s.to_dict(), "video": os.path.basename(mp4), "frames": int(clip.shape[0]),
                  "size": [int(clip.shape[1]), int(clip.shape[2])], "mindspore": capabilities.in_use(device_name())}
        record.update(extra or {})
        json_path = os.path.join(save_path, f"{stem}.json")
        write_json(json_path, record)
        return mp4, json_path

    def generate(self, settings: GenerationSettings, save_path: Optional[str] = None, output_file_name: str = "",
                 name_suffix: str = "", extra: Optional[dict] = None) -> GenerationResult:
        s = settings.resolved()
        if save_path is not None:  # a folder that cannot be written fails now, not after the generation
            from ..formats.output_names import check_save_folder

            check_save_folder(save_path, "save_path")
        if s.task != self.task:
            raise ValueError(f"task={s.task!r} does not fit this transformer ({self.task}): "
                             f"use_additional_conditions={self.transformer.use_additional_conditions}")
        timings = {}
        t0 = time.perf_counter()
        cond = self.encode_conditions(s)
        timings["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = self.denoise(s, cond, self.initial_noise(s))
        timings["denoise_s"] = time.perf_counter() - t0
        result = GenerationResult(latents=latents, timings=timings)
        if save_path is not None:
            t0 = time.perf_counter()
            frames = self.decode(latents)
            timings["decode_s"] = time.perf_counter() - t0
            info = dict(extra or {}, timings=timings, cache=self.last_cache)
            result.video_path, result.json_path = self.write_outputs(frames, s, save_path, output_file_name, name_suffix, info)
        return result


def output_stem(save_path: str, prompt: str, output_file_name: str = "", name_suffix: str = "",
                overwrite: bool = False) -> str:
    """The MP4/JSON name: the given name (else the prompt's start) and suffix, with a numbered suffix
    when a video of that name exists in `save_path` already, unless `overwrite`."""
    from ..formats.output_names import free_stem

    stem = output_file_name or safe_stem(prompt)
    if name_suffix:
        stem = f"{stem}-{name_suffix}"
    return free_stem(os.path.abspath(save_path), stem, overwrite)


def safe_stem(prompt: str, limit: int = 40) -> str:
    """A file name from a prompt: its first characters, letters and digits of any script kept as they are
    (readable), every run of anything else (spaces, punctuation, path separators, the shell's special
    characters) one '_', so the name needs no quoting in a shell."""
    stem = re.sub(r"[^\w.-]+", "_", prompt.strip())
    stem = re.sub(r"_{2,}", "_", stem)[:limit].strip("._-")
    return stem or "video"
