"""Images in, videos out: the first image of TI2V and the MP4 writer."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from .formats.atomic import atomic_output
from .diffusion.settings import FPS


def load_image(path: str):
    """Open an image file as RGB, with errors that say what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"first_image_path={path!r}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"first_image_path={path!r} is not a readable image ({exc}); use a PNG or JPEG") from exc


def cover_crop_box(src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Resize size covering dst with the source's aspect ratio, and the centre crop's top-left corner.

    The scale follows the side that must fill the target; the other side overflows and is cropped.
    """
    (h, w), (th, tw) = src_hw, dst_hw
    scale = tw / w if w / h < tw / th else th / h
    rh, rw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
    return (rh, rw), ((rh - th) // 2, (rw - tw) // 2)


def image_to_condition(img, height: int, width: int) -> np.ndarray:
    """RGB image -> (1, 1, 3, height, width) float32 in [-1, 1]: resized to cover, centre-cropped."""
    from PIL import Image

    (rh, rw), (top, left) = cover_crop_box((img.height, img.width), (height, width))
    resized = img.resize((rw, rh), Image.BICUBIC)
    cropped = np.asarray(resized, dtype=np.float32)[top:top + height, left:left + width]
    chw = cropped.transpose(2, 0, 1) / 127.5 - 1.0
    return chw[None, None].astype(np.float32)


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """(f, 3, h, w) in [-1, 1] -> (f, h, w, 3) uint8: clamped, then mapped as upstream ((x+1)*127.5)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (frames, 3, height, width), got {frames.shape}")
    bad = int(frames.size - np.count_nonzero(np.isfinite(frames)))
    if bad:  # NaN would become an arbitrary byte: refuse instead of writing a garbage video
        raise ValueError(f"frames hold {bad} non-finite value(s) (NaN or inf): nothing to write")
    x = (np.clip(frames, -1.0, 1.0) + 1.0) * 127.5
    return np.clip(x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def crop_to_540p(video: np.ndarray) -> np.ndarray:
    """Upstream's standard 540p centre crop (960x540 landscape, 540x960 portrait) when larger."""
    _, h, w, _ = video.shape
    ch, cw = h // 2, w // 2
    if w > h:
        th, tw = 540, 960
    elif h > w:
        th, tw = 960, 540
    else:
        return video
    if h < th or w < tw:
        return video
    return video[:, ch - th // 2:ch + th // 2, cw - tw // 2:cw + tw // 2]


def write_mp4(video: np.ndarray, path: str, fps: int = FPS) -> str:
    """Write (f, h, w, 3) uint8 frames to an H.264 MP4 atomically (temporary file, then rename)."""
    import imageio.v2 as imageio

    with atomic_output(path) as tmp:
        # macro_block_size=1 keeps odd small sizes as they are (no silent resize)
        with imageio.get_writer(tmp, fps=fps, codec="libx264", format="FFMPEG", macro_block_size=1,
                                ffmpeg_log_level="error", pixelformat="yuv420p" if _even(video) else "yuv444p") as w:
            for frame in video:
                w.append_data(frame)
    return path


def _even(video: np.ndarray) -> bool:
    return video.shape[1] % 2 == 0 and video.shape[2] % 2 == 0
