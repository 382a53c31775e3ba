"""The DiT forward and the denoising loop on a (cfg x pp x ulysses) mesh.

Every rank embeds the whole batch (patch embedding, AdaLN-single, caption projection: cheap
next to the blocks), keeps its SP slice of the video tokens, runs its stage's layers on the
micro-batch schedule, and the last stage projects its own tokens to the output channels before
they are gathered to every rank (p*p*out_channels per token instead of the model width). All ranks
therefore hold the same velocity and take the same scheduler step: `parallel_denoise` is the
single-process `denoise` loop with a parallel predictor.

With cfg_degree 2, each CFG replica embeds and runs only its half of the [cond, uncond] batch;
the one world all-gather of the projected tokens at the end of the forward also brings the two
halves together (the once-per-step combination). With sharded weights (shard.py) the stage's
blocks come from a BlockGatherer instead of the model's own (unallocated) blocks; with offload
(offload.py) from a BlockStreamer that copies them in from host memory.

Entry points for a command line:
    world_size, rank = comm.init_world()
    mesh = Mesh.create(world_size, rank, ulysses_degree, pp_degree, ring_degree, pp_split, cfg_degree, shard_weights)
    model, shards = load_stage(transformer_dir, mesh, dtype, weights=...)  # shards: None without shard_weights
    latents = parallel_denoise(mesh, make_communicator(mesh), model, noise, Conditioning(...),
                               scheduler, steps, time_shift, guidance_scale, shards=shards)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..formats import checkpoint
from ..diffusion.sampling import Predictor, denoise, uses_guidance
from ..diffusion.scheduler import FlowMatchScheduler
from ..models.dit import DiTInputs, StepVideoModel
from ..ops.alloc import empty
from ..ops.attention import KeyMask
from ..models.rope import Rope3D
from .comm import Communicator
from .mesh import Mesh
from .pipeline import Schedule, micro_batch_count, run_stage
from .step_plan import Marker, Residuals, layer_sequence, stage_items
from ..diffusion.step_cache import StepCache
from .offload import BlockStreamer, HostBlocks, load_offloaded_stage
from .shard import BlockGatherer, BlockShards, load_sharded_stage
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


def load_stage_model(path: str, mesh: Mesh, dtype=ms.float32, progress: bool = True,
                     weights: Optional[str] = None) -> StepVideoModel:
    """Build the DiT of `path` (a transformer directory with config.json) without allocating its
    weights, then read only this rank's stage and the shared embedding/output parameters.
    weights: "full", "int8" or None (what the folder holds), see StepVideoModel.from_pretrained."""
    config = checkpoint.read_config(path)
    model_args = StepVideoModel.config_keys()
    probe = {k: v for k, v in config.items() if k in model_args}
    heads, layers = int(probe.get("num_attention_heads", 48)), int(probe.get("num_layers", 48))
    mesh.check_model(heads, layers)
    return StepVideoModel.from_pretrained(path, config, dtype=dtype, select=stage_param_filter(mesh, layers),
                                          progress=progress, weights=weights)


def load_stage(path: str, mesh: Mesh, dtype=ms.float32, progress: bool = True,
               weights: Optional[str] = None) -> Tuple[StepVideoModel, Union[None, BlockShards, HostBlocks]]:
    """(model, shards): this rank's stage with full block weights, or with `mesh.shard_weights` the
    model without its block weights and this rank's slices of the stage's blocks, or with
    `mesh.offload` the model without its block weights and the stage's blocks in host memory.
    weights: "full", "int8" (the blocks' linear layers in int8) or None (what the folder holds)."""
    if mesh.offload:
        return load_offloaded_stage(path, mesh, dtype, progress, weights)
    if mesh.shard_weights:
        return load_sharded_stage(path, mesh, dtype, progress, weights)
    return load_stage_model(path, mesh, dtype, progress, weights), None


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

    def half(self, which: int) -> "Conditioning":
        """The conditional (0) or unconditional (1) half of a [cond, uncond] batch."""
        n = self.batch // 2

        def cut(t):
            return t[which * n:(which + 1) * n]

        condition = self.condition_hidden_states
        if condition is not None and condition.shape[0] == self.batch:
            condition = cut(condition)
        return dataclasses.replace(
            self, encoder_hidden_states=cut(self.encoder_hidden_states),
            encoder_attention_mask=cut(self.encoder_attention_mask),
            encoder_hidden_states_2=None if self.encoder_hidden_states_2 is None else cut(self.encoder_hidden_states_2),
            condition_hidden_states=condition)


def slice_inputs(inputs: DiTInputs, start: int, stop: int) -> DiTInputs:
    """Samples start..stop of every batched field."""
    return dataclasses.replace(
        inputs, tokens=inputs.tokens[start:stop], t6=inputs.t6[start:stop],
        embedded_timestep=inputs.embedded_timestep[start:stop], context=inputs.context[start:stop],
        key_mask=inputs.key_mask[start:stop])


class _StageWork:
    """The DiT's blocks as pipeline work on this rank's token shard."""

    def __init__(self, model: StepVideoModel, micro: List[DiTInputs], shard: TokenShard, rope: Rope3D,
                 core: Optional[UlyssesAttention], blocks: Union[None, BlockGatherer, BlockStreamer] = None):
        self.model, self.micro, self.shard, self.rope, self.core = model, micro, shard, rope, core
        self.blocks = blocks
        self.chunk = None
        self.probes: Optional[Dict[int, Tensor]] = None  # step cache: the probe's output per micro-batch
        self.residuals: Optional[Residuals] = None
        self.transfer_shape = (int(micro[0].tokens.shape[0]), shard.local, model.inner_dim)
        self.transfer_dtype = model.dtype

    def first_input(self, micro: int) -> Tensor:
        if self.probes is not None:
            return self.probes[micro]
        return self.shard.take(self.micro[micro].tokens)

    def run_layer(self, x: Tensor, micro: int, layer) -> Tensor:
        if isinstance(layer, Marker):
            return self.residuals.apply(layer, x, micro)
        if self.blocks is None:
            return self.model.run_blocks(x, self.micro[micro], self.rope, layers=range(layer, layer + 1), core=self.core,
                                         chunk=self.chunk)
        m = self.micro[micro]
        return self.blocks.block(layer)(x, m.context, m.t6, m.key_mask, self.rope, self.core, self.chunk)

    def idle_layer(self) -> None:
        if self.blocks is not None:
            self.blocks.idle()
        if self.core is not None:
            self.core.idle()


class ParallelDiT:
    """`forward(latents, timestep, conditioning)` -> the model output, the same on every rank."""

    def __init__(self, mesh: Mesh, comm: Communicator, model: StepVideoModel,
                 shards: Union[None, BlockShards, HostBlocks] = None):
        if comm.rank != mesh.rank or comm.world_size != mesh.world_size:
            raise ValueError(f"communicator (rank {comm.rank}/{comm.world_size}) does not match the mesh ({mesh.describe()})")
        if mesh.shard_weights != isinstance(shards, BlockShards):
            raise ValueError("shard_weights needs the model and shards of parallel.load_stage (and only then)")
        if mesh.offload != isinstance(shards, HostBlocks):
            raise ValueError("offload needs the model and host blocks of parallel.load_stage (and only then)")
        mesh.check_model(model.num_attention_heads, model.num_layers)
        self.mesh, self.comm, self.model = mesh, comm, model
        self.partition = mesh.partition(model.num_layers)
        self._ropes: Dict[Tuple[int, int, int], Rope3D] = {}
        self._text_slices: Dict[object, object] = {}  # micro-batch (start, stop) -> (context, KeyMask)
        self.blocks = None
        if isinstance(shards, BlockShards):
            self.blocks = BlockGatherer(comm, mesh.shard_group, shards, model, mesh.stage_layers(model.num_layers))
        elif isinstance(shards, HostBlocks):
            self.blocks = BlockStreamer(shards, model, mesh.stage_layers(model.num_layers))

    def forward(self, hidden_states: Tensor, timestep: Tensor, cond: Conditioning,
                text: Optional[Tuple[Tensor, KeyMask]] = None, cache: Optional[StepCache] = None) -> Tensor:
        """`text`: model.embed_text(...) of this rank's part of `cond` (its CFG replica's half when
        cfg_degree > 1), when the loop computed it once. `cache`: the loop's step cache (enabled), which
        decides this step (step_plan.py)."""
        mesh, model = self.mesh, self.model
        full_batch = int(hidden_states.shape[0])
        if cond.batch != full_batch:
            raise ValueError(f"encoder_hidden_states has batch {cond.batch} but the latents have batch {full_batch}")
        if mesh.cfg_degree > 1:  # this replica's half of [cond, uncond]
            if full_batch % 2:
                raise ValueError(f"cfg_degree 2 needs a [cond, uncond] batch, got batch {full_batch}")
            half = full_batch // 2
            hidden_states = hidden_states[mesh.cfg_rank * half:(mesh.cfg_rank + 1) * half]
            timestep = timestep[mesh.cfg_rank * half:(mesh.cfg_rank + 1) * half]
            cond = cond.half(mesh.cfg_rank)
        batch = int(hidden_states.shape[0])
        condition = cond.condition_hidden_states
        if condition is not None and condition.shape[0] == 1 and batch > 1:
            condition = condition.broadcast_to((batch,) + tuple(condition.shape[1:]))
        inputs = model.embed(hidden_states, timestep, cond.encoder_hidden_states, cond.encoder_attention_mask,
                             cond.encoder_hidden_states_2, condition, cond.motion_score, text=text)
        f, h, w = inputs.grid
        shard = TokenShard(f * h * w, mesh.ulysses_degree, mesh.sp_rank)
        n_micro = micro_batch_count(batch, mesh.pp_degree, mesh.sequential_cfg)
        size = batch // n_micro
        micro = [self._slice(inputs, m * size, (m + 1) * size, text) for m in range(n_micro)]
        core = None
        if mesh.ulysses_degree > 1:
            core = UlyssesAttention(self.comm, mesh.sp_group, shard, size, model.num_attention_heads,
                                    model.attention_head_dim, model.dtype)
        work = _StageWork(model, micro, shard, self._rope(shard, inputs.grid), core, self.blocks)
        work.chunk = mesh.chunk_tokens or None
        if cache is not None and cache.settings.enabled:
            outputs = self._run_cached(work, n_micro, cache)
        else:
            if cache is not None:
                cache.count_computed()
            outputs = run_stage(mesh, self.comm, Schedule(mesh.pp_degree, n_micro), self.partition, work)

        channels = model.patch_size * model.patch_size * model.out_channels
        if mesh.is_last_stage:
            projected = [model.project_out(outputs[m], micro[m], mesh.chunk_tokens or None) for m in range(n_micro)]
            mine = projected[0] if n_micro == 1 else mint.cat(projected, dim=0)
        else:
            mine = empty((batch, shard.local, channels), model.dtype)  # sliced away below: no fill
        # every rank's slice side by side: in each replica the last stage's ranks hold its last
        # padded_total tokens; the replicas' outputs are the halves of the batch, in order
        everything = self.comm.all_gather(mine, mesh.world_ranks, axis=1)
        halves = []
        for c in range(mesh.cfg_degree):
            first = (c * mesh.pp_degree + mesh.pp_degree - 1) * shard.padded_total
            halves.append(everything[:, first:first + shard.total])
        tokens = halves[0] if len(halves) == 1 else mint.cat(halves, dim=0)
        return model.unpatchify(tokens, inputs.grid)

    __call__ = forward

    def _run_cached(self, work: _StageWork, n_micro: int, cache: StepCache):
        """One step with the step cache: the probe on the first stage, one world decision, then the
        rest of the blocks on the schedule, the middle span computed or its residual reused."""
        mesh, comm, settings = self.mesh, self.comm, cache.settings
        probe = range(settings.first)
        first_stage = mesh.stage == 0
        if self.blocks is not None:
            self.blocks.plan(layer_sequence([], n_micro, probe) if first_stage else [])
        probes: Dict[int, Tensor] = {}
        sums = np.zeros((1, 2), np.float32)
        if first_stage:
            real = work.shard.real
            for m in range(n_micro):
                x = work.first_input(m)
                for layer in probe:
                    x = work.run_layer(x, m, layer)
                probes[m] = x
                then = cache.state.get(("probe", m))
                if then is not None and real > 0:
                    sums[0, 0] += float(mint.abs(x[:, :real] - then[:, :real]).astype(ms.float32).sum())
                    sums[0, 1] += float(mint.abs(then[:, :real]).astype(ms.float32).sum())
        elif comm.lockstep:
            for _ in range(len(probe) * n_micro):
                work.idle_layer()
        world = comm.all_gather(Tensor(sums), mesh.world_ranks, axis=0).asnumpy().astype(np.float64)
        reuse = cache.decide(float(world[:, 0].sum()), float(world[:, 1].sum()))
        if not reuse:
            for m, x in probes.items():
                cache.state[("probe", m)] = x
        middle = settings.middle(self.model.num_layers)
        items = [stage_items(layers, middle, reuse, probe if s == 0 else ())
                 for s, layers in enumerate(self.partition)]
        if self.blocks is not None:
            self.blocks.plan(layer_sequence(items[mesh.stage], n_micro))
        work.probes = probes if first_stage else None
        work.residuals = Residuals(cache.state)
        return run_stage(mesh, comm, Schedule(mesh.pp_degree, n_micro), items, work)

    def predictor(self, cond: Conditioning, cache: Optional[StepCache] = None) -> Predictor:
        """The loop's model call. The text context and key mask do not change over the loop: they are
        computed once here (one read of the mask to the host), not at every step."""
        local = cond.half(self.mesh.cfg_rank) if self.mesh.cfg_degree > 1 else cond
        text = self.model.embed_text(local.encoder_hidden_states, local.encoder_attention_mask.asnumpy(),
                                     local.encoder_hidden_states_2)
        return lambda latents, timestep: self.forward(latents, timestep, cond, text, cache)

    def _slice(self, inputs: DiTInputs, start: int, stop: int, text) -> DiTInputs:
        """A micro-batch; its text part (and so its key mask's kernel form) is kept while `text` is."""
        sliced = slice_inputs(inputs, start, stop)
        if text is None:
            return sliced
        if self._text_slices.get("of") is not text:
            self._text_slices = {"of": text}
        key = (start, stop)
        if key not in self._text_slices:
            self._text_slices[key] = (sliced.context, sliced.key_mask)
        context, key_mask = self._text_slices[key]
        return dataclasses.replace(sliced, context=context, key_mask=key_mask)

    def _rope(self, shard: TokenShard, grid: Tuple[int, int, int]) -> Rope3D:
        if grid not in self._ropes:
            self._ropes[grid] = shard.rope(self.model, grid)
        return self._ropes[grid]


def parallel_denoise(mesh: Mesh, comm: Communicator, model: StepVideoModel, latents: Tensor, cond: Conditioning,
                     scheduler: FlowMatchScheduler, num_inference_steps: int, time_shift: float,
                     guidance_scale: float, progress: bool = True,
                     shards: Union[None, BlockShards, HostBlocks] = None, on_step=None,
                     cache: Optional[StepCache] = None) -> Tensor:
    """The flow-matching loop of `sampling.denoise` with the DiT run on the mesh (`on_step` as there).
    cache: a fresh StepCache of this loop (diffusion/step_cache.py), or None: no step cache; its
    record() afterwards is the run's `cache` entry.

    latents: the initial noise (b, f, c, h, w), identical on every rank (same seed).
    cond: embeddings batched [cond, uncond] (2b) when guidance_scale > 1, else b.
    shards: this rank's block slices when mesh.shard_weights, its host blocks when mesh.offload (from `load_stage`).
    Returns the final latents (float32), identical on every rank.
    """
    if mesh.cfg_degree > 1 and not uses_guidance(guidance_scale):
        raise ValueError(f"cfg_degree={mesh.cfg_degree} runs the [cond, uncond] halves on two rank groups, but "
                         f"guidance_scale={guidance_scale} <= 1 has no unconditional half: use --cfg_degree 1 "
                         "or a cfg_scale above 1")
    expected = latents.shape[0] * (2 if uses_guidance(guidance_scale) else 1)
    if cond.batch != expected:
        raise ValueError(
            f"encoder_hidden_states has batch {cond.batch} but guidance_scale={guidance_scale} needs {expected}: "
            + ("pass [prompt, negative prompt] embeddings" if expected > latents.shape[0] else
               "pass the prompt embeddings only (no negative prompt without guidance)"))
    dit = ParallelDiT(mesh, comm, model, shards)
    if cache is not None:
        cache.settings.check_model(model.num_layers, dit.partition)
        cache.num_layers = model.num_layers
    return denoise(dit.predictor(cond, cache), latents, scheduler, num_inference_steps, time_shift, guidance_scale,
                   model_dtype=model.dtype, progress=progress and mesh.rank == 0, on_step=on_step)
