"""Gather of a dense gradient at a compressed index set (reference)."""
from __future__ import annotations

import torch


def gather_ref(
    grad: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Return ``float32(grad.flatten()[indices])``.

    Args:
        grad: dense gradient of any shape (fp32, bf16 or fp16), contiguous.
        indices: 1-D sorted unique int32/int64 flat indices into ``grad``.
        out: optional fp32 buffer of length ``len(indices)`` to write into.
        accumulate: add into ``out`` instead of overwriting it (gradient accumulation
            over micro-batches).
    """
    values = grad.reshape(-1).index_select(0, indices.long()).float()
    if out is None:
        return values
    if accumulate:
        out.add_(values)
    else:
        out.copy_(values)
    return out
