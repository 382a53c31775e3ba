"""Run under the device ascend-sim (by tests/test_vae_tiled.py): the tiled VAE decode's Ascend branch.

The golden bf16 vae case (weights and latents rounded to bf16) decoded untiled and in tiles (even and
uneven), with the bf16 policy: each within the bf16 noise floor of upstream's bf16 answer, and the
tiled frames close to the untiled ones. Prints "tiled decode under ascend-sim: ok".
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor
from safetensors import safe_open

from stepvideo_ms import runtime

rt = runtime.init()  # the device comes from $STEPVIDEO_DEVICE
assert rt.device == "ascend-sim" and runtime.is_ascend() and runtime.is_simulated(), rt
assert rt.compute_dtype == ms.bfloat16

from stepvideo_ms.formats import checkpoint  # noqa: E402
from stepvideo_ms.models.vae import AutoencoderKL  # noqa: E402

folder = os.path.join(os.environ["STEPVIDEO_GOLDEN"], "bf16")
weights = os.path.join(folder, "vae_bf16_weights.safetensors")
with safe_open(weights, "np") as fh:
    config = json.loads(fh.metadata()["config"])
with safe_open(os.path.join(folder, "vae_bf16_io.safetensors"), "np") as fh:
    latents = fh.get_tensor("in.latents")
    golden = fh.get_tensor("out.decoded_unmixed")
    noise = np.abs(fh.get_tensor("ref.fp32.out.decoded_unmixed") - golden)
    floor, floor_mean = float(noise.max()), float(noise.mean())

model = checkpoint.build_and_load(lambda: AutoencoderKL.from_config(config, ms.bfloat16), weights,
                                  dtype=ms.bfloat16, progress=False)
untiled = model.decode_chunks(Tensor(latents), progress=False).astype(ms.float32).asnumpy()
err_untiled = float(np.abs(untiled - golden).max())
print(f"untiled: max |ours - upstream bf16| {err_untiled:.3e} (floor {floor:.3e})")
for tile in (1, 2):
    out = model.decode_chunks(Tensor(latents), progress=False, tile_size=tile)
    assert out.dtype == ms.bfloat16, out.dtype
    tiled = out.astype(ms.float32).asnumpy()
    err = float(np.abs(tiled - golden).max())
    gap = float(np.abs(tiled - untiled).max())
    print(f"tile {tile}: max |ours - upstream bf16| {err:.3e}, max |tiled - untiled| {gap:.3e}, "
          f"mean {np.abs(tiled - golden).mean():.3e} (untiled {np.abs(untiled - golden).mean():.3e})")
    assert err <= floor, f"tile {tile}: {err} > the bf16 floor {floor}"
    assert np.abs(tiled - golden).mean() <= floor_mean, f"tile {tile}: mean error above the floor's {floor_mean}"
    assert gap <= floor, f"tile {tile}: tiled vs untiled {gap} > the bf16 floor {floor}"
print("tiled decode under ascend-sim: ok")
