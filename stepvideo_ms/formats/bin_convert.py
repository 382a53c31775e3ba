"""Converting PyTorch `.bin` checkpoints to safetensors: streamed, verified, atomic.

- `convert_file`: one `.bin` -> one `.safetensors` (plus the model's config.json beside it).
- `convert_dir`: a directory of `.bin` files, sharded with `pytorch_model.bin.index.json` or not,
  -> the same layout in safetensors (`model-0000x-of-0000N.safetensors` and
  `model.safetensors.index.json`).

Tensors are copied one at a time, in chunks, from the `.bin` (read by `torch_bin`, which runs
nothing from the file) into a temporary file beside the destination. The temporary file is then
re-read and checked (names, dtypes, shapes, and a CRC-32 of every tensor's bytes) and only then
renamed into place; on any failure, every temporary file (and any directory made for the
output) is removed. Every name of the state dict is kept, tied or shared tensors included (each
written once per name), since the loader matches names strictly. bfloat16 stays bfloat16.
"""
from __future__ import annotations

import filecmp
import glob
import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from .safetensors_io import SafetensorsError, SafetensorsFile
from .torch_bin import DType, TorchCheckpoint
from .atomic import temp_path_beside

METADATA = {"format": "pt"}  # what transformers expects of a safetensors file converted from torch
VERIFY_CHUNK = 16 << 20
SPACE_MARGIN = 1 << 20
MAX_LISTED = 10


class ConvertError(ValueError):
    """A problem with the command's arguments or outputs: the message names the argument and the fix."""


@dataclass
class ConversionReport:
    outputs: List[str]
    tensors: int
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: DType
    shape: Tuple[int, ...]
    begin: int
    end: int


