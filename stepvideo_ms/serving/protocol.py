"""The wire format shared by the model servers and their client: safetensors, never pickle.

Every request and every successful response body is one complete safetensors file sent with
content type `application/x-stepvideo-tensors`:

    8 bytes   little-endian u64 N: length of the JSON header
    N bytes   UTF-8 JSON header, padded with spaces to a multiple of 8 bytes:
                {"__metadata__": {"protocol": "stepvideo-tensors/1",
                                  "fields": "<JSON object as a string>"},
                 "<tensor name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                 ...}
    the data  raw little-endian tensor bytes; the tensors' byte ranges tile it exactly

Scalars and strings (prompts, seed, ...) travel in `fields`; arrays are tensors. Any safetensors
reader can open a captured message. Decoding never executes anything from the body: it parses
JSON and views bytes as numbers, after checking every length, offset, dtype and shape against
the body. Errors are answered as JSON, `{"error": message, "field": name, "status": code}`.

Endpoints (POST, both ways this format; GET /health answers JSON):
    /caption-api     fields {"prompts": [str, ...]}  ->  y (BF16, b x 320 x C_llm), y_mask (I64, b x (77 + 320)),
                     clip_embedding (BF16, b x 77 x C_clip); the BF16 values are exactly the model's.
    /vae-api         tensor latents (b, f_lat, z, h, w) F32/F16/BF16, f_lat a multiple of 3;
                     field response_dtype "float32" (default) or "bfloat16"  ->  frames (b, f_lat/3*17, 3, 16h, 16w)
    /vae-encode-api  tensor frames (b, f, 3, H, W) in [-1, 1], f = 1 or a multiple of 17, H and W multiples of
                     16; fields seed (int, 0), sample (bool, true), response_dtype  ->  latents

Status codes: 400 the body is not a well-formed message or misses a field; 422 well-formed but a
value is unacceptable (dtype, rank, shape, limits, non-finite numbers, prompts); 401 missing or
wrong token; 404 endpoint not served here; 411 no Content-Length; 413 body over the cap; 415 wrong
content type; 503 queue full (with Retry-After); 500 the model failed.
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..formats.safetensors_io import bf16_to_f32, f32_to_bf16_bits

CONTENT_TYPE = "application/x-stepvideo-tensors"
PROTOCOL = "stepvideo-tensors/1"
JSON_CONTENT_TYPE = "application/json"

# Endpoints (upstream's paths) and the default ports of the two servers.
CAPTION_PATH = "/caption-api"
VAE_DECODE_PATH = "/vae-api"
VAE_ENCODE_PATH = "/vae-encode-api"
HEALTH_PATH = "/health"
DEFAULT_CAPTION_PORT = 5000
DEFAULT_VAE_PORT = 5001
AUTH_ENV = "STEPVIDEO_AUTH_TOKEN"

MAX_RANK = 8
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
STREAM_CHUNK_BYTES = 16 * 1024 * 1024

WIRE_TO_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NUMPY_TO_WIRE = {np.dtype(v): k for k, v in WIRE_TO_NUMPY.items() if k != "BF16"}
FLOAT_WIRE_DTYPES = ("F32", "F16", "BF16")


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, the offending `field`, and what to do."""

    def __init__(self, message: str, field: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status

    def as_json(self) -> dict:
        return {"error": self.message, "field": self.field, "status": self.status}


@dataclass
class Message:
    """A decoded message: JSON fields, tensors as numpy arrays, and each tensor's wire dtype.

    BF16 tensors are held as their raw uint16 bits; `float32(name)` widens them."""

    fields: Dict[str, object] = field(default_factory=dict)
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    wire_dtypes: Dict[str, str] = field(default_factory=dict)

    def float32(self, name: str) -> np.ndarray:
        arr = self.tensors[name]
        if self.wire_dtypes[name] == "BF16":
            return bf16_to_f32(arr)
        return arr.astype(np.float32, copy=False)


# ---- encoding ----------------------------------------------------------------------------
def _wire_array(name: str, arr: np.ndarray, bf16: bool) -> Tuple[str, np.ndarray]:
    arr = np.asarray(arr)
    if bf16:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"tensor {name!r}: only floating arrays can be sent as bfloat16, got {arr.dtype}")
        return "BF16", f32_to_bf16_bits(arr.astype(np.float32, copy=False)).reshape(arr.shape)
    dtype = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in "=|" else arr.dtype
    wire = NUMPY_TO_WIRE.get(np.dtype(dtype))
    if wire is None:
        raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, which the protocol does not carry: "
                         f"use one of {sorted(str(d) for d in NUMPY_TO_WIRE)}")
    out = np.asarray(arr, dtype=np.dtype(WIRE_TO_NUMPY[wire]).newbyteorder("<"))
    return wire, out if out.flags.c_contiguous else out.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def encode_chunks(fields: Optional[Mapping[str, object]] = None,
                  tensors: Optional[Mapping[str, np.ndarray]] = None,
                  bf16: Sequence[str] = ()) -> Tuple[List[object], int]:
    """The message as a list of byte-like pieces (header, then each tensor) and its total length.

    `bf16` names floating tensors to send as bfloat16 (half the bytes, 8 bits of mantissa)."""
    tensors = dict(tensors or {})
    unknown = set(bf16) - set(tensors)
    if unknown:
        raise ValueError(f"bf16 names tensors that are not in the message: {sorted(unknown)}")
    meta = {"protocol": PROTOCOL, "fields": json.dumps(dict(fields or {}), ensure_ascii=False)}
    header: Dict[str, object] = {"__metadata__": meta}
    datas: List[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        wire, arr = _wire_array(name, tensors[name], name in bf16)
        header[name] = {"dtype": wire, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        datas.append(arr)
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    pieces: List[object] = [struct.pack("<Q", len(head)) + head]
    pieces.extend(memoryview(a.reshape(-1)).cast("B") for a in datas if a.nbytes)
    return pieces, 8 + len(head) + offset


def encode(fields: Optional[Mapping[str, object]] = None, tensors: Optional[Mapping[str, np.ndarray]] = None,
           bf16: Sequence[str] = ()) -> bytes:
    """The message as one bytes object (for requests; responses stream `iter_bytes`)."""
    pieces, _ = encode_chunks(fields, tensors, bf16)
    return b"".join(bytes(p) for p in pieces)


def iter_bytes(pieces: Sequence[object], chunk: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
    """Pieces as `bytes` of at most `chunk` bytes each (a WSGI body without one big copy)."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), chunk):
            yield bytes(view[start:start + chunk])


# ---- decoding ----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_header(body, max_header_bytes: int) -> Tuple[dict, int]:
    if len(body) == 0:
        raise RequestError("the body is empty: send a stepvideo-tensors message", "body")
    if len(body) < 8:
        raise RequestError(f"the body ({len(body)} bytes) is shorter than the 8-byte header length", "body")
    (n,) = struct.unpack("<Q", bytes(body[:8]))
    if n == 0 or n > len(body) - 8:
        raise RequestError(f"header length {n} does not fit a body of {len(body)} bytes "
                           "(not a safetensors message, or truncated)", "body")
    if n > max_header_bytes:
        raise RequestError(f"header of {n} bytes exceeds the limit of {max_header_bytes}", "body", 413)
    try:
        header = json.loads(bytes(body[8:8 + n]).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})", "body") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"the header is not valid JSON ({exc.msg} at {exc.pos})", "body") from None
    if not isinstance(header, dict):
        raise RequestError("the header must be a JSON object", "body")
    return header, 8 + n


def _parse_fields(header: dict) -> Dict[str, object]:
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise RequestError('the header needs "__metadata__" with string values (protocol, fields)', "__metadata__")
    if meta.get("protocol") != PROTOCOL:
        raise RequestError(f"__metadata__.protocol is {meta.get('protocol')!r}; this server speaks {PROTOCOL!r}",
                           "protocol")
    try:
        fields = json.loads(meta.get("fields", "{}"))
    except json.JSONDecodeError as exc:
        raise RequestError(f"__metadata__.fields is not valid JSON ({exc.msg})", "fields") from None
    if not isinstance(fields, dict):
        raise RequestError("__metadata__.fields must be a JSON object", "fields")
    return fields


def decode(body, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Message:
    """Parse and check a message; tensors are read-only views of `body` (copy to modify).

    Raises RequestError (400) naming what is wrong; nothing in the body is executed."""
    header, data_start = _parse_header(body, max_header_bytes)
    fields = _parse_fields(header)
    data_len = len(body) - data_start
    spans = []
    for name, info in header.items():
        if not name:
            raise RequestError("a tensor has an empty name", "body")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise RequestError(f"tensor {name!r}: the entry needs exactly dtype, shape and data_offsets", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in WIRE_TO_NUMPY:
            raise RequestError(f"tensor {name!r}: unknown dtype {dtype!r} (use one of {sorted(WIRE_TO_NUMPY)})", name)
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
            raise RequestError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative "
                               f"integers, got {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise RequestError(f"tensor {name!r}: data_offsets must be [begin, end]", name)
        count = 1
        for s in shape:
            count *= s
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != count * np.dtype(WIRE_TO_NUMPY[dtype]).itemsize:
            raise RequestError(f"tensor {name!r}: bytes {begin}..{end} do not hold a {dtype} tensor of shape "
                               f"{shape} inside {data_len} data bytes (truncated or corrupt)", name)
        spans.append((begin, end, name, dtype, tuple(shape), count))
    spans.sort()
    cursor = 0
    for begin, end, name, *_ in spans:
        if begin != cursor:
            raise RequestError(f"tensor {name!r} starts at byte {begin}, expected {cursor}: tensors must tile "
                               "the data without gaps or overlaps", name)
        cursor = end
    if cursor != data_len:
        raise RequestError(f"{data_len - cursor} stray bytes after the last tensor (corrupt message)", "body")
    msg = Message(fields=fields)
    for begin, _end, name, dtype, shape, count in spans:
        native = np.dtype(WIRE_TO_NUMPY[dtype])
        arr = np.frombuffer(body, dtype=native.newbyteorder("<"), count=count, offset=data_start + begin)
        # in the machine's own byte order (a view on a little-endian host): MindSpore 2.7.0's Tensor refuses an
        # array whose dtype names its byte order ('<i8'), even where it is the native one
        arr = arr.view(native) if sys.byteorder == "little" else arr.astype(native)
        msg.tensors[name] = arr.reshape(shape)
        msg.wire_dtypes[name] = dtype
    return msg
