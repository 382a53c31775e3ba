"""What a model server accepts: the configurable limits and the checks that enforce them.

Every check runs on the decoded message before any model work and raises `RequestError` naming
the field and the fix. Defaults admit the released model's largest request (204 frames at
544x992: latents (1, 36, 64, 34, 62), about 19 MB in float32) with room to spare, and refuse
what would tie a device up for hours or exhaust its memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .protocol import DEFAULT_MAX_HEADER_BYTES, FLOAT_WIRE_DTYPES, Message, RequestError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 512 * MIB      # request body cap (413 above it)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_prompts: int = 64                # prompts per caption request
    max_prompt_chars: int = 4096         # characters per prompt (the LLM reads 320 tokens anyway)
    max_batch: int = 8                   # videos per VAE request
    max_latent_frames: int = 128         # 128 latent frames = 725 video frames
    max_latent_side: int = 256           # x16 = 4096 pixels
    max_frames: int = 1024               # video frames per VAE encode request
    max_side: int = 4096                 # pixels per side
    queue_size: int = 8                  # requests waiting for the device (beyond the running one)
    queue_wait_s: float = 600.0          # longest wait for the device before a 503
    max_connections: int = 64            # concurrent connections (handler threads)
    socket_timeout_s: float = 120.0      # idle time on a socket (slow or stalled client)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"limit {name}={value} must be positive")

    def as_dict(self) -> dict:
        return asdict(self)


def check_fields(msg: Message, required: Sequence[str] = (), optional: Sequence[str] = (),
                 tensors: Sequence[str] = ()) -> None:
    """Exactly the expected field and tensor names: a typo is an error, not silently ignored."""
    for name in required:
        if name not in msg.fields:
            raise RequestError(f"missing field {name!r}", name)
    extra = set(msg.fields) - set(required) - set(optional)
    if extra:
        raise RequestError(f"unknown field(s) {sorted(extra)}; this endpoint reads "
                           f"{sorted(set(required) | set(optional))}", sorted(extra)[0])
    for name in tensors:
        if name not in msg.tensors:
            raise RequestError(f"missing tensor {name!r}", name)
    extra = set(msg.tensors) - set(tensors)
    if extra:
        raise RequestError(f"unexpected tensor(s) {sorted(extra)}; this endpoint reads {sorted(tensors)}",
                           sorted(extra)[0])


def check_prompts(value, limits: Limits, field: str = "prompts") -> List[str]:
    if not isinstance(value, list):
        raise RequestError(f"{field} must be a list of strings, got {type(value).__name__}", field, 422)
    if not value:
        raise RequestError(f"{field} is empty: send at least one prompt (an empty string is a valid prompt)",
                           field, 422)
    if len(value) > limits.max_prompts:
        raise RequestError(f"{field} holds {len(value)} prompts; the limit is {limits.max_prompts} per request",
                           field, 422)
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise RequestError(f"{field}[{i}] must be a string, got {type(p).__name__}", field, 422)
        if len(p) > limits.max_prompt_chars:
            raise RequestError(f"{field}[{i}] has {len(p)} characters; the limit is {limits.max_prompt_chars}",
                               field, 422)
        if "\x00" in p:
            raise RequestError(f"{field}[{i}] contains a NUL character", field, 422)
    return list(value)


def check_int(msg: Message, name: str, default: int, low: int, high: int) -> int:
    value = msg.fields.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}", name, 422)
    return value


def check_bool(msg: Message, name: str, default: bool) -> bool:
    value = msg.fields.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", name, 422)
    return value


def check_choice(msg: Message, name: str, default: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    value = msg.fields.get(name, default)
    if value not in choices:
        raise RequestError(f"{name} must be one of {list(choices)}, got {value!r}", name, 422)
    return value


def check_float_tensor(msg: Message, name: str, axes: Sequence[str],
                       bounds: Dict[str, Tuple[int, int]],
                       multiples: Optional[Dict[str, int]] = None) -> np.ndarray:
    """A floating tensor with len(axes) dimensions, each within its (low, high) bound and a multiple
    of `multiples[axis]` where given, all finite; returned as float32."""
    wire = msg.wire_dtypes[name]
    if wire not in FLOAT_WIRE_DTYPES:
        raise RequestError(f"{name} has dtype {wire}; send float32, float16 or bfloat16", name, 422)
    arr = msg.tensors[name]
    if arr.ndim != len(axes):
        raise RequestError(f"{name} must have {len(axes)} dimensions ({', '.join(axes)}), got shape "
                           f"{list(arr.shape)}", name, 422)
    for axis, size in zip(axes, arr.shape):
        low, high = bounds[axis]
        if not low <= size <= high:
            raise RequestError(f"{name}: {axis}={size} is outside [{low}, {high}] (shape {list(arr.shape)})",
                               name, 422)
        step = (multiples or {}).get(axis)
        if step and size % step:
            raise RequestError(f"{name}: {axis}={size} must be a multiple of {step} (shape {list(arr.shape)})",
                               name, 422)
    out = msg.float32(name)
    if not np.isfinite(out).all():
        bad = int(out.size - np.isfinite(out).sum())
        raise RequestError(f"{name} holds {bad} non-finite value(s) (NaN or Inf)", name, 422)
    return out
