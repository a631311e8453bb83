"""Sampled weight gradient of a Linear layer at a compressed index set (reference SDDMM).

For a Linear ``y = x W^T + b`` with ``x`` [N, in] and output gradient ``dy`` [N, out], the
weight gradient is ``dW = dy^T x`` ([out, in]). Training a child network needs only the child
entries of it: for the flat index ``e = i * in + j`` that is ``sum_n dy[n, i] * x[n, j]``, a
sampled dense-dense matrix product (SDDMM). This twin computes it in fp32, a bounded chunk of
entries at a time, so that it never holds anything of the size of ``dW``.
"""
from __future__ import annotations

import torch

# Elements of the [N, chunk] products formed at once (16 MiB of fp32 per operand): bounded
# memory whatever the layer, large enough that the Python loop is not the cost.
CHUNK_ELEMENTS = 1 << 22


def sddmm_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Reference :class:`~adtuning.backend_contract.SDDMMOp`: :data:`CHUNK_ELEMENTS`-bounded chunks of entries."""
    in_features = x.shape[1]
    idx = indices.long()
    rows, cols = idx // max(in_features, 1), idx % max(in_features, 1)
    if out is None:
        out, accumulate = torch.empty(idx.numel(), dtype=torch.float32, device=dy.device), False
    chunk = max(1, CHUNK_ELEMENTS // max(1, dy.shape[0]))
    for start in range(0, idx.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        part = (dy[:, r].float() * x[:, c].float()).sum(0)
        if accumulate:
            out[start:start + chunk] += part
        else:
            out[start:start + chunk] = part
    return out
