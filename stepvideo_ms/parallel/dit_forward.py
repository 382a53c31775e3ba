"""The DiT forward and the denoising loop on a (ulysses x pp) mesh.

Every rank embeds the whole batch (patch embedding, AdaLN-single, caption projection: cheap
next to the blocks), keeps its SP slice of the video tokens, runs its stage's layers on the
micro-batch schedule, and the last stage projects its own tokens to the output channels before
they are gathered to every rank (p*p*out_channels per token instead of the model width). All ranks
therefore hold the same velocity and take the same scheduler step: `parallel_denoise` is the
single-process `denoise` loop with a parallel predictor.

Entry points for a command line:
    world_size, rank = comm.init_world()
    mesh = Mesh.create(world_size, rank, ulysses_degree, pp_degree, ring_degree, pp_split)
    model = load_stage_model(transformer_dir, mesh, dtype)
    latents = parallel_denoise(mesh, make_communicator(mesh), model, noise, Conditioning(...),
                               scheduler, steps, time_shift, guidance_scale)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mindspore as ms
from mindspore import Tensor, mint

from .. import checkpoint
from ..diffusion.sampling import Predictor, denoise, uses_guidance
from ..diffusion.scheduler import FlowMatchScheduler
from ..models.dit import DiTInputs, StepVideoModel
from ..models.rope import Rope3D
from .comm import Communicator
from .mesh import Mesh
from .pipeline import Schedule, micro_batch_count, run_stage
from .ulysses import TokenShard, UlyssesAttention

BLOCK_PREFIX = "transformer_blocks."


def stage_param_filter(mesh: Mesh, num_layers: int) -> Callable[[str], bool]:
    """name -> whether this rank holds the parameter: its stage's blocks and every non-block one."""
    layers = set(mesh.stage_layers(num_layers))

    def keep(name: str) -> bool:
        if not name.startswith(BLOCK_PREFIX):
            return True
        return int(name[len(BLOCK_PREFIX):].split(".", 1)[0]) in layers

    return keep


def load_stage_model(path: str, mesh: Mesh, dtype=ms.float32, progress: bool = True) -> StepVideoModel:
    """Build the DiT of `path` (a transformer directory with config.json) without allocating its
    weights, then read only this rank's stage and the shared embedding/output parameters."""
    config = checkpoint.read_config(path)
    model_args = StepVideoModel.config_keys()
    probe = {k: v for k, v in config.items() if k in model_args}
    heads, layers = int(probe.get("num_attention_heads", 48)), int(probe.get("num_layers", 48))
    mesh.check_model(heads, layers)
    return StepVideoModel.from_pretrained(path, config, dtype=dtype, select=stage_param_filter(mesh, layers),
                                          progress=progress)


@dataclass(frozen=True)
class Conditioning:
    """DiT inputs that stay fixed over the loop, batched like the model input ([cond, uncond] with CFG)."""

    encoder_hidden_states: Tensor
    encoder_attention_mask: Tensor
    encoder_hidden_states_2: Optional[Tensor] = None
    condition_hidden_states: Optional[Tensor] = None  # TI2V: batch 1 (shared) or the model batch
    motion_score: Optional[float] = None

    @property
    def batch(self) -> int:
        return int(self.encoder_hidden_states.shape[0])


def slice_inputs(inputs: DiTInputs, start: int, stop: int) -> DiTInputs:
    """Samples start..stop of every batched field."""
    return dataclasses.replace(
        inputs, tokens=inputs.tokens[start:stop], t6=inputs.t6[start:stop],
        embedded_timestep=inputs.embedded_timestep[start:stop], context=inputs.context[start:stop],
        key_mask=inputs.key_mask[start:stop])


class _StageWork:
    """The DiT's blocks as pipeline work on this rank's token shard."""

    def __init__(self, model: StepVideoModel, micro: List[DiTInputs], shard: TokenShard, rope: Rope3D,
                 core: Optional[UlyssesAttention]):
        self.model, self.micro, self.shard, self.rope, self.core = model, micro, shard, rope, core
        self.transfer_shape = (int(micro[0].tokens.shape[0]), shard.local, model.inner_dim)
        self.transfer_dtype = model.dtype

    def first_input(self, micro: int) -> Tensor:
        return self.shard.take(self.micro[micro].tokens)

    def run_layer(self, x: Tensor, micro: int, layer: int) -> Tensor:
        return self.model.run_blocks(x, self.micro[micro], self.rope, layers=range(layer, layer + 1), core=self.core)

    def idle_layer(self) -> None:
        if self.core is not None:
            self.core.idle()


