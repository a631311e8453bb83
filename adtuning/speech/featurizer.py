"""s3prl-style featurizer: a learned softmax-weighted sum of all upstream hidden states, or (the
paper's frozen Baseline) the last hidden state alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURIZER_MODES = ("weighted-sum", "last")
"""``weighted-sum``: learnt softmax weights over every hidden state (s3prl's default);
``last``: the last hidden state only, no parameters (the paper's Baseline / ``frozen`` method)."""


class Featurizer(nn.Module):
    """Softmax-weighted sum of ``num_layers`` hidden states, or the last one.

    Args:
        num_layers: number of hidden states the upstream returns.
        normalize: layer-normalise every hidden state over its feature dimension (no affine
            parameters) before the sum, as s3prl's ``layer_norm`` option does.
        mode: one of :data:`FEATURIZER_MODES`. ``weighted-sum`` (default): the weights start
            equal (all-zero logits) and are an ordinary dense parameter ``weights`` of the
            downstream model. ``last``: the output is the last hidden state (normalised with
            ``normalize``); the featurizer has no parameters.

    The output is float32 whatever the upstream dtype.
    """

    def __init__(self, num_layers: int, *, normalize: bool = False, mode: str = "weighted-sum"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if mode not in FEATURIZER_MODES:
            raise ValueError(f"featurizer mode must be one of {', '.join(FEATURIZER_MODES)}, got {mode!r}")
        self.num_layers = num_layers
        self.normalize = normalize
        self.mode = mode
        if mode == "weighted-sum":
            self.weights = nn.Parameter(torch.zeros(num_layers))

    def layer_weights(self) -> torch.Tensor:
        """The current softmax weights ([num_layers]); one-hot on the last layer in ``last`` mode."""
        if self.mode == "last":
            w = torch.zeros(self.num_layers)
            w[-1] = 1.0
            return w
        return F.softmax(self.weights, dim=0)

    def forward(self, hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Combine ``[B, T, D]`` hidden states into one ``[B, T, D]`` float32 tensor."""
        if len(hidden_states) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} hidden states, got {len(hidden_states)}")
        if self.mode == "last":
            last = hidden_states[-1].float()
            return F.layer_norm(last, (last.shape[-1],)) if self.normalize else last
        stacked = torch.stack([h.float() for h in hidden_states], dim=0)
        if self.normalize:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        w = self.layer_weights().view(-1, 1, 1, 1)
        return (w * stacked).sum(dim=0)
