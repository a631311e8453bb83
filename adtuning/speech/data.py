"""Datasets' common base, batching with padding masks, and resumable, deterministic loaders.

A loader is fully determined by ``(dataset, batch_size, seed, epoch, options)``: the sample
order, the length buckets, the optional N-hour subset and every random crop come from
``numpy.random.default_rng`` seeded with those values, never from global state. Resuming at
batch ``n`` of epoch ``e`` is ``make_loader(..., epoch=e, skip_batches=n)`` (or
``loader.state_dict()`` / :meth:`BatchStream.load_state_dict` for an endless stream).

Data parallelism: ``make_loader(..., shard=(rank, world_size))`` plans the *global* batches
exactly as one process would (``batch_size`` is the global batch size) and yields only this
rank's contiguous part of each one, so the union over ranks, batch by batch, is the
single-process stream. Every rank yields one item per global batch, in step: ``None`` where
its part is empty (a last batch smaller than the world size).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from adtuning.speech.audio import SAMPLE_RATE, audio_num_samples


class SpeechDataset(Dataset):
    """Base class of the corpus readers.

    Subclasses implement :meth:`__len__`, :meth:`load` and either :meth:`audio_path` or
    :meth:`lengths`. Items are dicts with ``"wav"`` (float32 numpy, 16 kHz mono),
    ``"id"`` and the task's labels: ``"label"`` (int), ``"labels"`` (list of int),
    ``"targets"`` (list of int) or ``"activity"`` (``[T, S]`` numpy).

    Attributes:
        task: the task name the items are for.
        split: ``train``, ``dev`` or ``test``.
        task_kwargs: corpus-dependent arguments for :func:`adtuning.speech.build_task`.
        sample_weights: per-item sampling weights of the recipe's balanced sampler, or None.
        skipped: ``Counter`` of entries the recipe skips (reason -> count).
    """

    task: str = ""
    sample_rate: int = SAMPLE_RATE

    def __init__(self, split: str):
        if split not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', got {split!r}")
        self.split = split
        self.task_kwargs: dict[str, Any] = {}
        self.sample_weights: list[float] | None = None
        self.skipped: Counter = Counter()
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def audio_path(self, index: int) -> str:
        """Path of the audio file of item ``index`` (used for lengths)."""
        raise NotImplementedError

    def lengths(self) -> np.ndarray:
        """Lengths of all items in samples, read from the audio headers once and cached."""
        if self._lengths is None:
            with ThreadPoolExecutor(8) as pool:
                lengths = list(pool.map(lambda i: self._item_length(i), range(len(self))))
            self._lengths = np.asarray(lengths, dtype=np.int64)
        return self._lengths

    def _item_length(self, index: int) -> int:
        return audio_num_samples(self.audio_path(index))

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Decode item ``index``; ``rng`` drives the recipe's random crops (None: deterministic)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, None)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch items: see :func:`collate`."""
        return collate(items)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of items into a batch dict.

    Always: ``wav`` ``[B, L]`` float32 (zero padded), ``wav_lengths`` ``[B]`` long, ``ids``.
    Labels: ``label`` -> ``[B]`` long; ``labels`` -> ``[B, K]`` long; ``targets`` ->
    ``targets`` ``[B, S]`` long (zero padded) + ``target_lengths``; ``activity`` ->
    ``activity`` ``[B, T, S]`` float32 (zero padded) + ``label_lengths``.
    """
    lengths = [len(it["wav"]) for it in items]
    wav = torch.zeros(len(items), max(lengths), dtype=torch.float32)
    for b, it in enumerate(items):
        wav[b, : lengths[b]] = torch.from_numpy(np.asarray(it["wav"], dtype=np.float32))
    batch: dict[str, Any] = {"wav": wav, "wav_lengths": torch.tensor(lengths, dtype=torch.long),
                             "ids": [it["id"] for it in items]}
    first = items[0]
    if "label" in first:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    if "labels" in first:
        batch["labels"] = torch.tensor([list(it["labels"]) for it in items], dtype=torch.long)
    if "targets" in first:
        n = [len(it["targets"]) for it in items]
        t = torch.zeros(len(items), max(n), dtype=torch.long)
        for b, it in enumerate(items):
            t[b, : n[b]] = torch.tensor(it["targets"], dtype=torch.long)
        batch["targets"], batch["target_lengths"] = t, torch.tensor(n, dtype=torch.long)
    if "activity" in first:
        n = [it["activity"].shape[0] for it in items]
        a = torch.zeros(len(items), max(n), first["activity"].shape[1], dtype=torch.float32)
        for b, it in enumerate(items):
            a[b, : n[b]] = torch.from_numpy(np.asarray(it["activity"], dtype=np.float32))
        batch["activity"], batch["label_lengths"] = a, torch.tensor(n, dtype=torch.long)
    return batch


def subset_hours(dataset: SpeechDataset, hours: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a random subset of at most ``hours`` of audio (the paper's 0.5/1/5/10 h
    low-resource sets), drawn from ``seed`` only: the same subset in every epoch."""
    if hours <= 0:
        raise ValueError(f"max_hours must be positive, got {hours}")
    budget = hours * 3600 * dataset.sample_rate
    order = np.random.default_rng([int(seed), 0x5EB5E7]).permutation(len(dataset))
    lengths = dataset.lengths()[order]
    keep = order[np.cumsum(lengths) <= budget]
    if keep.size == 0:
        raise ValueError(f"max_hours={hours}: even the first utterance is longer than that")
    return np.sort(keep)


