"""A golden case and the registry of case kinds (verification/__init__ re-exports them).

A case NAME is two files, NAME_weights.safetensors (state dict, `config` metadata) and
NAME_io.safetensors (`in.*` inputs, `out`/`out.*` outputs). Its kind is the longest registered
kind that NAME equals or starts with followed by '_' (so `dit_t2v_big` runs as `dit_t2v`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms

from ...formats.safetensors_io import SafetensorsFile, load_file

Outputs = List[Tuple[str, np.ndarray, np.ndarray]]  # (output name, ours, golden)
REFERENCE_PREFIX = "ref.fp32."  # bf16 cases: the same module in float32, whose distance to `out` is the floor


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

    @property
    def is_bf16(self) -> bool:
        """A bf16 case (golden/bf16/): upstream ran in bfloat16 and `ref.fp32.*` holds its float32 answers."""
        return any(k.startswith(REFERENCE_PREFIX) for k in self.io)

    @property
    def dtype(self):
        """The dtype our module runs the case in: bfloat16 for a bf16 case, else float32."""
        return ms.bfloat16 if self.is_bf16 else ms.float32

    def reference(self, label: str) -> Optional[np.ndarray]:
        """The float32 answer beside output `label` ("out" or a name under out.*), or None."""
        return self.io.get(REFERENCE_PREFIX + ("out" if label == "out" else f"out.{label}"))


def to_numpy(t) -> np.ndarray:
    """A tensor's values as a numpy array (bfloat16 widened to float32: numpy has no bfloat16)."""
    return (t.astype(ms.float32) if t.dtype == ms.bfloat16 else t).asnumpy()


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
