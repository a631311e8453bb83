"""Gather of a dense gradient at a compressed index set (reference)."""
from __future__ import annotations

import torch


def gather_ref(
    grad: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Reference :class:`~adtuning.backend_contract.GatherOp` (``index_select``; no input checks)."""
    values = grad.reshape(-1).index_select(0, indices.long()).float()
    if out is None:
        return values
    if accumulate:
        out.add_(values)
    else:
        out.copy_(values)
    return out
