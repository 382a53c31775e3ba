"""The cost of int8 weights in quality, on the golden DiT cases (used by bench_int8_quality.py and the tests).

Every figure is a distance to upstream's float32 answer, as a ratio to the bf16 floor of the case:
the distance of upstream's own bf16 run to its float32 run (golden/bf16/*: max and mean).
- CPU (float32 arithmetic): int8 weights alone. dit_t2v / dit_ti2v: quantized from the float32 golden
  weights, against `out`, over the floor of the bf16 case of the same model; dit_*_bf16: quantized
  from the bf16 weights, against `ref.fp32.out`; sampler (3 steps, CFG): against `out`, over a floor of
  our bf16 run (no upstream bf16 run exists for it; ours lands at x0.05 of the DiT floors).
- ascend-sim (bf16 arithmetic, the W8A16 kernel's emulator): int8 and bf16 together, dit_*_bf16
  against `ref.fp32.out`, and the same run with bf16 weights beside it.
- heavy tails: the golden random weights have no outlier channels, real ones do. dit_t2v with 4
  output channels (rows) of every block linear weight x50, and with 4 input channels (columns)
  x50: per-channel int8 against the float32 run of the same weights (ours matches upstream to
  1e-5), over the floor of our bf16 run of those weights; groups of 32 input channels beside it (a
  simulated quantization) say whether groups would earn their keep.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Optional

import numpy as np

HEAVY = 50.0
HEAVY_CHANNELS = 4
GROUP = 32


def _case(golden: str, name: str):
    from stepvideo_ms.tools.verification import GoldenCase

    sub = "bf16" if name.endswith("_bf16") else ""
    return GoldenCase.open(name, os.path.join(golden, sub, f"{name}_weights.safetensors"),
                           os.path.join(golden, sub, f"{name}_io.safetensors"))


def _dit_out(case, weights_path: str, weights: str, dtype) -> np.ndarray:
    from mindspore import Tensor
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.tools.verification import to_numpy

    model = StepVideoModel.from_pretrained(weights_path, case.config, dtype=dtype, progress=False, weights=weights)

    def t(key):
        arr = case.inp(key)
        return None if arr is None else Tensor(arr).astype(dtype)

    mask = case.inp("encoder_attention_mask")
    motion = float(case.metadata["motion_score"]) if "motion_score" in case.metadata else None
    return to_numpy(model(t("hidden_states"), t("timestep"), t("encoder_hidden_states"), Tensor(mask),
                          t("encoder_hidden_states_2"), t("condition_hidden_states"), motion))


def _sampler_out(case, weights: str, dtype) -> np.ndarray:
    from mindspore import Tensor
    from stepvideo_ms.diffusion.sampling import denoise
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.models.dit import StepVideoModel

    model = StepVideoModel.from_pretrained(case.weights_path, case.config, dtype=dtype, progress=False, weights=weights)
    ctx, clip = (Tensor(case.inp(k)).astype(dtype) for k in ("encoder_hidden_states", "encoder_hidden_states_2"))
    mask = Tensor(case.inp("encoder_attention_mask"))

    def predict(latents, timestep):
        return model(latents, timestep, ctx, mask, clip, None, None)

    out = denoise(predict, Tensor(case.inp("latents")), FlowMatchScheduler(), int(case.metadata["steps"]),
                  float(case.metadata["time_shift"]), float(case.metadata["guidance_scale"]), model_dtype=dtype,
                  progress=False)
    return out.asnumpy()


def _dist(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"max": float(d.max()), "mean": float(d.mean())}


def heavy_weights(golden: str, mode: str, folder: str) -> str:
    """dit_t2v's weights with HEAVY_CHANNELS rows ("rows") or columns ("cols") of every block linear weight
    (the ones int8 quantizes) x HEAVY, or their group-quantized round trip ("rows-g", "cols-g"); -> path."""
    from stepvideo_ms.models.int8_folder import int8_weight_names
    from stepvideo_ms.formats.safetensors_io import load_file, save_file_atomic

    case = _case(golden, "dit_t2v")
    state = load_file(case.weights_path)
    names = int8_weight_names(case.config)
    rng = np.random.default_rng(17)
    for key in sorted(names):
        w = state[key].copy()
        axis = 0 if mode.startswith("rows") else 1
        pick = rng.choice(w.shape[axis], HEAVY_CHANNELS, replace=False)
        if axis == 0:
            w[pick] *= HEAVY
        else:
            w[:, pick] *= HEAVY
        state[key] = group_round_trip(w) if mode.endswith("-g") else w
    path = os.path.join(folder, f"heavy_{mode}.safetensors")
    save_file_atomic(state, path, {"config": json.dumps(case.config)})
    return path


def group_round_trip(w: np.ndarray, group: int = GROUP) -> np.ndarray:
    """w quantized to int8 with one scale per (row, group of input channels), then dequantized."""
    from stepvideo_ms.ops.quant import dequantize_rows, quantize_rows

    out, k = w.shape
    g = w.reshape(out * (k // group), group)
    q, s = quantize_rows(g)
    return dequantize_rows(q, s).reshape(out, k)


def measure_cpu(golden: str) -> List[dict]:
    import mindspore as ms

    f32 = ms.float32
    rows = []
    for name in ("dit_t2v", "dit_ti2v"):
        case, bf = _case(golden, name), _case(golden, name + "_bf16")
        floor = _dist(bf.reference("out"), bf.out())
        rows.append({"case": name, "arith": "float32", "weights": "int8", "err": _dist(_dit_out(case, case.weights_path, "int8", f32), case.out()), "floor": floor})
        rows.append({"case": name + "_bf16", "arith": "float32", "weights": "int8", "err": _dist(_dit_out(bf, bf.weights_path, "int8", f32), bf.reference("out")), "floor": floor})
    sampler = _case(golden, "sampler")
    rows.append({"case": "sampler", "arith": "float32", "weights": "int8",
                 "err": _dist(_sampler_out(sampler, "int8", f32), sampler.out()), "floor": None})
    case = _case(golden, "dit_t2v")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("rows", "cols"):
            ref = _dit_out(case, heavy_weights(golden, mode, tmp), "full", f32)
            rows.append({"case": f"heavy {mode} x{HEAVY:g}", "arith": "float32", "weights": "int8",
                         "err": _dist(_dit_out(case, heavy_weights(golden, mode, tmp), "int8", f32), ref), "floor": None})
            rows.append({"case": f"heavy {mode} x{HEAVY:g}", "arith": "float32", "weights": f"int8 groups of {GROUP}",
                         "err": _dist(_dit_out(case, heavy_weights(golden, mode + "-g", tmp), "full", f32), ref), "floor": None})
            rows[-1]["ref"] = rows[-2]["ref"] = mode
    return rows


def measure_sim(golden: str, quick: bool = False) -> List[dict]:
    """Under ascend-sim (bf16): int8 with bf16 arithmetic, and the floors the CPU part lacks (quick: the
    two DiT cases with int8 only)."""
    import mindspore as ms
    from mindspore.ops import auto_generate
    from stepvideo_ms.testing.ascend_sim.patching import is_simulated

    assert is_simulated(auto_generate.WeightQuantBatchMatmul), "run under ascend-sim"
    bf16, rows = ms.bfloat16, []
    for name in ("dit_t2v_bf16", "dit_ti2v_bf16"):
        bf = _case(golden, name)
        floor = _dist(bf.reference("out"), bf.out())
        for weights in ("int8",) if quick else ("int8", "full"):
            rows.append({"case": name, "arith": "bf16", "weights": weights,
                         "err": _dist(_dit_out(bf, bf.weights_path, weights, bf16), bf.reference("out")), "floor": floor})
    if quick:
        for r in rows:
            r["ratio"] = {k: r["err"][k] / r["floor"][k] for k in ("max", "mean")}
        return rows
    sampler = _case(golden, "sampler")
    floor = _dist(_sampler_out(sampler, "full", bf16), sampler.out())
    rows.append({"case": "sampler", "arith": "bf16", "weights": "full (the floor)", "err": floor, "floor": floor})
    rows.append({"case": "sampler", "arith": "bf16", "weights": "int8",
                 "err": _dist(_sampler_out(sampler, "int8", bf16), sampler.out()), "floor": floor})
    case = _case(golden, "dit_t2v")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("rows", "cols"):
            path = heavy_weights(golden, mode, tmp)
            rows.append({"case": f"heavy {mode} x{HEAVY:g}", "arith": "bf16", "weights": "full (the floor)",
                         "floor_of": mode, "out": _dit_out(case, path, "full", bf16).tolist()})
    return rows


def combine(cpu: List[dict], sim: List[dict], golden: str) -> List[dict]:
    """Fill the floors the CPU rows lack from the simulated runs; ratios everywhere."""
    import mindspore as ms

    sampler_floor = next(r["floor"] for r in sim if r["case"] == "sampler")
    heavy_floor = {}
    case = _case(golden, "dit_t2v")
    with tempfile.TemporaryDirectory() as tmp:
        for r in sim:
            if "floor_of" in r:
                ref = _dit_out(case, heavy_weights(golden, r["floor_of"], tmp), "full", ms.float32)
                heavy_floor[r["floor_of"]] = _dist(np.asarray(r["out"], np.float32), ref)
    rows = []
    for r in cpu + [s for s in sim if "floor_of" not in s]:
        r = dict(r)
        if r["floor"] is None:
            r["floor"] = sampler_floor if r["case"] == "sampler" else heavy_floor[r["ref"]]
        r["ratio"] = {k: r["err"][k] / r["floor"][k] for k in ("max", "mean")}
        rows.append(r)
    return rows


def table(rows: List[dict]) -> str:
    head = f"{'case':<22} {'arith.':<8} {'weights':<22} {'max err / floor':>24} {'mean err / floor':>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        e, f, q = r["err"], r["floor"], r["ratio"]
        lines.append(f"{r['case']:<22} {r['arith']:<8} {r['weights']:<22} "
                     f"{e['max']:.2e}/{f['max']:.2e}=x{q['max']:<5.2f} {e['mean']:.2e}/{f['mean']:.2e}=x{q['mean']:<5.2f}")
    return "\n".join(lines)


def run_sim_part(golden: str, out_json: str, repo: Optional[str] = None, quick: bool = False) -> List[dict]:
    import subprocess
    import sys

    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, STEPVIDEO_DEVICE="ascend-sim", GLOG_v="3",
               PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "bench")]))
    code = ("import json,sys; from stepvideo_ms import runtime; runtime.init('ascend-sim'); import int8_quality as q; "
            "json.dump(q.measure_sim(sys.argv[1], sys.argv[3] == '1'), open(sys.argv[2], 'w'))")
    proc = subprocess.run([sys.executable, "-c", code, golden, out_json, "1" if quick else "0"], env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"the ascend-sim part failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(out_json, "r", encoding="utf-8") as fh:
        return json.load(fh)
