"""Loading the released checkpoint layouts into MindSpore cells, strictly by name.

Layouts read:
- a directory holding `*.safetensors.index.json` (sharded: the index names the shard of every key);
- a directory holding safetensors files (one or several, e.g. `diffusion_pytorch_model.safetensors`);
- one `.safetensors` file.

Loading checks every name and shape before it reads a single tensor: a mismatch fails with the
lists of missing and unexpected keys. Tensors are read one at a time from memory-mapped shards,
cast to the dtype policy, and set into the cell's parameters, so host memory holds at most one
tensor beyond the model itself.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from ..console import progress as progress_bar  # a live bar on a terminal, plain lines in a log

from ..ops.conv import clear_weight_caches
from ..ops.quant import SCALE_SUFFIX, quantize_rows
from .safetensors_io import SafetensorsFile

MAX_LISTED = 20


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: names, shapes or files."""


def read_config(path: str) -> dict:
    """config.json of a model directory (or the directory holding a checkpoint file)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        raise CheckpointError(f"no config.json in {folder} (looked for {cfg}): the folder of a model's weights holds "
                              "its config.json (e.g. MODEL_DIR/transformer/config.json)")
    with open(cfg, "r", encoding="utf-8") as fh:
        return json.load(fh)


def checkpoint_files(path: str) -> List[str]:
    """The safetensors files that make up the checkpoint at `path` (a file or a directory)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several index files {indexes}: keep one")
    if indexes:
        with open(indexes[0], "r", encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{indexes[0]} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(
                f"missing shard(s) {missing} named by {os.path.basename(indexes[0])} in {path}: "
                "download every shard listed in the index")
        return [os.path.join(path, s) for s in shards]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no .safetensors file in {path} (convert .bin files with convert.py)")
    return files


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def load_into(
    cell: nn.Cell,
    path: str,
    dtype: Optional[ms.dtype] = None,
    select: Optional[Callable[[str], bool]] = None,
    rename: Optional[Callable[[str], str]] = None,
    progress: bool = True,
) -> Dict[str, Tuple[int, ...]]:
    """Set `cell`'s parameters from the checkpoint at `path`; return {name: shape} of what was loaded.

    dtype: floating tensors are cast to it (default: each parameter's own dtype).
    select: keep only the names for which it is true, on both sides (a pipeline stage loads its
        own layers and ignores the others' keys).
    rename: maps a checkpoint key to the model's parameter name.
    """
    params = {name: p for name, p in cell.parameters_and_names()}
    if select is not None:
        params = {n: p for n, p in params.items() if select(n)}
    files = [SafetensorsFile(f) for f in checkpoint_files(path)]
    where: Dict[str, Tuple[SafetensorsFile, str]] = {}
    for f in files:
        for key in f.keys():
            name = rename(key) if rename else key
            if select is not None and not select(name):
                continue
            if name in where:
                raise CheckpointError(f"key {key!r} appears twice in {path}")
            where[name] = (f, key)
    # int8 weights of the model (X.weight int8 beside X.weight_scale): read with their scales from an int8
    # checkpoint, or quantized here from a float one (reading the tensor once; the scales are derived)
    int8 = {n for n, p in params.items() if p.dtype == ms.int8 and n + SCALE_SUFFIX in params}
    derived = {n + SCALE_SUFFIX for n in int8
               if n in where and where[n][0].dtype(where[n][1]) != "I8" and n + SCALE_SUFFIX not in where}
    stored_int8 = sorted(n for n in set(where) & set(params) if where[n][0].dtype(where[n][1]) == "I8"
                         and params[n].dtype != ms.int8)
    if stored_int8:
        raise CheckpointError(f"checkpoint {path} holds int8 weights ({_listing(stored_int8)}) but the model was "
                              "built with full weights: load it with weights='int8' (--weights int8)")
    missing = set(params) - set(where) - derived
    unexpected = set(where) - set(params)
    wrong_shape = [
        f"{n}: checkpoint {where[n][0].shape(where[n][1])} vs model {tuple(params[n].shape)}"
        for n in sorted(set(params) & set(where))
        if tuple(where[n][0].shape(where[n][1])) != tuple(params[n].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"checkpoint {path} does not fit {type(cell).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): " + "; ".join(wrong_shape[:MAX_LISTED]))
        parts.append("check that the config matches the weights (and the model directory is the right one)")
        raise CheckpointError("\n  ".join(parts))
    clear_weight_caches(cell)  # layouts made from the old weights go (and free their storage)
    loaded = {}
    order = sorted(set(params) - derived, key=lambda n: (where[n][0].path, n))  # one shard after the other
    for name in progress_bar(order, desc=f"loading {type(cell).__name__}", unit="tensor", disable=not progress, leave=False):
        f, key = where[name]
        arr = f.get(key)
        param = params[name]
        if name + SCALE_SUFFIX in derived:  # a float weight for an int8 parameter: quantize it now
            arr, scales = quantize_rows(arr)
            scale_param = params[name + SCALE_SUFFIX]
            scale_param.set_data(Tensor(scales, dtype=scale_param.dtype if dtype is None else dtype))
            loaded[name + SCALE_SUFFIX] = tuple(scales.shape)
        target = param.dtype if dtype is None or not np.issubdtype(arr.dtype, np.floating) else dtype
        param.set_data(Tensor(arr, dtype=target))
        loaded[name] = tuple(arr.shape)
    for f in files:
        f.close()
    return loaded


def build_and_load(
    build: Callable[[], nn.Cell],
    path: str,
    dtype: Optional[ms.dtype] = None,
    select: Optional[Callable[[str], bool]] = None,
    progress: bool = True,
) -> nn.Cell:
    """`build()` a cell without allocating its weights (shapes only), set them from the checkpoint
    at `path` through `load_into`, and put the cell in inference mode."""
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        cell = build()
    load_into(cell, path, dtype=dtype, select=select, progress=progress)
    cell.set_train(False)
    return cell
