"""adtuning.speech.augmented: the training-set wrapper of ``--augment``.

Oracles: the wrapped reader itself (every attribute but the waveform is its own, and P = 0 keeps
even the waveform), the seeded generator (the same generator state gives the same clip, another
gives another), and the clip's length (kept when speed perturbation is off).
"""
from __future__ import annotations

import numpy as np
import pytest

from adtuning.speech.augment import PretrainingAugmenter
from adtuning.speech.augmented import AugmentedDataset, augmented_training_set
from adtuning.speech.data import SpeechDataset


class Tones(SpeechDataset):
    task = "ks"

    def __init__(self, n=5, length=8000):
        super().__init__("train")
        t = np.arange(length) / 16_000
        self.wavs = [(0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32) for i in range(n)]
        self.sample_weights = [1.0] * n

    def __len__(self):
        return len(self.wavs)

    def lengths(self):
        return np.array([len(w) for w in self.wavs])

    def load(self, index, rng=None):
        return {"wav": self.wavs[index].copy(), "label": index, "id": str(index)}


def test_items_are_degraded_reproducibly_and_labels_kept():
    base = Tones()
    data = AugmentedDataset(base, PretrainingAugmenter([], [], seed=3, p=1.0))
    assert len(data) == 5 and data.lengths().tolist() == base.lengths().tolist()
    assert data.sample_weights is base.sample_weights and data.task == "ks" and data.split == "train"
    a = [data.load(i, np.random.default_rng([0, 1, i])) for i in range(5)]
    b = [data.load(i, np.random.default_rng([0, 1, i])) for i in range(5)]
    c = [data.load(i, np.random.default_rng([0, 2, i])) for i in range(5)]
    for x, y, z, i in zip(a, b, c, range(5)):
        assert x["label"] == i and x["id"] == str(i) and x["wav"].dtype == np.float32
        assert np.array_equal(x["wav"], y["wav"])
    assert any(x["wav"].shape != base.wavs[i].shape or not np.allclose(x["wav"], base.wavs[i]) for i, x in enumerate(a))
    assert any(x["wav"].shape != z["wav"].shape or not np.array_equal(x["wav"], z["wav"]) for x, z in zip(a, c))
    # Without a generator there is nothing to seed from: the clean item.
    assert np.array_equal(data.load(2)["wav"], base.wavs[2])


def test_without_speed_perturbation_every_clip_keeps_its_length():
    data = AugmentedDataset(Tones(n=8), PretrainingAugmenter([], [], seed=0, p=1.0, speed=False))
    assert all(len(data.load(i, np.random.default_rng(i))["wav"]) == 8000 for i in range(8))
    speedy = AugmentedDataset(Tones(n=8), PretrainingAugmenter([], [], seed=0, p=1.0))
    assert any(len(speedy.load(i, np.random.default_rng(i))["wav"]) != 8000 for i in range(8))


def test_augmented_training_set_checks_p_and_keeps_its_rooms(tmp_path):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        augmented_training_set(Tones(), 0.0, 0, tmp_path)
    data = augmented_training_set(Tones(), 0.5, 0, tmp_path / "rooms")
    assert len(list((tmp_path / "rooms").glob("room_*.wav"))) == 32 and data.augmenter.p == 0.5
