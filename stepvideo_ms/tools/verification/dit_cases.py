"""Golden cases of the DiT and of the denoising loop."""
from __future__ import annotations

from typing import Optional

from mindspore import Tensor

from ...diffusion.sampling import denoise
from ...diffusion.scheduler import FlowMatchScheduler
from ...models.dit import StepVideoModel
from .golden import GoldenCase, Outputs, register, to_numpy

TRANSFORMER_RTOL = 1e-4


def _tensor(case: GoldenCase, key: str) -> Optional[Tensor]:
    arr = case.inp(key)
    return None if arr is None else Tensor(arr)


def load_dit(case: GoldenCase) -> StepVideoModel:
    return StepVideoModel.from_pretrained(case.weights_path, case.config, dtype=case.dtype, progress=False)


def _motion(case: GoldenCase) -> Optional[float]:
    return float(case.metadata["motion_score"]) if "motion_score" in case.metadata else None


def run_dit(case: GoldenCase) -> Outputs:
    model = load_dit(case)
    out = model(_tensor(case, "hidden_states"), _tensor(case, "timestep"), _tensor(case, "encoder_hidden_states"),
                _tensor(case, "encoder_attention_mask"), _tensor(case, "encoder_hidden_states_2"),
                _tensor(case, "condition_hidden_states"), _motion(case))
    return [("out", to_numpy(out), case.out())]


register("dit_t2v", TRANSFORMER_RTOL)(run_dit)
register("dit_ti2v", TRANSFORMER_RTOL)(run_dit)


@register("sampler", TRANSFORMER_RTOL)
def run_sampler(case: GoldenCase) -> Outputs:
    model = load_dit(case)
    steps = int(case.metadata["steps"])
    shift = float(case.metadata["time_shift"])
    cfg = float(case.metadata["guidance_scale"])
    context, mask, clip = (_tensor(case, k) for k in ("encoder_hidden_states", "encoder_attention_mask",
                                                      "encoder_hidden_states_2"))
    condition = _tensor(case, "condition_hidden_states")

    def predict(latents: Tensor, timestep: Tensor) -> Tensor:
        return model(latents, timestep, context, mask, clip, condition, _motion(case))

    scheduler = FlowMatchScheduler()
    final = denoise(predict, Tensor(case.inp("latents")), scheduler, steps, shift, cfg, progress=False)
    outputs = [("out", to_numpy(final), case.out())]
    if "out.sigmas" in case.io:
        outputs.append(("sigmas", scheduler.sigmas, case.out("sigmas")))
    return outputs
