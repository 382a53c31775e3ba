"""The memory and traffic planner: what each card of a (cfg x ulysses x pp [x shard]) layout holds at
its peak, what it sends per denoising step, and how long a step takes, from arithmetic alone.

Every figure below follows from the model's parameter counts (taken from the model built without
weights), the latent grid, and the layout, as the parallel code runs it (dit_forward.py,
pipeline.py, ulysses.py, shard.py):

- weights: the largest stage's blocks (1/N of each with shard_weights, N = cfg x ulysses ranks),
  plus everything outside the blocks (every rank keeps it); with --weights int8 a block's linear
  weights count 1 byte each plus one scale per output channel in the compute dtype (the rest of
  the block and everything outside the blocks stay in it), and so do its gathers; on a target
  without the W8A16 kernel (the CPU backend) the largest linear weight is dequantized at a time;
- gather buffers (shard_weights): the gathered block, the next block's gather in flight (Ascend)
  and the working block its values are copied into: 3 blocks (2 on a lockstep CPU world);
- embedded tokens: every rank embeds its replica's whole batch, (B, N, D);
- activations of one block on a micro-batch of m samples and n = ceil(N / ulysses) tokens, in
  units of n*m*D elements of the compute dtype. The tensors alive at the self-attention's peak
  count 15 units: the input and its modulated norm (2), q k v (3), their normed/rotated copies (3),
  the all-to-all's exchanged q k v (3), the attention output and its way back (2), float32 norm
  temporaries (2) (the feed-forward phase, x + h + 4D hidden + 4D GELU = 10 units, is smaller;
  attention is fused, no N x N scores). Memory pools do not pack that tightly: the target's
  `activation_units` is CALIBRATED, 30 on Ascend (puts both published points, mindone's ulysses 2 x
  pp 2 and upstream's ulysses 4, within 7 %) and 12 on the CPU backend plus its blocked attention's
  score blocks (3 x min(128 MiB, the scores of the micro-batch)), measured with bench/bench_offload.py
  at one and two samples (the earlier single 44-unit figure mixed the two; tests/test_plan.py checks
  the peak RSS of another size);
- pipeline: the stage's input/output of each micro-batch in flight (M x m x n x D);
- conditions: the caption context (B, Lk, D) and the text embeddings;
- a fixed runtime reserve (framework, HCCL buffers, kernel workspaces): the target's `reserve_gib`.

An in-process VAE decodes on rank 0's card after the DiT: it gets the card less the stage's resident
weights, the reserve and the in-process models held then (`decode_budget_bytes`), and is tiled to fit
that budget (`expected_decode_tile`); a layout that leaves no tile room is not chosen.

Offload (offload.py): the card keeps the non-block parameters and `offload_working_blocks` blocks
(Ascend: the one computing and the next one being copied in; CPU: one, filled synchronously), the
host keeps the rank's whole stage (`host_bytes`; with --weights int8 the blocks are int8 with their scales,
`block_bytes`, on the host, the link and the card). The host memory is counted PER HOST (`host_gib`, the
largest over the hosts of `ranks_per_host` consecutive ranks, default the whole world on one host):
with `Hardware.host_blocks_shared` (host blocks not pinned: CPU, or no Tensor.pin_memory) the ranks of
a host that run the same stage share one copy, else (pinned, Ascend) every rank keeps its own
(host_memory.py says why). Every
block is copied in once per micro-batch (unless the stage has no more blocks than working blocks)
over the host link (`host_link_gb_s`, per card, ASSUMED), issued one block ahead: a copy costs only
what exceeds the block it hides under, plus the `1 - offload_overlap` share (ASSUMED) the overlap
does not hide (DMA contention, the event wait). Sequential CFG (`seq_cfg`, one card or pure ulysses
layouts): the [cond, uncond] halves run one after the other as two micro-batches of one sample, so
the block activations are those of one sample; the FLOPs are the same. Chunked token-wise parts
(`chunk`, layers.tokenwise): the modulated norms, the cross-attention and the feed-forward run a
chunk of tokens at a time, so the float32 norm temporaries of the attention phase become a chunk's
(`chunk_units_saved` fewer units) and the feed-forward phase stays below the attention's.

Traffic per card per step: Ulysses all-to-alls (q k v out, the output back: (u-1)/u of 4 n m D
per layer and micro-batch), weight gathers ((N-1)/N of a block per layer and micro-batch),
stage-to-stage transfers, and the final all-gather of the projected tokens (which also brings the
two CFG halves together).

Step time on the target card: FLOPs / (peak x utilisation) / (1 - pipeline idle share) plus the
communication that is not hidden (all-to-alls and stage transfers; weight gathers only where one
takes longer than the block it hides under), at a stated link bandwidth. The defaults of
`Hardware` are ASSUMPTIONS, named as such wherever they are printed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional

from .host_memory import host_block_count, host_blocks_shared
from .mesh import CFG_DEGREES, Mesh, layer_partition

GIB = 2 ** 30
TEXT_TOKENS = 320 + 77  # Step-1 + HunyuanCLIP caption tokens (the context is at most this long)
CHUNK_TOKENS = 8192  # the chunk of token-wise parts the planner proposes (--chunk_tokens)


@dataclass(frozen=True)
class Hardware:
    """The target card. Every default is an assumption or a calibration, not a measurement of ours."""

    name: str = "Ascend 910B"
    peak_tflops: float = 313.0  # dense bf16 peak (assumed datasheet figure)
    utilisation: float = 0.35  # assumed: makes ulysses 2 x pp 2 reproduce mindone's ~77 s per step
    link_gb_s: float = 100.0  # assumed bytes per second each card can send to its peers (HCCS), in GB/s
    dtype_bytes: int = 2  # bf16 weights and activations
    activation_units: float = 30.0  # calibrated (see the module docstring)
    reserve_gib: float = 3.0  # assumed: framework, HCCL buffers, kernel workspaces
    lockstep: bool = False  # CPU world collectives: no gather issued ahead
    int8_matmul: bool = True  # the W8A16 kernel takes int8 weights (else one linear is dequantized at a time)
    host_link_gb_s: float = 25.0  # assumed: host-to-card copy bandwidth per card (PCIe 4.0 x16, pinned), GB/s
    offload_overlap: float = 0.95  # assumed: share of a copy hidden under a longer block's compute
    offload_working_blocks: int = 2  # the computing block and the next one in flight (offload.py)
    chunk_units_saved: float = 4.0  # modelled: the float32 norm temporaries (2 of the 15 units) x the calibration (30/15)
    score_block_bytes: int = 0  # CPU: the blocked attention's score block bound (0: fused attention, no scores)
    score_copies: float = 0.0  # CPU: score-sized tensors alive at once (scores, exponentials, probabilities)
    host_blocks_shared: bool = False  # offload: a host's ranks of one stage share one copy (not pinned; host_memory.py)

    def describe(self) -> str:
        return (f"assumed: {self.name} at {self.peak_tflops:.0f} TFLOPS bf16 peak x {self.utilisation:.0%} "
                f"utilisation, {self.link_gb_s:.0f} GB/s sent per card, runtime reserve {self.reserve_gib:g} GiB, "
                f"offload: {self.host_link_gb_s:g} GB/s host link per card, {self.offload_overlap:.0%} of a copy hidden "
                f"under a longer block, host blocks "
                f"{'shared per stage' if self.host_blocks_shared else 'pinned per rank'}; "
                f"calibrated: {self.activation_units:g} activation units")


# MindSpore's CPU backend as tests and benchmarks run it: float32, lockstep gathers, RSS measured above
# the process's size after start-up (no reserve); activation units from measured peak RSS.
# Activations: 12 units per sample plus 3 score blocks of the blocked attention (measured with
# bench/bench_offload.py on 8 x 8 x 64 at 2048 and 4096 tokens, one and two samples; it also reproduces the
# earlier 44-unit calibration's probe); chunking measured no saving on CPU (the score blocks dominate).
CPU = Hardware(name="CPU backend", peak_tflops=0.25, utilisation=1.0, link_gb_s=5.0, dtype_bytes=4,
               activation_units=12.0, reserve_gib=0.0, lockstep=True, host_link_gb_s=5.0, offload_working_blocks=1,
               chunk_units_saved=0.0, score_block_bytes=128 * 2 ** 20, score_copies=3.0,
               int8_matmul=False, host_blocks_shared=True)


def hardware_for(device: str) -> Hardware:
    """The profile a run on `device` is checked with: the CPU backend's on CPU, the 910B's otherwise, holding
    its offloaded blocks as the device does (host_memory.host_blocks_shared)."""
    return replace(CPU if device == "CPU" else Hardware(), host_blocks_shared=host_blocks_shared(device))


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of the DiT: parameter counts and widths."""

    num_layers: int
    heads: int
    head_dim: int
    block_params: int
    other_params: int
    out_channels: int = 64
    patch_size: int = 1
    caption_channels: int = 6144
    clip_channels: int = 1024
    block_int8_params: int = 0  # of block_params: the linear weights that --weights int8 holds in int8
    block_scales: int = 0  # their per-output-channel scales (added with --weights int8)
    largest_linear: int = 0  # elements of the largest of those weights

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def block_bytes(self, weights: str, dtype_bytes: int) -> int:
        """One block's weights: all in the compute dtype, or int8 linear weights plus scales and the rest."""
        if weights != "int8":
            return self.block_params * dtype_bytes
        return self.block_int8_params + (self.block_params - self.block_int8_params + self.block_scales) * dtype_bytes

    @property
    def total_params(self) -> int:
        return self.block_params * self.num_layers + self.other_params

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """Counts from the model built without weights (one source of truth with describe.py)."""
        import mindspore as ms
        from mindspore.nn.utils import no_init_parameters
        from ..models.common import count_parameters
        from ..models.dit import StepVideoModel

        from ..ops.quant import SCALE_SUFFIX
        from ..models.layers import StepVideoTransformerBlock

        with no_init_parameters():
            model = StepVideoModel.from_config(config, dtype=ms.bfloat16)
            quant = StepVideoTransformerBlock(model.inner_dim, model.attention_head_dim, ms.bfloat16, "int8")
        block = count_parameters(model.transformer_blocks[0])
        int8 = [_numel(p.shape) for _, p in quant.parameters_and_names() if p.dtype == ms.int8]
        scales = sum(_numel(p.shape) for n, p in quant.parameters_and_names() if n.endswith(SCALE_SUFFIX))
        caption = config.get("caption_channels", (6144, 1024))
        caption, clip = (caption, 0) if isinstance(caption, int) else caption
        return cls(model.num_layers, model.num_attention_heads, model.attention_head_dim, block,
                   count_parameters(model) - block * model.num_layers, model.out_channels, model.patch_size,
                   int(caption), int(clip or 0), sum(int8), scales, max(int8))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class Layout:
    cfg: int
    ulysses: int
    pp: int
    shard: bool
    offload: bool = False
    seq_cfg: bool = False  # the [cond, uncond] halves one after the other (cfg 1, pp 1)
    chunk: int = 0  # token-wise parts on this many tokens at a time (0: off)
    weights: str = "full"  # or "int8" (--weights int8)

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.pp

    @property
    def shard_parts(self) -> int:
        return self.cfg * self.ulysses if self.shard else 1

    def name(self) -> str:
        parts = ([f"cfg {self.cfg}"] if self.cfg > 1 else []) + [f"ulysses {self.ulysses}", f"pp {self.pp}"]
        return (" x ".join(parts) + (" + shard" if self.shard else "") + (" + offload" if self.offload else "")
                + (" + seq cfg" if self.seq_cfg else "") + (" + chunks" if self.chunk else "")
                + (" + int8" if self.weights == "int8" else ""))

    def arguments(self) -> str:
        return ((f"--cfg_degree {self.cfg} " if self.cfg > 1 else "") + f"--ulysses_degree {self.ulysses} "
                f"--pp_degree {self.pp}" + (" --shard_weights" if self.shard else "")
                + (" --offload" if self.offload else "") + (" --sequential_cfg" if self.seq_cfg else "")
                + (f" --chunk_tokens {self.chunk}" if self.chunk else "")
                + (" --weights int8" if self.weights == "int8" else ""))


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: dict  # part -> bytes, per card at the peak
    sent_bytes: dict  # part -> bytes sent per card per step
    flops_per_card: float
    idle_share: float
    compute_s: float
    comm_s: float
    host_bytes: int = 0  # offload: this rank's blocks in host memory
    offload_s: float = 0.0  # offload: copy time not hidden under compute, per step
    host_copy_bytes: int = 0  # offload: bytes copied host -> card per step
    host_total_bytes: int = 0  # offload: the offloaded blocks of the host that holds the most

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.memory.values()))

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def host_gib(self) -> float:
        """Host memory of the offloaded blocks PER HOST: the host that holds the most (see `plan`)."""
        return self.host_total_bytes / GIB

    @property
    def step_s(self) -> float:
        return self.compute_s / (1.0 - self.idle_share) + self.comm_s + self.offload_s

    @property
    def offload_ratio(self) -> float:
        """Step time over the step time without the offload's exposed copies (1.0 without offload)."""
        return self.step_s / (self.step_s - self.offload_s)

    def fits(self, card_gb: Optional[float], host_gb: Optional[float] = None) -> bool:
        return (card_gb is None or self.peak_gib <= card_gb) and (host_gb is None or self.host_gib <= host_gb)


