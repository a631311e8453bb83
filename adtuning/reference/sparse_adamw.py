"""AdamW over a compressed index set (reference): gather, update, scatter."""
from __future__ import annotations

import torch

from adtuning.reference.adamw import adamw_update_


def sparse_adamw_ref_(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Reference :class:`~adtuning.backend_contract.SparseAdamWOp`: gather, :func:`adamw_update_`, scatter.

    Without ``master`` the child entries of a bf16/fp16 ``param`` are updated in that dtype
    (each AdamW operation rounds), where the Triton kernel refuses.
    """
    flat = param.view(-1)
    idx = indices.long()
    weights = master if master is not None else flat.index_select(0, idx)
    adamw_update_(
        weights, grad, exp_avg, exp_avg_sq,
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )
    flat.index_copy_(0, idx, weights.to(flat.dtype))
