"""AdamW over the compressed index sets of a list of tensors (reference): :func:`sparse_adamw_ref_` in turn."""
from __future__ import annotations

from collections.abc import Sized

import torch

from adtuning.reference.sparse_adamw import sparse_adamw_ref_

OP = "sparse_adamw_multi_"


def check_sparse_adamw_multi_args(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor | None],
    steps: list[float],
) -> None:
    """Raise, naming the list and the position, unless every tensor's arguments are usable.

    Checks the list lengths, then per position: an fp32/bf16/fp16 ``params[t]``, int32/int64
    1-D ``indices[t]`` inside ``params[t]``, fp32 compact tensors of ``len(indices[t])``
    entries, all on the device of ``params[t]``, and ``steps[t] >= 1``. Run before any tensor is written, so that a bad argument
    leaves every tensor unwritten.

    Raises:
        ValueError: a list length, a compact length, a device, an index outside its parameter or a step.
        TypeError: a dtype.
    """
    lists: dict[str, Sized] = {"grads": grads, "indices": indices, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "masters": masters, "steps": steps}
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(f"{OP}: {name} has {len(values)} entries, params has {len(params)}; "
                             f"every list needs one entry per tensor")
    for t, (param, idx) in enumerate(zip(params, indices)):
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{OP}: params[{t}] must be float32, bfloat16 or float16, got {param.dtype}")
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise TypeError(f"{OP}: indices[{t}] must be a 1-D int32 or int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        k = idx.numel()
        compact = {"grads": grads[t], "exp_avgs": exp_avgs[t], "exp_avg_sqs": exp_avg_sqs[t], "masters": masters[t]}
        for name, value in {"indices": idx, **compact}.items():
            if value is not None and value.device != param.device:
                raise ValueError(f"{OP}: {name}[{t}] is on {value.device}, params[{t}] on {param.device}")
        for name, value in compact.items():
            if value is None:
                continue
            if value.dtype != torch.float32:
                raise TypeError(f"{OP}: {name}[{t}] must be float32, got {value.dtype}")
            if value.numel() != k:
                raise ValueError(f"{OP}: {name}[{t}] must have {k} entries (as indices[{t}]), got {value.numel()}")
        if k and not (0 <= int(idx.min()) and int(idx.max()) < param.numel()):
            raise ValueError(f"{OP}: indices[{t}] holds an index outside [0, {param.numel()}); nothing was written")
        if not steps[t] >= 1:
            raise ValueError(f"{OP}: steps[{t}] must be >= 1, got {steps[t]}")


def sparse_adamw_multi_ref_(
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
    """Reference :class:`~adtuning.backend_contract.SparseAdamWMultiOp`: :func:`sparse_adamw_ref_` on each position in turn.

    All arguments are checked first (:func:`check_sparse_adamw_multi_args`).
    """
    check_sparse_adamw_multi_args(params, grads, indices, exp_avgs, exp_avg_sqs, masters, steps)
    for param, grad, idx, exp_avg, exp_avg_sq, master, step in zip(
        params, grads, indices, exp_avgs, exp_avg_sqs, masters, steps
    ):
        sparse_adamw_ref_(
            param, grad, idx, exp_avg, exp_avg_sq, master,
            step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        )
