"""Tiny DiT cases shared by the parallel tests (pytest side) and their msrun worker.

A case is a model kind (t2v / ti2v), a latent grid (frames, height, width) and a mesh layout
(ulysses, pp, pp_split, cfg, shard_weights, offload). Its inputs come from a fixed seed, so the worker and the test rebuild
the same tensors independently; the test computes the single-process reference.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

HEADS, HEAD_DIM, LAYERS, CHANNELS = 4, 32, 4, 8
CAPTION_CHANNELS = (64, 32)
TEXT_LEN, CLIP_LEN = 6, 3
STEPS, TIME_SHIFT, GUIDANCE, MOTION = 2, 13.0, 5.0, 2.0
KINDS = ("t2v", "ti2v")
# the step cache's cases (issue 27): probe = block 0, middle = blocks 1-2, last = block 3, one warmup step;
# at the threshold of a case, the tiny models (seed 3) cache some steps of 6 but not all
CACHE_STEPS = 6
CACHE_SETTINGS = dict(warmup=1, first=1, last=1, max_skip=2)


@dataclass(frozen=True)
class Case:
    kind: str
    grid: Tuple[int, int, int]
    ulysses: int
    pp: int
    pp_split: Optional[str] = None
    cfg: int = 1
    shard: bool = False
    weights: str = "full"  # "int8": the blocks' linear layers quantized while loading
    offload: bool = False
    seq: bool = False  # sequential CFG
    cache: Optional[float] = None  # the step cache's threshold (None: no step cache; 0: on the loop, off)

    @property
    def name(self) -> str:
        f, h, w = self.grid
        split = f"_split{self.pp_split.replace(',', '-')}" if self.pp_split else ""
        extra = (f"_cfg{self.cfg}" if self.cfg > 1 else "") + ("_shard" if self.shard else "")
        extra += "_int8" if self.weights == "int8" else ""
        extra += ("_offload" if self.offload else "") + ("_seqcfg" if self.seq else "")
        extra += "" if self.cache is None else f"_cache{self.cache:g}"
        return f"{self.kind}_{f}x{h}x{w}_u{self.ulysses}_pp{self.pp}{split}{extra}"

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.pp


def save_cases(cases: List[Case], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump([asdict(c) for c in cases], fh)


def load_cases(path: str) -> List[Case]:
    with open(path, "r", encoding="utf-8") as fh:
        return [Case(c["kind"], tuple(c["grid"]), c["ulysses"], c["pp"], c["pp_split"], c["cfg"], c["shard"],
                     c.get("weights", "full"), c.get("offload", False), c.get("seq", False), c.get("cache"))
                for c in json.load(fh)]


def model_config(kind: str) -> dict:
    return {"num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM, "in_channels": CHANNELS,
            "out_channels": CHANNELS, "num_layers": LAYERS, "caption_channels": list(CAPTION_CHANNELS),
            "use_additional_conditions": kind == "ti2v"}


def _weight(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    if len(shape) <= 1:
        parent, leaf = name.rsplit(".", 1)
        base = 1.0 if leaf == "weight" and "norm" in parent.rsplit(".", 1)[-1] else 0.0  # norm scales near 1
        return (base + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def write_model(folder: str, kind: str, seed: int = 0) -> str:
    """A random-weight tiny DiT directory (config.json + one safetensors file)."""
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.formats.safetensors_io import save_file_atomic

    os.makedirs(folder, exist_ok=True)
    config = model_config(kind)
    rng = np.random.default_rng(seed)
    model = StepVideoModel.from_config(config)
    state = {n: _weight(n, tuple(p.shape), rng) for n, p in sorted(model.parameters_and_names())}
    save_file_atomic(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return folder


def case_inputs(case: Case) -> Dict[str, np.ndarray]:
    """Noise and embeddings of the [cond, uncond] batch; TI2V adds an image condition."""
    f, h, w = case.grid
    rng = np.random.default_rng(1000 + 31 * f + 7 * h + w + (1 if case.kind == "ti2v" else 0))
    mask = np.ones((2, TEXT_LEN), np.int64)
    mask[1, TEXT_LEN - 2:] = 0  # the negative prompt is shorter
    inputs = {
        "latents": rng.standard_normal((1, f, CHANNELS, h, w)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, TEXT_LEN, CAPTION_CHANNELS[0])).astype(np.float32),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": rng.standard_normal((2, CLIP_LEN, CAPTION_CHANNELS[1])).astype(np.float32),
    }
    if case.kind == "ti2v":
        cond = np.zeros((2, f, CHANNELS, h, w), np.float32)
        cond[:, 0] = rng.standard_normal((CHANNELS, h, w))  # the image latent on the first frame, then zeros
        inputs["condition_hidden_states"] = cond
    return inputs


def conditioning(inputs: Dict[str, np.ndarray], kind: str):
    from mindspore import Tensor
    from stepvideo_ms.parallel import Conditioning

    cond = inputs.get("condition_hidden_states")
    return Conditioning(Tensor(inputs["encoder_hidden_states"]), Tensor(inputs["encoder_attention_mask"]),
                        Tensor(inputs["encoder_hidden_states_2"]), None if cond is None else Tensor(cond),
                        MOTION if kind == "ti2v" else None)


def reference_latents(model_dir: str, case: Case, dtype=None) -> np.ndarray:
    """The single-process loop: the plain model in `sampling.denoise` (in `dtype`, default float32), with
    the case's weights (full or int8)."""
    from mindspore import Tensor
    from stepvideo_ms.diffusion.sampling import denoise
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.models.dit import StepVideoModel

    import mindspore as ms

    model = StepVideoModel.from_pretrained(model_dir, dtype=dtype or ms.float32, progress=False, weights=case.weights)
    inputs = case_inputs(case)
    c = conditioning(inputs, case.kind)

    def predict(latents, timestep):
        return model(latents, timestep, c.encoder_hidden_states, c.encoder_attention_mask,
                     c.encoder_hidden_states_2, c.condition_hidden_states, c.motion_score)

    out = denoise(predict, Tensor(inputs["latents"]), FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE,
                  model_dtype=model.dtype, progress=False)
    return out.asnumpy()