class _Fetch(Dataset):
    """Maps a position of an epoch's order to ``dataset.load(index, rng)`` (picklable for workers)."""

    def __init__(self, dataset: SpeechDataset, order: np.ndarray, seed: int, epoch: int, random: bool):
        self.dataset, self.order, self.seed, self.epoch, self.random = dataset, order, seed, epoch, random

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = int(self.order[position])
        key = [self.seed, self.epoch, position] if self.random else [self.seed, index]
        return self.dataset.load(index, np.random.default_rng(key))


class SpeechLoader:
    """One epoch of batches; built by :func:`make_loader`.

    Iterating yields batch dicts (see :func:`collate`). :attr:`position` counts the batches of
    the epoch consumed so far (including skipped ones); :meth:`state_dict` records it.

    A sharded loader (``global_sizes`` given) yields this rank's part of every global batch,
    with the global batch's item count under ``"global_batch_size"``, or ``None`` where the
    part is empty; positions count global batches.
    """

    def __init__(self, dataset: SpeechDataset, batches: list[list[int]], order: np.ndarray, *, seed: int, epoch: int,
                 skip_batches: int, random: bool, num_workers: int, pin_memory: bool,
                 global_sizes: list[int] | None = None):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch
        self.batches = batches
        self.global_sizes = global_sizes
        self.order = order
        self.skip_batches = min(skip_batches, len(batches))
        self.position = self.skip_batches
        self._random = random
        self._num_workers = num_workers
        self._pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.batches) - self.skip_batches

    @property
    def num_batches(self) -> int:
        """Batches in the whole epoch (skipped ones included)."""
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        remaining = self.batches[self.skip_batches:]
        if not remaining:
            return
        # DataLoader cannot fetch an empty batch: load the non-empty ones, yield None for the rest.
        loaded = [b for b in remaining if b]
        loader = iter(DataLoader(_Fetch(self.dataset, self.order, self.seed, self.epoch, self._random),
                                 batch_sampler=loaded, collate_fn=self.dataset.collate,
                                 num_workers=self._num_workers, pin_memory=self._pin_memory)) if loaded else iter(())
        self.position = self.skip_batches
        for i, positions in enumerate(remaining, start=self.skip_batches):
            batch = next(loader) if positions else None
            if batch is not None and self.global_sizes is not None:
                batch["global_batch_size"] = self.global_sizes[i]
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "position"}``: pass ``epoch`` and ``skip_batches=position`` to
        :func:`make_loader` (with the same other arguments) to continue where this stopped."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}


