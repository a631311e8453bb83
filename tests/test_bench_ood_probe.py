"""bench/ood_probe.py: the nearest-centroid probe and the leave-one-speaker-out split.

Oracles written by hand: points placed at known distances from known centroids, and a set whose
speakers each say every class, where holding a speaker out must leave the fit without it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ood_probe  # noqa: E402


def test_nearest_centroid_picks_the_closest_class_direction():
    fit = np.array([[1.0, 0.0], [1.2, 0.1], [0.0, 1.0], [0.1, 1.3], [-1.0, -1.0], [-1.1, -0.9]])
    labels = ["a", "a", "b", "b", "c", "c"]
    x = np.array([[2.0, 0.2], [0.0, 3.0], [-0.5, -0.6]])
    assert ood_probe.nearest_centroid(fit, labels, x) == ["a", "b", "c"]


def test_leave_one_speaker_out_never_fits_on_the_held_out_speaker():
    # Two classes; speaker "odd" says them with swapped features, so fitting on it as well would
    # get its clips right, and holding it out gets them wrong.
    x = np.array([[1.0, 0.0], [0.0, 1.0]] * 3 + [[0.0, 1.0], [1.0, 0.0]])
    labels = ["a", "b"] * 4
    speakers = ["s1", "s1", "s2", "s2", "s3", "s3", "odd", "odd"]
    assert ood_probe.leave_one_speaker_out(x, labels, speakers) == 6 / 8


def test_clips_reads_class_and_speaker_from_the_layout(tmp_path):
    for rel in ("yes/yes_03fest_nohash_0.wav", "_unknown_/bed_11espe_nohash_0.wav", "_silence_/silence_03fest_nohash_0.wav",
                "no/0e6aee69_nohash_2.wav", "_silence_/white_noise_4.wav"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.zeros(160, dtype=np.float32), 16_000)
    paths, labels, speakers = ood_probe.clips(tmp_path)
    got = {p.relative_to(tmp_path).as_posix(): (y, s) for p, y, s in zip(paths, labels, speakers)}
    assert got == {"yes/yes_03fest_nohash_0.wav": ("yes", "03fest"), "_unknown_/bed_11espe_nohash_0.wav": ("_unknown_", "11espe"),
                   "_silence_/silence_03fest_nohash_0.wav": ("_silence_", "03fest"), "no/0e6aee69_nohash_2.wav": ("no", "0e6aee69"),
                   "_silence_/white_noise_4.wav": ("_silence_", "white_noise_4")}
