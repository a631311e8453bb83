"""The task contract: featurizer + head, per-sample NLL, recipe loss, evaluation."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adtuning.speech.featurizer import Featurizer


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool mask, True at frames ``t < lengths[b]``."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[B, T, D]`` over the first ``lengths[b]`` frames of each sample."""
    mask = valid_mask(lengths, x.shape[1]).to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / lengths.clamp(min=1).to(x.dtype).unsqueeze(-1)


class Task(nn.Module):
    """A SUPERB downstream task: the featurizer and head (dense parameters) plus its recipe.

    Subclasses set :attr:`name`, :attr:`metrics` (metric name -> higher is better) and
    :attr:`primary_metric`, and implement :meth:`head`, :meth:`per_sample_nll`, :meth:`loss`,
    :meth:`eval_update` and :meth:`eval_compute`. Every evaluation also reports ``nll``, the
    mean per-sample negative log-likelihood (lower is better).
    """

    name: str = ""
    metrics: ClassVar[dict[str, bool]] = {}
    primary_metric: str = ""

    def __init__(self, *, upstream_dim: int, num_layers: int, normalize_features: bool = False):
        super().__init__()
        self.upstream_dim = upstream_dim
        self.featurizer = Featurizer(num_layers, normalize=normalize_features)

    def use_featurizer_mode(self, mode: str) -> None:
        """Replace the featurizer by one in ``mode`` (:data:`adtuning.speech.featurizer.FEATURIZER_MODES`;
        ``last``: the last hidden state, no layer weights: the paper's Baseline)."""
        self.featurizer = Featurizer(self.featurizer.num_layers, normalize=self.featurizer.normalize, mode=mode)

    @property
    def higher_is_better(self) -> bool:
        """Direction of :attr:`primary_metric`."""
        return self.metric_directions[self.primary_metric]

    @property
    def metric_directions(self) -> dict[str, bool]:
        """Every metric :meth:`eval_compute` returns -> True if higher is better."""
        return {**self.metrics, "nll": False}

    def bind_upstream(self, upstream: nn.Module) -> None:
        """Hook for tasks that depend on the upstream's frame rate (default: nothing)."""

    def forward(self, hidden_states: list[torch.Tensor], frame_lengths: torch.Tensor,
                batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Featurize the hidden states and run the head; returns the task's outputs."""
        return self.head(self.featurizer(hidden_states), frame_lengths, batch)

    def head(self, features: torch.Tensor, frame_lengths: torch.Tensor,
             batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Head on ``[B, T, D]`` float32 features with ``[B]`` valid frame counts."""
        raise NotImplementedError

    def per_sample_nll(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """``[B]`` negative log-likelihood of each sample's label under the model."""
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """The recipe's scalar batch loss."""
        raise NotImplementedError

    #: Whether :meth:`loss` is a mean over the batch's samples; a task whose loss is a mean over
    #: something else (SD: label frames) sets it False and counts that in :meth:`loss_normalizer`.
    loss_is_sample_mean: ClassVar[bool] = True

    def loss_normalizer(self, batch: dict[str, Any]) -> float:
        """How many things :meth:`loss` is a mean over in ``batch`` (data parallel weighs each
        rank's part of a global batch by its share of this count)."""
        return float(len(batch["ids"]))

    def new_eval_state(self) -> dict[str, Any]:
        """Fresh accumulator for :meth:`eval_update`."""
        return {"nll_sum": 0.0, "count": 0}

    def eval_update(self, state: dict[str, Any], outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Accumulate one evaluation batch."""
        nll = self.per_sample_nll(outputs, batch)
        state["nll_sum"] += float(nll.sum())
        state["count"] += int(nll.numel())

    def eval_compute(self, state: dict[str, Any]) -> dict[str, float]:
        """Metrics from the accumulated state."""
        if state["count"] == 0:
            raise ValueError(f"{self.name}: evaluation saw no samples")
        return {"nll": state["nll_sum"] / state["count"]}
