"""The host memory rule of --offload, the one that `describe --plan` and `run_parallel.py` both apply.

Offloaded blocks are pinned in the host's memory by every rank of that host (each its own stage: the
ranks of one host add up, `plan.Plan.host_gib`). They may take at most HOST_SHARE of the host's memory;
the rest is left to the system, the processes themselves and their in-process encoders and VAE. The
host's memory is `--host_gb` when given (describe: a host other than this one; not checked without
it), else, for a run, this machine's physical memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

HOST_SHARE = 0.8  # of a host's memory, at most, for the offloaded blocks of its ranks


@dataclass(frozen=True)
class HostLimit:
    host_gib: float  # the host's memory
    source: str  # where that figure comes from: "--host_gb" or "this host's memory"

    @property
    def gib(self) -> float:
        """What the offloaded blocks of all ranks of the host may take."""
        return HOST_SHARE * self.host_gib

    def describe(self) -> str:
        return f"{self.gib:.1f} GiB ({HOST_SHARE:.0%} of {self.source} {self.host_gib:g} GiB)"

    @staticmethod
    def host_for(blocks_gib: float) -> float:
        """The host memory (GiB) whose share holds `blocks_gib` of offloaded blocks."""
        return blocks_gib / HOST_SHARE


def physical_memory_gib() -> Optional[float]:
    """This machine's physical memory in GiB, when known."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


def host_limit(host_gb: Optional[float] = None, this_host: bool = False) -> Optional[HostLimit]:
    """The limit for `host_gb` GiB of host memory, else (`this_host`) for this machine's, else None
    (not checked). A non-positive `host_gb` is refused, naming --host_gb."""
    if host_gb is not None:
        if not host_gb > 0:
            raise ValueError(f"--host_gb {host_gb:g} must be positive (the host's memory in GiB, e.g. 192)")
        return HostLimit(float(host_gb), "--host_gb")
    if this_host:
        gib = physical_memory_gib()
        return HostLimit(round(gib, 1), "this host's memory") if gib else None
    return None


def limit_gib(limit: Optional[HostLimit]) -> Optional[float]:
    """What `Plan.fits` takes as its host bound: the offloaded blocks' share, or None (not checked)."""
    return None if limit is None else limit.gib
