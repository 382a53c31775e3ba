"""The CPU path against upstream PyTorch on the same machine: DiT forward and VAE decode.

    python bench/bench_cpu_vs_torch.py [--torch-python /path/to/venv/bin/python --upstream /path/to/Step-Video-TI2V]
        [--cases dit,vae_released,vae_golden] [--repeat 3] [--threads N]

Cases (random weights from a fixed seed, the same on both sides; float32):
- dit: the DiT (T2V layout, no additional conditions), 4 layers x 8 heads x 128, batch 2,
  8x16x16 = 2048 tokens, 48 caption tokens (6144 wide) + 77 clip tokens (1024 wide), the second
  sample's text partly masked;
- vae_released: the released-width VAE decoder (z 64, ch 128, ch_mult 1,2,4,4) on one chunk of
  3 latent frames at 4x4 (-> 17 frames at 64x64);
- vae_golden: the golden `vae` case's decoder (z 8, ch 32, ch_mult 1,1,1,1, one res block) on one
  chunk of 3 latent frames at 2x3 (-> 17 frames at 32x48).

Ours runs in this process; with --torch-python and --upstream, upstream's modules run in a
subprocess (bench/torch_side.py) on the same weights and inputs, and the outputs are compared.
Both sides run on --threads threads (default: the cores this process may use): MindSpore's CPU
kernels through `mindspore.device_context.cpu.op_tuning.threads_num`, numpy's BLAS (which our
CPU path may call) through OpenBLAS, PyTorch through `torch.set_num_threads` in a child started
with a clean environment that sets OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS
(MindSpore puts OMP_NUM_THREADS=1 in its own C environment once it has run a kernel; inherited,
it put upstream on one thread). Each side warms up once, then the timed runs alternate, one of
ours, one of upstream's, so both see the same machine load. Each side reports the best of
--repeat runs as wall time and as process CPU time, with its thread count; ratios are
ours / upstream.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from stepvideo_ms import runtime  # noqa: E402
from stepvideo_ms.ops import blas  # noqa: E402
from stepvideo_ms.tools.tiny import random_state  # noqa: E402

SEED = 11
DIT = dict(num_attention_heads=8, attention_head_dim=128, in_channels=64, out_channels=64, num_layers=4,
           caption_channels=[6144, 1024], use_additional_conditions=False)
DIT_INPUT = dict(batch=2, frames=8, height=16, width=16, caption_tokens=48, clip_tokens=77, masked_tail=30)
VAE_GOLDEN = {"z_channels": 8, "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1},
              "decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}, "version": 2}
CASES = {
    "dit": ("DiT forward 4 layers x 8 heads x 128, batch 2, 2048 tokens", None),
    "vae_released": ("released-width VAE decoder, 3 latent frames at 4x4", ((3, 4, 4), None)),
    "vae_golden": ("golden-size VAE decoder, 3 latent frames at 2x3", ((3, 2, 3), VAE_GOLDEN)),
}


def set_weights(cell, state) -> None:
    for name, p in cell.parameters_and_names():
        p.set_data(Tensor(state[name]))


def dit_case(rng):
    from stepvideo_ms.models.dit import StepVideoModel

    with ms.nn.utils.no_init_parameters():
        model = StepVideoModel(**DIT)
    state = random_state(model, SEED, "bench-dit")
    set_weights(model, state)
    d = DIT_INPUT
    text = d["clip_tokens"] + d["caption_tokens"]
    mask = np.ones((d["batch"], text), np.int64)
    mask[1, text - d["masked_tail"]:] = 0
    inputs = {
        "hidden_states": rng.standard_normal((d["batch"], d["frames"], DIT["in_channels"], d["height"], d["width"])),
        "timestep": np.array([0.5, 0.25]),  # sigmas in [0, 1], as the pipeline gives (x1000 inside)
        "encoder_hidden_states": rng.standard_normal((d["batch"], d["caption_tokens"], DIT["caption_channels"][0])),
        "encoder_hidden_states_2": rng.standard_normal((d["batch"], d["clip_tokens"], DIT["caption_channels"][1])),
        "encoder_attention_mask": mask,
    }
    inputs = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs.items()}
    args = {k: Tensor(v) for k, v in inputs.items()}

    def run():
        return model(args["hidden_states"], args["timestep"], args["encoder_hidden_states"],
                     args["encoder_attention_mask"], args["encoder_hidden_states_2"])

    meta = {"kind": "dit", "config": DIT}
    return run, meta, state, inputs


def vae_case(rng, latent_shape, config):
    from stepvideo_ms.models.vae import AutoencoderKL

    with ms.nn.utils.no_init_parameters():
        vae = AutoencoderKL.from_config(config)
    state = random_state(vae.decoder, SEED, "bench-vae")
    set_weights(vae.decoder, state)
    cfg = vae.config
    z = rng.standard_normal((1, cfg.z_channels) + tuple(latent_shape)).astype(np.float32)
    zt = Tensor(z)
    meta = {"kind": "vae_decoder", "config": {"z_channels": cfg.z_channels, "version": cfg.version,
                                              "decoder": {"ch": cfg.decoder.ch, "ch_mult": list(cfg.decoder.ch_mult),
                                                          "num_res_blocks": cfg.decoder.num_res_blocks}}}
    state = {k if k.startswith("decoder.") else "decoder." + k: v for k, v in state.items()}
    return (lambda: vae.decoder(zt)), meta, state, {"z": z}


def clean_env(threads: int) -> dict:
    """The PyTorch child's whole environment: nothing inherited but PATH, HOME and the locale."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL") if k in os.environ}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


