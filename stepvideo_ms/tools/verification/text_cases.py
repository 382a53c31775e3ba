"""Golden cases of the two text encoders: Step-1 (`step_llm`) and HunyuanCLIP's BERT (`clip`)."""
from __future__ import annotations

from mindspore import Tensor

from ...formats import checkpoint
from ...models.hunyuan_clip import BertModel
from ...models.step_llm import Step1Model
from .golden import GoldenCase, Outputs, register

TEXT_RTOL = 1e-4


@register("step_llm", TEXT_RTOL)
def run_step_llm(case: GoldenCase) -> Outputs:
    model = Step1Model.from_config(case.config)
    checkpoint.load_into(model, case.weights_path, progress=False)
    out = model(Tensor(case.inp("input_ids")), Tensor(case.inp("attention_mask")))
    return [("out", out.asnumpy(), case.out())]


@register("clip", TEXT_RTOL)
def run_clip(case: GoldenCase) -> Outputs:
    model = BertModel.from_config(case.config)
    checkpoint.load_into(model, case.weights_path, progress=False)
    hidden, pooled = model(Tensor(case.inp("input_ids")), Tensor(case.inp("attention_mask")))
    return [("last_hidden_state", hidden.asnumpy(), case.out("last_hidden_state")),
            ("pooler_output", pooled.asnumpy(), case.out("pooler_output"))]