def duration(seconds: float) -> str:
    """A run's predicted time as printed: minutes from 10 minutes on, else seconds."""
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds:.0f} s"


def decode_budget_bytes(plan: Plan, card_gb: float, held_bytes: int = 0) -> float:
    """What rank 0's card has left for an in-process VAE decode, which runs after the DiT (its activations
    freed): the card less the DiT stage's resident weights, the runtime reserve and the in-process models
    it holds then (`held_bytes`)."""
    return card_gb * GIB - plan.memory["weights"] - plan.memory["runtime reserve"] - held_bytes


def expected_decode_tile(plan: Plan, card_gb: float, held_bytes: int, tile_for: Callable[[float], Optional[tuple]]):
    """(the decode's tile in latent positions, None for untiled; its budget in bytes) on rank 0's card, with
    `tile_for(budget_bytes)` the VAE's choice (models.vae_tiled.choose_tile for the video's latents).
    ValueError with the numbers when the card has nothing left or no tile fits what it has."""
    budget = decode_budget_bytes(plan, card_gb, held_bytes)
    if budget <= 0:
        raise ValueError(f"{plan.layout.name()}: rank 0's card ({card_gb:g} GiB) is filled by the DiT's weights "
                         f"({plan.memory['weights'] / GIB:.2f} GiB), the runtime reserve and the in-process models "
                         f"({held_bytes / GIB:.2f} GiB) before the VAE decodes")
    try:
        return tile_for(budget), budget
    except ValueError as exc:
        raise ValueError(f"{plan.layout.name()}: the VAE decode on rank 0's card, with the {budget / GIB:.2f} GiB "
                         f"it has left: {exc}") from None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan(model: ModelShape, layout: Layout, grid, guidance: bool = True, hardware: Hardware = Hardware(),
         text_tokens: int = TEXT_TOKENS, ranks_per_host: Optional[int] = None) -> Plan:
    """The plan of one layout for latents of `grid` = (latent frames, latent height, latent width), its
    host memory per host of `ranks_per_host` consecutive ranks (None: the whole world on one host)."""
    f, h, w = grid
    p = model.patch_size
    tokens = f * (h // p) * (w // p)
    d, b = model.width, hardware.dtype_bytes
    batch = (2 if guidance else 1) // layout.cfg  # samples of this rank's replica
    if batch < 1:
        raise ValueError("cfg_degree 2 needs guidance (a [cond, uncond] batch)")
    if layout.seq_cfg and (layout.pp > 1 or batch < 2):
        raise ValueError("sequential CFG applies to a [cond, uncond] batch on cfg 1 x pp 1 layouts")
    micro = batch if layout.pp > 1 or layout.seq_cfg else 1  # micro-batches (pipeline.micro_batch_count)
    m = batch // micro  # samples per micro-batch
    n = ceil_div(tokens, layout.ulysses)  # local tokens
    stage_layers = ceil_div(model.num_layers, layout.pp)  # the largest (balanced) stage
    block_bytes = model.block_bytes(layout.weights, b)
    parts = layout.shard_parts
    int8 = layout.weights == "int8"

    resident_blocks = stage_layers
    if layout.offload:
        resident_blocks = min(stage_layers, hardware.offload_working_blocks)
    memory = {
        "weights": resident_blocks * ceil_div(block_bytes, parts) + model.other_params * b,
        "gather buffers": (2 if hardware.lockstep else 3) * block_bytes if parts > 1 else 0,
        "dequantized weight": model.largest_linear * b if int8 and not hardware.int8_matmul else 0,
        "embedded tokens": batch * tokens * d * b,
        "block activations": int((hardware.activation_units - (hardware.chunk_units_saved if layout.chunk else 0.0))
                                 * m * n * d * b
                                 + hardware.score_copies * min(hardware.score_block_bytes,
                                                               m * (model.heads // layout.ulysses) * tokens * tokens * 4)),
        "pipeline in flight": (2 * micro * m * n * d * b) if layout.pp > 1 else 0,
        "conditions": batch * text_tokens * (d + model.caption_channels) * b + batch * 77 * model.clip_channels * b,
        "runtime reserve": int(hardware.reserve_gib * GIB),
    }

    a2a = 0 if layout.ulysses == 1 else stage_layers * micro * (layout.ulysses - 1) * 4 * m * n * (d // layout.ulysses) * b
    gather = stage_layers * micro * (parts - 1) * ceil_div(block_bytes, parts) if parts > 1 else 0
    shift = micro * m * n * d * b if layout.pp > 1 else 0  # every stage but the last sends (the largest)
    out = (layout.world - 1) * batch * n * p * p * model.out_channels * b
    sent = {"all-to-all": a2a, "weight gathers": gather, "stage transfers": shift, "output gather": out}

    per_token_layer = 2 * 14 * d * d + 4 * tokens * d + 4 * text_tokens * d  # matmuls + self/cross attention
    total_flops = (2 if guidance else 1) * tokens * model.num_layers * per_token_layer
    flops = total_flops / layout.world
    rate = hardware.peak_tflops * 1e12 * hardware.utilisation
    compute = flops / rate
    link = hardware.link_gb_s * 1e9
    exposed = (a2a + shift + out) / link
    if gather:  # overlapped with the previous block: only the excess shows
        per_block_compute = compute / (stage_layers * micro)
        per_block_gather = gather / (stage_layers * micro) / link
        exposed += stage_layers * micro * max(0.0, per_block_gather - per_block_compute)
    idle = (layout.pp - 1) / (micro + layout.pp - 1) if layout.pp > 1 else 0.0
    host = copied = on_host = 0
    offload = 0.0
    if layout.offload:
        host = stage_layers * block_bytes
        stages = [len(layers) for layers in layer_partition(model.num_layers, layout.pp)]
        stage_of = [Mesh(layout.world, r, layout.ulysses, layout.pp, cfg_degree=layout.cfg).stage
                    for r in range(layout.world)]
        on_host = host_block_count(stage_of, stages, ranks_per_host, hardware.host_blocks_shared) * block_bytes
        copies = 0 if stage_layers <= hardware.offload_working_blocks else stage_layers * micro
        copied = copies * block_bytes
        if copies:
            per_copy = block_bytes / (hardware.host_link_gb_s * 1e9)
            per_block = compute / (stage_layers * micro)
            offload = copies * (max(0.0, per_copy - per_block)
                                + (1.0 - hardware.offload_overlap) * min(per_copy, per_block))
    return Plan(layout, memory, sent, flops, idle, compute, exposed, host, offload, copied, on_host)


def layouts(cards: int, heads: int, num_layers: int, guidance: bool = True, offload: bool = True,
            weights: str = "full") -> List[Layout]:
    """Every valid layout of `cards` ranks (the rules of mesh.Mesh), with `weights` ("full" or "int8"); with
    `offload`, also the offload variants and (cfg 1 x pp 1 with guidance) sequential CFG, alone and with
    chunked token-wise parts."""
    found = []
    for cfg in CFG_DEGREES:
        if cards % cfg or (cfg > 1 and not guidance):
            continue
        rest = cards // cfg
        for u in range(1, rest + 1):
            if rest % u or heads % u or rest // u > num_layers:
                continue
            pp = rest // u
            budgets = [(False, 0)]
            if offload and guidance and cfg == 1 and pp == 1:
                budgets += [(True, 0), (True, CHUNK_TOKENS)]
            for seq, chunk in budgets:
                for shard, off in ((False, False), (True, False), (False, True)):
                    if (shard and cfg * u == 1) or (off and not offload):
                        continue
                    found.append(Layout(cfg, u, pp, shard, off, seq, chunk, weights))
    return found


def choose(plans: List[Plan], card_gb: Optional[float], host_gb: Optional[float] = None) -> Optional[Plan]:
    """The fastest predicted plan that fits, or None; among equally fast ones (to the millisecond) the
    one without offload, sequential CFG or sharding (fewer moving parts), then the least memory."""
    fitting = [p for p in plans if p.fits(card_gb, host_gb)]
    return min(fitting, key=lambda q: (round(q.step_s, 3), q.layout.offload, q.layout.seq_cfg, bool(q.layout.chunk),
                                       q.layout.shard, q.peak_bytes)) if fitting else None

