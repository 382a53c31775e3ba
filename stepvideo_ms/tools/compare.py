"""`python -m stepvideo_ms compare A.mp4 B.mp4`: per-frame PSNR and SSIM of two videos, and their means.

Made to pick a step cache threshold (docs/step-cache.md) with the real weights: generate the same
prompt and seed with and without `--cache_threshold`, then compare the two MP4s. PSNR is
10 log10(255^2 / MSE) over the frame's uint8 RGB values (inf when the frames are equal); SSIM is
scikit-image's `structural_similarity` (data range 255, over the colour channels). A file may also be
a .npy array of (frames, height, width, 3) uint8 (exact values, no video codec in between).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np


def read_frames(path: str) -> np.ndarray:
    """(frames, height, width, 3) uint8 of an MP4 (or any video imageio reads) or a .npy file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".npy"):
        frames = np.load(path, allow_pickle=False)
    else:
        import imageio.v3 as iio

        try:
            frames = np.asarray(iio.imread(path))
        except Exception as exc:  # a codec's own error types: say which file and why
            raise ValueError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected (frames, height, width, 3) uint8, got {frames.shape} {frames.dtype}")
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / MSE) of two uint8 frames; inf when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    small = min(a.shape[0], a.shape[1])
    window = min(7, small if small % 2 else small - 1)  # scikit-image's default 7, or the largest odd that fits
    return float(structural_similarity(a, b, data_range=255, channel_axis=-1, win_size=window))


def compare_frames(a: np.ndarray, b: np.ndarray) -> Dict[str, object]:
    """{'psnr': [per frame], 'ssim': [per frame], 'mean_psnr', 'mean_ssim'} of two (f, h, w, 3) uint8 videos."""
    if a.shape != b.shape:
        raise ValueError(f"the videos differ in shape: {a.shape} vs {b.shape} (frames, height, width, 3); "
                         "compare two runs of the same size and frame count")
    if min(a.shape[1], a.shape[2]) < 3:
        raise ValueError(f"frames of {a.shape[1]}x{a.shape[2]} are too small for SSIM (3x3 at least)")
    p = [psnr(x, y) for x, y in zip(a, b)]
    s = [ssim(x, y) for x, y in zip(a, b)]
    return {"psnr": p, "ssim": s, "mean_psnr": float(np.mean(p)), "mean_ssim": float(np.mean(s))}


def report(result: Dict[str, object]) -> str:
    lines = ["frame    PSNR dB   SSIM"]
    for i, (p, s) in enumerate(zip(result["psnr"], result["ssim"])):
        lines.append(f"{i:5d}  {p:9.2f}  {s:.4f}")
    lines.append(f" mean  {result['mean_psnr']:9.2f}  {result['mean_ssim']:.4f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepvideo_ms compare",
                                description="Per-frame PSNR and SSIM of video B against video A, and their means "
                                            "(e.g. a step-cached run against an uncached run of the same seed).")
    p.add_argument("a", help="the reference video (MP4, or .npy of (frames, h, w, 3) uint8)")
    p.add_argument("b", help="the video compared with it")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (inf as the string 'inf')")
    args = p.parse_args(argv)
    try:
        result = compare_frames(read_frames(args.a), read_frames(args.b))
    except ValueError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        def clean(v):
            return [clean(x) for x in v] if isinstance(v, list) else ("inf" if v == math.inf else v)
        print(json.dumps({k: clean(v) for k, v in result.items()}))
    else:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
