"""Per-sample Fisher of a LayerNorm's weight and bias (reference)."""
from __future__ import annotations

import torch


def layernorm_fisher_ref_(
    x_hat: torch.Tensor,
    dy: torch.Tensor,
    fisher_w: torch.Tensor | None,
    fisher_b: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> None:
    """Accumulate ``fisher_w += sum_n (sum_t dy_n,t * x_hat_n,t)^2`` and ``fisher_b += sum_n (sum_t dy_n,t)^2``.

    Args:
        x_hat: [B, T, C] normalised LayerNorm input (before the affine transform).
        dy: [B, T, C] gradient w.r.t. the LayerNorm output.
        fisher_w, fisher_b: fp32 [C] accumulators (either may be None).
        lengths: optional int [B] of valid frames.
    """
    dy = dy.float()
    if lengths is not None:
        frames = torch.arange(dy.shape[1], device=dy.device)
        keep = (frames[None, :] < lengths.to(dy.device)[:, None]).unsqueeze(-1)
        dy = dy * keep
    if fisher_w is not None:
        fisher_w.add_((dy * x_hat.float()).sum(1).square().sum(0))
    if fisher_b is not None:
        fisher_b.add_(dy.sum(1).square().sum(0))
