"""Upstream + task: the module the CHILD-TUNING engine trains."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adtuning.speech.tasks.base import Task
from adtuning.speech.upstream import Upstream

# Receives the upstream's [B] valid frame counts of a batch.
LengthsSink = Callable[[torch.Tensor], None]


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device`` (other values are kept)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class SpeechModel(nn.Module):
    """An :class:`Upstream` followed by a :class:`Task` (featurizer + head).

    Args:
        upstream: the SSL model; its parameters are what CHILD-TUNING scores and updates.
        task: the downstream; :meth:`head_parameters` are trained densely.

    Batches are dicts from :func:`adtuning.speech.make_loader`; tensors are moved to the
    model's device here.
    """

    def __init__(self, upstream: Upstream, task: Task):
        super().__init__()
        if task.featurizer.num_layers != upstream.num_layers:
            raise ValueError(f"task expects {task.featurizer.num_layers} hidden states, "
                             f"upstream gives {upstream.num_layers}")
        self.upstream = upstream
        self.task = task
        task.bind_upstream(upstream)

    @property
    def featurizer(self):
        """The task's featurizer (layer-weighted sum)."""
        return self.task.featurizer

    @property
    def device(self) -> torch.device:
        """Device of the head (batches are moved there)."""
        return next(self.task.parameters()).device

    def head_parameters(self) -> list[nn.Parameter]:
        """Featurizer and head parameters (dense, always trained)."""
        return list(self.task.parameters())

    def named_head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the featurizer and head, names relative to this module."""
        for n, p in self.task.named_parameters():
            yield "task." + n, p

    def forward(self, batch: dict[str, Any], on_frame_lengths: LengthsSink | None = None) -> dict[str, torch.Tensor]:
        """Task outputs for a batch (see the task classes).

        ``on_frame_lengths``: called with the upstream's ``[B]`` valid frame counts, e.g. a
        Fisher pass's ``note_sample_lengths`` (the engine learns them from this adapter; the
        upstream knows nothing of it).
        """
        batch = batch_to(batch, self.device)
        hidden, frame_lengths = self.upstream(batch["wav"], batch["wav_lengths"])
        if on_frame_lengths is not None:
            on_frame_lengths(frame_lengths)
        return self.task(hidden, frame_lengths, batch)

    def per_sample_nll(self, batch: dict[str, Any], on_frame_lengths: LengthsSink | None = None) -> torch.Tensor:
        """``[B]`` negative log-likelihood ``-log p(y_j | x_j)`` of every sample (Fisher pass).

        A sample's value does not depend on the other samples of the batch (padding is
        masked everywhere), up to floating-point rounding. ``on_frame_lengths``: as in
        :meth:`forward`.
        """
        batch = batch_to(batch, self.device)
        return self.task.per_sample_nll(self(batch, on_frame_lengths), batch)

    def loss(self, batch: dict[str, Any], on_frame_lengths: LengthsSink | None = None) -> torch.Tensor:
        """The recipe's scalar batch loss (``on_frame_lengths``: as in :meth:`forward`)."""
        batch = batch_to(batch, self.device)
        return self.task.loss(self(batch, on_frame_lengths), batch)

    @property
    def primary_metric(self) -> str:
        """Name of the metric model selection uses (``task.primary_metric``)."""
        return self.task.primary_metric

    @property
    def higher_is_better(self) -> bool:
        """Direction of :attr:`primary_metric`."""
        return self.task.higher_is_better

    @property
    def metric_directions(self) -> dict[str, bool]:
        """Every metric :meth:`evaluate` returns -> True if higher is better."""
        return self.task.metric_directions

    @torch.no_grad()
    def evaluate(self, loader: Iterable[dict[str, Any]], progress: bool = True) -> dict[str, float]:
        """Evaluate on a dev/test loader in eval mode; returns ``{metric: value}``.

        Directions are in ``self.task.metric_directions`` (True: higher is better); the one to
        select on is ``self.task.primary_metric``. The training mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            state = self.task.new_eval_state()
            for batch in tqdm(loader, desc=f"eval {self.task.name}", disable=not progress, leave=False):
                batch = batch_to(batch, self.device)
                self.task.eval_update(state, self(batch), batch)
            return self.task.eval_compute(state)
        finally:
            self.train(was_training)
