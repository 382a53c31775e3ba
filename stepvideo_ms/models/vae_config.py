"""The Step-Video VAE (AutoencoderKL, version 2): its constants and its configuration.

One place for the compression rules (17 video frames <-> 3 latent frames, 16x16 pixels <->
one latent position), the released widths, and the checks that a configuration can be built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Tuple

# A video is coded in independent chunks of FRAMES_PER_CHUNK frames, each giving
# LATENT_FRAMES_PER_CHUNK latent frames; a single image (IMAGE_FRAMES) gives one latent frame.
FRAMES_PER_CHUNK = 17
LATENT_FRAMES_PER_CHUNK = 3
IMAGE_FRAMES = 1
SPATIAL_COMPRESSION = 16
# The released server multiplies encoded latents by it and divides latents by it before decoding.
LATENT_SCALE_FACTOR = 1.0

CHECKPOINT_FILE = "vae_v2.safetensors"
CONFIG_FILE = "config.json"
SUPPORTED_VERSION = 2

# Fixed by the architecture (upstream constructor defaults, the same in the released model).
NORM_GROUPS = 32
NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
NUM_LEVELS = 4
ENCODER_TEMPORAL_DOWN_LEVELS = (1, 2)  # the other non-last levels downsample in space only
DECODER_TEMPORAL_UP_LEVELS = (2, 3)    # level 1 upsamples in space only
DECODER_CROPPED_FRAMES = 3             # leading frames dropped after decoding a chunk
PATCH_FACTOR = 2                       # the pixel-(un)shuffle between the latent and the coder
CHUNK_BLEND_KEEP = 0.6                 # weight a boundary frame keeps when chunks are blended


@dataclass(frozen=True)
class CoderConfig:
    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int

    def widths(self) -> Tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)


def _released_encoder() -> CoderConfig:
    return CoderConfig(ch=32, ch_mult=(4, 8, 16, 16), num_res_blocks=2)


def _released_decoder() -> CoderConfig:
    return CoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are the released model's (vae/vae_v2.safetensors)."""

    z_channels: int = 64
    encoder: CoderConfig = field(default_factory=_released_encoder)
    decoder: CoderConfig = field(default_factory=_released_decoder)
    version: int = SUPPORTED_VERSION
    in_channels: int = 3
    out_channels: int = 3

    @property
    def patch_channels(self) -> int:
        """Channels between the latent and the coder: 4 z * 2^3."""
        return 4 * self.z_channels * PATCH_FACTOR ** 3

    @classmethod
    def from_dict(cls, cfg: dict) -> "VAEConfig":
        """{"z_channels", "encoder": {"ch", "ch_mult", "num_res_blocks"}, "decoder": {...}, "version"}.

        Missing keys take the released values; unknown keys are an error.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"VAE config must be a dict, got {type(cfg).__name__}")
        top = {f.name for f in fields(cls)}
        unknown = set(cfg) - top
        if unknown:
            raise ValueError(f"VAE config: unknown keys {sorted(unknown)} (known: {sorted(top)})")
        base = cls()
        kwargs = {k: v for k, v in cfg.items() if k not in ("encoder", "decoder")}
        for side in ("encoder", "decoder"):
            kwargs[side] = _coder_from_dict(getattr(base, side), cfg.get(side, {}), side)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict:
        out = asdict(self)
        for side in ("encoder", "decoder"):
            out[side]["ch_mult"] = list(out[side]["ch_mult"])
        return out

    def validate(self) -> None:
        if self.version != SUPPORTED_VERSION:
            raise ValueError(f"VAE version={self.version} is not supported: only version {SUPPORTED_VERSION} "
                             f"({CHECKPOINT_FILE}) is ported")
        if self.z_channels < 1:
            raise ValueError(f"z_channels={self.z_channels} must be positive")
        for side in ("encoder", "decoder"):
            coder = getattr(self, side)
            if len(coder.ch_mult) != NUM_LEVELS:
                raise ValueError(f"{side}.ch_mult={list(coder.ch_mult)} must have {NUM_LEVELS} levels "
                                 f"(the 16x spatial, 17->3 temporal layout depends on it)")
            least = 1 if side == "encoder" else 0  # the decoder has num_res_blocks + 1 per level, as upstream
            if coder.num_res_blocks < least:
                raise ValueError(f"{side}.num_res_blocks={coder.num_res_blocks} must be >= {least}")
            normed = ((coder.ch,) if side == "encoder" else ()) + coder.widths()  # conv_in feeds a norm
            bad = [w for w in normed if w < 1 or w % NORM_GROUPS]
            if bad:
                raise ValueError(f"{side} widths {bad} (ch={coder.ch}, ch_mult={list(coder.ch_mult)}) must be "
                                 f"positive multiples of {NORM_GROUPS}, the group-norm group count")
        patch = self.patch_channels
        enc_last = self.encoder.widths()[-1]
        dec_last = self.decoder.widths()[-1]
        if (enc_last * PATCH_FACTOR ** 3) % patch:
            raise ValueError(f"encoder last width {enc_last} x {PATCH_FACTOR ** 3} must be a multiple of "
                             f"4*z_channels*8 = {patch}")
        if (dec_last * PATCH_FACTOR ** 3) % patch:
            raise ValueError(f"decoder last width {dec_last} x {PATCH_FACTOR ** 3} must be a multiple of "
                             f"4*z_channels*8 = {patch}")


def _coder_from_dict(default: CoderConfig, cfg: dict, side: str) -> CoderConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f"VAE config {side} must be a dict, got {type(cfg).__name__}")
    known = {f.name for f in fields(CoderConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"VAE config {side}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return CoderConfig(
        ch=int(cfg.get("ch", default.ch)),
        ch_mult=tuple(int(m) for m in cfg.get("ch_mult", default.ch_mult)),
        num_res_blocks=int(cfg.get("num_res_blocks", default.num_res_blocks)),
    )


def latent_frames(frames: int) -> int:
    """Latent frames of a video of `frames` frames (17 k -> 3 k; an image -> 1)."""
    if frames == IMAGE_FRAMES:
        return 1
    if frames < 1 or frames % FRAMES_PER_CHUNK:
        raise ValueError(f"frames={frames}: a video must have a multiple of {FRAMES_PER_CHUNK} frames "
                         f"(or {IMAGE_FRAMES} for an image)")
    return frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK


def video_frames(latent: int) -> int:
    """Frames decoded from `latent` latent frames (3 k -> 17 k)."""
    if latent < 1 or latent % LATENT_FRAMES_PER_CHUNK:
        raise ValueError(f"latent frames={latent} must be a positive multiple of {LATENT_FRAMES_PER_CHUNK}")
    return latent // LATENT_FRAMES_PER_CHUNK * FRAMES_PER_CHUNK
