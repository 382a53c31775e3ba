"""Describe the released-size DiT without allocating its weights.

    python -m stepvideo_ms.describe [--config transformer/config.json] [--ti2v] [--layers]

Builds StepVideoModel under MindSpore's `no_init_parameters` (parameters hold shapes, no data)
and prints the parameter count, the per-block shapes and the memory the weights need.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import List, Optional

import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from .models.common import count_parameters
from .models.dit import StepVideoModel


def build_empty(config: dict) -> StepVideoModel:
    with no_init_parameters():
        return StepVideoModel.from_config(config, dtype=ms.bfloat16)


def describe(model: StepVideoModel, per_layer: bool = False) -> str:
    shapes = OrderedDict((n, tuple(p.shape)) for n, p in model.parameters_and_names())
    total = count_parameters(model)
    block = [(n[len("transformer_blocks.0."):], s) for n, s in shapes.items() if n.startswith("transformer_blocks.0.")]
    per_block = sum(_numel(s) for _, s in block)
    lines = [
        f"StepVideoModel: {model.num_layers} layers x {model.num_attention_heads} heads x {model.attention_head_dim}"
        f" (width {model.inner_dim}), in {model.in_channels}, out {model.out_channels},"
        f" additional conditions {model.use_additional_conditions}",
        f"parameters: {total:,} ({total / 1e9:.2f} B); bf16 weights {total * 2 / 2**30:.1f} GiB",
        f"per block: {per_block:,} x {model.num_layers} = {per_block * model.num_layers:,};"
        f" outside the blocks: {total - per_block * model.num_layers:,}",
        "block parameters:",
    ]
    lines += [f"  transformer_blocks.N.{n:<28} {s}" for n, s in block]
    lines.append("other parameters:")
    lines += [f"  {n:<45} {s}" for n, s in shapes.items() if not n.startswith("transformer_blocks.")]
    if per_layer:
        lines.append("all parameters:")
        lines += [f"  {n:<55} {s}" for n, s in shapes.items()]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepvideo_ms.describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a transformer config.json (default: the released Step-Video-T2V config)")
    parser.add_argument("--ti2v", action="store_true", help="with use_additional_conditions (Step-Video-TI2V)")
    parser.add_argument("--layers", action="store_true", help="list every parameter of every layer")
    args = parser.parse_args(argv)
    config = {}
    if args.config:
        with open(args.config, "r", encoding="utf-8") as fh:
            config = json.load(fh)
    if args.ti2v:
        config["use_additional_conditions"] = True
    print(describe(build_empty(config), args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
