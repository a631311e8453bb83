"""AD-TUNING: the adaptive early-stop search over child sizes, on ONE model copy.

Each candidate (one child network, e.g. P = 0.001, 0.01, 0.1) is a *sparse delta* on top of
the shared upstream: its current child values, its compact optimizer state, its downstream
head, its scheduler, its RNG state and its data position. Candidates are swapped into the
one model to train or evaluate and swapped out again (their child entries are reset to the
base values), so there is never a second upstream in memory.

The plan is the paper's (section 3.2), generalised to several rungs (successive halving):
train every candidate to ``rungs[0] * T`` steps, evaluate on dev, keep the best ``keep[0]``,
train those to ``rungs[1] * T``, ... and finally to ``T``. The learning-rate schedule is
the one of a ``T``-step run, so a continued candidate is indistinguishable from one that was
never paused. With ``rungs=(r,)`` and ``keep=(c,)`` this costs ``(r*n + c*(1-r)) * T`` steps
instead of ``n * T``.

Two optional comparisons run after the search on the same model copy:

- :meth:`AdaptiveSearch.measure_regret` trains every culled candidate on from where it was
  stopped to ``T`` and reports the *regret* of the early pick (how much worse the chosen
  candidate is at ``T`` than the best candidate at ``T``). It costs only the culled candidates'
  remaining steps, since their paused state continues exactly.
- :meth:`AdaptiveSearch.run_baselines` trains the head alone (``head-only``: P=0, frozen
  upstream) and full fine-tuning (``full``: every scored upstream entry, AdamW) under the same
  schedule, seed, data order and initial head.

Everything needed to continue is saved by :meth:`AdaptiveSearch.save_checkpoint` (atomically,
safetensors + JSON); :meth:`AdaptiveSearch.load_checkpoint` resumes to the same final result,
also when interrupted during the comparisons.

Data parallel (``data_parallel=``, see :mod:`adtuning.distributed`): every rank runs the same
plan on its own model copy. The problem serves each rank its part of every global batch and
returns its share of the global loss; after the last micro-batch of a step one all-reduce sums
the compact child gradients, the head gradients and the loss (:class:`~adtuning.distributed.GradientReducer`),
and every rank clips and steps identically. Dev metrics come back reduced from the problem, so
every rank takes the same rung decision. Rank 0 writes checkpoints (with every rank's RNG
state); resuming needs the same world size.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from adtuning.child import INT32_LIMIT, ChildNetwork
from adtuning.distributed import DataParallel, GradientReducer
from adtuning.optim import SparseAdamW, get_linear_schedule_with_warmup
from adtuning.search_checkpoint import (
    NonFiniteError,
    candidate_prefix,
    candidate_record,
    read_checkpoint,
    restore_candidate,
    rng_key,
    write_checkpoint,
)
from adtuning.sparse_grad import WEIGHT_GRAD_MODES, SparseWeightGrad, install_sparse_weight_grad

log = logging.getLogger("adtuning")

#: What a non-finite loss or gradient does (``SearchConfig.on_nonfinite``).
NONFINITE_POLICIES = ("stop", "skip")

#: Baselines :meth:`AdaptiveSearch.run_baselines` can train, with the P they amount to.
BASELINES = {"head-only": 0.0, "full": 1.0}

# Statuses of a candidate the search culled: "stopped" where the search left it, "regret" once
# :meth:`AdaptiveSearch.measure_regret` has begun training it on to T.
_CULLED = ("stopped", "regret")


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

    def loss(self, batch: Any) -> torch.Tensor: ...

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

    def __post_init__(self):
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
    rungs, keep = [], []
    fraction, alive = first_fraction, n
    while fraction < 1 and alive > min_keep:
        alive = max(min_keep, int(math.floor(n / eta ** (len(rungs) + 1))))
        rungs.append(round(fraction, 10))
        keep.append(alive)
        fraction *= eta
    return tuple(rungs), tuple(keep)


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
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    rng_state: torch.Tensor | None = None
    curve: list[dict] = field(default_factory=list)
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
        return self.child.p

    @property
    def name(self) -> str:
        """``P=<p>`` for a searched candidate, the baseline's kind for a baseline."""
        return self.baseline or f"P={self.p:g}"

    @property
    def search_steps(self) -> int:
        """Steps this candidate trained within the search (not counting regret training)."""
        return self.step if self.stopped_at is None else self.stopped_at


