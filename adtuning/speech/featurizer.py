"""s3prl-style featurizer: a learned softmax-weighted sum of all upstream hidden states."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Featurizer(nn.Module):
    """Softmax-weighted sum of ``num_layers`` hidden states.

    Args:
        num_layers: number of hidden states the upstream returns.
        normalize: layer-normalise every hidden state over its feature dimension (no affine
            parameters) before the sum, as s3prl's ``layer_norm`` option does.

    The weights start equal (all-zero logits). The output is float32 whatever the upstream
    dtype. The featurizer is an ordinary dense parameter of the downstream model.
    """

    def __init__(self, num_layers: int, *, normalize: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.normalize = normalize
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def layer_weights(self) -> torch.Tensor:
        """The current softmax weights ([num_layers])."""
        return F.softmax(self.weights, dim=0)

    def forward(self, hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Combine ``[B, T, D]`` hidden states into one ``[B, T, D]`` float32 tensor."""
        if len(hidden_states) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} hidden states, got {len(hidden_states)}")
        stacked = torch.stack([h.float() for h in hidden_states], dim=0)
        if self.normalize:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        w = self.layer_weights().view(-1, 1, 1, 1)
        return (w * stacked).sum(dim=0)
