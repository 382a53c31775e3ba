"""StepVideoModel: the Step-Video DiT, T2V and TI2V by configuration.

Parameter names and constructor arguments are upstream's, so the released
`transformer/config.json` and its safetensors shards load as they are. The forward is cut in
three (`embed`, `run_blocks`, `finish`) so that a pipeline stage can run its own layers and a
sequence-parallel rank its own tokens; `construct` chains the three for one process.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from ..formats import checkpoint
from .. import ops
from ..ops.attention import KeyMask
from ..ops.quant import resolve_weights
from .common import LayerNorm, Linear, count_parameters, new_param
from .embeddings import AdaLayerNormSingle, PixArtAlphaTextProjection
from .layers import AttentionCore, PatchEmbed, StepVideoTransformerBlock, tokenwise
from .rope import Rope3D


@dataclass
class DiTInputs:
    """What every block needs, computed once per forward by `StepVideoModel.embed`."""

    tokens: Tensor            # (b, f*h*w, D) video tokens
    t6: Tensor                # (b, 6D) AdaLN-single modulation
    embedded_timestep: Tensor  # (b, D)
    context: Tensor           # (b, Lk, D) clip + caption tokens, cut to the longest valid length
    key_mask: KeyMask         # (b, Lk), True where a text token is valid; prepared once per forward
    grid: Tuple[int, int, int]  # (frames, height, width) of the token grid


class StepVideoModel(nn.Cell):
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 128,
        in_channels: int = 64,
        out_channels: Optional[int] = 64,
        num_layers: int = 48,
        dropout: float = 0.0,
        patch_size: int = 1,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        use_additional_conditions: Optional[bool] = False,
        caption_channels: Union[int, Sequence[int]] = (6144, 1024),
        attention_type: Optional[str] = "parallel",
        dtype=ms.float32,
        weights: str = "full",
    ):
        super().__init__()
        if norm_type != "ada_norm_single":
            raise ValueError(f"norm_type={norm_type!r} is not supported: Step-Video uses 'ada_norm_single'")
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.inner_dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_layers = num_layers
        self.patch_size = patch_size
        self.use_additional_conditions = bool(use_additional_conditions)
        self.dtype = dtype
        self.weights = weights  # "int8": the blocks' linear layers hold int8 weights (models/layers.py)
        dim = self.inner_dim

        self.pos_embed = PatchEmbed(patch_size, in_channels * (2 if self.use_additional_conditions else 1), dim, dtype)
        self.transformer_blocks = nn.CellList(
            [StepVideoTransformerBlock(dim, attention_head_dim, dtype, weights) for _ in range(num_layers)])
        self.norm_out = LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine, dtype=dtype)
        self.scale_shift_table = new_param((2, dim), dtype)
        self.proj_out = Linear(dim, patch_size * patch_size * self.out_channels, dtype=dtype)
        self.adaln_single = AdaLayerNormSingle(dim, self.use_additional_conditions, dtype)
        if isinstance(caption_channels, int):
            caption_channel, clip_channel = caption_channels, None
        else:
            caption_channel, clip_channel = caption_channels
        self.clip_projection = Linear(clip_channel, dim, dtype=dtype) if clip_channel else None
        self.caption_norm = LayerNorm(caption_channel, eps=norm_eps, elementwise_affine=norm_elementwise_affine, dtype=dtype)
        self.caption_projection = PixArtAlphaTextProjection(caption_channel, dim, dtype)

    # ---- configuration -------------------------------------------------------------------
    @classmethod
    def config_keys(cls):
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dtype", "weights")]

    @classmethod
    def from_config(cls, config: dict, dtype=ms.float32, weights: str = "full") -> "StepVideoModel":
        """Build from a config dict (upstream's config.json); keys such as `_class_name` are ignored."""
        keys = cls.config_keys()
        return cls(**{k: v for k, v in config.items() if k in keys}, dtype=dtype, weights=weights)

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[dict] = None, dtype=ms.float32,
                        select: Optional[Callable[[str], bool]] = None, progress: bool = True,
                        weights: Optional[str] = None) -> "StepVideoModel":
        """The DiT of a transformer directory (config.json + safetensors) or checkpoint file; `config`
        replaces the config.json; `select` loads only some parameters (a pipeline stage). weights: "full",
        "int8" (quantized while loading released weights, or read from a convert.py --quantize int8 folder)
        or None (what the folder holds)."""
        config = checkpoint.read_config(path) if config is None else config
        weights = resolve_weights(weights, config, path)
        return checkpoint.build_and_load(lambda: cls.from_config(config, dtype=dtype, weights=weights), path,
                                         dtype=dtype, select=select, progress=progress)

    def num_parameters(self) -> int:
        return count_parameters(self)

    # ---- forward, in three parts ---------------------------------------------------------
    def embed(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
              encoder_attention_mask: Union[Tensor, np.ndarray], encoder_hidden_states_2: Optional[Tensor] = None,
              condition_hidden_states: Optional[Tensor] = None, motion_score: Optional[float] = None,
              text: Optional[Tuple[Tensor, KeyMask]] = None) -> DiTInputs:
        """The blocks' inputs; `text` = embed_text(...) of these conditions when already computed."""
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (batch, frames, channels, height, width), got {hidden_states.shape}")
        b, f, _, hh, ww = hidden_states.shape
        p = self.patch_size
        x = hidden_states.astype(self.dtype)
        if self.use_additional_conditions:
            if condition_hidden_states is None:
                raise ValueError("this model was built with use_additional_conditions=True: pass condition_hidden_states")
            x = mint.cat([x, condition_hidden_states.astype(self.dtype)], dim=2)
        x = self.pos_embed(x.reshape(b * f, x.shape[2], hh, ww))  # (b f) l d
        tokens = x.reshape(b, f * x.shape[1], self.inner_dim)

        motion = None
        if self.use_additional_conditions:
            if motion_score is None:
                raise ValueError("this model was built with use_additional_conditions=True: pass motion_score")
            motion = Tensor(np.full((b,), motion_score, dtype=np.float32)).astype(self.dtype)
        t6, embedded = self.adaln_single(timestep.astype(self.dtype), motion)

        if text is None:
            text = self.embed_text(encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2)
        context, key_mask = text
        return DiTInputs(tokens, t6, embedded, context, key_mask, (f, hh // p, ww // p))

    def embed_text(self, encoder_hidden_states: Tensor, encoder_attention_mask: Union[Tensor, np.ndarray],
                   encoder_hidden_states_2: Optional[Tensor] = None) -> Tuple[Tensor, KeyMask]:
        """The cross-attention context and its key mask: the same at every step of a denoising loop,
        so a loop may compute them once and pass them to `embed(..., text=)`."""
        context = self.caption_projection(self.caption_norm(encoder_hidden_states.astype(self.dtype)))
        if encoder_hidden_states_2 is not None and self.clip_projection is not None:
            clip = self.clip_projection(encoder_hidden_states_2.astype(self.dtype))
            context = mint.cat([clip, context], dim=1)
        return text_key_mask(context, encoder_attention_mask)

    def rope_for(self, grid: Tuple[int, int, int], start: int = 0, stop: Optional[int] = None) -> Rope3D:
        """RoPE tables of tokens start..stop of the flattened grid."""
        return Rope3D.for_grid(*grid, self.attention_head_dim, start, stop, dtype=self.dtype)

    def run_blocks(self, x: Tensor, inputs: DiTInputs, rope: Rope3D, layers: Optional[range] = None,
                   core: Optional[AttentionCore] = None, chunk: Optional[int] = None) -> Tensor:
        for i in layers if layers is not None else range(self.num_layers):
            x = self.transformer_blocks[i](x, inputs.context, inputs.t6, inputs.key_mask, rope, core, chunk)
        return x

    def finish(self, x: Tensor, inputs: DiTInputs) -> Tensor:
        return self.unpatchify(self.project_out(x, inputs), inputs.grid)

    def project_out(self, x: Tensor, inputs: DiTInputs, chunk: Optional[int] = None) -> Tensor:
        """Final modulation and projection, token by token: (b, n, D) -> (b, n, p*p*out_channels) for any
        n tokens of the grid (a sequence-parallel rank projects its own slice before gathering); `chunk`
        tokens at a time when given."""
        shift, scale = mint.chunk(self.scale_shift_table[None] + inputs.embedded_timestep[:, None], 2, dim=1)
        return tokenwise(lambda t: self.proj_out(ops.modulated_layer_norm(t, self.norm_out.weight, self.norm_out.bias,
                                                                          scale, shift, self.norm_out.eps)), x, chunk)

    def unpatchify(self, y: Tensor, grid: Tuple[int, int, int]) -> Tensor:
        """(b, f*h*w, p*p*c) projected tokens -> (b, f, c, h*p, w*p) latents."""
        f, h, w = grid
        b = y.shape[0]
        p, c = self.patch_size, self.out_channels
        y = y.reshape(b * f, h, w, p, p, c)
        return mint.permute(y, (0, 5, 1, 3, 2, 4)).reshape(b, f, c, h * p, w * p)

    def construct(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                  encoder_attention_mask: Tensor, encoder_hidden_states_2: Optional[Tensor] = None,
                  condition_hidden_states: Optional[Tensor] = None, motion_score: Optional[float] = None) -> Tensor:
        inputs = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                            encoder_hidden_states_2, condition_hidden_states, motion_score)
        x = self.run_blocks(inputs.tokens, inputs, self.rope_for(inputs.grid))
        return self.finish(x, inputs)


def text_key_mask(context: Tensor, mask: Union[Tensor, np.ndarray]) -> Tuple[Tensor, KeyMask]:
    """Upstream's text mask: sample i attends its first sum(mask[i]) text tokens; the text is cut
    to the longest valid length of the batch. The lengths are needed on the host: a numpy `mask`
    (read once by a loop) spares a device read per call."""
    lengths = (mask if isinstance(mask, np.ndarray) else mask.asnumpy()).astype(bool).sum(axis=1)
    if lengths.min() < 1:
        raise ValueError("encoder_attention_mask: every sample needs at least one valid text token")
    longest = int(lengths.max())
    keep = np.arange(longest)[None, :] < lengths[:, None]
    return context[:, :longest], KeyMask(Tensor(keep))
