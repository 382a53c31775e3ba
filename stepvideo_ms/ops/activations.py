"""Activations."""
from mindspore import Tensor, mint, ops


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (PyTorch's approximate='tanh')."""
    return ops.gelu(x, approximate="tanh")


def silu(x: Tensor) -> Tensor:
    return mint.nn.functional.silu(x)
