"""The upstream (PyTorch) half of bench_cpu_vs_torch.py; runs under a PyTorch interpreter, never MindSpore.

    <torch python> bench/torch_side.py --upstream <Step-Video tree> --case <case.npz> --out <out.npz>
        [--repeat N] [--threads T]

The case file, written by bench_cpu_vs_torch.py, holds the model kind and config (`meta`, JSON),
the weights (`w:<name>`, upstream's parameter names) and the inputs (`in:<name>`). Prints one
JSON line {"wall": best seconds, "cpu": best process seconds, "load": {...}} and writes the
output array to --out.

Upstream is imported module by module (its package __init__ pulls the whole pipeline, and its
sequence-parallel module imports xfuser, which this single-process run never calls: a
placeholder module stands in for it).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types

import numpy as np
import torch


def import_upstream(root: str) -> None:
    if not os.path.isfile(os.path.join(root, "stepvideo", "modules", "model.py")):
        raise SystemExit(f"--upstream {root}: no stepvideo/modules/model.py there (give the Step-Video-T2V/TI2V tree)")
    sys.path.insert(0, root)
    if "xfuser" not in sys.modules:
        sys.modules["xfuser"] = types.ModuleType("xfuser")
    package = types.ModuleType("stepvideo")
    package.__path__ = [os.path.join(root, "stepvideo")]
    sys.modules["stepvideo"] = package
    utils = types.ModuleType("stepvideo.utils")
    utils.__path__ = [os.path.join(root, "stepvideo", "utils")]
    sys.modules["stepvideo.utils"] = utils
    helpers = importlib.import_module("stepvideo.utils.utils")
    utils.with_empty_init = helpers.with_empty_init


def load_weights(model: torch.nn.Module, weights: dict, renames: dict) -> dict:
    state = {}
    for name, value in weights.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
        state[name] = torch.from_numpy(value)
    result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def build_dit(meta: dict, weights: dict, inputs: dict):
    from stepvideo.modules.model import StepVideoModel

    model = StepVideoModel(**meta["config"], attention_type="torch").eval()
    load = load_weights(model, weights, {})
    args = dict(
        hidden_states=torch.from_numpy(inputs["hidden_states"]),
        timestep=torch.from_numpy(inputs["timestep"]),
        encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
        encoder_hidden_states_2=torch.from_numpy(inputs["encoder_hidden_states_2"]),
        encoder_attention_mask=torch.from_numpy(inputs["encoder_attention_mask"]),
    )

    def run():
        out = model(**args, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)

    return run, load


def build_vae_decoder(meta: dict, weights: dict, inputs: dict):
    vae = importlib.import_module("stepvideo.vae.vae")
    cfg = meta["config"]
    vae.base_group_norm.spatial = True  # what AutoencoderKL(version=2) sets
    decoder = vae.VideoDecoder(ch=cfg["decoder"]["ch"], z_channels=cfg["z_channels"], out_channels=3,
                               ch_mult=tuple(cfg["decoder"]["ch_mult"]),
                               num_res_blocks=cfg["decoder"]["num_res_blocks"], version=cfg["version"]).eval()
    # the released files name the last conv decoder.conv_out.*, upstream's module conv_out.conv.*
    load = load_weights(decoder, {k[len("decoder."):]: v for k, v in weights.items()}, {"conv_out.": "conv_out.conv."})
    z = torch.from_numpy(inputs["z"]).permute(0, 2, 1, 3, 4).contiguous()  # ours (b c t h w) -> upstream (b t c h w)

    def run():
        with torch.inference_mode():
            return decoder(z, is_init=True)

    return run, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import_upstream(args.upstream)
    data = np.load(args.case)
    meta = json.loads(str(data["meta"]))
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
    build = {"dit": build_dit, "vae_decoder": build_vae_decoder}[meta["kind"]]
    run, load = build(meta, weights, inputs)
    with torch.inference_mode():
        out = run()  # warm-up
        wall, cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            out = run()
            wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    np.savez(args.out, out=out.float().numpy())
    print(json.dumps({"wall": wall, "cpu": cpu, "threads": torch.get_num_threads(), "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