class AdaptiveSearch:
    """Runs the AD-TUNING plan over ``children`` on the one model of ``problem``.

    Args:
        problem: the task (see :class:`TrainingProblem`).
        children: one child network per candidate (usually :meth:`ChildNetwork.nested`).
        config: :class:`SearchConfig`.
        checkpoint_dir: where resumable checkpoints go (``None``: none are written).
        progress: tqdm bars.
        on_event: optional callback ``on_event(kind, info_dict)`` for logging / TensorBoard.
        baselines: kinds from :data:`BASELINES` that :meth:`run_baselines` trains (their
            progress is part of the checkpoint, so they are fixed here).
        data_parallel: the process group of a data-parallel run (``None``: one process). All
            ranks construct the search with the same children and config; only rank 0 writes
            checkpoints (pass the same ``checkpoint_dir`` everywhere).
    """

    def __init__(
        self,
        problem: TrainingProblem,
        children: Sequence[ChildNetwork],
        config: SearchConfig,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool = True,
        on_event: Callable[[str, dict], None] | None = None,
        baselines: Sequence[str] = (),
        data_parallel: DataParallel | None = None,
    ) -> None:
        if not children:
            raise ValueError("AdaptiveSearch needs at least one candidate child network")
        if max(config.keep, default=1) > len(children):
            raise ValueError(f"keep {config.keep} exceeds the number of candidates ({len(children)})")
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown or len(set(baselines)) != len(baselines):
            raise ValueError(f"baselines must be distinct kinds from {', '.join(BASELINES)}, got {list(baselines)}")
        self.problem = problem
        self.config = config
        self.progress = progress
        self.on_event = on_event or (lambda kind, info: None)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.dp = data_parallel
        upstream = dict(problem.upstream_params)
        for child in children:
            child.check_against(upstream, where="the upstream")
        self.initial_head = {n: p.detach().clone() for n, p in problem.head_params.items()}
        initial_rng = torch.Generator().manual_seed(_rank_seed(config.seed, self.rank)).get_state()
        self.candidates = []
        for i, child in enumerate(children):
            self.candidates.append(Candidate(index=i, child=child, base_values=child.gather(upstream), rng_state=initial_rng.clone()))
        # Baselines start like every candidate (same RNG, data position, head, schedule). Their
        # base values are taken only when they start, and kept in host memory: for "full" they
        # are the whole scored upstream.
        shapes: dict[str, tuple[int, ...]] = {}
        for child in children:
            shapes.update(child.shapes)
        self.baselines = [
            Candidate(index=len(children) + i, child=_baseline_child(kind, shapes), rng_state=initial_rng.clone(), baseline=kind)
            for i, kind in enumerate(baselines)
        ]
        self.chosen: Candidate | None = None
        self.active: Candidate | None = None
        self._optimizer: SparseAdamW | None = None
        self._sparse_grad: SparseWeightGrad | None = None
        self._reducer: GradientReducer | None = None
        self._scheduler = None
        self.swap_seconds = 0.0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        #: Data parallel: wall time of the per-step gradient all-reduces and their count.
        self.allreduce_seconds = 0.0
        self.allreduce_steps = 0
        self._since_checkpoint = 0

    @property
    def rank(self) -> int:
        """This process's rank (0 without data parallelism)."""
        return 0 if self.dp is None else self.dp.rank

    @property
    def world_size(self) -> int:
        """Processes training together (1 without data parallelism)."""
        return 1 if self.dp is None else self.dp.world_size

    def allreduce_bytes_per_step(self, cand: Candidate) -> int:
        """Bytes one optimizer step of ``cand`` all-reduces: ``4 * (k + head entries + 1)`` (the
        extra entry is the step's loss); 0 without data parallelism."""
        if self.dp is None:
            return 0
        return 4 * (cand.child.k + sum(p.numel() for p in self.problem.head_params.values()) + 1)

    # ---- swapping ---------------------------------------------------------------------

    @torch.no_grad()
    def _activate(self, cand: Candidate) -> None:
        if self.active is cand:
            return
        if self.active is not None:
            self._deactivate()
        start = time.perf_counter()
        upstream, head = self.problem.upstream_params, self.problem.head_params
        if cand.baseline is not None and not cand.base_values:
            # Nothing is active, so the upstream holds the base values right now.
            cand.base_values = _gather(cand.child, upstream, device="cpu")
        cand.child.scatter_(upstream, cand.values or cand.base_values)
        for name, param in head.items():
            param.data.copy_(cand.head.get(name, self.initial_head[name]))
        cfg = self.config
        self._optimizer = SparseAdamW(
            [
                {"named_params": upstream, "child": cand.child, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                {"params": list(head.values()), "lr": cfg.head_lr, "weight_decay": cfg.head_weight_decay},
            ],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, backend=cfg.backend,
        )
        # The active candidate's child decides which Linears take the sparse gradient path.
        self._sparse_grad = install_sparse_weight_grad(self.problem.model, self._optimizer, cfg.weight_grad)
        if self.dp is not None:
            self._reducer = GradientReducer(self.dp, self._optimizer, list(head.values()))
        self._scheduler = get_linear_schedule_with_warmup(self._optimizer, cfg.warmup_steps, cfg.total_steps)
        if cand.optimizer_state is not None:
            # The paused state becomes the live state: no second copy of the moments.
            self._optimizer.load_state_dict(cand.optimizer_state, adopt=True)
            self._scheduler.load_state_dict(cand.scheduler_state)
        torch.set_rng_state(cand.rng_state)
        self._drop_snapshot(cand)
        self.active = cand
        self.swap_seconds += time.perf_counter() - start

    @staticmethod
    def _drop_snapshot(cand: Candidate) -> None:
        # While a candidate is active the model and the live optimizer hold its state; keeping
        # the paused copy too would double its optimizer state in memory.
        cand.values, cand.head, cand.optimizer_state = {}, {}, None

    def _capture(self, cand: Candidate, *, keep_live: bool = True, offload: bool = False) -> None:
        """Copy the live state of the active candidate into ``cand`` (model left as is).

        With ``keep_live=False`` (the optimizer is about to be discarded) its state tensors are
        taken over rather than cloned, so swapping out never holds the moments twice. With
        ``offload`` the copy goes to host memory tensor by tensor (checkpoints, and baselines,
        whose "full" state is as large as the scored upstream).
        """
        upstream, head = self.problem.upstream_params, self.problem.head_params
        device = "cpu" if offload else None
        cand.values = _gather(cand.child, upstream, device=device)
        cand.head = {n: p.detach().clone() for n, p in head.items()}
        state = self._optimizer.state_dict()
        cand.optimizer_state = _clone_state_dict(state, device=device, copy=keep_live) if keep_live or offload else state
        cand.scheduler_state = dict(self._scheduler.state_dict())
        cand.rng_state = torch.get_rng_state()

    @torch.no_grad()
    def _deactivate(self) -> None:
        cand = self.active
        if cand is None:
            return
        start = time.perf_counter()
        self._capture(cand, keep_live=False, offload=cand.baseline is not None)
        cand.child.scatter_(self.problem.upstream_params, cand.base_values)
        self._release_optimizer()
        self.active = None
        self.swap_seconds += time.perf_counter() - start

    def _release_optimizer(self) -> None:
        """Unhook the live optimizer and the sparse gradient path built for its child."""
        if self._sparse_grad is not None:
            self._sparse_grad.remove()
            self._sparse_grad = None
        if self._reducer is not None:
            self._reducer.release()
            self._reducer = None
        self._optimizer.remove_hooks()
        self._optimizer = self._scheduler = None

    @torch.no_grad()
    def _retire(self, cand: Candidate) -> None:
        """Swap the active ``cand`` out for good: restore the base values, keep no state."""
        assert self.active is cand
        start = time.perf_counter()
        cand.child.scatter_(self.problem.upstream_params, cand.base_values)
        self._release_optimizer()
        self.active = None
        cand.values, cand.head, cand.optimizer_state, cand.base_values = {}, {}, None, {}
        self.swap_seconds += time.perf_counter() - start

    def apply(self, cand: Candidate) -> None:
        """Swap ``cand`` into the model (e.g. to evaluate or export it)."""
        self._activate(cand)

    # ---- training and evaluation --------------------------------------------------------

    def _batches(self, cand: Candidate) -> Iterator[Any]:
        while True:
            for batch in self.problem.train_batches(cand.epoch, cand.batch_in_epoch):
                cand.batch_in_epoch += 1
                yield batch
            if cand.batch_in_epoch == 0:
                raise RuntimeError("the training set yielded no batches")
            cand.epoch += 1
            cand.batch_in_epoch = 0

    def _train(self, cand: Candidate, until: int) -> None:
        if cand.step >= until:
            return
        self._activate(cand)
        cfg, model, opt, sched = self.config, self.problem.model, self._optimizer, self._scheduler
        model.train()
        batches = self._batches(cand)
        bar = tqdm(total=until, initial=cand.step, desc=f"train {cand.name}", unit="step", disable=not self.progress, leave=False)
        start = time.perf_counter()
        try:
            while cand.step < until:
                total = 0.0
                if self._reducer is not None:
                    self._reducer.prepare()
                seen = []  # (epoch, batch, utterance ids) of this step's micro-batches, for messages
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    seen.append((cand.epoch, cand.batch_in_epoch - 1, batch.get("ids") if isinstance(batch, dict) else None))
                    loss = self.problem.loss(batch)
                    if loss is None:  # data parallel: this rank holds no sample of the global batch
                        continue
                    loss = loss / cfg.grad_accum
                    loss.backward()
                    total += float(loss.detach())
                if self._reducer is not None:
                    # One all-reduce per step, after the last micro-batch; clipping sees its result.
                    reduce_start = time.perf_counter()
                    total = self._reducer.reduce(total)
                    self.allreduce_seconds += time.perf_counter() - reduce_start
                    self.allreduce_steps += 1
                # Gradients are reduced, so every rank takes the same decision here.
                norm = opt.grad_norm()
                if not (math.isfinite(total) and math.isfinite(float(norm))):
                    self._nonfinite_step(cand, total, float(norm), seen)
                    opt.zero_grad(set_to_none=True)
                    continue
                cand.nonfinite_streak = 0
                if cfg.max_grad_norm is not None:
                    opt.clip_grad_norm_(cfg.max_grad_norm, total_norm=norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                cand.step += 1
                cand.train_losses.append((cand.step, total))
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
                self.on_event("train", {"candidate": cand.index, "p": cand.p, "step": cand.step, "loss": total, "lr": sched.get_last_lr()[0]})
                if cfg.eval_interval and cand.step % cfg.eval_interval == 0 and cand.step < until:
                    self._evaluate_dev(cand)
                    model.train()
                self._since_checkpoint += 1
                if cfg.checkpoint_interval and self._since_checkpoint >= cfg.checkpoint_interval and cand.step < until:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.train_seconds += time.perf_counter() - start

    def _nonfinite_step(self, cand: Candidate, loss: float, grad_norm: float, seen: list[tuple]) -> None:
        """Apply the ``on_nonfinite`` policy to a step whose loss or gradient is NaN/inf (it is
        never applied): raise, or count it and go on until too many come in a row."""
        cfg = self.config
        batches = "; ".join(f"epoch {epoch} batch {index}" + (f" (utterances {', '.join(map(str, ids[:8]))}"
                                                              f"{', ...' if len(ids) > 8 else ''})" if ids else "")
                            for epoch, index, ids in seen)
        where = (f"{cand.name}, step {cand.step + 1}: loss {loss:g}, gradient norm {grad_norm:g} "
                 f"({batches}{'; rank ' + str(self.rank) + ' of ' + str(self.world_size) if self.dp is not None else ''})")
        if cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite training step, nothing applied: {where}. Lower the learning rate, "
                                 "check the data, or pass on_nonfinite='skip' (--on-nonfinite skip) to drop such steps")
        cand.skipped_steps += 1
        cand.nonfinite_streak += 1
        log.warning("skipped a non-finite step (%d in a row, %d in all): %s", cand.nonfinite_streak, cand.skipped_steps, where)
        self.on_event("nonfinite", {"candidate": cand.index, "p": cand.p, "step": cand.step, "skipped": cand.skipped_steps})
        if cand.nonfinite_streak >= cfg.max_nonfinite_skips:
            raise NonFiniteError(f"{cand.nonfinite_streak} non-finite training steps in a row (the limit, "
                                 f"max_nonfinite_skips={cfg.max_nonfinite_skips}); the last: {where}")

    def _evaluate(self, cand: Candidate, split: str) -> dict[str, float]:
        # Evaluation must not consume the training RNG stream: pause/continue stays exact.
        self._activate(cand)
        rng = torch.get_rng_state()
        start = time.perf_counter()
        metrics = self.problem.evaluate(split)
        self.eval_seconds += time.perf_counter() - start
        torch.set_rng_state(rng)
        return metrics

    def _evaluate_dev(self, cand: Candidate) -> dict[str, float]:
        metrics = self._evaluate(cand, "dev")
        cand.curve.append({"step": cand.step, **metrics})
        log.info("dev %s step %d: %s", cand.name, cand.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.on_event("dev", {"candidate": cand.index, "p": cand.p, "step": cand.step, **metrics})
        return metrics

    def _rank_key(self, metrics: dict[str, float]) -> float:
        value = metrics[self.problem.primary_metric]
        return -value if self.problem.higher_is_better else value

    def _order(self, cand: Candidate, metrics: dict[str, float]) -> tuple:
        # Ties of a count-based metric (accuracy on a few hundred clips) are broken by the dev
        # NLL every task reports, then by the candidate's order: no tie is decided by position
        # while the models differ.
        return (self._rank_key(metrics), metrics.get("nll", 0.0), cand.index)

    def run(self) -> Candidate:
        """Execute (or continue) the plan; return the chosen candidate, swapped in."""
        cfg = self.config
        alive = [c for c in self.candidates if c.status not in _CULLED]
        for rung, until in enumerate(cfg.rung_steps()):
            for cand in alive:
                if rung in cand.rung_metrics:
                    continue
                self._train(cand, until)
                cand.rung_metrics[rung] = self._evaluate_dev(cand)
                self.save_checkpoint()
            if rung < len(cfg.rungs):
                # Sort by the dev metric, then dev NLL, then position (see _order).
                ranked = sorted(alive, key=lambda c: self._order(c, c.rung_metrics[rung]))
                survivors = ranked[: cfg.keep[rung]]
                for cand in alive:
                    if cand not in survivors:
                        cand.status, cand.stopped_at = "stopped", cand.step
                alive = [c for c in alive if c in survivors]
                log.info("rung %d at step %d: continuing P=%s", rung, until, ", ".join(f"{c.p:g}" for c in alive))
                self.on_event("rung", {"rung": rung, "step": until, "survivors": [c.p for c in alive]})
        last = len(cfg.rungs)
        for cand in alive:
            cand.status = "finished"
        best = min(alive, key=lambda c: self._order(c, c.rung_metrics[last]))
        self.chosen = best
        self._activate(best)
        self.save_checkpoint()
        return best

    # ---- comparisons after the search ---------------------------------------------------

    def _final_metrics(self, cand: Candidate) -> dict[str, dict[str, float]]:
        last = len(self.config.rungs)
        # A candidate the search finished was evaluated on dev at T already (its last rung).
        final = {"dev": cand.rung_metrics[last] if last in cand.rung_metrics else self._evaluate_dev(cand)}
        if self.problem.has_split("test"):
            final["test"] = self._evaluate(cand, "test")
        return final

    def measure_regret(self) -> dict[str, Any]:
        """Train every culled candidate on to T, evaluate all at T, and report the regret.

        Each culled candidate continues from its paused state (values, optimizer, scheduler,
        RNG, data position), so it ends exactly where an uninterrupted T-step run would, and
        the extra cost is only its remaining steps. Culled candidates get status ``regret``;
        their ``final`` metrics (dev, and test when the task has a test split) are recorded and
        checkpointed one by one, so an interrupted measurement resumes. The chosen candidate is
        swapped back in at the end, so evaluating or saving it afterwards is unchanged.

        Returns :meth:`regret_report`.
        """
        if self.chosen is None:
            raise RuntimeError("measure_regret() needs the search's pick: call run() first")
        for cand in self.candidates:
            if cand.final:
                continue  # measured before an interruption
            if cand.status == "stopped":
                cand.status = "regret"
                log.info("regret: training %s on from step %d to %d", cand.name, cand.step, self.config.total_steps)
            self._train(cand, self.config.total_steps)
            cand.final = self._final_metrics(cand)
            self.save_checkpoint()
        self._activate(self.chosen)
        return self.regret_report()

    def regret_report(self) -> dict[str, Any]:
        """The regret of the search's pick, from the candidates' metrics at T.

        Definitions (``m`` is the primary metric; "best" means highest when higher is better,
        lowest otherwise, ties going to the earlier candidate as in the search):

        - ``regret`` (the primary definition): ``|best final dev m over all candidates -
          final dev m of the chosen|``, i.e. ``best - chosen`` for higher-is-better metrics and
          ``chosen - best`` for lower-is-better ones (WER). 0: the early pick is the best
          candidate at T; positive: how much worse it is.
        - ``regret_test`` (only with a test split): the same on test, against the best test
          metric any candidate reaches at T (an oracle that picks by test, not by dev).
          ``None`` without a test split.

        Returns a dict with ``metric``, ``higher_is_better``, ``regret``, ``chosen_p``,
        ``chosen_dev``, ``best_p``, ``best_dev``, ``regret_test``, ``chosen_test``,
        ``best_test_p``, ``best_test``, ``steps_spent_search``, ``steps_spent_regret`` and
        ``candidates`` (per candidate: ``p``, ``status``, ``search_steps``, ``steps``,
        ``final_dev``, ``final_test``).
        """
        if self.chosen is None or any(not c.final for c in self.candidates):
            raise RuntimeError("regret_report() needs every candidate's metrics at T: call measure_regret() first")
        metric = self.problem.primary_metric

        def best_by(split: str) -> Candidate:
            return min(self.candidates, key=lambda c: self._order(c, c.final[split]))

        def regret(split: str, best: Candidate) -> float:
            return self._rank_key(self.chosen.final[split]) - self._rank_key(best.final[split])

        best = best_by("dev")
        report: dict[str, Any] = {
            "metric": metric, "higher_is_better": self.problem.higher_is_better,
            "regret": regret("dev", best), "chosen_p": self.chosen.p, "chosen_dev": self.chosen.final["dev"][metric],
            "best_p": best.p, "best_dev": best.final["dev"][metric],
            "regret_test": None, "chosen_test": None, "best_test_p": None, "best_test": None,
            "steps_spent_search": self.steps_spent(), "steps_spent_regret": self.steps_regret(),
            "candidates": [
                {"p": c.p, "status": c.status, "search_steps": c.search_steps, "steps": c.step,
                 "final_dev": c.final["dev"], "final_test": c.final.get("test")}
                for c in self.candidates
            ],
        }
        if all("test" in c.final for c in self.candidates):
            best_test = best_by("test")
            report.update(regret_test=regret("test", best_test), chosen_test=self.chosen.final["test"][metric],
                          best_test_p=best_test.p, best_test=best_test.final["test"][metric])
        return report

    def run_baselines(self) -> dict[str, dict[str, Any]]:
        """Train each baseline given to the constructor for T steps and evaluate it at T.

        ``head-only`` trains the head alone (the upstream is frozen: no upstream entry changes);
        ``full`` trains every scored upstream entry with AdamW (a child holding all of them)
        plus the head. Both start from the base upstream and the search's initial head, with
        the search's schedule, learning rates, clipping, seed and data order, on the one model
        copy: the base values a baseline changes are kept in host memory while it trains and
        written back when it is done; its trained values are not kept. Progress is
        checkpointed, so an interrupted baseline resumes. If the search has picked a candidate,
        it is swapped back in at the end.

        Returns :meth:`baseline_report`.
        """
        for cand in self.baselines:
            if cand.final:
                continue
            self._train(cand, self.config.total_steps)
            cand.final = self._final_metrics(cand)
            cand.status = "finished"
            self._retire(cand)
            log.info("baseline %s at step %d: %s", cand.name, cand.step,
                     ", ".join(f"{split} {k}={v:.4f}" for split, m in cand.final.items() for k, v in m.items()))
            self.save_checkpoint()
        if self.chosen is not None:
            self._activate(self.chosen)
        return self.baseline_report()

    def baseline_report(self) -> dict[str, dict[str, Any]]:
        """Per baseline kind: ``p``, trainable counts (``trainable_upstream``, ``trainable_head``,
        ``trainable_params``), ``steps``, ``final_dev``, ``final_test`` (``None`` without a test
        split or before it ran) and the dev ``curve``."""
        head = sum(p.numel() for p in self.problem.head_params.values())
        return {
            c.baseline: {"p": c.p, "trainable_upstream": c.child.k, "trainable_head": head, "trainable_params": c.child.k + head,
                         "steps": c.step, "final_dev": c.final.get("dev"), "final_test": c.final.get("test"), "curve": c.curve}
            for c in self.baselines
        }

    # ---- accounting ---------------------------------------------------------------------

    def steps_spent(self) -> int:
        """Optimizer steps the search ran over all candidates (regret training not counted)."""
        return sum(c.search_steps for c in self.candidates)

    def steps_regret(self) -> int:
        """Extra steps :meth:`measure_regret` ran: culled candidates trained on to T."""
        return sum(c.step - c.stopped_at for c in self.candidates if c.stopped_at is not None)

    def steps_exhaustive(self) -> int:
        """Steps of training every candidate for T (n * T)."""
        return len(self.candidates) * self.config.total_steps

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write everything needed to continue (atomically: tensors, then the JSON that names them).

        Data parallel: a collective, called by every rank at the same point of the plan. The
        replicas are checked to be identical, every rank's RNG states are gathered, and rank 0
        alone writes (other ranks return ``None``).
        """
        if self.checkpoint_dir is None:
            return None
        self._since_checkpoint = 0
        rank_rngs = None
        if self.dp is not None:
            self._check_replicas()
            rank_rngs = self.dp.all_gather_object(
                [torch.get_rng_state() if c is self.active else c.rng_state for c in self.candidates + self.baselines])
            if not self.dp.is_main:
                return None
        if self.active is not None:
            self._capture(self.active, offload=True)
        tensors: dict[str, torch.Tensor] = {}
        everyone = self.candidates + self.baselines
        records = {id(cand): candidate_record(cand, _prefix(cand), tensors) for cand in everyone}
        for rank, states in enumerate(rank_rngs or []):
            if rank > 0:
                for cand, state in zip(everyone, states):
                    tensors[rng_key(_prefix(cand), rank)] = state.contiguous()
        meta = {
            "active": None if self.active is None else self.active.index,
            "candidates": [records[id(cand)] for cand in self.candidates],
            "baselines": [records[id(cand)] for cand in self.baselines],
            "swap_seconds": self.swap_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "world_size": self.world_size,
            "allreduce_seconds": self.allreduce_seconds,
            "allreduce_steps": self.allreduce_steps,
        }
        path = write_checkpoint(self.checkpoint_dir, meta, tensors)
        if self.active is not None:
            self._drop_snapshot(self.active)
        return path

    def _check_replicas(self) -> None:
        """Data parallel: raise unless the active candidate's trained tensors (whole upstream
        tensors holding child entries, and the head) are the same on every rank."""
        if self.active is None:
            return
        upstream = self.problem.upstream_params
        tensors = {f"upstream {n}": upstream[n] for n in self.active.child.indices}
        tensors.update({f"head {n}": p for n, p in self.problem.head_params.items()})
        self.dp.check_replicas(tensors, f"the trained parameters of {self.active.name}")

    def load_checkpoint(self) -> bool:
        """Restore the state written by :meth:`save_checkpoint`; False if there is none.

        Data parallel: a collective. Rank 0 reads the checkpoint and broadcasts it (nodes need
        not share a file system); each rank takes its own RNG states from it.

        Raises:
            ValueError: the checkpoint does not fit this search, or it was written by a job of
                another world size (each rank's data shard and random stream depend on it, so
                the run could not continue as it would have; resume with the same number of
                processes).
        """
        if self.checkpoint_dir is None:
            return False
        loaded = self._read_checkpoint() if self.dp is None else self.dp.run_on_main(self._read_checkpoint)
        if loaded is None:
            return False
        meta_path, meta, tensors = loaded
        if len(meta["candidates"]) != len(self.candidates):
            raise ValueError(f"{meta_path}: {len(meta['candidates'])} candidates saved, this search has {len(self.candidates)}")
        saved_baselines = [rec["baseline"] for rec in meta.get("baselines", [])]
        if saved_baselines != [c.baseline for c in self.baselines]:
            raise ValueError(f"{meta_path}: baselines {saved_baselines} saved, this search has {[c.baseline for c in self.baselines]}")
        if self.active is not None:
            self._deactivate()
        for rec, cand in zip(meta["candidates"], self.candidates):
            self._restore(rec, cand, tensors, meta_path)
        for rec, cand in zip(meta.get("baselines", []), self.baselines):
            self._restore(rec, cand, tensors, meta_path)
        self.swap_seconds, self.train_seconds, self.eval_seconds = meta["swap_seconds"], meta["train_seconds"], meta["eval_seconds"]
        self.allreduce_seconds, self.allreduce_steps = meta.get("allreduce_seconds", 0.0), meta.get("allreduce_steps", 0)
        if meta["active"] is not None:
            self._activate((self.candidates + self.baselines)[meta["active"]])
        log.info("resumed the search from %s (steps so far: %d)", meta_path, self.steps_spent())
        return True

    def _read_checkpoint(self) -> tuple[Path, dict, dict[str, torch.Tensor]] | None:
        return read_checkpoint(self.checkpoint_dir, self.world_size)

    def _restore(self, rec: dict, cand: Candidate, tensors: dict[str, torch.Tensor], meta_path: Path) -> None:
        # A baseline's paused values stay in host memory until it is swapped in.
        value_devices = {n: ("cpu" if cand.baseline else p.device) for n, p in self.problem.upstream_params.items()}
        head_devices = {n: p.device for n, p in self.problem.head_params.items()}
        restore_candidate(rec, cand, _prefix(cand), tensors, rank=self.rank, value_devices=value_devices,
                          head_devices=head_devices, where=meta_path)


def _prefix(cand: Candidate) -> str:
    """Where a candidate's tensors live in the checkpoint."""
    return candidate_prefix(cand.index, cand.baseline)


def _rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank``: ``seed`` itself on rank 0 (a one-process run is unchanged),
    distinct streams elsewhere, so that ranks draw independent dropout masks."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def _baseline_child(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> ChildNetwork:
    """The child a baseline trains: no entry (``head-only``) or every entry of ``shapes`` (``full``)."""
    if kind == "head-only":
        indices = {}
    else:
        indices = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            indices[name] = torch.arange(numel, dtype=torch.int64 if numel >= INT32_LIMIT else torch.int32)
    k = sum(i.numel() for i in indices.values())
    return ChildNetwork(indices=indices, shapes=dict(shapes), p=BASELINES[kind], k=k, method=kind)


def _gather(child: ChildNetwork, named_params: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """:meth:`ChildNetwork.gather`, moving each tensor to ``device`` before the next is taken
    (so a large child never has two copies on the accelerator)."""
    if device is None:
        return child.gather(named_params)
    out = {}
    for name, idx in child.indices.items():
        flat = named_params[name].detach().reshape(-1)
        out[name] = flat.index_select(0, idx.to(flat.device).long()).to(device)
    return out


def _clone_state_dict(state_dict: dict, device: str | torch.device | None = None, copy: bool = True) -> dict:
    """A copy of an optimizer state dict (on ``device`` if given; with ``copy=False`` tensors
    already there are taken over instead of copied)."""
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        if device is None:
            return v.detach().clone()
        return v.detach().to(device, copy=copy)

    return {
        "state": {k: {n: move(v) for n, v in s.items()} for k, s in state_dict["state"].items()},
        "param_groups": [dict(g) for g in state_dict["param_groups"]],
    }
