"""The caption encoder: prompts -> the text conditioning of the DiT, as upstream's caption server serves it.

Upstream (`CaptionPipeline.embedding` of api/call_remote_server.py) runs Step-1 (bfloat16, 320
tokens) and HunyuanCLIP (float32, 77 tokens) on the same prompts and serves
- `y`: Step-1 hidden states (b, 320, 6144), bfloat16;
- `y_mask`: int64 (b, 77 + 320): ones for the clip tokens, then Step-1's mask (the DiT puts the
  clip tokens before the Step-1 tokens);
- `clip_embedding`: HunyuanCLIP's last hidden state (b, 77, 1024), cast to bfloat16.
numpy has no bfloat16, so `encode` returns `y` and `clip_embedding` as float32 arrays holding
bfloat16-rounded values (exact in bfloat16: a server may send them as BF16 without loss); the
names are listed in `BF16_OUTPUTS`.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms

from ..runtime import compute_dtype, is_ascend
from ..formats.safetensors_io import bf16_to_f32, f32_to_bf16_bits
from .hunyuan_clip import CLIP_ENCODER_DIR, CLIP_TOKENIZER_DIR, HunyuanClip
from .step_llm import StepTextEncoder
from .step_tokenizer import STEP_TOKENIZER_FILE

BF16_OUTPUTS = ("y", "clip_embedding")
OUTPUT_DTYPES = {"y": "bfloat16", "y_mask": "int64", "clip_embedding": "bfloat16"}


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    return bf16_to_f32(f32_to_bf16_bits(x.astype(np.float32)))


def check_prompts(prompts) -> List[str]:
    """A non-empty list (or tuple) of strings, else a ValueError/TypeError saying what to pass."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string: pass [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (an empty string \"\" is a valid prompt)")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts[{bad[0]}] is {type(prompts[bad[0]]).__name__}: every prompt must be a string")
    return list(prompts)


def _require(path: str, what: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {what}")


def check_caption_dirs(llm_path: str, clip_path: str):
    """Every file the two encoders need, checked before any weight is read."""
    _require(llm_path, "the model directory needs the Step-1 folder (step_llm/)")
    _require(os.path.join(llm_path, "config.json"), "the step_llm folder needs its config.json")
    _require(os.path.join(llm_path, STEP_TOKENIZER_FILE), f"the step_llm folder needs {STEP_TOKENIZER_FILE}")
    if not glob.glob(os.path.join(llm_path, "*.safetensors")):
        raise FileNotFoundError(f"no .safetensors weights in {llm_path}: download the step_llm shards")
    enc = os.path.join(clip_path, CLIP_ENCODER_DIR)
    _require(clip_path, "the model directory needs the HunyuanCLIP folder (hunyuan_clip/)")
    _require(os.path.join(enc, "config.json"), f"hunyuan_clip/{CLIP_ENCODER_DIR} needs its config.json")
    if not glob.glob(os.path.join(enc, "*.safetensors")):
        hint = (" (it holds pytorch_model.bin: convert it with convert.py to model.safetensors)"
                if os.path.isfile(os.path.join(enc, "pytorch_model.bin")) else "")
        raise FileNotFoundError(f"no .safetensors weights in {enc}{hint}")
    _require(os.path.join(clip_path, CLIP_TOKENIZER_DIR, "vocab.txt"),
             f"hunyuan_clip/{CLIP_TOKENIZER_DIR} needs the BERT vocab.txt")


class CaptionEncoder:
    """Step-1 + HunyuanCLIP on one device: `encode(prompts)` -> {y, y_mask, clip_embedding}."""

    def __init__(self, llm: StepTextEncoder, clip: HunyuanClip):
        self.llm, self.clip = llm, clip

    @classmethod
    def from_model_dir(cls, model_dir: str, llm_dir: str = "step_llm", clip_dir: str = "hunyuan_clip",
                       dtype: Optional[ms.dtype] = None, progress: bool = True) -> "CaptionEncoder":
        """Load both encoders from a released model directory (`llm_dir`, `clip_dir` relative to it, or
        absolute). `dtype`: Step-1's compute dtype (default: the runtime policy, bfloat16 on Ascend,
        float32 on CPU); HunyuanCLIP runs in float32, as upstream's."""
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model_dir {model_dir} is not a directory: pass the downloaded model folder")
        llm_path, clip_path = os.path.join(model_dir, llm_dir), os.path.join(model_dir, clip_dir)
        check_caption_dirs(llm_path, clip_path)
        dtype = compute_dtype() if dtype is None else dtype
        if dtype == ms.bfloat16 and not is_ascend():
            raise ValueError("dtype=bfloat16 has no CPU kernels in MindSpore: use float32 on CPU (dtype=None)")
        clip = HunyuanClip.from_pretrained(clip_path, dtype=ms.float32, progress=progress)
        llm = StepTextEncoder.from_pretrained(llm_path, dtype=dtype, progress=progress)
        return cls(llm, clip)

    @property
    def llm_length(self) -> int:
        return self.llm.max_length

    @property
    def clip_length(self) -> int:
        return self.clip.max_length

    @property
    def caption_channels(self) -> List[int]:
        """[Step-1 hidden size, CLIP hidden size]: the DiT's `caption_channels`."""
        return [self.llm.model.hidden_size, self.clip.model.hidden_size]

    def encode(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        """prompts (non-empty list of str) -> y (b, 320, hidden) and clip_embedding (b, 77, clip_hidden) as
        bfloat16-rounded float32; y_mask (b, 77 + 320) int64."""
        prompts = check_prompts(prompts)
        y, mask = self.llm(prompts)
        clip_embedding, _ = self.clip(prompts)
        clip_np = clip_embedding.astype(ms.float32).asnumpy()
        y_mask = np.concatenate([np.ones((mask.shape[0], clip_np.shape[1]), np.int64), mask.astype(np.int64)], axis=1)
        return {
            "y": round_to_bf16(y.astype(ms.float32).asnumpy()),
            "y_mask": y_mask,
            "clip_embedding": round_to_bf16(clip_np),
        }
