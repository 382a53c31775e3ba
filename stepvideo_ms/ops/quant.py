"""Int8 weights with one scale per output channel (W8A16): quantization and the linear layer.

Scheme: symmetric, per output channel (one row of a PyTorch (out, in) weight), no offset, no
groups. A row's scale is max|w| / 127 rounded *up* to the nearest bfloat16, and the row is
quantized against that very scale (q = round(w / scale), |q| <= 127). The scale is therefore
exact in bfloat16 (the dtype the Ascend kernel takes it in) and in float32 (the CPU path): both
dequantize to the same values, and the only error is the int8 rounding, at most scale / 2 per
weight. An offset buys nothing for rows centred on zero (the DiT's are); groups along the input
axis help only when a few *input* channels dominate every row (see bench/bench_int8_quality.py).

Linear (ops/linear.py, linear_int8): y = x @ (q * scale)^T + bias.
- Ascend: `mindspore.ops.auto_generate.WeightQuantBatchMatmul(transpose_x=False,
  transpose_weight=True)` on x as 2-D (m, k), the weight as stored (n, k) (the transposed weight
  the kernel prefers for per-channel scales), the scale (n,) in the dtype of x, bias in float32 when
  x is bfloat16. The kernel dequantizes inside; the matmul runs in bfloat16.
- CPU: the int8 weight is cast to the working dtype, multiplied by its scales, and used by the
  plain linear (bench/bench_int8_linear.py measured this against scaling the product instead).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from mindspore import Tensor, ops



QMAX = 127
WEIGHTS_CHOICES = ("full", "int8")
SCALE_SUFFIX = "_scale"  # X.weight (int8) has its scales in X.weight_scale
_ROWS_PER_CHUNK_BYTES = 64 * 2 ** 20  # host temporaries while quantizing a large weight


def _bf16_round_up(x: np.ndarray) -> np.ndarray:
    """Positive float32 values -> the smallest bfloat16 value >= each, as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    up = np.where(bits & 0xFFFF, (bits & 0xFFFF0000) + 0x10000, bits).astype(np.uint32)
    return up.view(np.float32)


def row_scales(weight: np.ndarray) -> np.ndarray:
    """The per-row scales of a float weight (out, in): max|row| / 127, rounded up to bfloat16 (1 for a
    zero row). float32 (out,)."""
    amax = np.abs(np.asarray(weight, np.float32)).max(axis=1)
    scale = _bf16_round_up(amax / np.float32(QMAX))
    return np.where(amax > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_rows(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A float weight (out, in) -> (int8 (out, in), float32 scales (out,)); rows in chunks, so the host
    holds at most ~64 MiB of temporaries beyond the input and the result."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"quantize_rows: a 2-D (out, in) weight is needed, got shape {w.shape}")
    rows = max(1, _ROWS_PER_CHUNK_BYTES // max(1, w.shape[1] * 4))
    q = np.empty(w.shape, np.int8)
    scales = np.empty(w.shape[0], np.float32)
    for r0 in range(0, w.shape[0], rows):
        part = np.asarray(w[r0:r0 + rows], np.float32)
        s = row_scales(part)
        q[r0:r0 + rows] = np.clip(np.rint(part / s[:, None]), -QMAX, QMAX).astype(np.int8)
        scales[r0:r0 + rows] = s
    return q, scales


def dequantize_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scales, np.float32)[:, None]


def take_rows(weight: Tensor, rows: np.ndarray) -> Tensor:
    return ops.gather(weight, Tensor(rows.astype(np.int32)), 0)


# ---------------------------------------------------------------------------------------------
# what a transformer folder holds

CONFIG_KEY = "weight_quantization"  # config.json of a converted folder: {"weights": "int8", ...}


def config_record() -> dict:
    """The entry convert.py --quantize int8 writes into config.json under CONFIG_KEY."""
    return {"weights": "int8", "scheme": "symmetric, one scale per output channel, no offset",
            "scale_key": "{weight}" + SCALE_SUFFIX, "scale_dtype": "bfloat16",
            "layers": "the linear layers of transformer_blocks (attn1, attn2, ff)"}


def stored_weights(config: dict) -> str:
    """"int8" for a folder written by convert.py --quantize int8, else "full"."""
    record = config.get(CONFIG_KEY)
    if record is None:
        return "full"
    if not isinstance(record, dict) or record.get("weights") not in WEIGHTS_CHOICES:
        raise ValueError(f"config.json: {CONFIG_KEY} = {record!r} is not a weight quantization this code reads")
    return record["weights"]


def resolve_weights(requested: Optional[str], config: dict, where: str = "the transformer folder") -> str:
    """The weights a model is built with: `requested` ("full", "int8" or None: what the folder holds).
    Full weights cannot be restored from an int8 folder: asking for them is an error."""
    stored = stored_weights(config)
    if requested is None:
        return stored
    if requested not in WEIGHTS_CHOICES:
        raise ValueError(f"--weights {requested}: use one of {', '.join(WEIGHTS_CHOICES)}")
    if stored == "int8" and requested == "full":
        raise ValueError(f"--weights full: {where} holds int8 weights (convert.py --quantize int8); the full "
                         "weights cannot be restored from them: use --weights int8 or the released folder")
    return requested
