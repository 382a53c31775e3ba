"""Golden case of the VAE: encoder moments, per-chunk decode and the chunk blend."""
from __future__ import annotations

from mindspore import Tensor

from .. import checkpoint
from ..models.vae import AutoencoderKL, blend_chunks
from . import GoldenCase, Outputs, register

VAE_RTOL = 1e-3


@register("vae", VAE_RTOL)
def run_vae(case: GoldenCase) -> Outputs:
    model = AutoencoderKL.from_config(case.config)
    checkpoint.load_into(model, case.weights_path, progress=False)
    outputs = []
    if case.inp("video") is not None:
        raw = model.encode_raw(Tensor(case.inp("video")), progress=False)
        outputs.append(("encoder_raw", raw.asnumpy(), case.out("encoder_raw")))
    if case.inp("latents") is not None:
        unmixed = model.decode_chunks(Tensor(case.inp("latents")), progress=False)
        outputs.append(("decoded_unmixed", unmixed.asnumpy(), case.out("decoded_unmixed")))
        outputs.append(("decoded", blend_chunks(unmixed).asnumpy(), case.out("decoded")))
    return outputs
