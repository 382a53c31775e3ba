"""HunyuanCLIP's text encoder: a BERT encoder under the `transformers` BertModel names, in MindSpore.

Written here because mindone's BertModel does not run on MindSpore's CPU backend. Names follow
BertModel's state dict (`embeddings.{word,position,token_type}_embeddings`, `embeddings.LayerNorm`,
`encoder.layer.N.attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
`intermediate.dense`, `output.{dense,LayerNorm}`, `pooler.dense`), the configuration is BertConfig's
config.json. Upstream's layout: `hunyuan_clip/clip_text_encoder/` (config.json and the weights,
released as `pytorch_model.bin`; convert.py writes `model.safetensors`, the only file read here)
and `hunyuan_clip/tokenizer/` (a `transformers.BertTokenizer` folder). Prompts are padded and
cut to 77 tokens; the encoder returns (last_hidden_state, pooler_output).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn
from mindspore import ops as msops

from ..formats import checkpoint
from .. import ops
from ..formats.safetensors_io import SafetensorsFile
from .common import EmbeddingTable, LayerNorm, Linear

CLIP_ENCODER_DIR = "clip_text_encoder"
CLIP_TOKENIZER_DIR = "tokenizer"
CLIP_MAX_LENGTH = 77
# BertConfig's defaults, for keys a config.json leaves out.
BERT_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
                 "type_vocab_size": 2, "max_position_embeddings": 512}
# Keys that may sit in a BertModel checkpoint without being parameters (old transformers saved this buffer).
BERT_BUFFERS = ("embeddings.position_ids",)


def _gelu_erf(x: Tensor) -> Tensor:
    return msops.gelu(x, approximate="none")  # exact erf GELU; runs on CPU (mint's gelu does not)


ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": ops.gelu_tanh,
    "gelu_pytorch_tanh": ops.gelu_tanh,
    "relu": mint.nn.functional.relu,
}


class BertEmbeddings(nn.Cell):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, type_vocab_size, eps, dtype):
        super().__init__()
        self.word_embeddings = EmbeddingTable(vocab_size, hidden_size, dtype)
        self.position_embeddings = EmbeddingTable(max_position_embeddings, hidden_size, dtype)
        self.token_type_embeddings = EmbeddingTable(type_vocab_size, hidden_size, dtype)
        self.LayerNorm = LayerNorm(hidden_size, eps=eps, dtype=dtype)

    def construct(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        b, s = input_ids.shape
        positions = Tensor(np.arange(s, dtype=np.int32)).reshape(1, s)
        types = Tensor(np.zeros((1, s), np.int32)) if token_type_ids is None else token_type_ids
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Cell):
    def __init__(self, hidden_size, num_heads, dtype):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.query = Linear(hidden_size, hidden_size, dtype=dtype)
        self.key = Linear(hidden_size, hidden_size, dtype=dtype)
        self.value = Linear(hidden_size, hidden_size, dtype=dtype)

    def construct(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        b, s, dim = x.shape
        q, k, v = (f(x).reshape(b, s, self.num_heads, self.head_dim) for f in (self.query, self.key, self.value))
        return ops.attention(q, k, v, key_mask=key_mask).reshape(b, s, dim)


class BertResidualOutput(nn.Cell):
    """dense -> add the block's input -> LayerNorm (BertSelfOutput and BertOutput)."""

    def __init__(self, in_dim, hidden_size, eps, dtype):
        super().__init__()
        self.dense = Linear(in_dim, hidden_size, dtype=dtype)
        self.LayerNorm = LayerNorm(hidden_size, eps=eps, dtype=dtype)

    def construct(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Cell):
    def __init__(self, hidden_size, num_heads, eps, dtype):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, dtype)
        self.output = BertResidualOutput(hidden_size, hidden_size, eps, dtype)

    def construct(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Cell):
    def __init__(self, hidden_size, intermediate_size, activation, dtype):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size, dtype=dtype)
        self.activation = activation

    def construct(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(x))


