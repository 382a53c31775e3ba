"""A small random-weight model directory in the released layout, for tests and dry runs.

    python -m stepvideo_ms tiny OUT_DIR [--task t2v|ti2v] [--seed N] [--force]

writes, in seconds, the folders a user downloads (one directory per task, as released):
    transformer/           config.json + 2 safetensors shards + diffusion_pytorch_model.safetensors.index.json
    step_llm/              config.json, model.safetensors, step1_chat_tokenizer.model
    hunyuan_clip/clip_text_encoder/  config.json, model.safetensors
    hunyuan_clip/tokenizer/          vocab.txt, tokenizer_config.json
    vae/                   vae_v2.safetensors, config.json
    scheduler/             scheduler_config.json
Both tokenizers are built from the bundled bilingual corpus (stepvideo_ms/data/tiny_corpus.txt).
The weights are random with fan-in scaling, so every output is finite and not degenerate; the same
seed gives the same bytes. The directory is written beside OUT_DIR and renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np

from ..formats.safetensors_io import save_file_atomic

CORPUS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny_corpus.txt")
TASKS = ("t2v", "ti2v")
SP_VOCAB = 1024
# One layer per text encoder: every request to a tiny caption server runs both at full length
# (320 + 77 tokens), and the serving tests send hundreds of them; the DiT keeps two layers.
EMBED_STD = 0.5
MARKER = "tiny_model.json"

STEP_LLM_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_attention_groups": 2,
                   "ffn_hidden_size": 100, "num_layers": 1, "layernorm_epsilon": 1e-5, "seq_length": 320,
                   "max_position_embeddings": 320}
CLIP_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 96,
               "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
               "position_embedding_type": "absolute", "pad_token_id": 0}
# The narrowest VAE the architecture allows (32 channels: the group norms' 32 groups) with one res block
# per decoder level: the decoder runs at the video's full size and was most of the demo's time.
VAE_CONFIG = {"z_channels": 8, "version": 2, "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1},
              "decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0}}
DIT_CONFIG = {"_class_name": "StepVideoModel", "num_attention_heads": 2, "attention_head_dim": 64,
              "num_layers": 2, "dropout": 0.0, "patch_size": 1, "norm_type": "ada_norm_single",
              "norm_elementwise_affine": False, "norm_eps": 1e-6, "attention_type": "parallel"}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchDiscreteScheduler", "num_train_timesteps": 1000, "reverse": False,
                    "solver": "euler"}
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors",
              "diffusion_pytorch_model-00002-of-00002.safetensors")


# ---- weights ---------------------------------------------------------------------------------
def _stream(seed: int, part: str) -> np.random.Generator:
    """An independent random stream per part, so adding a part never changes another's weights."""
    digest = hashlib.sha256(f"{seed}:{part}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_weight(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    """Fan-in scaled normal weights; norms' scales near 1; small biases; embedding tables O(EMBED_STD)."""
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        if leaf in ("weight", "gamma", "scale") and any(k in name.lower() for k in ("norm", "ln", "layernorm")):
            return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32).reshape(shape)
        return (0.02 * rng.standard_normal(n)).astype(np.float32).reshape(shape)
    if "embedding" in name.lower() and len(shape) == 2:
        return (EMBED_STD * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def random_state(cell, seed: int, part: str) -> Dict[str, np.ndarray]:
    """A random state dict for every parameter of `cell` (names as the cell names them)."""
    rng = _stream(seed, part)
    return {name: random_weight(name, p.shape, rng) for name, p in sorted(cell.parameters_and_names())}


def set_small_random_weights(cell, rng: np.random.Generator, scale: float = 0.05):
    """In place: every parameter of `cell` = scale x a normal draw from `rng`, norms' weights around 1
    (for numerical tests that want every path exercised without fan-in scaling); -> the cell."""
    from mindspore import Tensor

    for name, p in cell.parameters_and_names():
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.set_data(Tensor((base + scale * rng.standard_normal(p.shape)).astype(np.float32)))
    return cell


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def _save(state: Dict[str, np.ndarray], path: str) -> None:
    save_file_atomic(state, path, metadata={"format": "pt"})


def read_corpus(path: str = CORPUS_FILE) -> List[str]:
    with open(path, "r", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


# ---- the parts -------------------------------------------------------------------------------
def write_step_llm(folder: str, seed: int, corpus: List[str]) -> dict:
    from ..models.step_llm import Step1Model
    from ..models.step_tokenizer import STEP_TOKENIZER_FILE, StepTokenizer
    from .tokenizer_build import train_step1_sentencepiece

    tok_path = train_step1_sentencepiece(os.path.join(folder, STEP_TOKENIZER_FILE), corpus, SP_VOCAB)
    vocab = StepTokenizer(tok_path).vocab_size
    config = {**STEP_LLM_CONFIG, "padded_vocab_size": -(-vocab // 128) * 128}
    _write_json(os.path.join(folder, "config.json"), config)
    _save(random_state(Step1Model.from_config(config), seed, "step_llm"), os.path.join(folder, "model.safetensors"))
    return config


def bert_words(corpus: List[str]) -> List[str]:
    """The word pieces BertTokenizer's basic step makes of the corpus (CJK characters split, lower case)."""
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=True, tokenize_chinese_chars=True)
    return sorted({w for line in corpus for w in basic.tokenize(line)})


def write_hunyuan_clip(folder: str, seed: int, corpus: List[str]) -> dict:
    from ..models.hunyuan_clip import CLIP_ENCODER_DIR, CLIP_TOKENIZER_DIR, BertModel
    from .tokenizer_build import BERT_SPECIAL_TOKENS, write_bert_vocab

    words = bert_words(corpus)
    write_bert_vocab(os.path.join(folder, CLIP_TOKENIZER_DIR), words)
    n = len(BERT_SPECIAL_TOKENS) + len([w for w in words if w not in BERT_SPECIAL_TOKENS])
    config = {**CLIP_CONFIG, "vocab_size": -(-n // 64) * 64}
    enc = os.path.join(folder, CLIP_ENCODER_DIR)
    _write_json(os.path.join(enc, "config.json"), config)
    _save(random_state(BertModel.from_config(config), seed, "clip"), os.path.join(enc, "model.safetensors"))
    return config


def write_vae(folder: str, seed: int) -> dict:
    from ..models.vae import AutoencoderKL
    from ..models.vae_config import CHECKPOINT_FILE, CONFIG_FILE, VAEConfig

    config = VAEConfig.from_dict(VAE_CONFIG).to_dict()
    _write_json(os.path.join(folder, CONFIG_FILE), config)
    _save(random_state(AutoencoderKL.from_config(config), seed, "vae"), os.path.join(folder, CHECKPOINT_FILE))
    return config


def write_transformer(folder: str, seed: int, task: str, in_channels: int, caption_channels: List[int]) -> dict:
    from ..models.dit import StepVideoModel

    config = {**DIT_CONFIG, "in_channels": in_channels, "out_channels": in_channels,
              "caption_channels": list(caption_channels), "use_additional_conditions": task == "ti2v"}
    _write_json(os.path.join(folder, "config.json"), config)
    state = random_state(StepVideoModel.from_config(config), seed, f"transformer-{task}")
    names = sorted(state)
    total = sum(state[n].nbytes for n in names)
    cut, acc = len(names), 0
    for i, n in enumerate(names):  # first shard: names until half the bytes
        acc += state[n].nbytes
        if acc >= total / 2:
            cut = i + 1
            break
    cut = min(max(cut, 1), len(names) - 1)
    shards = (names[:cut], names[cut:])
    weight_map = {}
    for shard, keys in zip(DIT_SHARDS, shards):
        _save({k: state[k] for k in keys}, os.path.join(folder, shard))
        weight_map.update({k: shard for k in keys})
    _write_json(os.path.join(folder, DIT_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return config


def _make_readable(root: str) -> None:
    """mkdtemp makes the build directory private (0700); a model directory is for everyone to read."""
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def write_tiny_model(out_dir: str, seed: int = 0, task: str = "t2v", force: bool = False) -> str:
    """Write the whole directory to a temporary sibling of `out_dir`, then rename it into place."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists: choose a new OUT_DIR or pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        corpus = read_corpus()
        llm = write_step_llm(os.path.join(tmp, "step_llm"), seed, corpus)
        clip = write_hunyuan_clip(os.path.join(tmp, "hunyuan_clip"), seed, corpus)
        vae = write_vae(os.path.join(tmp, "vae"), seed)
        write_transformer(os.path.join(tmp, "transformer"), seed, task, vae["z_channels"],
                          [llm["hidden_size"], clip["hidden_size"]])
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
        _write_json(os.path.join(tmp, MARKER), {"task": task, "seed": seed,
                                                "note": "random weights for tests; not a trained model"})
        _make_readable(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepvideo_ms tiny",
                                description="Write a small random-weight Step-Video model directory")
    p.add_argument("out_dir", help="directory to create")
    p.add_argument("--task", choices=TASKS, default="t2v", help="t2v (text to video) or ti2v (text + image)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same bytes)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    args = p.parse_args(argv)
    from ..console import quiet_environment

    quiet_environment(verbose=False)  # the tokenizer build imports transformers: no framework banner
    if args.seed < 0:
        p.error(f"--seed {args.seed} must be >= 0")
    os.environ.setdefault("GLOG_v", "3")  # before MindSpore loads: quiet its logging
    from .. import runtime

    runtime.init("CPU")  # the weights are drawn with numpy; MindSpore only names the parameters
    try:
        path = write_tiny_model(args.out_dir, args.seed, args.task, args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"python -m stepvideo_ms tiny: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a tiny {args.task} model directory (seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
