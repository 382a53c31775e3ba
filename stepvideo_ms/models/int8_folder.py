"""`convert.py --quantize int8`: a DiT transformer folder with int8 block weights, written ahead of time.

The output keeps the released layout: the same shard files (each about half its size), the same
`*.safetensors.index.json` when the source has one, and config.json. Every linear weight of the
transformer blocks (the ones `--weights int8` quantizes) becomes `X.weight` int8 with its scales
`X.weight_scale` (bfloat16, exact: ops/quant.py) in the same shard; every other tensor is copied
byte for byte. The quantization is recorded in config.json (key `weight_quantization`) and in each
shard's metadata. Loading the folder reads half the bytes of the released one, and gives the same
model as `--weights int8` on the released folder (the same quantization).

Written atomically: everything goes to a temporary folder beside the output, each shard is re-read
and checked (names, shapes, dtypes, CRC-32 of every tensor's bytes), then the folder is renamed into
place. Tensors are read and written one at a time (host memory: one tensor and its int8 copy).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..formats.atomic import current_umask
from ..ops.quant import CONFIG_KEY, SCALE_SUFFIX, config_record, quantize_rows, stored_weights

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
METADATA = {"format": "pt", "stepvideo_ms.weights": "int8"}


class QuantizeError(ValueError):
    """A bad --quantize request (source, output): nothing was written."""


@dataclass
class QuantizeReport:
    outputs: List[str] = field(default_factory=list)
    quantized: int = 0
    copied: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def int8_weight_names(config: dict) -> set:
    """Checkpoint names of the weights `--weights int8` holds in int8 (from the model built without weights)."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters
    from .dit import StepVideoModel

    with no_init_parameters():
        model = StepVideoModel.from_config(config, dtype=ms.bfloat16, weights="int8")
    return {n for n, p in model.parameters_and_names() if p.dtype == ms.int8}


def _entries(src, quantize: set) -> List[Tuple[str, str, Tuple[int, ...], Optional[str]]]:
    """(output key, dtype, shape, source key and role) of one shard, in the order written."""
    out = []
    for key in sorted(src.keys()):
        shape = tuple(src.shape(key))
        if key in quantize:
            if src.dtype(key) not in ("BF16", "F16", "F32") or len(shape) != 2:
                raise QuantizeError(f"{src.path}: {key} is {src.dtype(key)} {shape}, expected a 2-D float weight")
            out.append((key, "I8", shape, "q"))
            out.append((key + SCALE_SUFFIX, "BF16", (shape[0],), "s"))
        else:
            out.append((key, src.dtype(key), shape, None))
    return out


def _header(entries, metadata: Dict[str, str]) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    offsets, at = {}, 0
    for key, dtype, shape, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + size]}
        offsets[key] = (at, at + size)
        at += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def _write_shard(src, dest: str, quantize: set, bar) -> Tuple[Dict[str, int], int, int]:
    """Write one shard; -> (CRC-32 of each tensor's bytes, quantized count, copied count)."""
    from ..formats.safetensors_io import bf16_to_f32, f32_to_bf16_bits

    entries = _entries(src, quantize)
    head, _ = _header(entries, METADATA)
    crcs, nq, nc = {}, 0, 0
    with open(dest, "wb") as fh:
        fh.write(head)
        pending_scale = None
        for key, dtype, shape, role in entries:
            if role == "q":
                raw = src.get(key, upcast_bf16=False)
                w = bf16_to_f32(raw) if src.dtype(key) == "BF16" else raw.astype(np.float32)
                q, scales = quantize_rows(w)
                data, pending_scale = q.tobytes(), f32_to_bf16_bits(scales).tobytes()
                nq += 1
            elif role == "s":
                data, pending_scale = pending_scale, None
            else:
                data = src.get(key, upcast_bf16=False).tobytes()
                nc += 1
            fh.write(data)
            crcs[key] = zlib.crc32(data)
            if bar is not None:
                bar.update(1)
        fh.flush()
        os.fsync(fh.fileno())
    return crcs, nq, nc


