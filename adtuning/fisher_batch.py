"""The published code's Fisher scores (``estimate_fisher(mode="batch")``): per batch, the squared
(per-tensor clipped) gradient of the batch objective, and under data parallel the gradient of the
*global* batch's objective in one all-reduced buffer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from adtuning.distributed import DataParallel


def accumulate_batch_mode(out: torch.Tensor | None, scored: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor],
                           clip_norm: float | None, data_parallel: DataParallel | None = None) -> None:
    """Add the squared (clipped) gradient of one batch objective: ``out`` is ``[B]`` (its mean
    is differentiated), a scalar (differentiated as it is) or ``None`` (an empty part)."""
    names = list(scored)
    grads: Sequence[torch.Tensor | None]
    if data_parallel is None:
        assert out is not None  # an empty part exists only under data parallel
        objective = out if out.dim() == 0 else out.mean()
        grads = torch.autograd.grad(objective, [scored[n] for n in names], allow_unused=True)
    else:
        grads = global_batch_gradient(out, scored, names, data_parallel)
    for name, grad in zip(names, grads):
        if grad is None:
            continue
        grad = grad.float()
        if clip_norm is not None:
            # torch.nn.utils.clip_grad_norm_ on this tensor alone: the same formula and epsilon.
            norm = torch.linalg.vector_norm(grad)
            grad = grad * torch.clamp(clip_norm / (norm + 1e-6), max=1.0)
        fisher[name].add_(grad.square())


def global_batch_gradient(out: torch.Tensor | None, scored: dict[str, nn.Parameter], names: list[str],
                           data_parallel: DataParallel) -> list[torch.Tensor]:
    """The gradient of the *global* batch's objective on every rank, in one dense all-reduced
    buffer. ``[B]`` losses: this rank's summed-loss gradient and sample count, divided by the
    global count (the mean). A scalar: this rank's share of the global loss, summed as is. Two
    tail entries count samples and scalar parts so that the two kinds cannot be mixed."""
    device = next(iter(scored.values())).device
    flat = torch.zeros(sum(scored[n].numel() for n in names) + 2, dtype=torch.float32, device=device)
    if out is not None and out.numel():
        objective = out if out.dim() == 0 else out.sum()
        grads = torch.autograd.grad(objective, [scored[n] for n in names], allow_unused=True)
        offset = 0
        for name, grad in zip(names, grads):
            numel = scored[name].numel()
            if grad is not None:
                flat[offset:offset + numel] = grad.reshape(-1).float()
            offset += numel
        if out.dim() == 0:
            flat[-1] = 1
        else:
            flat[-2] = out.numel()
    data_parallel.all_reduce_sum_(flat)
    count, scalar_parts = flat[-2].item(), flat[-1].item()
    if scalar_parts and count:
        raise ValueError("estimate_fisher: ranks returned both scalar and per-sample losses for one global batch")
    if not scalar_parts:
        if count == 0:
            raise ValueError("estimate_fisher: a global batch without samples")
        flat.div_(count)
    out_grads: list[torch.Tensor] = []
    offset = 0
    for name in names:
        numel = scored[name].numel()
        out_grads.append(flat[offset:offset + numel].view(scored[name].shape))
        offset += numel
    return out_grads
