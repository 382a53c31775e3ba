"""CFG x pipeline x Ulysses parallelism for the DiT, optionally with sharded or host-offloaded block weights (see mesh.py)."""
from .comm import Communicator, LocalCommunicator, init_world, launched_distributed, make_communicator
from .dit_forward import (Conditioning, ParallelDiT, load_stage, load_stage_model, parallel_denoise,
                          stage_param_filter)
from .shard import BlockShards, load_sharded_stage
from .offload import BlockStreamer, HostBlocks, load_offloaded_stage
from .mesh import Mesh, layer_partition, parse_pp_split
from .pipeline import Schedule, micro_batch_count
from .ulysses import TokenShard, UlyssesAttention

__all__ = [
    "Communicator", "LocalCommunicator", "init_world", "launched_distributed", "make_communicator",
    "Conditioning", "ParallelDiT", "load_stage", "load_stage_model", "parallel_denoise", "stage_param_filter",
    "BlockShards", "load_sharded_stage", "BlockStreamer", "HostBlocks", "load_offloaded_stage",
    "Mesh", "layer_partition", "parse_pp_split", "Schedule", "micro_batch_count",
    "TokenShard", "UlyssesAttention",
]
