"""Step-1: the causal language model Step-Video uses as its main text encoder.

Parameter names and config keys are upstream's (`tok_embeddings.word_embeddings`,
`transformer.layers.N.{attention.wqkv, attention.wo, attention_norm, feed_forward.w1,
feed_forward.w2, ffn_norm}`), so the released `step_llm/` folder (config.json, safetensors
shards with their index, `step1_chat_tokenizer.model`) loads as it is.

Architecture: token embedding, then `num_layers` pre-norm blocks (RMSNorm -> grouped-query
attention -> residual, RMSNorm -> SwiGLU -> residual), no final norm and no positional
embedding: position enters only through the causal ALiBi bias -slope_h * sqrt(i - j). The
attention mask is accepted but, as upstream's kernel, not used: attention is causal only, so
padding after EOS never influences the valid tokens before it.

`Step1Model` returns (batch, seq, hidden) directly (upstream's module works sequence-first and
its text encoder transposes back).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from ..formats import checkpoint
from .. import ops
from ..runtime import compute_dtype
from .common import EmbeddingTable, Linear, RMSNorm, count_parameters
from .step_tokenizer import STEP_MAX_LENGTH, STEP_TOKENIZER_FILE, StepTokenizer

FFN_MULTIPLE = 256
STEP1_CONFIG_KEYS = ("hidden_size", "num_attention_heads", "num_attention_groups", "ffn_hidden_size",
                     "num_layers", "layernorm_epsilon", "padded_vocab_size")


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes (Press et al.): 2^(-8i/n) for a power of two n; otherwise those of
    the largest power of two below, then every other slope of the next power of two."""
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be positive")

    def geometric(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return np.array(geometric(num_heads), dtype=np.float64)
    base = 2 ** int(math.floor(math.log2(num_heads)))
    extra = alibi_slopes(2 * base)[0::2][: num_heads - base]
    return np.concatenate([np.array(geometric(base)), extra])


def alibi_sqrt_bias(num_heads: int, seq_len: int) -> np.ndarray:
    """(heads, seq, seq) float32: -slope_h * sqrt(i - j) on and below the diagonal, 0 above it
    (the causal mask removes those keys anyway)."""
    dist = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
    root = np.sqrt(np.maximum(dist, 0).astype(np.float64))
    return (-alibi_slopes(num_heads)[:, None, None] * root[None]).astype(np.float32)


def ffn_width(ffn_hidden_size: int) -> int:
    """Upstream rounds the SwiGLU width up to a multiple of 256."""
    return FFN_MULTIPLE * ((ffn_hidden_size + FFN_MULTIPLE - 1) // FFN_MULTIPLE)


class MultiQueryAttention(nn.Cell):
    """Grouped-query attention: `num_attention_groups` key/value heads shared by consecutive query heads."""

    def __init__(self, hidden_size: int, num_heads: int, num_groups: int, dtype=ms.float32):
        super().__init__()
        if hidden_size % num_heads or num_heads % num_groups:
            raise ValueError(f"hidden_size={hidden_size}, num_attention_heads={num_heads}, "
                             f"num_attention_groups={num_groups}: heads must divide hidden_size and groups heads")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = hidden_size // num_heads
        self.wqkv = Linear(hidden_size, hidden_size + 2 * num_groups * self.head_dim, bias=False, dtype=dtype)
        self.wo = Linear(hidden_size, hidden_size, bias=False, dtype=dtype)

    def construct(self, x: Tensor, alibi: Tensor) -> Tensor:
        b, s, dim = x.shape
        g, d = self.num_groups, self.head_dim
        q, kv = ops.split(self.wqkv(x), [dim, 2 * g * d], dim=-1)
        q = q.reshape(b, s, self.num_heads, d)
        kv = kv.reshape(b, s, g, 2, d)  # per group: its key, then its value
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        # query head h reads group h // (heads / groups): attention takes the groups as they are
        out = ops.attention(q, k, v, bias=alibi, causal=True)
        return self.wo(out.reshape(b, s, dim))


class FeedForward(nn.Cell):
    """SwiGLU: w1 gives [gate, up] side by side; silu(gate) * up -> w2."""

    def __init__(self, dim: int, ffn_hidden_size: int, dtype=ms.float32):
        super().__init__()
        width = ffn_width(ffn_hidden_size)
        self.width = width
        self.w1 = Linear(dim, 2 * width, bias=False, dtype=dtype)
        self.w2 = Linear(width, dim, bias=False, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        gate, up = ops.split(self.w1(x), [self.width, self.width], dim=-1)
        return self.w2(ops.silu(gate) * up)


class TransformerBlock(nn.Cell):
    def __init__(self, hidden_size, num_heads, num_groups, ffn_hidden_size, eps, dtype=ms.float32):
        super().__init__()
        self.attention = MultiQueryAttention(hidden_size, num_heads, num_groups, dtype)
        self.feed_forward = FeedForward(hidden_size, ffn_hidden_size, dtype)
        self.attention_norm = RMSNorm(hidden_size, eps=eps, dtype=dtype)
        self.ffn_norm = RMSNorm(hidden_size, eps=eps, dtype=dtype)

    def construct(self, x: Tensor, alibi: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), alibi)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Cell):
    def __init__(self, num_layers: int, **block_args):
        super().__init__()
        self.layers = nn.CellList([TransformerBlock(**block_args) for _ in range(num_layers)])

    def construct(self, x: Tensor, alibi: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, alibi)
        return x


class LLaMaEmbedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32):
        super().__init__()
        self.word_embeddings = EmbeddingTable(vocab_size, hidden_size, dtype)

    def construct(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


class Step1Model(nn.Cell):
    def __init__(self, hidden_size: int, num_attention_heads: int, num_attention_groups: int,
                 ffn_hidden_size: int, num_layers: int, padded_vocab_size: int,
                 layernorm_epsilon: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.vocab_size = padded_vocab_size
        self.dtype = dtype
        self.tok_embeddings = LLaMaEmbedding(padded_vocab_size, hidden_size, dtype)
        self.transformer = Transformer(num_layers, hidden_size=hidden_size, num_heads=num_attention_heads,
                                       num_groups=num_attention_groups, ffn_hidden_size=ffn_hidden_size,
                                       eps=layernorm_epsilon, dtype=dtype)

    @classmethod
    def from_config(cls, config: dict, dtype=ms.float32) -> "Step1Model":
        """Build from upstream's config.json keys; other keys (seq_length, dropouts, ...) are ignored."""
        missing = [k for k in STEP1_CONFIG_KEYS if k not in config and k != "layernorm_epsilon"]
        if missing:
            raise ValueError(f"Step-1 config lacks {', '.join(missing)}: use the config.json of the step_llm folder")
        return cls(**{k: config[k] for k in STEP1_CONFIG_KEYS if k in config}, dtype=dtype)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def alibi(self, seq_len: int) -> Tensor:
        return Tensor(alibi_sqrt_bias(self.num_attention_heads, seq_len)).expand_dims(0)

    def construct(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (b, s) -> hidden states (b, s, hidden). `attention_mask` is ignored (causal only)."""
        x = self.tok_embeddings(input_ids)
        # one cast of the bias per forward, not one per layer
        return self.transformer(x, self.alibi(input_ids.shape[1]).astype(x.dtype))


def load_step1(folder: str, dtype=None, progress: bool = True) -> Step1Model:
    """Step1Model from a step_llm folder (config.json + safetensors)."""
    dtype = compute_dtype() if dtype is None else dtype
    config = checkpoint.read_config(folder)
    return checkpoint.build_and_load(lambda: Step1Model.from_config(config, dtype=dtype), folder, dtype=dtype,
                                     progress=progress)


class StepTextEncoder:
    """Tokenizer + Step1Model: prompts -> (hidden states (b, max_length, hidden), mask (b, max_length))."""

    def __init__(self, tokenizer: StepTokenizer, model: Step1Model, max_length: int = STEP_MAX_LENGTH):
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(f"the Step-1 tokenizer has {tokenizer.vocab_size} pieces but the model's embedding only "
                             f"{model.vocab_size} rows: tokenizer and weights come from different models")
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @classmethod
    def from_pretrained(cls, folder: str, dtype=None, max_length: int = STEP_MAX_LENGTH,
                        progress: bool = True) -> "StepTextEncoder":
        tokenizer = StepTokenizer(os.path.join(folder, STEP_TOKENIZER_FILE))  # cheap checks before the weights
        return cls(tokenizer, load_step1(folder, dtype, progress), max_length)

    def __call__(self, prompts: Sequence[str]) -> Tuple[Tensor, np.ndarray]:
        tokens = self.tokenizer(prompts, self.max_length)
        y = self.model(Tensor(tokens.input_ids), Tensor(tokens.attention_mask))
        return y, tokens.attention_mask
