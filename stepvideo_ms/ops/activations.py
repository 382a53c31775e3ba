"""Activations."""
import math

from mindspore import Tensor, mint, ops

from ..runtime import is_ascend

# tanh-GELU: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
_GELU_LINEAR = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (PyTorch's approximate='tanh')."""
    if is_ascend():  # pragma: no cover - needs an NPU
        return ops.gelu(x, approximate="tanh")
    # CPU: MindSpore's gelu kernel is ~5x slower than these five elementwise passes
    return x * ops.sigmoid(x * (x * x * _GELU_CUBIC + _GELU_LINEAR))


def silu(x: Tensor) -> Tensor:
    return mint.nn.functional.silu(x)