def steps(case: Case) -> int:
    return CACHE_STEPS if case.cache else STEPS


def step_cache(case: Case):
    """A fresh StepCache of the case's threshold, or None."""
    from stepvideo_ms.diffusion.step_cache import CacheSettings, StepCache

    return None if case.cache is None else StepCache(CacheSettings(threshold=case.cache, **CACHE_SETTINGS))


def cached_reference(model_dir: str, case: Case, dtype=None):
    """(latents, cache record) of the step-cached loop in one process (a one-rank mesh), float32 by default."""
    import mindspore as ms
    from mindspore import Tensor
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
    from stepvideo_ms.parallel import Mesh, load_stage, make_communicator, parallel_denoise

    mesh = Mesh.create(1, 0)
    model, _ = load_stage(model_dir, mesh, dtype or ms.float32, progress=False, weights=case.weights)
    inputs = case_inputs(case)
    cache = step_cache(case)
    out = parallel_denoise(mesh, make_communicator(mesh), model, Tensor(inputs["latents"]),
                           conditioning(inputs, case.kind), FlowMatchScheduler(), steps(case), TIME_SHIFT, GUIDANCE,
                           progress=False, cache=cache)
    return out.asnumpy(), cache.record()


def tolerance(reference: np.ndarray) -> float:
    """float32 layouts: the single-process latents up to float32 summation order."""
    return 1e-4 * (1.0 + float(np.abs(reference).max()))


# bf16 layouts: the same arithmetic in another order rounds differently, so a layout is not compared with
# the single-process bf16 run bit for bit but both with the float32 run: its distance to float32 over the
# single-process run's (the bf16 floor of the case), max and mean, within these bounds.
BF16_MAX_RATIO, BF16_MEAN_RATIO = 2.0, 1.3


def bf16_floor_ratios(got: np.ndarray, single_bf16: np.ndarray, float32: np.ndarray):
    """(max ratio, mean ratio) of |got - float32| over the floor |single_bf16 - float32|."""
    from stepvideo_ms.tools.verify import bf16_ratios

    err_max, floor_max, err_mean, floor_mean = bf16_ratios(got, float32, single_bf16)
    assert floor_max > 0, "the bf16 run equals the float32 run: the case does not exercise bf16 rounding"
    return err_max / floor_max, err_mean / floor_mean


def output_path(out_dir: str, case: Case, rank: int) -> str:
    return os.path.join(out_dir, f"{case.name}.rank{rank}.npy")


def reference_path(out_dir: str, case: Case) -> str:
    return os.path.join(out_dir, f"{case.name}.reference.npy")


def read_reports(out_dir: str, world: int) -> List[dict]:
    """The JSON report each rank of a worker launch wrote (tests/parallel_worker.py), in rank order."""
    reports = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"report.rank{rank}.json"), "r", encoding="utf-8") as fh:
            reports.append(json.load(fh))
    return reports
