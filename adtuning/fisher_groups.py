"""A memory-bounded Fisher pass: the scored tensors in G groups, one pass over the samples each.

DESIGN.md's floor for the Fisher phase is the weights plus 4 bytes per scored entry *of the group
being scored*. :func:`fisher_children` reaches it: the scored tensors (in scored order) are cut
into ``G`` contiguous groups balanced by entry count (:func:`split_groups`); group ``g`` is scored
by its own pass of :func:`~adtuning.fisher.estimate_fisher` over the same batches, and its scores
are folded at once into three small accumulators before the next group is scored:

* :class:`TopCandidates` -- the best ``K`` entries (key and flat index, 8 bytes each) under the
  selection's total order (score descending, then earlier tensor, then lower flat index), where
  ``K`` is the deepest rank any requested child needs. A group's share of the global top ``K``
  is its own top ``K``, so the children built from the candidates are exactly those
  :meth:`ChildNetwork.nested <adtuning.child.ChildNetwork.nested>` builds from all the scores, for
  both count rules (for ``"percentile"`` the candidates also keep every entry tied with the
  boundary score, as that rule keeps all ties);
* :class:`ScoreStats` -- :func:`~adtuning.fisher.fisher_summary`'s figures, the same values;
* :class:`~adtuning.plots.ScoreHistogram` -- the log-score histogram of the plots (fixed bins, so
  summing per-group histograms gives the histogram of all the scores).

A group's scores are the scores G = 1 gives for those tensors, bit for bit: the per-tensor
accumulation does not depend on which other tensors are scored (tested for every algorithm and
both modes). The price is G passes over the Fisher samples; :func:`auto_fisher_groups` picks the
smallest G whose Fisher phase fits the training phase's budget.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from adtuning.child import (
    ChildNetwork,
    _check_count_rule,
    _check_p,
    _float_to_key,
    _index_dtype,
    _k_for,
    _key_to_float,
    _kth_largest_key,
    _order_key,
    _validated_scores,
    percentile_position,
    percentile_threshold,
)
from adtuning.phase_memory import release_freed_memory
from adtuning.plots import ScoreHistogram

log = logging.getLogger("adtuning")

Batches = Iterable[Any] | Callable[[], Iterable[Any]]

# Bytes per child entry the training phase holds for the sparse AdamW (exp_avg, exp_avg_sq, the
# compact fp32 gradient, its int32 index and the child's own int32 index), plus the fp32 master
# copy of the child entries for bf16/fp16 weights (adtuning/optim.py).
TRAINING_BYTES_PER_CHILD_ENTRY = 20
MASTER_BYTES_PER_CHILD_ENTRY = 4
# Bytes per candidate of the selection: the running top K and one group's top K side by side,
# each an int32 key and an int32 (int64 for huge tensors: counted as 4 here) flat index.
CANDIDATE_BYTES_PER_RANK = 2 * 8


def split_groups(numels: Sequence[int], groups: int, units: Sequence[Any] | None = None) -> list[range]:
    """Cut tensors of ``numels`` entries (in scored order) into ``groups`` contiguous, non-empty
    runs balanced by entry count: boundary ``g`` is the allowed boundary nearest to ``g * N / G``
    (the earlier one on a tie). ``units`` (one label per tensor, e.g. its module) forbids
    boundaries between neighbours with the same label: a Linear's weight and bias stay together.
    Returns the runs as ranges of tensor positions."""
    count = len(numels)
    allowed = [j for j in range(1, count) if units is None or units[j - 1] != units[j]]
    most = len(allowed) + 1
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= most:
        what = "scored tensors" if units is None else "scored modules"
        raise ValueError(f"Fisher groups must be an integer between 1 and the number of {what} ({most}), got {groups!r}")
    cumulative = [0]
    for numel in numels:
        cumulative.append(cumulative[-1] + int(numel))
    total = cumulative[-1]
    at = [cumulative[j] for j in allowed]  # strictly increasing: the nearest is beside the bisection point
    bounds, position = [0], -1
    for g in range(1, groups):
        target = g * total / groups
        first, last = position + 1, len(allowed) - (groups - 1 - g) - 1
        i = min(max(bisect.bisect_left(at, target, first, last + 1), first), last)
        choices = {i, max(first, i - 1)}
        position = min(choices, key=lambda c: (abs(at[c] - target), c))
        bounds.append(allowed[position])
    bounds.append(count)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def module_units(names: Sequence[str]) -> list[str]:
    """The module of each parameter name (``a.b.weight`` -> ``a.b``): the units groups keep whole."""
    return [name.rpartition(".")[0] for name in names]


def candidate_ranks(ps: Sequence[float], total: int, count_rule: str = "round") -> int:
    """The deepest rank (1 = best) the children of ``ps`` read: ``round(p * N)`` for the
    ``"round"`` rule, the lower order statistic's rank from the top for ``"percentile"``."""
    count_rule = _check_count_rule(count_rule)
    ranks = []
    for p in ps:
        p = _check_p(p)
        if count_rule == "round":
            ranks.append(_k_for(p, total))
        else:
            lower, _, _ = percentile_position(p, total)
            ranks.append(total - lower)
    if not ranks:
        raise ValueError("child selection: no ratios given")
    return min(total, max(ranks))