def _verify(path: str, crcs: Dict[str, int], quantize: set) -> None:
    from ..formats.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    try:
        if set(f.keys()) != set(crcs):
            raise QuantizeError(f"verification of {path} failed: its tensors differ from those written")
        for key, crc in crcs.items():
            want = "I8" if key in quantize else None
            if want and f.dtype(key) != want:
                raise QuantizeError(f"verification of {path} failed: {key} is {f.dtype(key)}, not int8")
            if zlib.crc32(f.get(key, upcast_bf16=False).tobytes()) != crc:
                raise QuantizeError(f"verification of {path} failed: the bytes of {key} changed on disk")
        if f.metadata.get("stepvideo_ms.weights") != "int8":
            raise QuantizeError(f"verification of {path} failed: its metadata does not record int8 weights")
    finally:
        f.close()


def quantize_folder(src_dir: str, out_dir: str, overwrite: bool = False, progress: bool = True) -> QuantizeReport:
    """Write the int8 copy of the transformer folder `src_dir` to `out_dir` (atomically, verified)."""
    from ..console import progress as progress_bar
    from ..formats import checkpoint
    from ..formats.safetensors_io import SafetensorsFile

    t0 = time.perf_counter()
    config = checkpoint.read_config(src_dir)
    if stored_weights(config) == "int8":
        raise QuantizeError(f"--model_dir: {src_dir} holds int8 weights already (config.json {CONFIG_KEY})")
    files = checkpoint.checkpoint_files(src_dir)
    if os.path.isfile(src_dir):
        raise QuantizeError(f"{src_dir}: give the model directory (its transformer folder holds config.json)")
    src_abs, out_abs = os.path.realpath(src_dir), os.path.realpath(out_dir)
    if src_abs == out_abs:
        raise QuantizeError(f"--out {out_dir}: is the source folder; give another folder")
    if os.path.exists(out_dir) and not overwrite:
        raise QuantizeError(f"--out {out_dir} exists: give --overwrite to replace it, or another folder")
    quantize = int8_weight_names(config)
    sources = [SafetensorsFile(f) for f in files]
    found = {k for s in sources for k in s.keys()}
    missing = sorted(quantize - found)
    if missing:
        raise QuantizeError(f"{src_dir} does not fit its config.json: missing {missing[:5]} (+{max(0, len(missing) - 5)})")
    need = sum(os.path.getsize(f) for f in files)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    if shutil.disk_usage(parent).free < need * 0.6:
        raise QuantizeError(f"--out {out_dir}: not enough free space in {parent} (about {need * 0.55 / 2**30:.1f} GiB needed)")
    report = QuantizeReport(bytes_in=need)
    tmp = tempfile.mkdtemp(prefix=".int8-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would stay the folder's: respect the umask
        bar = progress_bar(total=sum(len(s.keys()) + len(quantize & set(s.keys())) for s in sources),
                   desc="quantizing to int8", unit="tensor", disable=not progress, leave=False)
        weight_map = {}
        for src in sources:
            name = os.path.basename(src.path)
            dest = os.path.join(tmp, name)
            crcs, nq, nc = _write_shard(src, dest, quantize, bar)
            _verify(dest, crcs, quantize)
            report.quantized += nq
            report.copied += nc
            report.bytes_out += os.path.getsize(dest)
            weight_map.update({k: name for k in crcs})
            src.close()
        bar.close()
        indexes = [f for f in os.listdir(src_dir) if f.endswith(".safetensors.index.json")]
        if indexes:
            with open(os.path.join(tmp, indexes[0]), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": report.bytes_out, **METADATA},
                           "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(dict(config, **{CONFIG_KEY: config_record()}), fh, indent=2)
        checkpoint.checkpoint_files(tmp)  # the index names exactly the shards written
        if stored_weights(checkpoint.read_config(tmp)) != "int8":
            raise QuantizeError("verification failed: the written config.json does not record int8 weights")
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.outputs = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir))
    report.seconds = time.perf_counter() - t0
    return report
