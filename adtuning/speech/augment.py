"""On-the-fly waveform augmentation of the pre-training crops, through ``audiomentations``
(and ``pyroomacoustics`` for the simulated rooms).

:class:`PretrainingAugmenter` turns one clean 16 kHz crop into a degraded one:

* **speed** — torchaudio's ``resample`` from 100 to 90-110 (an integer), read back at 16 kHz:
  tempo and pitch change together, as Kaldi's speed perturbation (audiomentations'
  ``Resample`` does the same through librosa, forty times slower); the crop's length changes,
  and :func:`warp_targets` maps the frame targets onto the new frames;
* **pitch** — ``PitchShift`` by up to 3 semitones (length kept);
* **reverberation** — ``ApplyImpulseResponse`` with a bank of shoe-box rooms simulated once by
  pyroomacoustics (:func:`simulate_rooms`; size, absorption, source and microphone drawn from
  the seed);
* **noise** — ``AddColorNoise`` (white to brown) at 5-30 dB SNR;
* **babble** — ``AddBackgroundNoise`` with other utterances of the corpus at 3-20 dB SNR;
* **band-limiting** — one of a telephone-like band-pass (about 300-3400 Hz), a low-pass
  (2-6 kHz) or a high-pass (100-400 Hz);
* **gain** — ``Gain`` of -12 to +6 dB.

With ``colour=True`` (``python -m adtuning.pretrain --augment-colour``), three more degradations
change the spectral colour and fine structure of the voice rather than its surroundings, so that a
model trained on one synthesiser cannot lean on that synthesiser's spectral detail (issue 24: the v2
upstream's features carry over to new espeak-ng voices but not to another synthesiser):

* **equalisation** — ``SevenBandParametricEQ`` of -12 to +12 dB per band;
* **distortion** — ``TanhDistortion`` (0.01-0.3);
* **bit crushing** — ``BitCrush`` to 6-10 bits.

audiomentations draws from Python's ``random`` and numpy's global generator; every call seeds
both from its ``key`` (and restores them afterwards), so one ``(seed, key)`` always gives the
same output: a resumed pre-training run sees the same stream as an uninterrupted one.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np

from adtuning.atomic import atomic_write
from adtuning.speech.synthesis import SAMPLE_RATE, rng, seed_ints, write_wav

__all__ = ["PretrainingAugmenter", "simulate_rooms", "warp_targets"]


def simulate_rooms(folder: str | Path, count: int, seed: int) -> list[Path]:
    """Simulate ``count`` shoe-box rooms with pyroomacoustics (image source method, order 10)
    and write their impulse responses (16 kHz, peak 0.9, at most 0.5 s) as ``room_<k>.wav``
    into ``folder`` (atomically); rooms already there are kept (the result depends only on ``seed`` and
    ``k``). Returns the paths."""
    import pyroomacoustics as pra

    folder = Path(folder)
    paths = []
    for k in range(count):
        path = folder / f"room_{k:03d}.wav"
        paths.append(path)
        if path.is_file():
            continue
        r = rng("rooms", seed, k)
        dims = np.array([r.uniform(3.0, 10.0), r.uniform(3.0, 8.0), r.uniform(2.4, 4.0)])
        absorption = float(r.uniform(0.1, 0.6))
        room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=10)
        source = dims * r.uniform(0.15, 0.85, 3)
        mic = np.clip(source + r.uniform(-1.0, 1.0, 3) * np.array([2.0, 2.0, 0.5]), 0.2, dims - 0.2)
        room.add_source(source)
        room.add_microphone(mic)
        room.compute_rir()
        ir = np.asarray(room.rir[0][0], dtype=np.float64)[: SAMPLE_RATE // 2]
        ir = ir / max(float(np.abs(ir).max()), 1e-12) * 0.9
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: write_wav(Path(tmp), ir))
    return paths


def warp_targets(targets, new_frames: int):
    """Frame targets of a crop whose audio was time-scaled to ``new_frames`` frames: frame t
    takes the target of the original frame nearest to the same instant."""
    import torch

    old = len(targets)
    idx = torch.clamp(torch.round((torch.arange(new_frames, dtype=torch.float64) + 0.5) * old / new_frames - 0.5).long(), 0, old - 1)
    return targets[idx]


class PretrainingAugmenter:
    """Seeded audiomentations pipeline for pre-training crops.

    Args:
        babble: wav files of other utterances (the babble source).
        rooms: impulse-response wav files (:func:`simulate_rooms`); empty: no reverberation.
        seed: with each call's ``key``, seeds everything drawn.
        p: probability scale of the degradations (1.0: the probabilities listed in the module
            docstring; 0: identity).
        speed: whether the speed perturbation (which changes the length) is among them; off for
            audio whose labels are frames.
        colour: add the spectral-colour degradations (module docstring); off, the pipeline and
            its random stream are exactly those without the option.
    """

    def __init__(self, babble: Sequence[str | Path], rooms: Sequence[str | Path], seed: int, p: float = 1.0,
                 speed: bool = True, colour: bool = False):
        import audiomentations as A

        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability scale must be in [0, 1], got {p}")
        self.seed, self.p, self.speed = int(seed), float(p), bool(speed)
        stages = [A.PitchShift(min_semitones=-3.0, max_semitones=3.0, p=0.2 * p)]
        if rooms:
            stages.append(A.ApplyImpulseResponse(ir_path=[str(x) for x in rooms], p=0.3 * p, leave_length_unchanged=True))
        stages.append(A.AddColorNoise(min_snr_db=5.0, max_snr_db=30.0, min_f_decay=-6.0, max_f_decay=0.0, p=0.3 * p))
        if babble:
            stages.append(A.AddBackgroundNoise(sounds_path=[str(x) for x in babble], min_snr_db=3.0, max_snr_db=20.0,
                                               p=0.3 * p))
        stages.append(A.OneOf([
            A.BandPassFilter(min_center_freq=1700.0, max_center_freq=2000.0, min_bandwidth_fraction=1.5,
                             max_bandwidth_fraction=1.8, p=1.0),
            A.LowPassFilter(min_cutoff_freq=2000.0, max_cutoff_freq=6000.0, p=1.0),
            A.HighPassFilter(min_cutoff_freq=100.0, max_cutoff_freq=400.0, p=1.0),
        ], p=0.25 * p))
        if colour:
            stages += [A.SevenBandParametricEQ(min_gain_db=-12.0, max_gain_db=12.0, p=0.4 * p),
                       A.TanhDistortion(min_distortion=0.01, max_distortion=0.3, p=0.15 * p),
                       A.BitCrush(min_bit_depth=6, max_bit_depth=10, p=0.1 * p)]
        stages.append(A.Gain(min_gain_db=-12.0, max_gain_db=6.0, p=0.5 * p))
        self.stages = A.Compose(stages, p=1.0)

    def __call__(self, wav: np.ndarray, *key: object) -> np.ndarray:
        """The augmented copy of ``wav`` (float32, 16 kHz, mono; its length may change by the
        speed perturbation). Equal ``(seed, key)`` give equal output."""
        if self.p == 0.0:
            return np.asarray(wav, dtype=np.float32).copy()
        py_state, np_state = random.getstate(), np.random.get_state()
        s = seed_ints("augment", self.seed, *key)
        try:
            random.seed(s[0] ^ (s[1] << 32))
            np.random.seed(s[2])
            x = np.asarray(wav, dtype=np.float32)
            if random.random() < 0.5 * self.p and self.speed:
                import torch
                import torchaudio.functional as AF

                x = AF.resample(torch.from_numpy(x.copy())[None], 100, random.randint(90, 110))[0].numpy()
            x = self.stages(samples=x, sample_rate=SAMPLE_RATE)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        peak = float(np.abs(x).max(initial=0.0))
        return (x / peak * 0.99 if peak > 0.99 else x).astype(np.float32)
