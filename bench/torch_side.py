"""The upstream (PyTorch) half of bench_cpu_vs_torch.py; runs under a PyTorch interpreter, never MindSpore.

    <torch python> bench/torch_side.py --upstream <Step-Video tree> --case <case.npz> --out <out.npz>
        --threads T [--repeat N | --interleave]

The case file, written by bench_cpu_vs_torch.py, holds the model kind and config (`meta`, JSON),
the weights (`w:<name>`, upstream's parameter names) and the inputs (`in:<name>`). The output
array goes to --out. Every JSON line printed carries "threads" (torch.get_num_threads()).

- `--repeat N`: one warm-up and N timed runs; prints one JSON line {"wall": best seconds, "cpu":
  best process seconds, "threads", "load": {...}}.
- `--interleave`: after the warm-up prints {"ready": true, "threads", "load"}, then answers each
  line `run` on stdin with {"wall", "cpu", "threads"} for one timed run, and `finish` by writing
  --out and printing {"done": true}: the parent alternates these runs with its own, so both
  sides see the same machine load.

The caller sets the thread count: --threads goes to torch.set_num_threads, and the parent starts
this process with OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS set to the same number
(MindSpore sets OMP_NUM_THREADS=1 in its own C environment, which a child would otherwise inherit).

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
    parser.add_argument("--interleave", action="store_true", help="one timed run per `run` line on stdin")
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    import_upstream(args.upstream)
    data = np.load(args.case)
    meta = json.loads(str(data["meta"]))
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
    build = {"dit": build_dit, "vae_decoder": build_vae_decoder}[meta["kind"]]
    run, load = build(meta, weights, inputs)
    threads = torch.get_num_threads()

    def timed():
        w0, c0 = time.perf_counter(), time.process_time()
        result = run()
        return result, time.perf_counter() - w0, time.process_time() - c0

    with torch.inference_mode():
        out = run()  # warm-up
        if args.interleave:
            say({"ready": True, "threads": threads, "load": load})
            for line in sys.stdin:
                command = line.strip()
                if command == "run":
                    out, wall, cpu = timed()
                    say({"wall": wall, "cpu": cpu, "threads": threads})
                elif command == "finish":
                    break
                else:
                    raise SystemExit(f"torch_side: unknown command {command!r} (run or finish)")
            np.savez(args.out, out=out.float().numpy())
            say({"done": True, "threads": threads})
            return 0
        wall, cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            out, w, c = timed()
            wall, cpu = min(wall, w), min(cpu, c)
    np.savez(args.out, out=out.float().numpy())
    say({"wall": wall, "cpu": cpu, "threads": threads, "load": load})
    return 0


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    sys.exit(main())
