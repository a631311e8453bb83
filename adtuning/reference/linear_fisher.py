"""Per-sample Fisher of a Linear layer's weight and bias (reference).

For the input ``x`` [B, T, in] and the output gradient ``dy`` [B, T, out] of one backward
pass over a sum of per-sample losses, sample n's weight gradient is ``dy_n^T x_n`` and its
bias gradient is ``sum_t dy_n,t``. The Fisher accumulators receive their squares.
This twin materialises each per-sample gradient on purpose: it is the clear statement of
the contract, not the fast path.
"""
from __future__ import annotations

import torch


def linear_fisher_ref_(
    x: torch.Tensor,
    dy: torch.Tensor,
    fisher_w: torch.Tensor,
    fisher_b: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> None:
    """Reference :class:`~adtuning.backend_contract.LinearFisherOp`: one per-sample gradient at a time.

    Any float dtype is accepted for ``x`` and ``dy``, and the accumulators need not be contiguous.
    """
    batch, frames = x.shape[0], x.shape[1]
    for n in range(batch):
        valid = frames if lengths is None else int(lengths[n])
        x_n = x[n, :valid].float()
        dy_n = dy[n, :valid].float()
        grad_w = dy_n.t() @ x_n
        fisher_w.add_(grad_w.square())
        if fisher_b is not None:
            fisher_b.add_(dy_n.sum(0).square())
