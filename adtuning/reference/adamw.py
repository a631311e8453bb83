"""AdamW on one dense tensor, in exactly the order of operations of ``torch.optim.AdamW``
(single-tensor path), so that on CPU the result is bit-identical to the oracle."""
from __future__ import annotations

import math

import torch


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Apply one AdamW step in place.

    Args:
        param, grad, exp_avg, exp_avg_sq: tensors of one shape; ``param`` is updated in place.
        step: the step number *after* incrementing (1 on the first step).
        lr, beta1, beta2, eps, weight_decay: the usual AdamW hyper-parameters (decoupled decay).
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
