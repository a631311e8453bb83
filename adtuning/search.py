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

Random streams: each candidate has its own (seeded alike, as independent runs would be). It is
in the global CPU RNG only while :meth:`AdaptiveSearch._train` runs that candidate and is kept
in the candidate otherwise, so what the caller does between calls (evaluating, logging,
resuming) never shifts a candidate's dropout masks.

Modules: :mod:`adtuning.search_config` (:class:`SearchConfig`, :class:`TrainingProblem`,
:func:`successive_halving`), :mod:`adtuning.search_candidate` (:class:`Candidate`),
:mod:`adtuning.search_report` (ranking, regret and baseline reports) and
:mod:`adtuning.search_checkpoint` (the files); their public names are importable from here.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from adtuning import rng
from adtuning.child import ChildNetwork
from adtuning.distributed import DataParallel, GradientReducer
from adtuning.optim import SparseAdamW, get_linear_schedule_with_warmup
from adtuning.phase_memory import PhaseMemory
from adtuning.search_candidate import CULLED, Candidate, baseline_child, checkpoint_prefix, clone_state_dict, gather_to, rank_seed
from adtuning.search_checkpoint import (
    NonFiniteError,
    candidate_record,
    read_checkpoint,
    restore_candidate,
    rng_key,
    write_checkpoint,
)
from adtuning.search_config import BASELINES, NONFINITE_POLICIES, SearchConfig, TrainingProblem, successive_halving
from adtuning.search_report import baseline_report, order_key, regret_report
from adtuning.sparse_grad import SparseWeightGrad, install_sparse_weight_grad

__all__ = [
    "BASELINES", "NONFINITE_POLICIES", "AdaptiveSearch", "Candidate", "NonFiniteError", "SearchConfig", "TrainingProblem",
    "baseline_child", "successive_halving",
]

