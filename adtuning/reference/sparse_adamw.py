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
    """One AdamW step on the child entries of ``param`` only.

    The child entries ``w = param.flatten()[indices]`` (or the fp32 ``master`` copy of them,
    when given) evolve exactly as ``torch.optim.AdamW`` would evolve the vector ``w`` alone
    with gradient ``grad``; every other entry of ``param`` is left untouched.

    Args:
        param: the dense parameter (fp32, bf16 or fp16), contiguous; updated in place.
        grad: fp32 compact gradient, length k.
        indices: 1-D sorted unique int32/int64 flat indices, length k.
        exp_avg, exp_avg_sq: fp32 compact moments, length k; updated in place.
        master: fp32 compact master weights (length k) for low-precision ``param``, else None.
        step: step number after incrementing (1 on the first step).
    """
    flat = param.view(-1)
    idx = indices.long()
    weights = master if master is not None else flat.index_select(0, idx)
    adamw_update_(
        weights, grad, exp_avg, exp_avg_sq,
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )
    flat.index_copy_(0, idx, weights.to(flat.dtype))
