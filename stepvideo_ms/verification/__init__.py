"""Golden-data cases: each runs one of our modules on a case's inputs and returns its outputs
beside the golden ones.

A case NAME is two files, NAME_weights.safetensors (state dict, `config` metadata) and
NAME_io.safetensors (`in.*` inputs, `out`/`out.*` outputs). Its kind is the longest registered
kind that NAME equals or starts with followed by '_' (so `dit_t2v_big` runs as `dit_t2v`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..safetensors_io import SafetensorsFile, load_file

Outputs = List[Tuple[str, np.ndarray, np.ndarray]]  # (output name, ours, golden)


@dataclass
class GoldenCase:
    name: str
    weights_path: str
    io_path: str
    config: dict
    metadata: Dict[str, str]
    io: Dict[str, np.ndarray]

    @classmethod
    def open(cls, name: str, weights_path: str, io_path: str) -> "GoldenCase":
        metadata = dict(SafetensorsFile(io_path).metadata)
        metadata.update({k: v for k, v in SafetensorsFile(weights_path).metadata.items() if k not in metadata})
        if "config" not in metadata:
            raise ValueError(f"case {name}: neither {weights_path} nor {io_path} has a 'config' metadata entry")
        return cls(name, weights_path, io_path, json.loads(metadata["config"]), metadata, load_file(io_path))

    def inp(self, key: str) -> Optional[np.ndarray]:
        return self.io.get(f"in.{key}")

    def out(self, key: Optional[str] = None) -> np.ndarray:
        return self.io["out" if key is None else f"out.{key}"]


@dataclass
class CaseKind:
    kind: str
    run: Callable[[GoldenCase], Outputs]
    rtol: float  # max |ours - golden| <= rtol * (1 + max |golden|)


REGISTRY: Dict[str, CaseKind] = {}


def register(kind: str, rtol: float):
    def wrap(fn):
        REGISTRY[kind] = CaseKind(kind, fn, rtol)
        return fn
    return wrap


def kind_of(name: str) -> Optional[CaseKind]:
    matches = [k for k in REGISTRY if name == k or name.startswith(k + "_")]
    return REGISTRY[max(matches, key=len)] if matches else None


def load_all_kinds():
    """Import the modules that register case kinds."""
    from . import dit_cases  # noqa: F401
    from . import vae_case  # noqa: F401
    from . import text_cases  # noqa: F401