log = logging.getLogger("adtuning")

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
        phases: a :class:`~adtuning.phase_memory.PhaseMemory` that measures each training
            segment as a ``train`` phase (labelled with the candidate and its steps), or ``None``.
    """

    def __init__(
        self,
        problem: TrainingProblem,
        children: Sequence[ChildNetwork],
        config: SearchConfig,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        baselines: Sequence[str] = (),
        data_parallel: DataParallel | None = None,
        phases: PhaseMemory | None = None,
    ) -> None:
        config.check_candidates(len(children))
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown or len(set(baselines)) != len(baselines):
            raise ValueError(f"baselines must be distinct kinds from {', '.join(BASELINES)}, got {list(baselines)}")
        self.problem = problem
        self.config = config
        self.progress = progress
        self.on_event: Callable[[str, dict[str, Any]], None] = on_event or (lambda kind, info: None)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.dp = data_parallel
        self.phases = phases
        upstream = dict(problem.upstream_params)
        for child in children:
            child.check_against(upstream, where="the upstream")
        self.initial_head = {n: p.detach().clone() for n, p in problem.head_params.items()}
        # Each candidate's random stream (CPU, and the model's CUDA device when it trains there).
        self._device = next(problem.model.parameters()).device
        initial_rng = rng.initial_state(rank_seed(config.seed, self.rank), self._device)
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
            Candidate(index=len(children) + i, child=baseline_child(kind, shapes), rng_state=initial_rng.clone(), baseline=kind)
            for i, kind in enumerate(baselines)
        ]
        self.chosen: Candidate | None = None
        self.active: Candidate | None = None
        self._optimizer: SparseAdamW | None = None
        self._sparse_grad: SparseWeightGrad | None = None
        self._reducer: GradientReducer | None = None
        self._scheduler: LambdaLR | None = None
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
            cand.base_values = gather_to(cand.child, upstream, device="cpu")
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
            assert cand.scheduler_state is not None, "a paused candidate holds both states"
            self._optimizer.load_state_dict(cand.optimizer_state, adopt=True)
            self._scheduler.load_state_dict(cand.scheduler_state)
        assert cand.rng_state is not None, "every candidate starts with its seed's RNG state"
        rng.set_state(cand.rng_state, self._device)
        self._drop_snapshot(cand)
        self.active = cand
        self.swap_seconds += time.perf_counter() - start

    @staticmethod
    def _drop_snapshot(cand: Candidate) -> None:
        # While a candidate is active the model and the live optimizer hold its state; keeping
        # the paused copy too would double its optimizer state in memory.
        cand.values, cand.head, cand.optimizer_state = {}, {}, None

    def _capture(self, cand: Candidate, *, keep_live: bool = True, offload: bool = False, alias: bool = False) -> None:
        """Copy the live state of the active candidate into ``cand`` (model left as is).

        With ``keep_live=False`` (the optimizer is about to be discarded) its state tensors are
        taken over rather than cloned, so swapping out never holds the moments twice. With
        ``offload`` the copy goes to host memory tensor by tensor (checkpoints, and baselines,
        whose "full" state is as large as the scored upstream). With ``alias`` (a checkpoint,
        written and dropped before anything trains again) tensors already in host memory are
        not copied at all: the head, the moments and FT's whole-tensor values are the live ones.
        """
        upstream, head = self.problem.upstream_params, self.problem.head_params
        device = "cpu" if offload else None
        cand.values = gather_to(cand.child, upstream, device=device, alias=alias)
        on_host = alias and offload
        cand.head = {n: (p.detach() if on_host and p.device.type == "cpu" else p.detach().clone()) for n, p in head.items()}
        opt, sched = self._live()
        state = opt.state_dict()
        if keep_live or offload:
            cand.optimizer_state = clone_state_dict(state, device=device, copy=keep_live and not on_host)
        else:
            cand.optimizer_state = state
        cand.scheduler_state = dict(sched.state_dict())
        # cand.rng_state is current: _train hands the stream back to the candidate when it stops.

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
        self._live()[0].remove_hooks()
        self._optimizer = self._scheduler = None

    def _live(self) -> tuple[SparseAdamW, LambdaLR]:
        """The optimizer and schedule of the active candidate."""
        if self._optimizer is None or self._scheduler is None:
            raise RuntimeError("AdaptiveSearch: no candidate is active")
        return self._optimizer, self._scheduler

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

    def restore_base(self) -> None:
        """Swap the active candidate out (its state kept, as between segments), so the upstream
        holds its base values again: for other work on the same model copy (e.g. the recipe's
        method rows); :meth:`apply` swaps a candidate back in."""
        self._deactivate()

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
        if self.phases is None:
            self._train_segment(cand, until)
            return
        with self.phases.phase("train", label=f"train {cand.name} steps {cand.step}-{until}"):
            self._train_segment(cand, until)

    def _train_segment(self, cand: Candidate, until: int) -> None:
        self._activate(cand)
        cfg, model = self.config, self.problem.model
        opt, sched = self._live()
        model.train()
        # The candidate's random stream runs in the global RNG only inside this loop, so code that
        # draws random numbers between calls (after a resume, between the search and the
        # baselines, in on_event) cannot shift what the candidate trains on.
        assert cand.rng_state is not None
        rng.set_state(cand.rng_state, self._device)
        batches = self._batches(cand)
        bar = tqdm(total=until, initial=cand.step, desc=f"train {cand.name}", unit="step", disable=not self.progress, leave=False)
        start = time.perf_counter()
        try:
            while cand.step < until:
                total = 0.0
                if self._reducer is not None:
                    self._reducer.prepare()
                seen: list[tuple[int, int, Any]] = []  # (epoch, batch, utterance ids) of this step's micro-batches, for messages
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    seen.append((cand.epoch, cand.batch_in_epoch - 1, batch.get("ids") if isinstance(batch, dict) else None))
                    loss = self.problem.loss(batch)
                    if loss is None:  # data parallel: this rank holds no sample of the global batch
                        continue
                    loss = loss / cfg.grad_accum
                    loss.backward()  # type: ignore[no-untyped-call]
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
                self._emit("train", {"candidate": cand.index, "p": cand.p, "step": cand.step, "loss": total, "lr": sched.get_last_lr()[0]})
                if cfg.eval_interval and cand.step % cfg.eval_interval == 0 and cand.step < until:
                    self._evaluate_dev(cand)
                    model.train()
                self._since_checkpoint += 1
                if cfg.checkpoint_interval and self._since_checkpoint >= cfg.checkpoint_interval and cand.step < until:
                    cand.rng_state = rng.get_state(self._device)
                    self.save_checkpoint()
        finally:
            cand.rng_state = rng.get_state(self._device)
            bar.close()
            self.train_seconds += time.perf_counter() - start

    def _emit(self, kind: str, info: dict[str, Any]) -> None:
        """Call ``on_event`` without letting it move the global RNG (the active candidate's
        stream while training)."""
        with rng.kept(self._device):
            self.on_event(kind, info)

    def _nonfinite_step(self, cand: Candidate, loss: float, grad_norm: float, seen: list[tuple[int, int, Any]]) -> None:
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
        self._emit("nonfinite", {"candidate": cand.index, "p": cand.p, "step": cand.step, "skipped": cand.skipped_steps})
        if cand.nonfinite_streak >= cfg.max_nonfinite_skips:
            raise NonFiniteError(f"{cand.nonfinite_streak} non-finite training steps in a row (the limit, "
                                 f"max_nonfinite_skips={cfg.max_nonfinite_skips}); the last: {where}")

    def _evaluate(self, cand: Candidate, split: str) -> dict[str, float]:
        # Evaluation must not consume the training RNG stream: pause/continue stays exact.
        self._activate(cand)
        start = time.perf_counter()
        with rng.kept(self._device):
            metrics = self.problem.evaluate(split)
        self.eval_seconds += time.perf_counter() - start
        return metrics

    def _evaluate_dev(self, cand: Candidate) -> dict[str, float]:
        metrics = self._evaluate(cand, "dev")
        cand.curve.append({"step": cand.step, **metrics})
        log.info("dev %s step %d: %s", cand.name, cand.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self._emit("dev", {"candidate": cand.index, "p": cand.p, "step": cand.step, **metrics})
        return metrics

    def _order(self, cand: Candidate, metrics: dict[str, float]) -> tuple[float, float, int]:
        # The dev metric, then dev NLL, then position (search_report.order_key).
        return order_key(cand, metrics, self.problem.primary_metric, self.problem.higher_is_better)

    def run(self) -> Candidate:
        """Execute (or continue) the plan; return the chosen candidate, swapped in."""
        cfg = self.config
        alive = [c for c in self.candidates if c.status not in CULLED]
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
                self._emit("rung", {"rung": rung, "step": until, "survivors": [c.p for c in alive]})
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
        """The regret of the search's pick, from the candidates' metrics at T (the definitions
        and keys: :func:`adtuning.search_report.regret_report`).

        Raises:
            RuntimeError: before :meth:`measure_regret` has measured every candidate at T.
        """
        if self.chosen is None or any(not c.final for c in self.candidates):
            raise RuntimeError("regret_report() needs every candidate's metrics at T: call measure_regret() first")
        return regret_report(self.candidates, self.chosen, self.problem.primary_metric, self.problem.higher_is_better,
                             steps_spent_search=self.steps_spent(), steps_spent_regret=self.steps_regret())

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
        """Per baseline kind: ``p``, trainable counts, ``steps``, ``final_dev``, ``final_test``
        and the dev ``curve`` (:func:`adtuning.search_report.baseline_report`)."""
        return baseline_report(self.baselines, sum(p.numel() for p in self.problem.head_params.values()))

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
                [c.rng_state for c in self.candidates + self.baselines])
            if not self.dp.is_main:
                return None
        if self.active is not None:
            # Written at once and dropped below: host-memory tensors go in without a copy.
            self._capture(self.active, offload=True, alias=True)
        tensors: dict[str, torch.Tensor] = {}
        everyone = self.candidates + self.baselines
        records = {id(cand): candidate_record(cand, checkpoint_prefix(cand), tensors) for cand in everyone}
        for rank, states in enumerate(rank_rngs or []):
            if rank > 0:
                for cand, state in zip(everyone, states):
                    tensors[rng_key(checkpoint_prefix(cand), rank)] = state.contiguous()
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
        if self.dp is not None:
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

    def _read_checkpoint(self) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
        if self.checkpoint_dir is None:
            return None
        return read_checkpoint(self.checkpoint_dir, self.world_size)

    def _restore(self, rec: dict[str, Any], cand: Candidate, tensors: dict[str, torch.Tensor], meta_path: Path) -> None:
        # A baseline's paused values stay in host memory until it is swapped in.
        value_devices = {n: ("cpu" if cand.baseline else p.device) for n, p in self.problem.upstream_params.items()}
        head_devices = {n: p.device for n, p in self.problem.head_params.items()}
        restore_candidate(rec, cand, checkpoint_prefix(cand), tensors, rank=self.rank, value_devices=value_devices,
                          head_devices=head_devices, where=meta_path)
