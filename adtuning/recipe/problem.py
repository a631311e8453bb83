"""The speech problem the search trains: a :class:`~adtuning.speech.SpeechModel` with its loaders.

It implements :class:`adtuning.search.TrainingProblem` from explicit fields (:class:`LoaderSettings`)
and the task's own hooks (what its loss is a mean over), never from the command line's namespace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from adtuning.distributed import DataParallel


@dataclass(frozen=True)
class LoaderSettings:
    """What the problem's loaders need of the run configuration (sizes per process)."""

    batch_size: int
    eval_batch_size: int | None = None
    fisher_batch_size: int | None = None
    fisher_samples: int = 512
    seed: int = 0
    max_train_hours: float | None = None
    num_workers: int = 0
    progress: bool = True


class SpeechProblem:
    """Adapts a :class:`adtuning.speech.SpeechModel` and its datasets to the search.

    Data parallel (``dp`` given): loaders plan the global batches (``W`` times the per-process
    batch sizes) and yield this rank's part; :meth:`loss` returns this rank's share of the
    global batch's loss and :meth:`evaluate` the metrics of the whole split.
    """

    def __init__(self, model, train_set, dev_set, test_set, loaders: LoaderSettings, dp: DataParallel | None = None,
                 extra_trainable: dict[str, torch.nn.Parameter] | None = None,
                 upstream_params: dict[str, torch.nn.Parameter] | None = None):
        from adtuning.speech import make_loader

        self.model = model
        self.dp = dp
        self.world_size = 1 if dp is None else dp.world_size
        self._shard = None if dp is None else (dp.rank, dp.world_size)
        self.train_set, self.dev_set, self.test_set = train_set, dev_set, test_set
        # The upstream's own weights by their base names (a method's added modules are not among
        # them: ``upstream_params`` gives the base names when a method such as peft's LoRA renamed
        # the weights it wraps).
        if upstream_params is None:
            added = {id(p) for p in (extra_trainable or {}).values()}
            upstream_params = {n: p for n, p in model.upstream.named_parameters() if id(p) not in added}
        self.upstream_params = dict(upstream_params)
        # Dense trainable parameters: the task head, and the modules a method added (LoRA,
        # adapters, ...), which train like the head.
        self.head_params = {**dict(model.task.named_parameters()), **(extra_trainable or {})}
        self.primary_metric = model.primary_metric
        self.higher_is_better = model.higher_is_better
        self._make_loader = make_loader
        self.loaders = loaders

    def train_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        s = self.loaders
        return iter(self._make_loader(
            self.train_set, s.batch_size * self.world_size, shuffle=True, seed=s.seed, epoch=epoch,
            skip_batches=skip, max_hours=s.max_train_hours, num_workers=s.num_workers, shard=self._shard,
        ))

    def fisher_batches(self):
        """The Fisher pass's batches (data parallel: this rank's parts, cut to ``fisher_samples``
        in total before sharding, since ``estimate_fisher`` cannot count other ranks' samples).
        Each call returns a new loader over the same batches."""
        s = self.loaders
        return self._make_loader(
            self.train_set, (s.fisher_batch_size or s.batch_size) * self.world_size, shuffle=True,
            seed=s.seed + 1, epoch=0, balanced=False, max_hours=s.max_train_hours,
            num_workers=s.num_workers, shard=self._shard,
            max_items=None if self.dp is None else s.fisher_samples,
        )

    def loss(self, batch):
        if self.dp is None:
            return self.model.loss(batch)
        share = self._loss_share(batch)
        return None if batch is None else self.model.loss(batch) * share

    def _loss_share(self, batch) -> float:
        """This rank's weight in the global batch's loss: the fraction of the loss's normaliser
        it holds. A loss that is a mean over samples needs no communication (the loader knows the
        global batch's size); another normaliser (SD's label frames) takes one scalar all-reduce,
        which every rank joins, also with an empty part."""
        task = self.model.task
        if not task.loss_is_sample_mean:
            count = torch.zeros((), dtype=torch.float64, device=self.dp.device)
            if batch is not None:
                count += task.loss_normalizer(batch)
            mine = float(count)
            total = float(self.dp.all_reduce_sum_(count))
            return mine / total
        if batch is None:
            return 0.0
        return len(batch["ids"]) / batch["global_batch_size"]

    def has_split(self, split: str) -> bool:
        return (self.dev_set if split == "dev" else self.test_set) is not None

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.dev_set if split == "dev" else self.test_set
        s = self.loaders
        batch_size = (s.eval_batch_size or s.batch_size) * self.world_size
        loader = self._make_loader(dataset, batch_size, shuffle=False, seed=s.seed, num_workers=s.num_workers, shard=self._shard)
        if self.dp is None:
            return self.model.evaluate(loader, progress=s.progress)
        return self._evaluate_sharded(loader)

    @torch.no_grad()
    def _evaluate_sharded(self, loader) -> dict[str, float]:
        """This rank's part of the split through the task's accumulator, merged over the ranks
        (counts summed, hypotheses concatenated), then the metric of the whole split."""
        from adtuning.speech.model import batch_to

        model, task = self.model, self.model.task
        was_training = model.training
        model.eval()
        try:
            state = task.new_eval_state()
            for batch in loader:
                if batch is None:
                    continue
                batch = batch_to(batch, model.device)
                task.eval_update(state, model(batch), batch)
        finally:
            model.train(was_training)
        return task.eval_compute(self.dp.merge_eval_states(state))
