"""VAE decode and convolution timings on CPU: our matmul conv path against MindSpore's ops.conv3d.

    python bench/bench_vae.py [--golden DIR (default tests/golden)] [--skip-native-large]

Prints, from one run (ratios are what to compare; this machine is shared):
1. conv3d alone at typical VAE shapes: ours vs the native kernel, GFLOP/s and speed-up;
2. decode of the golden `vae` case (tiny widths, 2 chunks -> 34 frames of 32x48);
3. the released-width decoder (z 64, ch 128, ch_mult 1,2,4,4, 2 res blocks; random weights) on
   one latent frame of 1x1 (-> one 16x16 frame; --large-frames/--large-hw make it bigger: the
   native conv runs at ~1 GFLOP/s or less, one 3-frame chunk at 1x1 is ~125 GFLOP).
Each decode runs with our conv and again with every VAE convolution routed to ops.conv3d.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from stepvideo_ms import checkpoint, runtime  # noqa: E402
from stepvideo_ms import ops as sv_ops  # noqa: E402
from stepvideo_ms.ops.conv import conv3d, conv3d_native  # noqa: E402
from stepvideo_ms.tools.verify import CHECKOUT_GOLDEN  # noqa: E402

CAUSAL = ((2, 0), (1, 1), (1, 1))
# (label, channels in, channels out, kernel, frames, height, width, stride, padding)
CONV_SHAPES = [
    ("golden level-0 3x3x3", 32, 32, 3, 20, 32, 48, 1, CAUSAL),
    ("released dec. level 0", 128, 128, 3, 2, 32, 32, 1, CAUSAL),
    ("released dec. level 2", 512, 512, 3, 3, 8, 8, 1, CAUSAL),
    ("released enc. Downsample3D", 256, 256, 3, 17, 16, 16, 2, CAUSAL),
    ("per-frame 2D 3x3", 256, 256, (1, 3, 3), 2, 32, 32, 1, ((0, 0), (1, 1), (1, 1))),
    ("pointwise 1x1x1", 512, 512, 1, 5, 16, 16, 1, 0),
]


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        out.asnumpy()
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def native_convs():
    """Route the VAE's convolutions (stepvideo_ms.ops.conv3d) to MindSpore's ops.conv3d."""
    saved = sv_ops.conv3d
    sv_ops.conv3d = lambda x, w, b=None, stride=1, padding=0: conv3d_native(x, w, b, stride, padding)
    try:
        yield
    finally:
        sv_ops.conv3d = saved


def conv_bench() -> None:
    print("conv3d alone (best of 2; native once):")
    print(f"  {'shape':<28} {'GFLOP':>7} {'ours s':>8} {'native s':>9} {'ours GF/s':>10} {'speed-up':>9}")
    rng = np.random.default_rng(0)
    for label, ci, co, k, t, h, w, stride, pad in CONV_SHAPES:
        kernel = (k,) * 3 if isinstance(k, int) else k
        x = Tensor(rng.standard_normal((1, ci, t, h, w)).astype(np.float32))
        wt = Tensor((rng.standard_normal((co, ci) + kernel) * 0.05).astype(np.float32))
        b = Tensor(rng.standard_normal(co).astype(np.float32))
        ours_out = conv3d(x, wt, b, stride, pad)
        flops = 2.0 * ci * co * np.prod(kernel) * np.prod(ours_out.shape[2:])
        ours = timed(lambda: conv3d(x, wt, b, stride, pad), 2)
        native_out = conv3d_native(x, wt, b, stride, pad)
        native = timed(lambda: conv3d_native(x, wt, b, stride, pad), 1)
        err = float(np.abs(ours_out.asnumpy() - native_out.asnumpy()).max())
        print(f"  {label:<28} {flops / 1e9:7.2f} {ours:8.3f} {native:9.3f} {flops / ours / 1e9:10.1f} "
              f"{native / ours:8.1f}x   (max |diff| {err:.1e})", flush=True)


@contextlib.contextmanager
def counting_convs(total: list):
    """Add the multiply-add FLOPs of every VAE convolution to total[0]."""
    saved = sv_ops.conv3d

    def counted(x, w, b=None, stride=1, padding=0):
        out = saved(x, w, b, stride, padding)
        total[0] += 2.0 * float(np.prod(w.shape)) * float(np.prod(out.shape[2:])) * out.shape[0]
        return out

    sv_ops.conv3d = counted
    try:
        yield
    finally:
        sv_ops.conv3d = saved


def decode_pair(title: str, run) -> None:
    flops = [0.0]
    with counting_convs(flops):
        run().asnumpy()  # also the warm-up
    ours = timed(run)
    with native_convs():
        native = timed(run)
    print(f"  {title:<52} conv {flops[0] / 1e9:6.1f} GFLOP  ours {ours:7.2f}s  native conv {native:8.2f}s  "
          f"speed-up {native / ours:5.1f}x", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", default=CHECKOUT_GOLDEN)
    parser.add_argument("--large-hw", type=int, nargs=2, default=(1, 1), metavar=("H", "W"),
                        help="latent height and width of the released-width decode (default 1 1 -> 16x16 frames)")
    parser.add_argument("--large-frames", type=int, default=1,
                        help="latent frames given to the released-width decoder (3 = one video chunk)")
    parser.add_argument("--skip-conv", action="store_true", help="skip the conv-only table")
    args = parser.parse_args()
    runtime.init("CPU")
    from stepvideo_ms.models.vae import AutoencoderKL
    from stepvideo_ms.formats.safetensors_io import SafetensorsFile, load_file

    if not args.skip_conv:
        conv_bench()
    print("VAE decode (one run each):")
    weights = os.path.join(args.golden, "vae_weights.safetensors")
    if os.path.isfile(weights):
        import json

        model = AutoencoderKL.from_config(json.loads(SafetensorsFile(weights).metadata["config"]))
        checkpoint.load_into(model, weights, progress=False)
        latents = Tensor(load_file(os.path.join(args.golden, "vae_io.safetensors"))["in.latents"])
        decode_pair(f"golden config: decode {tuple(latents.shape)}", lambda: model.decode(latents, progress=False))
    else:
        print(f"  golden weights not found at {weights}: skipped")
    with ms.nn.utils.no_init_parameters():
        big = AutoencoderKL.from_config({})
    rng = np.random.default_rng(0)
    for name, p in big.decoder.parameters_and_names():
        if len(p.shape) > 1:  # conv weights, scaled by fan-in
            value = rng.standard_normal(p.shape) / np.sqrt(np.prod(p.shape[1:]))
        else:  # norm scales 1, biases 0
            value = np.ones(p.shape) if "norm" in name and name.endswith("weight") else np.zeros(p.shape)
        p.set_data(Tensor(value.astype(np.float32)))
    h, w = args.large_hw
    z = Tensor(rng.standard_normal((1, big.config.z_channels, args.large_frames, h, w)).astype(np.float32))
    decode_pair(f"released-width decoder on latent (b,z,t,h,w)={tuple(z.shape)}", lambda: big.decoder(z))
    return 0


if __name__ == "__main__":
    sys.exit(main())
