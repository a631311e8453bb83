"""A candidate of :class:`adtuning.search.AdaptiveSearch`: one child size under search (or a
baseline), and while paused a sparse delta plus its training state.

Also the small pure helpers the search swaps candidates with (gathering child values to host
memory, copying optimizer state dicts, the baselines' children, per-rank seeds). Re-exported
by :mod:`adtuning.search`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from adtuning.child import INT32_LIMIT, ChildNetwork
from adtuning.search_checkpoint import candidate_prefix
from adtuning.search_config import BASELINES

#: Statuses of a candidate the search culled: "stopped" where the search left it, "regret" once
#: :meth:`AdaptiveSearch.measure_regret` has begun training it on to T.
CULLED = ("stopped", "regret")


@dataclass
class Candidate:
    """One child size under search; while paused it is a sparse delta plus training state.

    ``status`` is ``training`` (in the search), ``stopped`` (culled at step ``stopped_at``),
    ``regret`` (culled, then trained on to T by :meth:`AdaptiveSearch.measure_regret`) or
    ``finished`` (trained to T). ``final`` holds ``{"dev": metrics, "test": metrics}`` at T once
    measured. A baseline (``baseline`` = ``"head-only"`` or ``"full"``) is a candidate too.
    """

    index: int
    child: ChildNetwork
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    base_values: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_state: torch.Tensor | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    rung_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    status: str = "training"  # training | stopped | regret | finished
    stopped_at: int | None = None
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline: str | None = None
    skipped_steps: int = 0  # non-finite steps dropped (on_nonfinite="skip")
    nonfinite_streak: int = 0  # of them, how many in a row up to now

    @property
    def p(self) -> float:
        """The child's fraction P (0 for ``head-only``, 1 for ``full``)."""
        return self.child.p

    @property
    def name(self) -> str:
        """``P=<p>`` for a searched candidate, the baseline's kind for a baseline."""
        return self.baseline or f"P={self.p:g}"

    @property
    def search_steps(self) -> int:
        """Steps this candidate trained within the search (not counting regret training)."""
        return self.step if self.stopped_at is None else self.stopped_at


def checkpoint_prefix(cand: Candidate) -> str:
    """Where a candidate's tensors live in the checkpoint."""
    return candidate_prefix(cand.index, cand.baseline)


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank``: ``seed`` itself on rank 0 (a one-process run is unchanged),
    distinct streams elsewhere, so that ranks draw independent dropout masks."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def baseline_child(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> ChildNetwork:
    """The child a baseline trains: no entry (``head-only``) or every entry of ``shapes`` (``full``)."""
    indices: dict[str, torch.Tensor] = {}
    if kind != "head-only":
        for name, shape in shapes.items():
            numel = math.prod(shape)
            indices[name] = torch.arange(numel, dtype=torch.int64 if numel >= INT32_LIMIT else torch.int32)
    k = sum(i.numel() for i in indices.values())
    return ChildNetwork(indices=indices, shapes=dict(shapes), p=BASELINES[kind], k=k, method=kind)


def gather_to(child: ChildNetwork, named_params: Mapping[str, torch.Tensor],
              device: str | torch.device | None = None, *, alias: bool = False) -> dict[str, torch.Tensor]:
    """:meth:`ChildNetwork.gather`, moving each tensor to ``device`` before the next is taken
    (so a large child never has two copies on the accelerator).

    With ``alias``, a tensor whose child holds every entry (FT's) is returned as a flat view of
    the parameter itself when it is already on ``device``: no copy, so the result is valid only
    until the parameter changes (a checkpoint written at once)."""
    if device is None:
        return child.gather(named_params, alias=alias)
    out = {}
    for name, idx in child.indices.items():
        flat = named_params[name].detach().reshape(-1)
        if alias and child.holds_all(name) and flat.device == torch.device(device):
            out[name] = flat
            continue
        out[name] = flat.index_select(0, idx.to(flat.device).long()).to(device)
    return out


def clone_state_dict(state_dict: dict[str, Any], device: str | torch.device | None = None,
                     copy: bool = True) -> dict[str, Any]:
    """A copy of an optimizer state dict (on ``device`` if given; with ``copy=False`` tensors
    already there are taken over instead of copied)."""
    def move(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if device is None:
            return v.detach().clone()
        return v.detach().to(device, copy=copy)

    return {
        "state": {k: {n: move(v) for n, v in s.items()} for k, s in state_dict["state"].items()},
        "param_groups": [dict(g) for g in state_dict["param_groups"]],
    }
