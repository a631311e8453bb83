"""What :class:`adtuning.search.AdaptiveSearch` is configured with: the task it trains
(:class:`TrainingProblem`), its hyper-parameters (:class:`SearchConfig`, validated once, here)
and the successive-halving plan (:func:`successive_halving`).

All of it is re-exported by :mod:`adtuning.search`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol

import torch
from torch import nn

from adtuning.sparse_grad import WEIGHT_GRAD_MODES

#: What a non-finite loss or gradient does (``SearchConfig.on_nonfinite``).
NONFINITE_POLICIES = ("stop", "skip")

#: Baselines :meth:`AdaptiveSearch.run_baselines` can train, with the P they amount to.
BASELINES = {"head-only": 0.0, "full": 1.0}


class TrainingProblem(Protocol):
    """What the search needs from a task (a :class:`adtuning.speech.SpeechModel` adapter fits).

    Attributes/methods:
        model: the one model (upstream + head), already on its device.
        upstream_params: ``{name: parameter}`` of the upstream; child names refer to these.
        head_params: ``{name: parameter}`` trained densely (head + layer-weighted sum).
        train_batches(epoch, skip): deterministic iterator over the training batches of
            ``epoch`` (its shuffle depends only on the seed and the epoch), starting after
            ``skip`` batches. Data parallel: this rank's parts of the global batches, one item
            per global batch on every rank (``None`` for an empty part); ``skip`` counts
            global batches.
        loss(batch): the scalar training loss of a batch. Data parallel: this rank's share of
            the global batch's loss (the global loss is the sum over ranks), or ``None`` when
            the rank holds no sample of it.
        evaluate(split): ``{metric: value}`` on ``"dev"`` or ``"test"`` (data parallel: of the
            whole split, the same on every rank).
        has_split(split): whether that split exists.
        primary_metric, higher_is_better: how candidates are ranked.
    """

    model: nn.Module
    upstream_params: Mapping[str, nn.Parameter]
    head_params: Mapping[str, nn.Parameter]
    primary_metric: str
    higher_is_better: bool

    def train_batches(self, epoch: int, skip: int) -> Iterator[Any]: ...

    def loss(self, batch: Any) -> torch.Tensor | None: ...

    def evaluate(self, split: str) -> dict[str, float]: ...

    def has_split(self, split: str) -> bool: ...


@dataclass
class SearchConfig:
    """Hyper-parameters of the search and of each candidate's training.

    Attributes:
        total_steps: T, optimizer steps of a full run.
        rungs: fractions of T at which candidates are evaluated and culled (paper: ``(r,)``).
        keep: survivors after each rung (paper: ``(c,)``).
        lr, head_lr: learning rates of the child entries and of the dense head.
        warmup_steps: linear warm-up steps of the T-step schedule.
        weight_decay, betas, eps: AdamW hyper-parameters (weight decay on the child only,
            like the paper's code; heads use ``head_weight_decay``).
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: global-norm clip over child + head gradients (``None``: off).
        eval_interval: also evaluate dev every this many steps, for the curves (0: only at rungs).
        backend: optimizer backend (``reference`` / ``native`` / ``triton`` / ``fused``).
        weight_grad: how the active candidate's Linear weight gradients are computed:
            ``"auto"`` (per tensor, SDDMM of the child entries straight into the compact
            buffers when the child density is below the backend's threshold, else dense GEMM +
            gather), ``"dense"`` or ``"sparse"`` (see :mod:`adtuning.sparse_grad`).
        seed: seeds each candidate's RNG identically, as independent runs would be.
        checkpoint_interval: write a resumable checkpoint every this many steps (0: only at
            segment ends).
        on_nonfinite: a step whose loss or gradient holds NaN/inf is never applied;
            ``"stop"`` raises :class:`NonFiniteError` naming the candidate, step and batch,
            ``"skip"`` drops the step (its batch is consumed, the optimizer and schedule do not
            move), logs it and counts it in the candidate's ``skipped_steps``.
        max_nonfinite_skips: with ``"skip"``, this many non-finite steps in a row stop the run.

    Every field is checked once, on construction (:class:`ValueError` naming the field and
    the value); nothing downstream checks them again. What depends on the candidates is
    checked by :meth:`check_candidates`.
    """

    total_steps: int
    rungs: tuple[float, ...] = (0.2,)
    keep: tuple[int, ...] = (1,)
    lr: float = 1e-4
    head_lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    head_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: float | None = None
    eval_interval: int = 0
    backend: str = "reference"
    weight_grad: str = "auto"
    seed: int = 0
    checkpoint_interval: int = 0
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self.rungs = tuple(float(r) for r in self.rungs)
        self.keep = tuple(int(c) for c in self.keep)
        if len(self.rungs) != len(self.keep):
            raise ValueError(f"rungs {self.rungs} and keep {self.keep} must have the same length")
        if any(not 0 < r < 1 for r in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"rungs must be increasing fractions in (0, 1), got {self.rungs}")
        if any(c < 1 for c in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep must be non-increasing counts >= 1, got {self.keep}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}], got {self.warmup_steps}")
        if self.weight_grad not in WEIGHT_GRAD_MODES:
            raise ValueError(f"weight_grad must be one of {', '.join(WEIGHT_GRAD_MODES)}, got {self.weight_grad!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.max_nonfinite_skips < 1:
            raise ValueError(f"max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
        for name in ("lr", "head_lr", "weight_decay", "head_weight_decay", "eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = (betas[0], betas[1])
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm}")
        for name in ("eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def check_candidates(self, n: int) -> None:
        """Raise unless this plan fits ``n`` candidates (at least one; no rung keeps more).

        Raises:
            ValueError: no candidate, or a ``keep`` count above ``n``.
        """
        if n < 1:
            raise ValueError("AdaptiveSearch needs at least one candidate child network")
        if max(self.keep, default=1) > n:
            raise ValueError(f"keep {self.keep} exceeds the number of candidates ({n})")

    def rung_steps(self) -> list[int]:
        """Step counts of the rungs followed by T."""
        steps = [max(1, int(round(r * self.total_steps))) for r in self.rungs]
        return steps + [self.total_steps]


def successive_halving(n: int, eta: float, first_fraction: float, min_keep: int = 1) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Rungs and survivor counts for successive halving of ``n`` candidates.

    Rung i (from 0) is at ``first_fraction * eta**i`` of T and keeps
    ``max(min_keep, floor(n / eta**(i+1)))`` candidates; rungs stop once one survivor count
    reaches ``min_keep`` or the fraction reaches 1. ``eta=n`` gives the paper's single rung.
    """
    if n < 1 or eta <= 1 or not 0 < first_fraction < 1:
        raise ValueError(f"successive_halving needs n >= 1, eta > 1, 0 < first_fraction < 1 (got {n}, {eta}, {first_fraction})")
    rungs: list[float] = []
    keep: list[int] = []
    fraction, alive = first_fraction, n
    while fraction < 1 and alive > min_keep:
        alive = max(min_keep, int(math.floor(n / eta ** (len(rungs) + 1))))
        rungs.append(round(fraction, 10))
        keep.append(alive)
        fraction *= eta
    return tuple(rungs), tuple(keep)