class TopCandidates:
    """The best entries of a score set fed group by group, enough to build the children.

    Args:
        ps: the child ratios to build.
        total: N, the entries of *all* scored tensors (known before scoring: their shapes).
        count_rule: ``"round"`` or ``"percentile"`` (see :mod:`adtuning.child`).

    Feed every group with :meth:`add` in scored order; :meth:`children` then returns what
    ``ChildNetwork.nested(all_scores, ps, count_rule=count_rule)`` returns. Memory: at most
    ``K`` candidates kept (8 bytes each; plus the ties at the boundary under ``"percentile"``),
    and temporaries the size of one tensor.
    """

    def __init__(self, ps: Sequence[float], total: int, count_rule: str = "round"):
        self.ps = [_check_p(p) for p in ps]
        self.count_rule = _check_count_rule(count_rule)
        self.total = int(total)
        self.ranks = candidate_ranks(self.ps, self.total, self.count_rule)
        self.shapes: dict[str, tuple[int, ...]] = {}
        # name -> (int32 keys, sorted flat indices) of the kept entries, in scored order
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def candidate_bytes(self) -> int:
        """Bytes held by the kept candidates."""
        return sum(k.numel() * k.element_size() + i.numel() * i.element_size() for k, i in self.kept.values())

    def add(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Fold in the scores of the next group (tensors after every earlier group's)."""
        scores = _validated_scores(scores)
        for name, value in scores.items():
            if name in self.shapes:
                raise ValueError(f"child selection: tensor {name!r} was scored twice")
            self.shapes[name] = tuple(value.shape)
        seen = sum(math.prod(s) for s in self.shapes.values())
        if seen > self.total:
            raise ValueError(f"child selection: {seen} scored entries fed, more than the announced N={self.total}")
        # The running candidates come first: their tensors precede this group's in scored order.
        pool: list[tuple[str, torch.Tensor, torch.Tensor | None]] = [(n, k, i) for n, (k, i) in self.kept.items()]
        pool += [(name, _order_key(value), None) for name, value in scores.items()]
        size = sum(key.numel() for _, key, _ in pool)
        if size <= self.ranks:
            threshold, ties = None, 0
        else:
            threshold, ties = _kth_largest_key([key for _, key, _ in pool], self.ranks)
        kept = {}
        ties_left = ties
        for name, key, index in pool:
            if threshold is None:
                chosen = torch.ones(key.numel(), dtype=torch.bool, device=key.device)
            elif self.count_rule == "percentile":
                chosen = key >= threshold  # the percentile rule keeps every tie: so must the candidates
            else:
                chosen = key > threshold
                if ties_left > 0:
                    tied = (key == threshold).nonzero().flatten()[:ties_left]
                    chosen[tied] = True
                    ties_left -= tied.numel()
            flat = chosen.nonzero().flatten()
            if flat.numel():
                positions = flat if index is None else index[flat.to(index.device)]
                kept[name] = (key.reshape(-1)[flat], positions.to(_index_dtype(math.prod(self.shapes[name]))))
        self.kept = kept

    def children(self) -> list[ChildNetwork]:
        """The children of every ratio, as ``ChildNetwork.nested`` on all the scores."""
        seen = sum(math.prod(s) for s in self.shapes.values())
        if seen != self.total:
            raise ValueError(f"child selection: {seen} of the announced N={self.total} scored entries were fed")
        keys = [key for key, _ in self.kept.values()]
        children = []
        for p in self.ps:
            if self.count_rule == "round":
                k = _k_for(p, self.total)
                threshold, ties = _kth_largest_key(keys, k)
                indices, ties_left = {}, ties
                for name, (key, index) in self.kept.items():
                    chosen = key > threshold
                    if ties_left > 0:
                        tied = (key == threshold).nonzero().flatten()[:ties_left]
                        chosen[tied] = True
                        ties_left -= tied.numel()
                    if bool(chosen.any()):
                        indices[name] = index[chosen.to(index.device)].cpu()
                value = _key_to_float(threshold)
            else:
                lower, upper, gamma = percentile_position(p, self.total)
                low_key, _ = _kth_largest_key(keys, self.total - lower)
                high_key, _ = _kth_largest_key(keys, self.total - upper)
                value = percentile_threshold(_key_to_float(low_key), _key_to_float(high_key), gamma)
                cut = _float_to_key(value)
                indices = {}
                for name, (key, index) in self.kept.items():
                    chosen = key >= cut
                    if bool(chosen.any()):
                        indices[name] = index[chosen.to(index.device)].cpu()
                k = sum(int(v.numel()) for v in indices.values())
            children.append(ChildNetwork(indices=indices, shapes=dict(self.shapes), p=p, k=k, threshold=value))
        return children


class ScoreStats:
    """:func:`~adtuning.fisher.fisher_summary` of a score set fed tensor by tensor (same values)."""

    def __init__(self) -> None:
        self.tensors = self.entries = self.zeros = 0
        self.minimum, self.maximum = math.inf, -math.inf
        self.sums: list[float] = []

    def add(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Fold in some tensors' scores."""
        for value in scores.values():
            self.tensors += 1
            self.entries += value.numel()
            self.zeros += int((value == 0).sum())
            self.minimum = min(self.minimum, float(value.min()))
            self.maximum = max(self.maximum, float(value.max()))
            self.sums.append(float(value.double().sum()))

    def summary(self) -> dict[str, float]:
        """The figures of ``fisher_summary`` over everything fed."""
        return {"tensors": self.tensors, "entries": self.entries, "min": self.minimum, "max": self.maximum,
                "mean": math.fsum(self.sums) / self.entries, "zero_fraction": self.zeros / self.entries}


def _fresh_batches(batches: Batches, groups: int) -> Callable[[], Iterable[Any]]:
    """A callable returning the batches anew for each pass (the same batches in the same order)."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches
    if groups > 1 and iter(batches) is batches:
        raise ValueError("estimate_fisher: groups > 1 scores the samples once per group; pass a callable returning "
                         "a fresh iterable of the same batches (e.g. problem.fisher_batches) or a re-iterable "
                         "(list, unshuffled DataLoader), not an iterator")
    return lambda: batches


def _scored_numels(model: nn.Module, params: Iterable[str] | Mapping[str, torch.Tensor] | None) -> dict[str, int]:
    from adtuning.fisher import _resolve_params

    return {name: p.numel() for name, p in _resolve_params(model, params).items()}


def _random_state() -> tuple:
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_random_state(state: tuple) -> None:
    import random

    import numpy as np

    cpu, cuda, python, numpy_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


def fisher_group_passes(model: nn.Module, batches: Batches, loss_fn: Callable, *, groups: int = 1,
                        params: Iterable[str] | Mapping[str, torch.Tensor] | None = None,
                        **fisher_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The scores of the scored tensors, one group at a time: yields ``{name: fp32 scores}`` of
    group 1, 2, ... (in scored order), each from its own :func:`~adtuning.fisher.estimate_fisher`
    pass over the batches. Drop a group's scores before asking for the next to hold one group.

    ``batches``: a callable returning a fresh iterable of the *same* batches in the same order on
    every call (``problem.fisher_batches``), or a re-iterable; an iterator only with ``groups=1``.
    ``fisher_kwargs``: the other keywords of ``estimate_fisher`` (mode, backend, max_samples, ...).
    """
    from adtuning.fisher import estimate_fisher

    numels = _scored_numels(model, params)
    names = list(numels)
    runs = split_groups(list(numels.values()), groups, module_units(names))
    fresh = _fresh_batches(batches, groups)
    # Every pass runs all scored modules through the in-backward path (only the group's accumulate),
    # so that the backward arithmetic, and with it every score, is that of the one-group pass.
    extra = fisher_kwargs.pop("in_backward_set", None) or []
    patched = names + [name for name in extra if name not in numels]
    # Each pass draws from the random state the one-group pass starts from (dropout in train mode,
    # a shuffling or augmenting loader), so that every pass sees the same masks and batches.
    start = _random_state()
    for number, run in enumerate(runs, 1):
        group = [names[i] for i in run]
        if groups > 1:
            _set_random_state(start)
            log.info("Fisher group %d/%d: %d tensors, %d entries", number, groups, len(group), sum(numels[n] for n in group))
        yield estimate_fisher(model, fresh(), loss_fn, params=group, groups=1, in_backward_set=patched, **fisher_kwargs)


@dataclass
class FisherSelection:
    """What the Fisher phase hands on: the children, and the scores' summary and histogram
    (the scores themselves are gone)."""

    children: list[ChildNetwork]
    summary: dict[str, float]
    histogram: dict
    groups: int
    group_entries: list[int] = field(default_factory=list)
    candidate_bytes: int = 0


def fisher_children(model: nn.Module, batches: Batches, loss_fn: Callable, ps: Sequence[float], *, groups: int = 1,
                    count_rule: str = "round", params: Iterable[str] | Mapping[str, torch.Tensor] | None = None,
                    rename: Callable[[str], str] | None = None, **fisher_kwargs: Any) -> FisherSelection:
    """Score in ``groups`` passes and select the children of ``ps`` without holding all scores.

    The children equal ``ChildNetwork.nested(estimate_fisher(...), ps, count_rule=count_rule)``
    (with the names passed through ``rename``, e.g. stripping ``"upstream."``), the summary equals
    :func:`~adtuning.fisher.fisher_summary` and the histogram :func:`~adtuning.plots.log_score_histogram`
    of the same scores, for any ``groups``. ``batches`` and ``fisher_kwargs`` as in
    :func:`fisher_group_passes`.
    """
    numels = _scored_numels(model, params)
    rename = rename or (lambda name: name)
    top = TopCandidates(ps, sum(numels.values()), count_rule)
    stats, histogram = ScoreStats(), ScoreHistogram()
    entries, candidate_bytes = [], 0
    for scores in fisher_group_passes(model, batches, loss_fn, groups=groups, params=list(numels), **fisher_kwargs):
        scores = {rename(name): value for name, value in scores.items()}
        entries.append(sum(v.numel() for v in scores.values()))
        top.add(scores)
        stats.add(scores)
        histogram.add_all(scores)
        candidate_bytes = max(candidate_bytes, top.candidate_bytes())
        del scores  # this group's scores are gone before the next group's are allocated
    release_freed_memory()  # the freed score blocks would otherwise stay resident through training
    return FisherSelection(children=top.children(), summary=stats.summary(), histogram=histogram.result(), groups=groups,
                           group_entries=entries, candidate_bytes=candidate_bytes)


def fisher_phase_bytes(numels: Sequence[int], groups: int, ps: Sequence[float], count_rule: str = "round",
                       units: Sequence[Any] | None = None) -> int:
    """Bytes the Fisher phase holds beyond the weights and activations with ``groups`` groups:
    4 per entry of the largest group plus the selection's candidates."""
    largest = max(sum(numels[i] for i in run) for run in split_groups(numels, groups, units))
    return 4 * largest + CANDIDATE_BYTES_PER_RANK * candidate_ranks(ps, sum(numels), count_rule)


def training_phase_bytes(numels: Sequence[int], p_max: float, weight_element_size: int) -> int:
    """Bytes the training phase of the largest candidate holds beyond the weights and
    activations: its compact optimizer state, ``round(P_max * N)`` child entries."""
    per_entry = TRAINING_BYTES_PER_CHILD_ENTRY + (MASTER_BYTES_PER_CHILD_ENTRY if weight_element_size < 4 else 0)
    return per_entry * _k_for(_check_p(p_max), sum(numels))


def auto_fisher_groups(scored: Mapping[str, int], ps: Sequence[float], *, weight_bytes: int, weight_element_size: int,
                       count_rule: str = "round", headroom_bytes: int = 0) -> int:
    """The smallest G whose Fisher phase fits in the training phase's budget (``--fisher-groups auto``).

    The budget model (DESIGN.md "Memory by phase"), both phases holding the weights
    (``weight_bytes``) and the activations of one batch (taken equal: the same model on batches
    of the same size, so they cancel):

    * training = weights + compact state of the largest child, ``round(P_max * N)`` entries at
      :data:`TRAINING_BYTES_PER_CHILD_ENTRY` (+ :data:`MASTER_BYTES_PER_CHILD_ENTRY` for 16-bit
      weights) bytes each + activations;
    * Fisher(G) = weights + 4 bytes per entry of the largest of G balanced groups + the
      selection's candidates (:data:`CANDIDATE_BYTES_PER_RANK` per rank) + activations.

    G is the smallest with Fisher(G) <= training + ``headroom_bytes``; when even one module per
    group does not fit (a single module larger than the budget), the number of scored modules.

    Args:
        scored: ``{name: entries}`` of each scored tensor, in scored order (groups keep a
            module's tensors together: :func:`module_units`).
        ps: the candidate ratios (P_max sets the training budget and the candidates).
        weight_bytes: bytes of the model's weights (for the log line).
        weight_element_size: bytes per weight entry (2 for bf16).
        count_rule: the child count rule (sets the candidates' depth).
        headroom_bytes: memory the Fisher phase may use beyond the training budget.
    """
    numels = [int(n) for n in scored.values()]
    units = module_units(list(scored))
    budget = training_phase_bytes(numels, max(ps), weight_element_size) + int(headroom_bytes)
    most = 1 + sum(1 for a, b in zip(units[:-1], units[1:]) if a != b)
    chosen = most
    for groups in range(1, most + 1):
        if fisher_phase_bytes(numels, groups, ps, count_rule, units) <= budget:
            chosen = groups
            break
    need = fisher_phase_bytes(numels, chosen, ps, count_rule, units)
    if need > budget:
        log.warning("Fisher groups: even one module per group (%d groups) needs %.3f GB beyond the weights, over the "
                    "training budget of %.3f GB", chosen, need / 1e9, budget / 1e9)
    log.info("Fisher groups: %d (scores and candidates %.3f GB beyond the weights of %.3f GB; training budget %.3f GB "
             "beyond them at P_max=%g)", chosen, need / 1e9, weight_bytes / 1e9, budget / 1e9, max(ps))
    return chosen
