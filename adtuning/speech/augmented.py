"""On-the-fly augmentation of a downstream training set (``python -m adtuning.train --augment P``).

:class:`AugmentedDataset` wraps a corpus reader's training split and passes every waveform it
loads through :class:`~adtuning.speech.augment.PretrainingAugmenter`, the audiomentations pipeline
the v2 upstream was pre-trained with (noise, babble from other training clips, simulated rooms,
speed and pitch perturbation, band-limiting, gain), at probability scale ``P``. Dev and test are
never augmented; the Fisher pass reads the training split, so it scores augmented clips.

Each item's degradation is drawn from the loader's per-item generator (seeded by the run's seed,
the epoch and the item's position), so a resumed run sees the very clips an uninterrupted one
would. Items whose labels are frames (``"activity"``: diarization) keep their length: the speed
perturbation is off for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adtuning.speech.augment import PretrainingAugmenter, simulate_rooms
from adtuning.speech.data import SpeechDataset

__all__ = ["AugmentedDataset", "augmented_training_set"]

#: Babble sources drawn from the training clips, and simulated rooms.
BABBLE_CLIPS, ROOMS = 256, 32


class AugmentedDataset(SpeechDataset):
    """``dataset`` with every loaded waveform degraded by ``augmenter`` (see the module docstring).

    Everything but :meth:`load` is the wrapped dataset's: its length, lengths (the planned batch
    sizes are those of the clean clips), labels, task options and sampling weights.
    """

    def __init__(self, dataset: SpeechDataset, augmenter: PretrainingAugmenter):
        self.dataset, self.augmenter = dataset, augmenter
        self.task, self.split, self.sample_rate = dataset.task, dataset.split, dataset.sample_rate
        self.task_kwargs, self.sample_weights, self.skipped = dataset.task_kwargs, dataset.sample_weights, dataset.skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def audio_path(self, index: int) -> str:
        return self.dataset.audio_path(index)

    def lengths(self) -> np.ndarray:
        return self.dataset.lengths()

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """The wrapped item with its ``"wav"`` augmented; ``rng`` None: the clean item (nothing to seed from)."""
        item = self.dataset.load(index, rng)
        if rng is None:
            return item
        return dict(item, wav=self.augmenter(item["wav"], "downstream", int(rng.integers(0, 2**62))))

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.dataset.collate(items)


def _babble(dataset: SpeechDataset, seed: int) -> list[str]:
    """Up to :data:`BABBLE_CLIPS` audio files of ``dataset`` (none if the reader has no files)."""
    order = np.random.default_rng([seed, 17]).permutation(len(dataset))[:BABBLE_CLIPS]
    try:
        return sorted({dataset.audio_path(int(i)) for i in order})
    except NotImplementedError:
        return []


def augmented_training_set(dataset: SpeechDataset, p: float, seed: int, rooms_dir: str | Path) -> AugmentedDataset:
    """``dataset`` (a training split) augmented at probability scale ``p`` in (0, 1]: babble from its
    own clips, :data:`ROOMS` rooms simulated once into ``rooms_dir`` (kept for later runs)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"augmentation probability scale must be in (0, 1], got {p}")
    rooms = simulate_rooms(Path(rooms_dir), ROOMS, seed=1)
    speed = dataset.task != "sd"
    return AugmentedDataset(dataset, PretrainingAugmenter(_babble(dataset, seed), rooms, seed=seed, p=p, speed=speed))
