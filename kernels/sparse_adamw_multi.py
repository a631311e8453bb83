"""Fused AdamW over the compressed index sets of a list of tensors: :func:`sparse_adamw` per tensor.

Twin of :func:`adtuning.reference.sparse_adamw_multi_ref_`. One launch of the single-tensor
kernel per tensor (on a GPU a launch costs microseconds and the launches queue without host
synchronisation), after every tensor's arguments have been checked, so that a bad argument
at any position leaves every tensor unwritten. Like :func:`sparse_adamw`, it does not check
that the indices lie inside their parameters (that would synchronise with the device).
"""
from __future__ import annotations

from collections.abc import Sized

import torch

from ._common import check_compact, check_device, check_indices
from .sparse_adamw import sparse_adamw


def _check_position(
    t: int,
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    step: float,
) -> None:
    """The checks of :func:`sparse_adamw` on the tensor at position ``t``, naming it."""
    op = f"sparse_adamw_multi, tensor {t}"
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: param must be fp32/bf16/fp16, got {param.dtype}")
    if not param.is_contiguous():
        raise ValueError(f"{op}: param must be contiguous")
    check_indices(op, indices, param.numel())
    k = indices.numel()
    for name, value in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_compact(op, name, value, k)
    if master is not None:
        check_compact(op, "master", master, k)
    elif param.dtype != torch.float32:
        raise ValueError(f"{op}: {param.dtype} param needs an fp32 master copy of its child entries")
    check_device(op, param, grad, indices, exp_avg, exp_avg_sq, master)
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")


def sparse_adamw_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor | None],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Triton :class:`~adtuning.backend_contract.SparseAdamWMultiOp` (one :func:`sparse_adamw` launch per tensor).

    Every position is checked first, with the checks of :func:`sparse_adamw` (a bf16/fp16
    param needs its master; steps >= 1); indices are not range-checked.
    """
    lists: dict[str, Sized] = {"grads": grads, "indices": indices, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "masters": masters, "steps": steps}
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(f"sparse_adamw_multi: {name} has {len(values)} entries, params has {len(params)}; "
                             f"every list needs one entry per tensor")
    columns = list(zip(params, grads, indices, exp_avgs, exp_avg_sqs, masters, steps))
    for t, (param, grad, idx, exp_avg, exp_avg_sq, master, step) in enumerate(columns):
        _check_position(t, param, grad, idx, exp_avg, exp_avg_sq, master, step)
    for param, grad, idx, exp_avg, exp_avg_sq, master, step in columns:
        sparse_adamw(
            param, grad, idx, exp_avg, exp_avg_sq, master,
            step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        )