class ParallelDiT:
    """`forward(latents, timestep, conditioning)` -> the model output, the same on every rank."""

    def __init__(self, mesh: Mesh, comm: Communicator, model: StepVideoModel):
        if comm.rank != mesh.rank or comm.world_size != mesh.world_size:
            raise ValueError(f"communicator (rank {comm.rank}/{comm.world_size}) does not match the mesh ({mesh.describe()})")
        mesh.check_model(model.num_attention_heads, model.num_layers)
        self.mesh, self.comm, self.model = mesh, comm, model
        self.partition = mesh.partition(model.num_layers)
        self._ropes: Dict[Tuple[int, int, int], Rope3D] = {}

    def forward(self, hidden_states: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        mesh, model = self.mesh, self.model
        batch = int(hidden_states.shape[0])
        if cond.batch != batch:
            raise ValueError(f"encoder_hidden_states has batch {cond.batch} but the latents have batch {batch}")
        condition = cond.condition_hidden_states
        if condition is not None and condition.shape[0] == 1 and batch > 1:
            condition = condition.broadcast_to((batch,) + tuple(condition.shape[1:]))
        inputs = model.embed(hidden_states, timestep, cond.encoder_hidden_states, cond.encoder_attention_mask,
                             cond.encoder_hidden_states_2, condition, cond.motion_score)
        f, h, w = inputs.grid
        shard = TokenShard(f * h * w, mesh.ulysses_degree, mesh.sp_rank)
        n_micro = micro_batch_count(batch, mesh.pp_degree)
        size = batch // n_micro
        micro = [slice_inputs(inputs, m * size, (m + 1) * size) for m in range(n_micro)]
        core = None
        if mesh.ulysses_degree > 1:
            core = UlyssesAttention(self.comm, mesh.sp_group, shard, size, model.num_attention_heads,
                                    model.attention_head_dim, model.dtype)
        work = _StageWork(model, micro, shard, self._rope(shard, inputs.grid), core)
        outputs = run_stage(mesh, self.comm, Schedule(mesh.pp_degree, n_micro), self.partition, work)

        channels = model.patch_size * model.patch_size * model.out_channels
        if mesh.is_last_stage:
            projected = [model.project_out(outputs[m], micro[m]) for m in range(n_micro)]
            mine = projected[0] if n_micro == 1 else mint.cat(projected, dim=0)
        else:
            mine = mint.zeros((batch, shard.local, channels), dtype=model.dtype)
        # every rank's slice side by side: the last stage's ranks hold the last padded_total tokens
        everything = self.comm.all_gather(mine, mesh.world_ranks, axis=1)
        first = (mesh.pp_degree - 1) * shard.padded_total
        return model.unpatchify(everything[:, first:first + shard.total], inputs.grid)

    __call__ = forward

    def predictor(self, cond: Conditioning) -> Predictor:
        return lambda latents, timestep: self.forward(latents, timestep, cond)

    def _rope(self, shard: TokenShard, grid: Tuple[int, int, int]) -> Rope3D:
        if grid not in self._ropes:
            self._ropes[grid] = shard.rope(self.model, grid)
        return self._ropes[grid]


def parallel_denoise(mesh: Mesh, comm: Communicator, model: StepVideoModel, latents: Tensor, cond: Conditioning,
                     scheduler: FlowMatchScheduler, num_inference_steps: int, time_shift: float,
                     guidance_scale: float, progress: bool = True, on_step=None) -> Tensor:
    """The flow-matching loop of `sampling.denoise` with the DiT run on the mesh (`on_step` as there).

    latents: the initial noise (b, f, c, h, w), identical on every rank (same seed).
    cond: embeddings batched [cond, uncond] (2b) when guidance_scale > 1, else b.
    Returns the final latents (float32), identical on every rank.
    """
    expected = latents.shape[0] * (2 if uses_guidance(guidance_scale) else 1)
    if cond.batch != expected:
        raise ValueError(
            f"encoder_hidden_states has batch {cond.batch} but guidance_scale={guidance_scale} needs {expected}: "
            + ("pass [prompt, negative prompt] embeddings" if expected > latents.shape[0] else
               "pass the prompt embeddings only (no negative prompt without guidance)"))
    dit = ParallelDiT(mesh, comm, model)
    return denoise(dit.predictor(cond), latents, scheduler, num_inference_steps, time_shift, guidance_scale,
                   model_dtype=model.dtype, progress=progress and mesh.rank == 0, on_step=on_step)
