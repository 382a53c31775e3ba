"""Golden-data cases: each runs one of our modules on a case's inputs and returns its outputs
beside the golden ones.

A case NAME is two files, NAME_weights.safetensors (state dict, `config` metadata) and
NAME_io.safetensors (`in.*` inputs, `out`/`out.*` outputs). Its kind is the longest registered
kind that NAME equals or starts with followed by '_' (so `dit_t2v_big` runs as `dit_t2v`).
The kinds register themselves in golden.REGISTRY when their modules (dit_cases, vae_case,
text_cases) are imported: `load_all_kinds()`.
"""
from __future__ import annotations

from .golden import REFERENCE_PREFIX, REGISTRY, CaseKind, GoldenCase, Outputs, kind_of, register, to_numpy

__all__ = ["REFERENCE_PREFIX", "REGISTRY", "CaseKind", "GoldenCase", "Outputs", "kind_of", "load_all_kinds",
           "register", "to_numpy"]


def load_all_kinds():
    """Import the modules that register case kinds."""
    from . import dit_cases  # noqa: F401
    from . import vae_case  # noqa: F401
    from . import text_cases  # noqa: F401
