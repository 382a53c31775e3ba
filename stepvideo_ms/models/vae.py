"""AutoencoderKL version 2: the Step-Video video VAE (vae/vae_v2.safetensors).

Video (b, frames, 3, H, W) in [-1, 1]  <->  latents (b, frames/17*3, z, H/16, W/16).
Videos are coded in independent 17-frame chunks (3 latent frames each); decoding blends the two
frames at every chunk boundary. Encoding returns a sample of the posterior N(mean, exp(logvar)),
drawn from a seeded numpy generator (so it is reproducible, though not torch's random stream),
or its mean.

Version 1 (vae.safetensors, z 16, 5 latent frames per chunk, 3D group norms and no
(un)patchify paths) is not ported: `VAEConfig` refuses it.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn
from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from ..formats import checkpoint
from .. import runtime
from .vae_blocks import (
    CausalConv, Conv3d, ConvPixelShuffleUp, ConvPixelUnshuffleDown, Downsample2D, Downsample3D, FrameGroupNorm,
    Level, Mid, Resnet3DBlock, Upsample2D, Upsample3D, average_down, causal_padding, duplicate_up,
)
from .vae_tiled import as_tile, choose_tile, decode_tiled
from .vae_config import (
    CHECKPOINT_FILE, CHUNK_BLEND_KEEP, CONFIG_FILE, DECODER_CROPPED_FRAMES, DECODER_TEMPORAL_UP_LEVELS,
    ENCODER_TEMPORAL_DOWN_LEVELS, FRAMES_PER_CHUNK, IMAGE_FRAMES, LATENT_FRAMES_PER_CHUNK, PATCH_FACTOR,
    SPATIAL_COMPRESSION, VAEConfig, latent_frames, video_frames, LATENT_SCALE_FACTOR,
)

ArrayLike = Union[Tensor, np.ndarray]

__all__ = [
    "AutoencoderKL", "VAEConfig", "FRAMES_PER_CHUNK", "LATENT_FRAMES_PER_CHUNK", "SPATIAL_COMPRESSION",
    "blend_chunks", "latent_frames", "video_frames",
]


class VideoEncoder(nn.Cell):
    """(b, 3, t, H, W) -> (b, 2z, latent t, H/16, W/16): mean and log-variance on channels."""

    def __init__(self, config: VAEConfig, dtype=ms.float32):
        super().__init__()
        coder, z = config.encoder, config.z_channels
        widths = coder.widths()
        self.conv_in = CausalConv(config.in_channels, coder.ch, 3, dtype=dtype)
        levels, block_in = [], coder.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(coder.num_res_blocks):
                blocks.append(Resnet3DBlock(block_in, width, dtype))
                block_in = width
            down = None
            if i != len(widths) - 1:
                down = Downsample3D(width, dtype) if i in ENCODER_TEMPORAL_DOWN_LEVELS else Downsample2D(width, dtype)
            levels.append(Level(blocks, down, "downsample"))
        self.down = nn.CellList(levels)
        self.mid = Mid(block_in, dtype)
        self.norm_out = FrameGroupNorm(block_in, dtype=dtype)
        self.patch_channels = config.patch_channels
        self.out_channels = 2 * z
        self.conv_patchify = ConvPixelUnshuffleDown(block_in, self.patch_channels, PATCH_FACTOR, dtype)
        self.conv_out = CausalConv(self.patch_channels, self.out_channels, 3, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.norm_out(self.mid(h), silu=True)
        h = self.conv_patchify(h) + average_down(h, self.patch_channels, PATCH_FACTOR)
        return self.conv_out(h) + average_down(h, self.out_channels, 1)


class VideoDecoder(nn.Cell):
    """(b, z, latent t, h, w) -> (b, 3, 8 t - 7, 16 h, 16 w) for one chunk."""

    def __init__(self, config: VAEConfig, dtype=ms.float32):
        super().__init__()
        coder, z = config.decoder, config.z_channels
        widths = coder.widths()
        block_in = widths[-1]
        self.patch_channels = config.patch_channels
        self.block_in = block_in
        self.conv_in = CausalConv(z, self.patch_channels, 3, dtype=dtype)
        self.conv_unpatchify = ConvPixelShuffleUp(self.patch_channels, block_in, PATCH_FACTOR, dtype)
        self.mid = Mid(block_in, dtype)
        levels = [None] * len(widths)
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(coder.num_res_blocks + 1):
                blocks.append(Resnet3DBlock(block_in, widths[i], dtype))
                block_in = widths[i]
            up = None
            if i != 0:
                up = Upsample3D(block_in, dtype) if i in DECODER_TEMPORAL_UP_LEVELS else Upsample2D(block_in, dtype)
            levels[i] = Level(blocks, up, "upsample")
        self.up = nn.CellList(levels)
        self.norm_out = FrameGroupNorm(block_in, dtype=dtype)
        # Released naming: decoder.conv_out.weight, no inner `.conv`.
        self.conv_out = Conv3d(block_in, config.out_channels, 3, 1, causal_padding((3, 3, 3)), dtype)

    def construct(self, z: Tensor) -> Tensor:
        h = self.conv_in(z) + duplicate_up(z, self.patch_channels, 1)
        h = self.conv_unpatchify(h) + duplicate_up(h, self.block_in, PATCH_FACTOR)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        h = self.conv_out(self.norm_out(h, silu=True))
        return h[:, :, DECODER_CROPPED_FRAMES:]


def blend_chunks(frames: Tensor, chunk: int = FRAMES_PER_CHUNK, keep: float = CHUNK_BLEND_KEEP) -> Tensor:
    """Blend the last frame of each chunk with the first of the next, as upstream does (in order:
    the later frame is blended first, the earlier one then blends with that new value)."""
    n = frames.shape[1]
    if n <= chunk:
        return frames
    front = list(range(chunk - 1, n - 1, chunk))
    back = [i + 1 for i in front]
    a, b = frames[:, Tensor(np.array(front))], frames[:, Tensor(np.array(back))]
    new_b = b * keep + a * (1.0 - keep)
    new_a = a * keep + new_b * (1.0 - keep)
    parts, start = [], 0
    for i, (fa, fb) in enumerate(zip(front, back)):
        parts += [frames[:, start:fa], new_a[:, i:i + 1], new_b[:, i:i + 1]]
        start = fb + 1
    parts.append(frames[:, start:])
    return mint.cat([p for p in parts if p.shape[1]], dim=1)


class AutoencoderKL(nn.Cell):
    def __init__(self, config: Optional[VAEConfig] = None, dtype=ms.float32):
        super().__init__()
        self.config = VAEConfig() if config is None else config
        self.config.validate()
        self.dtype = dtype
        self.encoder = VideoEncoder(self.config, dtype)
        self.decoder = VideoDecoder(self.config, dtype)
        # how decode_numpy (the servers, the in-process backend) tiles: a fixed tile_size, or the tile
        # predicted to fit a budget in bytes (`set_decode_tiling`); neither: untiled
        self.decode_tile_size = None
        self.decode_budget_bytes = None

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Optional[dict] = None, dtype=ms.float32) -> "AutoencoderKL":
        return cls(VAEConfig.from_dict(cfg or {}), dtype)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, progress: bool = True) -> "AutoencoderKL":
        """Load `vae_v2.safetensors` from a folder (or the given file) with the `config.json` beside it
        (released widths when there is none)."""
        if os.path.isdir(path):
            folder, weights = path, os.path.join(path, CHECKPOINT_FILE)
        else:
            folder, weights = os.path.dirname(path) or ".", path
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"VAE weights not found: {weights} (give the vae/ folder holding "
                                    f"{CHECKPOINT_FILE} or the file itself)")
        cfg = {}
        cfg_path = os.path.join(folder, CONFIG_FILE)
        if os.path.isfile(cfg_path):
            with open(cfg_path, "r", encoding="utf-8") as fh:
                cfg = json.load(fh)
        dtype = runtime.compute_dtype() if dtype is None else dtype
        return checkpoint.build_and_load(lambda: cls.from_config(cfg, dtype), weights, dtype=dtype, progress=progress)

    def save_config(self, folder: str) -> str:
        """Write config.json (atomically) into `folder`; returns its path."""
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, CONFIG_FILE)
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.config.to_dict(), fh, indent=2)
        os.replace(tmp, target)
        return target

    # ---- coding ------------------------------------------------------------------------------

    def _as_tensor(self, value: ArrayLike, name: str) -> Tensor:
        if isinstance(value, np.ndarray):
            value = Tensor(value)
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a MindSpore Tensor or a numpy array, got {type(value).__name__}")
        return value.astype(self.dtype)

    def _check_frames(self, frames: Tensor) -> None:
        if frames.ndim != 5:
            raise ValueError(f"frames must be (batch, frames, {self.config.in_channels}, height, width), "
                             f"got shape {tuple(frames.shape)}")
        _, f, c, h, w = frames.shape
        if c != self.config.in_channels:
            raise ValueError(f"frames has {c} channels at axis 2; expected {self.config.in_channels} "
                             f"(layout (batch, frames, channels, height, width))")
        if h % SPATIAL_COMPRESSION or w % SPATIAL_COMPRESSION or h == 0 or w == 0:
            raise ValueError(f"frames height {h} and width {w} must be positive multiples of {SPATIAL_COMPRESSION}: "
                             f"resize or crop the video")
        latent_frames(f)  # raises for a frame count that is neither an image nor whole chunks

    def encode_raw(self, frames: ArrayLike, progress: bool = True) -> Tensor:
        """(b, f, 3, H, W) -> (b, f/17*3, 2z, H/16, W/16): mean and log-variance concatenated on channels."""
        frames = self._as_tensor(frames, "frames")
        self._check_frames(frames)
        f = frames.shape[1]
        size = IMAGE_FRAMES if f == IMAGE_FRAMES else FRAMES_PER_CHUNK
        chunks = []
        for start in progress_bar(range(0, f, size), desc="VAE encode", unit="chunk", disable=not progress, leave=False):
            clip = mint.permute(frames[:, start:start + size], (0, 2, 1, 3, 4))  # b c t h w
            chunks.append(mint.permute(self.encoder(clip), (0, 2, 1, 3, 4)))
        return chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=1)

    def encode(self, frames: ArrayLike, seed: int = 0, sample: bool = True, progress: bool = True) -> Tensor:
        """(b, f, 3, H, W) in [-1, 1] -> latents (b, f/17*3, z, H/16, W/16) (an image, f = 1, -> 1 frame).

        sample=True draws mean + std * noise with noise from numpy's generator seeded by `seed`;
        sample=False returns the mean.
        """
        moments = self.encode_raw(frames, progress).astype(ms.float32)
        z = self.config.z_channels
        mean, logvar = moments[:, :, :z], moments[:, :, z:]
        if not sample:
            return mean.astype(self.dtype)
        std = mint.exp(0.5 * mint.clamp(logvar, -30.0, 20.0))
        noise = np.random.default_rng(seed).standard_normal(tuple(mean.shape), dtype=np.float32)
        return (mean + std * Tensor(noise)).astype(self.dtype)

    def _check_latents(self, latents: Tensor) -> None:
        z = self.config.z_channels
        if latents.ndim != 5:
            raise ValueError(f"latents must be (batch, latent frames, {z}, height, width), got shape "
                             f"{tuple(latents.shape)}")
        if latents.shape[2] != z:
            raise ValueError(f"latents has {latents.shape[2]} channels at axis 2; this VAE has z_channels={z} "
                             f"(layout (batch, latent frames, channels, height, width))")
        video_frames(latents.shape[1])  # raises unless whole 3-frame chunks

    def decode_chunks(self, latents: ArrayLike, progress: bool = True, tile_size=None) -> Tensor:
        """Each 3-latent-frame chunk decoded to 17 frames, concatenated: (b, f, 3, 16h, 16w), not blended.

        tile_size: None decodes each chunk whole; an int or (rows, columns), in latent positions,
        decodes its up path in spatial tiles of that size (`vae_tiled`: the same frames, less memory)."""
        latents = self._as_tensor(latents, "latents")
        self._check_latents(latents)
        tile = None if tile_size is None else as_tile(tile_size)
        chunks = []
        n = latents.shape[1]
        for start in progress_bar(range(0, n, LATENT_FRAMES_PER_CHUNK), desc="VAE decode", unit="chunk",
                          disable=not progress, leave=False):
            z = mint.permute(latents[:, start:start + LATENT_FRAMES_PER_CHUNK], (0, 2, 1, 3, 4))
            out = self.decoder(z) if tile is None else decode_tiled(self.decoder, z, tile)
            chunks.append(mint.permute(out, (0, 2, 1, 3, 4)))
        return chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=1)

    def decode(self, latents: ArrayLike, progress: bool = True, tile_size=None) -> Tensor:
        """latents (b, f_lat, z, h, w) -> frames (b, f_lat/3*17, 3, 16h, 16w), roughly in [-1, 1].
        tile_size: see `decode_chunks`."""
        return blend_chunks(self.decode_chunks(latents, progress, tile_size))

    def set_decode_tiling(self, tile_size=None, budget_gb: Optional[float] = None) -> None:
        """What `decode_numpy` does: tile_size (latent positions) always tiles; budget_gb tiles only
        when the untiled decode of a chunk is predicted not to fit (`vae_tiled.choose_tile`)."""
        if tile_size is not None and budget_gb is not None:
            raise ValueError("give a VAE tile size or a VAE memory budget, not both")
        if budget_gb is not None and not budget_gb > 0:
            raise ValueError(f"VAE decode budget {budget_gb} GB must be positive")
        self.decode_tile_size = None if tile_size is None else as_tile(tile_size)
        self.decode_budget_bytes = None if budget_gb is None else float(budget_gb) * 2 ** 30

    def tile_for(self, latent_h: int, latent_w: int):
        """The tile `decode_numpy` uses for latents of latent_h x latent_w positions (None: untiled)."""
        if self.decode_tile_size is not None:
            return self.decode_tile_size
        if self.decode_budget_bytes is None:
            return None
        dtype_bytes = 4 if self.dtype == ms.float32 else 2
        return choose_tile(self.config, latent_h, latent_w, dtype_bytes, self.decode_budget_bytes)

    # ---- numpy in, numpy out: what the VAE server and the in-process backend serve ---------------
    def decode_numpy(self, latents: np.ndarray, progress: bool = True) -> np.ndarray:
        """DiT latents -> float32 frames, with the serving scale (latents / LATENT_SCALE_FACTOR);
        in tiles when `set_decode_tiling` asks for them."""
        latents = np.asarray(latents, np.float32)
        tile = self.tile_for(*latents.shape[-2:]) if latents.ndim == 5 else None
        frames = self.decode(Tensor(latents / LATENT_SCALE_FACTOR), progress=progress, tile_size=tile)
        return frames.astype(ms.float32).asnumpy()

    def encode_numpy(self, frames: np.ndarray, seed: int = 0, sample: bool = True,
                     progress: bool = True) -> np.ndarray:
        """float32 frames in [-1, 1] -> DiT latents (the sample or mean, times LATENT_SCALE_FACTOR)."""
        latents = self.encode(Tensor(np.asarray(frames, np.float32)), seed=seed, sample=sample, progress=progress)
        return latents.astype(ms.float32).asnumpy() * LATENT_SCALE_FACTOR
