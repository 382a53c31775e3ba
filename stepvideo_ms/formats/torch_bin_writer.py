"""Writing PyTorch `.bin` checkpoints (the torch.save zip layout) without torch.

For test fixtures, benchmarks and small model directories in the released layout (whose CLIP
text encoder ships as `pytorch_model.bin`). The output is what torch.save writes for a state dict
of contiguous tensors: `<stem>/data.pkl` (an OrderedDict of `_rebuild_tensor_v2` calls, pickle
protocol 2, opcodes written here directly), `<stem>/byteorder`, `<stem>/data/<i>` (one storage
per tensor, 64-byte aligned as torch does) and the version records. torch.load reads it.
"""
from __future__ import annotations

import os
import struct
import zipfile
from typing import Mapping, Optional

import numpy as np

from .atomic import atomic_output
from .torch_pickle import DTYPES, STORAGE_CLASSES

ALIGNMENT = 64
WRITE_CHUNK = 16 << 20
_ZIP_LOCAL_HEADER = 30
_ZIP64_EXTRA = 20  # zipfile adds this to the local header of an entry it writes as zip64
_STORAGE_OF = {dtype: cls for cls, dtype in STORAGE_CLASSES.items() if cls != "UntypedStorage"}
_NAME_OF_NUMPY = {np.dtype(d.numpy): name for name, d in DTYPES.items() if name != "bfloat16"}


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _ints(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _state_dict_pickle(specs) -> bytes:
    """Protocol-2 pickle of OrderedDict{name: _rebuild_tensor_v2(storage, 0, shape, stride, False, {})}."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R("]
    for key, (name, torch_dtype, shape) in enumerate(specs):
        stride, step = [], 1
        for n in reversed(shape):
            stride.insert(0, step)
            step *= n
        numel = int(np.prod(shape, dtype=np.int64))
        out += [
            _text(name), _global("torch._utils", "_rebuild_tensor_v2"), b"(",
            b"(", _text("storage"), _global("torch", _STORAGE_OF[torch_dtype]), _text(str(key)),
            _text("cpu"), _int(numel), b"tQ",
            _int(0), _ints(shape), _ints(stride), b"\x89", _global("collections", "OrderedDict"), b")R",
            b"tR",
        ]
    out.append(b"u.")
    return b"".join(out)


def _torch_dtype(name: str, arr: np.ndarray, dtypes: Mapping[str, str]) -> str:
    if name in dtypes:
        torch_dtype = dtypes[name]
        if torch_dtype not in DTYPES or np.dtype(DTYPES[torch_dtype].numpy) != arr.dtype.newbyteorder("<"):
            raise ValueError(f"tensor {name!r}: numpy dtype {arr.dtype} cannot be written as torch.{torch_dtype}")
        return torch_dtype
    if arr.dtype.newbyteorder("<") not in _NAME_OF_NUMPY:
        raise ValueError(f"tensor {name!r}: numpy dtype {arr.dtype} has no torch counterpart")
    return _NAME_OF_NUMPY[arr.dtype.newbyteorder("<")]


def _add_record(zf: zipfile.ZipFile, name: str, data, size: int):
    """One stored zip entry whose data starts on an ALIGNMENT boundary, written in chunks."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    start = zf.fp.tell() + _ZIP_LOCAL_HEADER + len(name.encode()) + (_ZIP64_EXTRA if zip64 else 0)
    pad = -(start + 4) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as fh:
        for begin in range(0, size, WRITE_CHUNK):
            fh.write(data[begin:begin + WRITE_CHUNK])


def save_bin(path: str, tensors: Mapping[str, np.ndarray], dtypes: Optional[Mapping[str, str]] = None,
             byteorder: str = "little"):
    """Write `tensors` as torch.save would, atomically (temporary file, then rename).

    `dtypes` overrides the torch dtype of some tensors by name, e.g. {"w": "bfloat16"} for a uint16
    array of bfloat16 bits. `tensors` is read twice (shapes first, then data), one tensor at a time.
    `byteorder="big"` writes the data big-endian, as a big-endian machine would.
    """
    if byteorder not in ("little", "big"):
        raise ValueError(f"byteorder must be 'little' or 'big', got {byteorder!r}")
    dtypes = dict(dtypes or {})
    specs = []
    for name in tensors:
        arr = tensors[name]
        specs.append((name, _torch_dtype(name, arr, dtypes), tuple(int(n) for n in arr.shape)))
    stem = os.path.splitext(os.path.basename(path))[0] or "archive"
    with atomic_output(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            payload = _state_dict_pickle(specs)
            _add_record(zf, f"{stem}/data.pkl", payload, len(payload))
            for record, text in ((".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
                                 ("byteorder", byteorder.encode())):
                _add_record(zf, f"{stem}/{record}", text, len(text))
            for key, (name, torch_dtype, _shape) in enumerate(specs):
                dt = np.dtype(DTYPES[torch_dtype].numpy).newbyteorder("<" if byteorder == "little" else ">")
                arr = np.ascontiguousarray(tensors[name], dtype=dt).reshape(-1)
                data = memoryview(arr.view(np.uint8))
                _add_record(zf, f"{stem}/data/{key}", data, len(data))
                del arr, data
            _add_record(zf, f"{stem}/version", b"3\n", 2)