def safetensors_name(bin_name: str) -> str:
    """The conventional safetensors name for a `.bin` file name.

    pytorch_model.bin -> model.safetensors; pytorch_model-00001-of-00002.bin ->
    model-00001-of-00002.safetensors; diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors.
    """
    stem = bin_name[:-len(".bin")] if bin_name.endswith(".bin") else os.path.splitext(bin_name)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:MAX_LISTED]) + (f" ... (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


class _Staging:
    """Outputs written under temporary names beside their destinations, then renamed together."""

    def __init__(self):
        self._pairs: List[Tuple[str, str]] = []
        self._made_dirs: List[str] = []

    def temp_for(self, dest: str) -> str:
        folder = os.path.dirname(os.path.abspath(dest))
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for path in reversed(missing):
            os.mkdir(path)
            self._made_dirs.append(path)
        tmp = temp_path_beside(dest)
        self._pairs.append((tmp, dest))
        return tmp

    def commit(self):
        for tmp, dest in self._pairs:
            os.replace(tmp, dest)
        self._pairs, self._made_dirs = [], []

    def discard(self):
        for tmp, _ in self._pairs:
            if os.path.exists(tmp):
                os.remove(tmp)
        for path in reversed(self._made_dirs):
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        self._pairs, self._made_dirs = [], []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()


# ----- one file ----------------------------------------------------------------------------------
def _layout(ckpt: TorchCheckpoint) -> List[_Entry]:
    """Output order: widest dtype first (keeps every tensor aligned), then file order (sequential reads)."""
    names = sorted(ckpt.keys(), key=lambda n: (-ckpt.dtype(n).itemsize, ckpt.storage_position(n), n))
    entries, pos = [], 0
    for name in names:
        nbytes = ckpt.nbytes(name)
        entries.append(_Entry(name, ckpt.dtype(name), ckpt.shape(name), pos, pos + nbytes))
        pos += nbytes
    return entries


def _header(entries: List[_Entry]) -> bytes:
    header: Dict[str, object] = {"__metadata__": dict(METADATA)}
    for e in sorted(entries, key=lambda e: e.name):
        header[e.name] = {"dtype": e.dtype.safetensors, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(ckpt: TorchCheckpoint, entries: List[_Entry], tmp: str, bar) -> Dict[str, int]:
    crcs = {}
    with open(tmp, "wb") as out:
        out.write(_header(entries))
        for e in entries:
            stream, written = ckpt.chunks(e.name), 0
            for piece in stream:
                out.write(piece)
                written += len(piece)
                bar.update(len(piece))
            if written != e.end - e.begin:
                raise ConvertError(f"{ckpt.path}: tensor {e.name!r} gave {written} bytes, expected {e.end - e.begin}")
            crcs[e.name] = stream.crc
        out.flush()
        os.fsync(out.fileno())
    return crcs


def _verify(tmp: str, dest: str, entries: List[_Entry], crcs: Dict[str, int]):
    """Re-read the written file: header through the project's reader, every tensor's bytes by CRC-32."""
    fail = f"verification of {dest} failed"
    try:
        written = SafetensorsFile(tmp)
    except SafetensorsError as exc:
        raise ConvertError(f"{fail}: {exc}") from exc
    expected = {e.name: e for e in entries}
    if set(written.keys()) != set(expected):
        raise ConvertError(f"{fail}: names differ: {_listing(set(written.keys()) ^ set(expected))}")
    if written.metadata != METADATA:
        raise ConvertError(f"{fail}: metadata {written.metadata} != {METADATA}")
    for e in entries:
        if written.dtype(e.name) != e.dtype.safetensors or written.shape(e.name) != e.shape:
            raise ConvertError(f"{fail}: tensor {e.name!r} reads back as {written.dtype(e.name)} {written.shape(e.name)}")
    buf = memoryview(bytearray(VERIFY_CHUNK))
    with open(tmp, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        start = 8 + header_len
        if os.fstat(fh.fileno()).st_size != start + (entries[-1].end if entries else 0):
            raise ConvertError(f"{fail}: the file size does not match its header")
        for e in entries:
            fh.seek(start + e.begin)
            crc, left = 0, e.end - e.begin
            while left:
                got = fh.readinto(buf[:min(left, VERIFY_CHUNK)])
                if not got:
                    raise ConvertError(f"{fail}: tensor {e.name!r} is cut short")
                crc = zlib.crc32(buf[:got], crc)
                left -= got
            if crc != crcs[e.name]:
                raise ConvertError(f"{fail}: the bytes of tensor {e.name!r} differ from what was written")


def _convert_into(ckpt: TorchCheckpoint, tmp: str, dest: str, bar) -> List[_Entry]:
    entries = _layout(ckpt)
    crcs = _write(ckpt, entries, tmp, bar)
    _verify(tmp, dest, entries, crcs)
    return entries


# ----- checks made before any work ---------------------------------------------------------------
def _check_input_file(path: str, arg: str):
    if not path:
        raise ConvertError(f"{arg} is required: give the path of the PyTorch .bin file")
    if not os.path.isfile(path):
        what = "is a directory (use --pt_dir for a directory)" if os.path.isdir(path) else "does not exist"
        raise ConvertError(f"{arg} {path} {what}: give the path of the PyTorch .bin file")
    if path.endswith(".safetensors"):
        raise ConvertError(f"{arg} {path} is already a safetensors file: there is nothing to convert")


def _check_output(path: str, arg: str, overwrite: bool):
    if os.path.isdir(path):
        raise ConvertError(f"{arg} {path} is a directory: give the path of the file to write")
    if os.path.exists(path) and not overwrite:
        raise ConvertError(f"{arg}: {path} already exists; pass --overwrite to replace it, or choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConvertError(f"{arg} {path}: {folder} is a file, not a directory; choose another output path")
    if not os.access(folder, os.W_OK):
        raise ConvertError(f"{arg} {path}: no permission to write in {folder}; choose another output path")


def _check_space(path: str, nbytes: int, arg: str):
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < nbytes + SPACE_MARGIN:
        raise ConvertError(
            f"{arg}: not enough free space in {folder} ({free / 2**30:.2f} GiB free, "
            f"{nbytes / 2**30:.2f} GiB needed); free some space or write elsewhere")


def _config_copy(config_path: Optional[str], dest_dir: str, overwrite: bool) -> Optional[Tuple[str, str]]:
    """(source, destination) of the config.json to copy beside the output, or None if nothing to do."""
    if not config_path:
        return None
    if not os.path.isfile(config_path):
        raise ConvertError(f"--config_path {config_path} does not exist: give the model's config.json, or leave the option out")
    try:
        with open(config_path, "r", encoding="utf-8") as fh:
            config = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"--config_path {config_path} is not valid JSON ({exc}): give the model's config.json") from exc
    if not isinstance(config, dict):
        raise ConvertError(f"--config_path {config_path} holds no JSON object: give the model's config.json")
    dest = os.path.join(dest_dir, "config.json")
    if os.path.exists(dest):
        if os.path.samefile(config_path, dest) or filecmp.cmp(config_path, dest, shallow=False):
            return None
        if not overwrite:
            raise ConvertError(
                f"{dest} already exists and differs from --config_path {config_path}; pass --overwrite to replace it")
    return config_path, dest


def _progress_bar(total: int, desc: str, progress: bool):
    return progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


# ----- public entry points -----------------------------------------------------------------------
def convert_file(pt_filename: str, sf_filename: Optional[str] = None, config_path: Optional[str] = None,
                 overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Convert one `.bin`; `sf_filename` defaults to the conventional name beside it."""
    _check_input_file(pt_filename, "--pt_filename")
    if not sf_filename:
        sf_filename = os.path.join(os.path.dirname(pt_filename), safetensors_name(os.path.basename(pt_filename)))
    if not sf_filename.endswith(".safetensors"):
        raise ConvertError(f"--sf_filename {sf_filename} should end in .safetensors (the loader looks for that name)")
    _check_output(sf_filename, "--sf_filename", overwrite)
    config = _config_copy(config_path, os.path.dirname(sf_filename), overwrite)
    start = time.perf_counter()
    with TorchCheckpoint(pt_filename) as ckpt:
        total = sum(ckpt.nbytes(n) for n in ckpt.keys())
        _check_space(sf_filename, total, "--sf_filename")
        with _Staging() as staging, _progress_bar(total, os.path.basename(pt_filename), progress) as bar:
            entries = _convert_into(ckpt, staging.temp_for(sf_filename), sf_filename, bar)
            if config:
                shutil.copyfile(config[0], staging.temp_for(config[1]))
            staging.commit()
    outputs = [sf_filename] + ([config[1]] if config else [])
    return ConversionReport(outputs, len(entries), total, time.perf_counter() - start)


def _dir_plan(pt_dir: str) -> Tuple[List[str], Optional[str], Optional[Dict[str, str]]]:
    """(shard file names, index file name, weight map) of the `.bin` checkpoint in `pt_dir`."""
    indexes = sorted(os.path.basename(p) for p in glob.glob(os.path.join(pt_dir, "*.bin.index.json")))
    if len(indexes) > 1:
        raise ConvertError(f"--pt_dir {pt_dir} holds several index files ({', '.join(indexes)}): convert one model per directory")
    if not indexes:
        shards = sorted(f for f in os.listdir(pt_dir) if f.endswith(".bin") and os.path.isfile(os.path.join(pt_dir, f)))
        if not shards:
            raise ConvertError(f"--pt_dir {pt_dir} holds no .bin file: point it at the folder with pytorch_model.bin")
        return shards, None, None
    path = os.path.join(pt_dir, indexes[0])
    try:
        with open(path, "r", encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ConvertError(f"{path} is not a valid index file ({exc}); download it again") from exc
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and os.path.basename(v) == v for v in weight_map.values()):
        raise ConvertError(f"{path} has no valid weight_map (tensor name -> shard file name); download it again")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(pt_dir, s))]
    if missing:
        raise ConvertError(f"--pt_dir {pt_dir} lacks shard(s) {_listing(missing)} named by {indexes[0]}: download every shard")
    return shards, indexes[0], weight_map


def convert_dir(pt_dir: str, sf_dir: Optional[str] = None, config_path: Optional[str] = None,
                overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Convert every `.bin` of a model directory (sharded or not); `sf_dir` defaults to `pt_dir`."""
    if not pt_dir or not os.path.isdir(pt_dir):
        raise ConvertError(f"--pt_dir {pt_dir or '(empty)'} is not a directory: give the folder holding the .bin file(s)")
    sf_dir = sf_dir or pt_dir
    if os.path.exists(sf_dir) and not os.path.isdir(sf_dir):
        raise ConvertError(f"--sf_dir {sf_dir} is a file: give a directory")
    shards, index_name, weight_map = _dir_plan(pt_dir)
    targets = {s: os.path.join(sf_dir, safetensors_name(s)) for s in shards}
    if len(set(targets.values())) != len(targets):
        raise ConvertError(f"--pt_dir {pt_dir}: shards {_listing(shards)} map to clashing safetensors names")
    index_dest = os.path.join(sf_dir, safetensors_name(index_name[:-len(".index.json")]) + ".index.json") if index_name else None
    for dest in list(targets.values()) + ([index_dest] if index_dest else []):
        _check_output(dest, "--sf_dir", overwrite)
    if not config_path and os.path.isfile(os.path.join(pt_dir, "config.json")):
        config_path = os.path.join(pt_dir, "config.json")
    config = _config_copy(config_path, sf_dir, overwrite)
    start = time.perf_counter()
    ckpts: Dict[str, TorchCheckpoint] = {}
    try:
        for shard in shards:
            ckpts[shard] = TorchCheckpoint(os.path.join(pt_dir, shard))
        new_map = _check_weight_map(ckpts, weight_map, index_name, pt_dir, targets)
        total = sum(c.nbytes(n) for c in ckpts.values() for n in c.keys())
        _check_space(os.path.join(sf_dir, "x"), total, "--sf_dir")
        with _Staging() as staging, _progress_bar(total, os.path.basename(os.path.abspath(pt_dir)), progress) as bar:
            for shard in shards:
                _convert_into(ckpts[shard], staging.temp_for(targets[shard]), targets[shard], bar)
            if index_dest:
                with open(staging.temp_for(index_dest), "w", encoding="utf-8") as fh:
                    json.dump({"metadata": {"total_size": total}, "weight_map": new_map}, fh, indent=2, sort_keys=True)
                    fh.write("\n")
            if config:
                shutil.copyfile(config[0], staging.temp_for(config[1]))
            staging.commit()
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    outputs = [targets[s] for s in shards] + ([index_dest] if index_dest else []) + ([config[1]] if config else [])
    return ConversionReport(outputs, len(new_map), total, time.perf_counter() - start)


def _check_weight_map(ckpts: Dict[str, TorchCheckpoint], weight_map: Optional[Dict[str, str]],
                      index_name: Optional[str], pt_dir: str, targets: Dict[str, str]) -> Dict[str, str]:
    """Tensor name -> output file name; every name in exactly one shard, and where the index says."""
    new_map: Dict[str, str] = {}
    for shard, ckpt in ckpts.items():
        twice = [n for n in ckpt.keys() if n in new_map]
        if twice:
            raise ConvertError(f"--pt_dir {pt_dir}: tensors {_listing(twice)} appear in more than one shard")
        if weight_map is not None:
            listed = {n for n, s in weight_map.items() if s == shard}
            if listed != set(ckpt.keys()):
                raise ConvertError(
                    f"--pt_dir {pt_dir}: shard {shard} does not match {index_name}: missing "
                    f"[{_listing(listed - set(ckpt.keys()))}], not in the index [{_listing(set(ckpt.keys()) - listed)}]; "
                    "download the checkpoint again")
        for name in ckpt.keys():
            new_map[name] = os.path.basename(targets[shard])
    return new_map
