"""Reading and writing safetensors files with numpy, bfloat16 included.

The `safetensors` package cannot hand bfloat16 tensors to numpy, and the released Step-Video
checkpoints are bfloat16, so reading goes through this small memory-mapped reader of the
format (8-byte header length, JSON header, raw little-endian data). Writing uses the package.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from .atomic import atomic_output

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file: header now, tensors on request."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise SafetensorsError(f"cannot read safetensors file {path}: {exc.strerror}") from exc
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path} is not a valid safetensors file (header length {n} exceeds the file)")
            try:
                header = json.loads(fh.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SafetensorsError(f"{path} has a corrupt safetensors header: {exc}") from exc
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + n
        data_len = size - self._data_start
        for name, info in header.items():
            if info.get("dtype") not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != expected:
                raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupt)")
        self._mmap: Optional[np.memmap] = None

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str, upcast_bf16: bool = True) -> np.ndarray:
        """The tensor as a numpy array (a copy); bfloat16 comes back as float32 unless told not to."""
        info = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        arr = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16" and upcast_bf16:
            return bf16_to_f32(arr)
        return np.array(arr)

    def get_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements start..stop of the flattened tensor (a copy, bfloat16 upcast to float32), reading only
        their bytes."""
        info = self._entries[name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if not 0 <= start <= stop <= count:
            raise ValueError(f"{self.path}: elements {start}..{stop} lie outside tensor {name!r} of {count}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin = self._data_start + info["data_offsets"][0]
        raw = self._mmap[begin + start * dtype.itemsize:begin + stop * dtype.itemsize]
        arr = np.frombuffer(raw, dtype=dtype)
        return bf16_to_f32(arr) if info["dtype"] == "BF16" else np.array(arr)

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def close(self):
        self._mmap = None


def load_file(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a file as numpy arrays (bfloat16 upcast to float32)."""
    f = SafetensorsFile(path)
    try:
        return dict(f.items())
    finally:
        f.close()


def read_metadata(path: str) -> Dict[str, str]:
    return SafetensorsFile(path).metadata


def save_file_atomic(tensors: Mapping[str, np.ndarray], path: str, metadata: Optional[Mapping[str, str]] = None):
    """Write with the safetensors package to a temporary file beside `path`, then rename."""
    from safetensors.numpy import save_file

    with atomic_output(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata else None)
