"""Golden case of the VAE: encoder moments, per-chunk decode and the chunk blend."""
from __future__ import annotations

from mindspore import Tensor

from ...formats import checkpoint
from ...models.vae import AutoencoderKL, blend_chunks
from .golden import GoldenCase, Outputs, register, to_numpy

VAE_RTOL = 1e-3


@register("vae", VAE_RTOL)
def run_vae(case: GoldenCase) -> Outputs:
    model = checkpoint.build_and_load(lambda: AutoencoderKL.from_config(case.config, case.dtype), case.weights_path,
                                      dtype=case.dtype, progress=False)
    outputs = []
    if case.inp("video") is not None:
        raw = model.encode_raw(Tensor(case.inp("video")), progress=False)
        outputs.append(("encoder_raw", to_numpy(raw), case.out("encoder_raw")))
    if case.inp("latents") is not None:
        unmixed = model.decode_chunks(Tensor(case.inp("latents")), progress=False)
        outputs.append(("decoded_unmixed", to_numpy(unmixed), case.out("decoded_unmixed")))
        outputs.append(("decoded", to_numpy(blend_chunks(unmixed)), case.out("decoded")))
    return outputs
