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

Everything needed to continue is saved by :meth:`AdaptiveSearch.save_checkpoint` (atomically,
safetensors + JSON); :meth:`AdaptiveSearch.load_checkpoint` resumes to the same final result.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from adtuning.atomic import atomic_write
from adtuning.child import ChildNetwork
from adtuning.optim import SparseAdamW, get_linear_schedule_with_warmup

log = logging.getLogger("adtuning")

CHECKPOINT_VERSION = 1


class TrainingProblem(Protocol):
    """What the search needs from a task (a :class:`adtuning.speech.SpeechModel` adapter fits).

    Attributes/methods:
        model: the one model (upstream + head), already on its device.
        upstream_params: ``{name: parameter}`` of the upstream; child names refer to these.
        head_params: ``{name: parameter}`` trained densely (head + layer-weighted sum).
        train_batches(epoch, skip): deterministic iterator over the training batches of
            ``epoch`` (its shuffle depends only on the seed and the epoch), starting after
            ``skip`` batches.
        loss(batch): the scalar training loss of a batch.
        evaluate(split): ``{metric: value}`` on ``"dev"`` or ``"test"``.
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
        seed: seeds each candidate's RNG identically, as independent runs would be.
        checkpoint_interval: write a resumable checkpoint every this many steps (0: only at
            segment ends).
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
    seed: int = 0
    checkpoint_interval: int = 0

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
    """One child size under search; while paused it is a sparse delta plus training state."""

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
    status: str = "training"  # training | stopped | finished

    @property
    def p(self) -> float:
        return self.child.p


class AdaptiveSearch:
    """Runs the AD-TUNING plan over ``children`` on the one model of ``problem``.

    Args:
        problem: the task (see :class:`TrainingProblem`).
        children: one child network per candidate (usually :meth:`ChildNetwork.nested`).
        config: :class:`SearchConfig`.
        checkpoint_dir: where resumable checkpoints go (``None``: none are written).
        progress: tqdm bars.
        on_event: optional callback ``on_event(kind, info_dict)`` for logging / TensorBoard.
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
    ) -> None:
        if not children:
            raise ValueError("AdaptiveSearch needs at least one candidate child network")
        if max(config.keep, default=1) > len(children):
            raise ValueError(f"keep {config.keep} exceeds the number of candidates ({len(children)})")
        self.problem = problem
        self.config = config
        self.progress = progress
        self.on_event = on_event or (lambda kind, info: None)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        upstream = dict(problem.upstream_params)
        for child in children:
            child.check_against(upstream, where="the upstream")
        self.initial_head = {n: p.detach().clone() for n, p in problem.head_params.items()}
        initial_rng = torch.Generator().manual_seed(config.seed).get_state()
        self.candidates = []
        for i, child in enumerate(children):
            self.candidates.append(Candidate(index=i, child=child, base_values=child.gather(upstream), rng_state=initial_rng.clone()))
        self.active: Candidate | None = None
        self._optimizer: SparseAdamW | None = None
        self._scheduler = None
        self.swap_seconds = 0.0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self._since_checkpoint = 0

    # ---- swapping ---------------------------------------------------------------------

    @torch.no_grad()
    def _activate(self, cand: Candidate) -> None:
        if self.active is cand:
            return
        if self.active is not None:
            self._deactivate()
        start = time.perf_counter()
        upstream, head = self.problem.upstream_params, self.problem.head_params
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

    def _capture(self, cand: Candidate, *, keep_live: bool = True) -> None:
        """Copy the live state of the active candidate into ``cand`` (model left as is).

        With ``keep_live=False`` (the optimizer is about to be discarded) its state tensors are
        taken over rather than cloned, so swapping out never holds the moments twice.
        """
        upstream, head = self.problem.upstream_params, self.problem.head_params
        cand.values = cand.child.gather(upstream)
        cand.head = {n: p.detach().clone() for n, p in head.items()}
        state = self._optimizer.state_dict()
        cand.optimizer_state = _clone_state_dict(state) if keep_live else state
        cand.scheduler_state = dict(self._scheduler.state_dict())
        cand.rng_state = torch.get_rng_state()

    @torch.no_grad()
    def _deactivate(self) -> None:
        cand = self.active
        if cand is None:
            return
        start = time.perf_counter()
        self._capture(cand, keep_live=False)
        cand.child.scatter_(self.problem.upstream_params, cand.base_values)
        self._optimizer.remove_hooks()
        self._optimizer = self._scheduler = None
        self.active = None
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
        bar = tqdm(total=until, initial=cand.step, desc=f"train P={cand.p:g}", unit="step", disable=not self.progress, leave=False)
        start = time.perf_counter()
        try:
            while cand.step < until:
                total = 0.0
                for _ in range(cfg.grad_accum):
                    loss = self.problem.loss(next(batches)) / cfg.grad_accum
                    loss.backward()
                    total += float(loss.detach())
                if cfg.max_grad_norm is not None:
                    opt.clip_grad_norm_(cfg.max_grad_norm)
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

    def _evaluate_dev(self, cand: Candidate) -> dict[str, float]:
        # Evaluation must not consume the training RNG stream: pause/continue stays exact.
        self._activate(cand)
        rng = torch.get_rng_state()
        start = time.perf_counter()
        metrics = self.problem.evaluate("dev")
        self.eval_seconds += time.perf_counter() - start
        torch.set_rng_state(rng)
        cand.curve.append({"step": cand.step, **metrics})
        log.info("dev P=%g step %d: %s", cand.p, cand.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.on_event("dev", {"candidate": cand.index, "p": cand.p, "step": cand.step, **metrics})
        return metrics

    def _rank_key(self, metrics: dict[str, float]) -> float:
        value = metrics[self.problem.primary_metric]
        return -value if self.problem.higher_is_better else value

    def run(self) -> Candidate:
        """Execute (or continue) the plan; return the chosen candidate, swapped in."""
        cfg = self.config
        alive = [c for c in self.candidates if c.status != "stopped"]
        for rung, until in enumerate(cfg.rung_steps()):
            for cand in alive:
                if rung in cand.rung_metrics:
                    continue
                self._train(cand, until)
                cand.rung_metrics[rung] = self._evaluate_dev(cand)
                self.save_checkpoint()
            if rung < len(cfg.rungs):
                # Sort by the dev metric; ties go to the earlier (smaller) candidate.
                ranked = sorted(alive, key=lambda c: (self._rank_key(c.rung_metrics[rung]), c.index))
                survivors = ranked[: cfg.keep[rung]]
                for cand in alive:
                    if cand not in survivors:
                        cand.status = "stopped"
                alive = [c for c in alive if c in survivors]
                log.info("rung %d at step %d: continuing P=%s", rung, until, ", ".join(f"{c.p:g}" for c in alive))
                self.on_event("rung", {"rung": rung, "step": until, "survivors": [c.p for c in alive]})
        last = len(cfg.rungs)
        for cand in alive:
            cand.status = "finished"
        best = min(alive, key=lambda c: (self._rank_key(c.rung_metrics[last]), c.index))
        self._activate(best)
        self.save_checkpoint()
        return best

    # ---- accounting ---------------------------------------------------------------------

    def steps_spent(self) -> int:
        """Optimizer steps run over all candidates."""
        return sum(c.step for c in self.candidates)

    def steps_exhaustive(self) -> int:
        """Steps of training every candidate for T (n * T)."""
        return len(self.candidates) * self.config.total_steps

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write everything needed to continue (atomically: tensors, then the JSON that names them)."""
        if self.checkpoint_dir is None:
            return None
        self._since_checkpoint = 0
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self.active is not None:
            self._capture(self.active)
        tensors: dict[str, torch.Tensor] = {}
        records = []
        for cand in self.candidates:
            prefix = f"c{cand.index}"
            for name, value in cand.values.items():
                tensors[f"{prefix}.values.{name}"] = value.detach().cpu().contiguous()
            for name, value in cand.head.items():
                tensors[f"{prefix}.head.{name}"] = value.detach().cpu().contiguous()
            tensors[f"{prefix}.rng"] = cand.rng_state.contiguous()
            opt_meta = None
            if cand.optimizer_state is not None:
                opt_meta = {"param_groups": cand.optimizer_state["param_groups"], "state": {}}
                for pid, st in cand.optimizer_state["state"].items():
                    opt_meta["state"][str(pid)] = sorted(st)
                    for key, value in st.items():
                        tensors[f"{prefix}.opt.{pid}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
            records.append({
                "index": cand.index, "p": cand.p, "k": cand.child.k, "step": cand.step, "epoch": cand.epoch,
                "batch_in_epoch": cand.batch_in_epoch, "status": cand.status, "curve": cand.curve,
                "train_losses": cand.train_losses, "rung_metrics": {str(k): v for k, v in cand.rung_metrics.items()},
                "scheduler_state": cand.scheduler_state, "optimizer": opt_meta,
            })
        serial = int(time.time() * 1e6)
        tensor_name = f"search-{serial}.safetensors"
        atomic_write(self.checkpoint_dir / tensor_name, lambda tmp: save_file(tensors, tmp))
        meta = {
            "version": CHECKPOINT_VERSION,
            "tensors": tensor_name,
            "active": None if self.active is None else self.active.index,
            "candidates": records,
            "swap_seconds": self.swap_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }
        path = atomic_write(self.checkpoint_dir / "search.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        for old in self.checkpoint_dir.glob("search-*.safetensors"):
            if old.name != tensor_name:
                old.unlink(missing_ok=True)
        if self.active is not None:
            self._drop_snapshot(self.active)
        return path

    def load_checkpoint(self) -> bool:
        """Restore the state written by :meth:`save_checkpoint`; False if there is none."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "search.json").is_file():
            return False
        meta_path = self.checkpoint_dir / "search.json"
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{meta_path}: unsupported checkpoint version {meta.get('version')}")
        tensor_path = self.checkpoint_dir / meta["tensors"]
        if not tensor_path.is_file():
            raise FileNotFoundError(f"{meta_path} names {tensor_path}, which is missing")
        tensors = load_file(str(tensor_path))
        if len(meta["candidates"]) != len(self.candidates):
            raise ValueError(f"{meta_path}: {len(meta['candidates'])} candidates saved, this search has {len(self.candidates)}")
        if self.active is not None:
            self._deactivate()
        device = {n: p.device for n, p in self.problem.upstream_params.items()}
        for rec, cand in zip(meta["candidates"], self.candidates):
            if abs(rec["p"] - cand.p) > 1e-12 or rec["k"] != cand.child.k:
                raise ValueError(f"{meta_path}: candidate {cand.index} was P={rec['p']} k={rec['k']}, now P={cand.p} k={cand.child.k}")
            prefix = f"c{cand.index}"
            cand.values = {n: tensors[f"{prefix}.values.{n}"].to(device[n]) for n in cand.child.indices if f"{prefix}.values.{n}" in tensors}
            cand.head = {n: tensors[f"{prefix}.head.{n}"].to(p.device) for n, p in self.problem.head_params.items() if f"{prefix}.head.{n}" in tensors}
            cand.rng_state = tensors[f"{prefix}.rng"]
            opt_meta = rec["optimizer"]
            if opt_meta is None:
                cand.optimizer_state = None
            else:
                state = {int(pid): {key: tensors[f"{prefix}.opt.{pid}.{key}"] for key in keys} for pid, keys in opt_meta["state"].items()}
                cand.optimizer_state = {"state": state, "param_groups": opt_meta["param_groups"]}
            cand.scheduler_state = rec["scheduler_state"]
            cand.step, cand.epoch, cand.batch_in_epoch = rec["step"], rec["epoch"], rec["batch_in_epoch"]
            cand.status, cand.curve = rec["status"], rec["curve"]
            cand.train_losses = [tuple(x) for x in rec["train_losses"]]
            cand.rung_metrics = {int(k): v for k, v in rec["rung_metrics"].items()}
        self.swap_seconds, self.train_seconds, self.eval_seconds = meta["swap_seconds"], meta["train_seconds"], meta["eval_seconds"]
        if meta["active"] is not None:
            self._activate(self.candidates[meta["active"]])
        log.info("resumed the search from %s (steps so far: %d)", meta_path, self.steps_spent())
        return True


def _clone_state_dict(state_dict: dict) -> dict:
    return {
        "state": {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()} for k, s in state_dict["state"].items()},
        "param_groups": [dict(g) for g in state_dict["param_groups"]],
    }
