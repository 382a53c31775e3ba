"""The host memory of --offload: which ranks share a host copy, how many ranks a host runs, and the one
rule that `describe --plan` and `run_parallel.py` both apply.

Each rank offloads its pipeline stage's blocks to its host's memory (offload.py). Whether the ranks of
one host that run the SAME stage share one copy depends on how the blocks are held (`host_blocks_shared`):

- not pinned (the CPU backend; Ascend on a MindSpore without `Tensor.pin_memory`, 2.7.0): the blocks
  sit in a file-backed map that the host's ranks of one stage map together, so a host holds each
  distinct stage its ranks run once;
- pinned (Ascend with `Tensor.pin_memory`): MindSpore pins by allocating fresh page-locked memory in
  each process and copying into it (Tensor.pin_memory -> its PinMemPool -> aclrtMallocHost) and has no
  API to page-lock memory that several processes map, so every rank keeps its own copy and the ranks
  of a host add up.

The planner counts the host memory PER HOST (`plan.Plan.host_gib`: the largest over the hosts of the
world). msrun numbers ranks host by host, so host k runs the world ranks [k*R, (k+1)*R) with R ranks per
host (`ranks_on_this_host`: $STEPVIDEO_RANKS_PER_HOST, which msrun_job gives its workers, else the
whole world on one host). The offloaded blocks of a host may take at most HOST_SHARE of its memory; the
rest is left to the system, the processes themselves and their in-process encoders and VAE. The host's
memory is `--host_gb` when given (describe: a host other than this one; not checked without it), else,
for a run, this machine's physical memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

HOST_SHARE = 0.8  # of a host's memory, at most, for the offloaded blocks of its ranks
RANKS_PER_HOST_ENV = "STEPVIDEO_RANKS_PER_HOST"  # the ranks msrun starts on each host (msrun_job sets it)
CARDS_PER_HOST = 8  # describe --plan's default: an Ascend server's cards (a world of fewer: all on one host)


def host_blocks_shared(device: str) -> bool:
    """Whether the ranks of one host that run the same stage share one host copy of its blocks on
    `device` ("Ascend", "CPU", "ascend-sim"): where the blocks are not pinned (see the module docstring)."""
    from ..capabilities import asynchronous_offload
    from .host_share import sharing_enabled

    return not asynchronous_offload(device) and sharing_enabled()  # STEPVIDEO_SHARE_HOST_BLOCKS=0: per rank


def sharing_words(shared: bool) -> str:
    """How the planner counts a host's offloaded blocks, as printed."""
    return ("one copy per stage, shared by the host's ranks that run it (not pinned)" if shared
            else "pinned per rank (each rank its own copy)")


def hosts_words(cards: int, cards_per_host: int) -> str:
    """"per host of 4 cards", "per host of 8 cards (2 hosts, the last of 4)" for `cards` over hosts."""
    per = min(cards, cards_per_host)
    hosts, last = -(-cards // per), cards - (-(-cards // per) - 1) * per
    return (f"per host of {per} card{'s' if per > 1 else ''}"
            + (f" ({hosts} hosts" + (f", the last of {last})" if last != per else ")") if hosts > 1 else ""))


def ranks_on_this_host(world_size: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """The ranks of this run on this host: $STEPVIDEO_RANKS_PER_HOST (in `environ`, default os.environ)
    when set, else the whole world (one host). ValueError naming the variable when it is not a positive
    whole number that divides the world."""
    value = (os.environ if environ is None else environ).get(RANKS_PER_HOST_ENV, "").strip()
    if not value:
        return world_size
    ranks = int(value) if value.isdigit() else 0
    if ranks < 1 or world_size % ranks:
        raise ValueError(f"{RANKS_PER_HOST_ENV}={value!r} must be a positive whole number of ranks per host that "
                         f"divides the world of {world_size} rank(s) (msrun's --local_worker_num, e.g. "
                         f"{RANKS_PER_HOST_ENV}={world_size}); unset it for a world on one host")
    return ranks


def host_block_count(stage_of_rank: Sequence[int], stage_layers: Sequence[int], ranks_per_host: Optional[int],
                     shared: bool) -> int:
    """The most blocks any host holds: hosts of `ranks_per_host` consecutive ranks (None: one host; the last
    host may have fewer), rank r running stage `stage_of_rank[r]` of `stage_layers[s]` blocks; `shared`:
    each distinct stage of a host once, else every rank's stage."""
    per = ranks_per_host or len(stage_of_rank)
    if per < 1:
        raise ValueError(f"ranks_per_host={per} must be at least 1")
    most = 0
    for start in range(0, len(stage_of_rank), per):
        stages: Iterable[int] = stage_of_rank[start:start + per]
        most = max(most, sum(stage_layers[s] for s in (set(stages) if shared else stages)))
    return most


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


def check_host_holds(predicted, ranks: int, shared: bool, limit: Optional[HostLimit]) -> None:
    """Refuse (ValueError naming the per-host figure and the fix) an offload plan whose offloaded blocks on
    this host of `ranks` ranks (`predicted.host_gib`, per host) exceed `limit` (None: not checked)."""
    if limit is None or predicted.host_gib <= limit.gib:
        return
    how = ("the ranks of one stage share one copy" if shared else "each rank pins its own copy")
    raise ValueError(f"--offload: {predicted.layout.name()} keeps {predicted.host_gib:.1f} GiB of offloaded blocks "
                     f"in this host's memory for its {ranks} rank(s) here ({how}), over {limit.describe()}: spread "
                     "the ranks over more hosts, or use --shard_weights instead of --offload")
