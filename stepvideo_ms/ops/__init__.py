"""Backend-dependent primitives, in one place.

Each function has a CPU implementation that runs on MindSpore's CPU backend and an Ascend branch
with the fused kernel; callers never test the backend themselves.
"""
from .attention import KeyMask, attention
from .conv import MatmulWeight, clear_weight_caches, conv2d, conv3d, conv3d_native
from .embedding import embedding
from .linear import linear, linear_heads
from .norms import group_norm, layer_norm, modulated_layer_norm, rms_norm
from .activations import gelu_tanh, silu
from .patch import patch_embed
from .split import split

__all__ = [
    "KeyMask",
    "attention",
    "embedding",
    "gelu_tanh",
    "group_norm",
    "layer_norm",
    "linear",
    "linear_heads",
    "modulated_layer_norm",
    "patch_embed",
    "rms_norm",
    "silu",
    "split",
]