class Upstream:
    """bench/torch_side.py in --interleave mode: built and warmed up once, then one timed run per call."""

    def __init__(self, args, folder: str, name: str, meta: dict, state: dict, inputs: dict):
        self.name = name
        case = os.path.join(folder, f"{name}.npz")
        self.out = os.path.join(folder, f"{name}_out.npz")
        arrays = {"meta": np.array(json.dumps(meta))}
        arrays.update({f"w:{k}": v for k, v in state.items()})
        arrays.update({f"in:{k}": v for k, v in inputs.items()})
        np.savez(case, **arrays)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [args.torch_python, os.path.join(ROOT, "bench", "torch_side.py"), "--upstream", args.upstream,
               "--case", case, "--out", self.out, "--threads", str(args.threads), "--interleave"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=clean_env(args.threads))
        ready = self._read()
        load = ready["load"]
        if load["missing"] or load["unexpected"]:
            self.close()
            raise SystemExit(f"upstream {name}: weights do not match upstream's names: {load}")
        self.threads = ready["threads"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.stderr.seek(0)
                raise SystemExit(f"upstream side failed for {self.name} (exit {self.proc.returncode}):\n"
                                 f"{self.stderr.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        report = self._read()
        return report["wall"], report["cpu"]

    def finish(self) -> np.ndarray:
        self.proc.stdin.write("finish\n")
        self.proc.stdin.flush()
        self._read()
        self.close()
        return np.load(self.out)["out"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def set_threads(threads: int) -> None:
    """MindSpore's CPU kernels and numpy's BLAS on `threads` threads (before the first kernel)."""
    ms.device_context.cpu.op_tuning.threads_num(threads)
    blas.set_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", help="python of a venv with torch (and einops, diffusers) installed")
    parser.add_argument("--upstream", help="a Step-Video-T2V or Step-Video-TI2V source tree (holds stepvideo/)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side after one warm-up (best kept)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of both sides (default: the cores this process may use)")
    args = parser.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    if bool(args.torch_python) != bool(args.upstream):
        parser.error("--torch-python and --upstream go together (both or neither)")
    if args.torch_python and not os.path.isfile(args.torch_python):
        parser.error(f"--torch-python {args.torch_python}: no such file")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    runtime.init("CPU")
    set_threads(args.threads)
    print(f"threads: ours {args.threads} (MindSpore CPU kernels, numpy BLAS {blas.get_threads()}); "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    rng = np.random.default_rng(SEED)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cpu_vs_torch_") as folder:
        for name in names:
            title, spec = CASES[name]
            run, meta, state, inputs = dit_case(rng) if spec is None else vae_case(rng, *spec)
            upstream = Upstream(args, folder, name, meta, state, inputs) if args.torch_python else None
            try:
                ours = run().asnumpy()  # warm-up (upstream's warmed up before saying it is ready)
                walls, cpus, twalls, tcpus = [], [], [], []
                for _ in range(args.repeat):  # interleaved: one of ours, one of upstream's
                    w0, c0 = time.perf_counter(), time.process_time()
                    ours = run().asnumpy()
                    walls.append(time.perf_counter() - w0)
                    cpus.append(time.process_time() - c0)
                    if upstream is not None:
                        tw, tc = upstream.run()
                        twalls.append(tw)
                        tcpus.append(tc)
                ref = upstream.finish() if upstream is not None else None
            finally:
                if upstream is not None:
                    upstream.close()
            wall, cpu = min(walls), min(cpus)
            row = {"case": name, "title": title, "ours_wall": wall, "ours_cpu": cpu, "ours_threads": args.threads}
            print(f"{title}: ours {wall:.2f} s wall, {cpu:.2f} s cpu, {args.threads} threads", flush=True)
            if ref is not None:
                if ref.shape != ours.shape:
                    raise SystemExit(f"{name}: upstream output {ref.shape} but ours {ours.shape}")
                twall, tcpu = min(twalls), min(tcpus)
                err = float(np.abs(ref - ours).max() / (1.0 + np.abs(ref).max()))
                row.update(torch_wall=twall, torch_cpu=tcpu, torch_threads=upstream.threads, rel_err=err,
                           wall_ratio=wall / twall, cpu_ratio=cpu / tcpu)
                print(f"{'':{len(title)}}  upstream {twall:.2f} s wall, {tcpu:.2f} s cpu, {upstream.threads} threads; "
                      f"ours/upstream {wall / twall:.2f}x wall, {cpu / tcpu:.2f}x cpu; "
                      f"max|diff|/(1+max|ref|) {err:.1e}", flush=True)
            rows.append(row)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