def plan_batches(dataset: SpeechDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int, bucket: bool,
                 indices: np.ndarray | None = None, balanced: bool = False, drop_last: bool = False,
                 bucket_window: int = 50) -> tuple[np.ndarray, list[list[int]]]:
    """The order of an epoch and its batches (lists of positions into that order).

    Shuffled epochs draw a permutation (or, with ``balanced``, ``len`` draws with replacement
    weighted by ``dataset.sample_weights``, as s3prl's ``WeightedRandomSampler``); with
    ``bucket`` every window of ``bucket_window`` batches is sorted by length before it is cut
    into batches, and the batch order is shuffled. Unshuffled epochs with ``bucket`` are sorted
    by length (longest first) over the whole set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pool = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if pool.size == 0:
        raise ValueError(f"{type(dataset).__name__} ({dataset.split}) is empty")
    rng = np.random.default_rng([int(seed), int(epoch), 0xBA7C4])
    if shuffle and balanced:
        if dataset.sample_weights is None:
            raise ValueError(f"{type(dataset).__name__} has no sample_weights for balanced sampling")
        w = np.asarray(dataset.sample_weights, dtype=np.float64)[pool]
        order = pool[rng.choice(pool.size, size=pool.size, replace=True, p=w / w.sum())]
    elif shuffle:
        order = pool[rng.permutation(pool.size)]
    else:
        order = pool
    positions = np.arange(order.size)
    if bucket:
        lengths = dataset.lengths()[order]
        if shuffle:
            window = batch_size * bucket_window
            chunks = [positions[i:i + window] for i in range(0, order.size, window)]
            positions = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        else:
            positions = positions[np.argsort(-lengths, kind="stable")]
    batches = [positions[i:i + batch_size].tolist() for i in range(0, order.size, batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return order, batches


def shard_batches(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's part of every global batch: the ``rank``-th of ``world_size`` contiguous,
    near-equal slices (sizes differ by at most one; ``[]`` when the batch has fewer items than
    ranks), so that concatenating the parts of ranks 0..W-1 gives the global batch back."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need 0 <= rank < world_size, got rank {rank} of {world_size}")
    parts = []
    for batch in batches:
        n = len(batch)
        start, stop = (rank * n) // world_size, ((rank + 1) * n) // world_size
        parts.append(list(batch[start:stop]))
    return parts


def limit_items(batches: Sequence[Sequence[int]], max_items: int) -> list[list[int]]:
    """The first ``max_items`` items of ``batches`` in batch order (the last batch cut)."""
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    kept, left = [], max_items
    for batch in batches:
        if left <= 0:
            break
        kept.append(list(batch[:left]))
        left -= len(kept[-1])
    return kept


def make_loader(dataset: SpeechDataset, batch_size: int, *, shuffle: bool, seed: int = 0, bucket: bool = True,
                max_hours: float | None = None, epoch: int = 0, skip_batches: int = 0, balanced: bool | None = None,
                drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False,
                shard: tuple[int, int] | None = None, max_items: int | None = None) -> SpeechLoader:
    """A deterministic, resumable loader over one epoch of ``dataset``.

    Args:
        dataset: a corpus reader (:func:`adtuning.speech.build_dataset`).
        batch_size: utterances per batch (with ``shard``: per *global* batch, over all ranks).
        shuffle: draw a new order every epoch (training) or keep a fixed one (evaluation).
        seed: the seed of orders, subsets and crops.
        bucket: group utterances of similar length (less padding).
        max_hours: train on a fixed random subset of this many hours (from ``seed``).
        epoch: which epoch's order to produce.
        skip_batches: start after this many batches of the epoch (resume).
        balanced: class-balanced sampling with replacement (``None``: the recipe's choice,
            which is True only for the KS training set).
        drop_last: drop a final incomplete batch.
        num_workers, pin_memory: passed to ``torch.utils.data.DataLoader``.
        shard: ``(rank, world_size)``: yield only this rank's part of each global batch (see
            :func:`shard_batches`; ``None`` for an empty part), the batch dicts carrying the
            global batch's size as ``"global_batch_size"``. The global plan is the
            single-process plan of ``batch_size``.
        max_items: only the first ``max_items`` items of the epoch's plan, in batch order (the
            Fisher pass's sample budget, cut before sharding).
    """
    if balanced is None:
        balanced = shuffle and dataset.sample_weights is not None
    indices = subset_hours(dataset, max_hours, seed) if max_hours is not None else None
    order, batches = plan_batches(dataset, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, bucket=bucket,
                                  indices=indices, balanced=balanced, drop_last=drop_last)
    if max_items is not None:
        batches = limit_items(batches, max_items)
    global_sizes = None
    if shard is not None:
        global_sizes = [len(b) for b in batches]
        batches = shard_batches(batches, *shard)
    return SpeechLoader(dataset, batches, order, seed=seed, epoch=epoch, skip_batches=skip_batches, random=shuffle,
                        num_workers=num_workers, pin_memory=pin_memory, global_sizes=global_sizes)


class BatchStream:
    """An endless, resumable stream of training batches over successive epochs.

    ``next(stream)`` returns the next batch; :meth:`state_dict` / :meth:`load_state_dict`
    save and restore ``{"epoch", "position"}`` exactly (the AD-TUNING search pauses and resumes
    candidates with them). Other arguments are those of :func:`make_loader`.
    """

    def __init__(self, dataset: SpeechDataset, batch_size: int, *, seed: int = 0, **loader_kwargs: Any):
        loader_kwargs.setdefault("shuffle", True)
        self.dataset, self.batch_size, self.seed, self.loader_kwargs = dataset, batch_size, seed, loader_kwargs
        self.epoch, self.position = 0, 0
        self._it: Iterator | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._loader = make_loader(self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch,
                                           skip_batches=self.position, **self.loader_kwargs)
                self._it = iter(self._loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "position"}``: batches of ``epoch`` already returned."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"stream state has seed {state['seed']}, this stream uses {self.seed}")
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None