class BertLayer(nn.Cell):
    def __init__(self, hidden_size, num_heads, intermediate_size, eps, activation, dtype):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, eps, dtype)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size, activation, dtype)
        self.output = BertResidualOutput(intermediate_size, hidden_size, eps, dtype)

    def construct(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        h = self.attention(x, key_mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Cell):
    def __init__(self, num_layers, **layer_args):
        super().__init__()
        self.layer = nn.CellList([BertLayer(**layer_args) for _ in range(num_layers)])

    def construct(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class BertPooler(nn.Cell):
    def __init__(self, hidden_size, dtype):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size, dtype=dtype)

    def construct(self, hidden: Tensor) -> Tensor:
        return mint.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                 layer_norm_eps: float = 1e-12, hidden_act: str = "gelu", add_pooling_layer: bool = True,
                 dtype=ms.float32):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_attention_heads={num_attention_heads}")
        self.max_position_embeddings = max_position_embeddings
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, dtype)
        self.encoder = BertEncoder(num_hidden_layers, hidden_size=hidden_size, num_heads=num_attention_heads,
                                   intermediate_size=intermediate_size, eps=layer_norm_eps,
                                   activation=ACTIVATIONS[hidden_act], dtype=dtype)
        self.pooler = BertPooler(hidden_size, dtype) if add_pooling_layer else None

    @classmethod
    def from_config(cls, config: dict, add_pooling_layer: bool = True, dtype=ms.float32) -> "BertModel":
        cfg = {**BERT_DEFAULTS, **config}
        if cfg["position_embedding_type"] != "absolute":
            raise ValueError(f"position_embedding_type={cfg['position_embedding_type']!r} is not supported "
                             "(HunyuanCLIP uses 'absolute')")
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise ValueError(f"BERT config lacks {', '.join(missing)}: use the clip_text_encoder's config.json")
        return cls(**{k: cfg[k] for k in keys}, add_pooling_layer=add_pooling_layer, dtype=dtype)

    def construct(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                  token_type_ids: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """input_ids (b, s), attention_mask (b, s) 1 = attend -> (last_hidden_state (b, s, hidden),
        pooler_output (b, hidden) or None without a pooler)."""
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings={self.max_position_embeddings}")
        key_mask = None if attention_mask is None else ops.KeyMask(attention_mask.astype(ms.bool_))
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)
        return hidden, (None if self.pooler is None else self.pooler(hidden))


def load_bert(folder: str, dtype=ms.float32, progress: bool = True) -> BertModel:
    """BertModel from a folder holding config.json and safetensors weights."""
    config = checkpoint.read_config(folder)
    files = checkpoint.checkpoint_files(folder)
    has_pooler = any("pooler.dense.weight" in SafetensorsFile(f).keys() for f in files)
    return checkpoint.build_and_load(lambda: BertModel.from_config(config, add_pooling_layer=has_pooler, dtype=dtype),
                                     folder, dtype=dtype, select=lambda name: name not in BERT_BUFFERS,
                                     progress=progress)


class HunyuanClip:
    """BertTokenizer + BertModel: prompts -> (last_hidden_state (b, 77, hidden), pooler_output)."""

    def __init__(self, tokenizer, model: BertModel, max_length: int = CLIP_MAX_LENGTH):
        if max_length > model.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                             f"{model.max_position_embeddings}")
        if len(tokenizer) > model.vocab_size:
            raise ValueError(f"the CLIP tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{model.vocab_size} rows: tokenizer and weights come from different models")
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @classmethod
    def from_pretrained(cls, folder: str, dtype=ms.float32, max_length: int = CLIP_MAX_LENGTH,
                        progress: bool = True) -> "HunyuanClip":
        """From a hunyuan_clip folder (clip_text_encoder/ and tokenizer/); the weights run in float32 by
        default, as upstream's."""
        return cls(load_bert_tokenizer(os.path.join(folder, CLIP_TOKENIZER_DIR)),
                   load_bert(os.path.join(folder, CLIP_ENCODER_DIR), dtype, progress), max_length)

    def tokenize(self, prompts: Sequence[str]):
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_attention_mask=True, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def __call__(self, prompts: Sequence[str]) -> Tuple[Tensor, Optional[Tensor]]:
        ids, mask = self.tokenize(prompts)
        return self.model(Tensor(ids), Tensor(mask))


def load_bert_tokenizer(folder: str):
    """transformers.BertTokenizer from a folder holding vocab.txt."""
    if not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise FileNotFoundError(f"no vocab.txt in {folder}: the CLIP tokenizer folder is hunyuan_clip/{CLIP_TOKENIZER_DIR}")
    # transformers' "None of PyTorch, TensorFlow >= 2.0, or Flax" notice says nothing to our users (the
    # tokenizer needs none of them); the command lines silence it too (console.quiet_environment)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(folder)
