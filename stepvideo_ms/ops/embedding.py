"""Embedding lookup (mint's embedding has no CPU kernel)."""
from mindspore import Tensor, mint, ops

from ..runtime import is_ascend


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """Rows of `table` (vocab, dim) at integer `ids` (any shape) -> ids.shape + (dim,)."""
    if is_ascend():
        return mint.nn.functional.embedding(ids, table)
    return ops.gather(table, ids, 0)
