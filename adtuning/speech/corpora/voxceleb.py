"""SID: VoxCeleb1 identification as s3prl's ``voxceleb1`` recipe reads it.

Layout: ``root/wav/<speaker>/<video>/<n>.wav`` (or ``root/<part>/wav/...``, e.g. the ``dev``
and ``test`` archives unpacked side by side) and the split list ``iden_split.txt`` (lines
``<1|2|3> <speaker>/<video>/<n>.wav``: 1 train, 2 dev, 3 test), by default in ``root``.
Speakers are numbered in sorted order of the ids in the split list (id10001 -> 0, ... as s3prl).
Training utterances longer than ``max_timestep`` samples (8 s) are randomly cropped; audio is
peak-normalised (the recipe's sox ``norm``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from adtuning.speech.audio import (
    CorpusError,
    MissingDataError,
    audio_options,
    corpus_path,
    read_audio,
    read_lines,
    require_dir,
    require_file,
)
from adtuning.speech.data import SpeechDataset

_SPLIT_ID = {"train": "1", "dev": "2", "test": "3"}


class VoxCeleb1Dataset(SpeechDataset):
    """VoxCeleb1 speaker identification (SID).

    Args:
        root: the VoxCeleb1 folder.
        split: ``train``, ``dev`` or ``test``.
        split_file: the ``iden_split.txt`` list (default ``root/iden_split.txt``).
        max_timestep: training crop length in samples (128000; None: no crop).
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    Raises:
        CorpusError: naming the split list and line: a malformed line, a path that leaves the
            corpus, an utterance listed twice, a speaker without training utterances, a listed
            file that is missing; or an empty split.
    """

    task = "sid"

    def __init__(self, root: str | Path, split: str, *, split_file: str | Path | None = None,
                 max_timestep: int | None = 128000, resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        self.root = require_dir(root, "VoxCeleb1")
        split_file = require_file(split_file or self.root / "iden_split.txt", "VoxCeleb1 split list")
        wav_dirs = [d for d in [self.root / "wav"] + [p / "wav" for p in sorted(self.root.iterdir()) if p.is_dir()]
                    if d.is_dir()]
        if not wav_dirs:
            raise CorpusError(f"VoxCeleb1: no wav/ folder in {self.root} or its subfolders")
        entries = []  # (line, split id, relative path)
        first_line: dict[str, int] = {}
        for n, line in enumerate(read_lines(split_file), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ("1", "2", "3") or parts[1].count("/") != 2:
                raise CorpusError(f"{split_file} line {n}: expected '<1|2|3> <speaker>/<video>/<file>.wav', "
                                  f"got {line[:200]!r}")
            rel = parts[1]
            corpus_path(self.root, rel, f"{split_file} line {n}")  # refuses '..' and absolute paths
            if any(not part for part in rel.split("/")):
                raise CorpusError(f"{split_file} line {n}: empty speaker, video or file name in {rel!r}")
            if rel in first_line:
                raise CorpusError(f"{split_file} line {n}: {rel} is listed twice (first on line {first_line[rel]})")
            first_line[rel] = n
            entries.append((n, parts[0], rel))
        speakers = sorted({rel.split("/")[0] for _, _, rel in entries})
        # A class without training utterances cannot be learnt: the split list is wrong.
        trained = {rel.split("/")[0] for _, which, rel in entries if which == "1"}
        for n, _, rel in entries:
            if rel.split("/")[0] not in trained:
                raise CorpusError(f"{split_file} line {n}: speaker {rel.split('/')[0]} has no training utterance "
                                  "(split id 1)")
        self.speaker_index = {s: i for i, s in enumerate(speakers)}
        self.items: list[tuple[Path, int]] = []
        for n, which, rel in entries:
            if which != _SPLIT_ID[split]:
                continue
            path = next((d / rel for d in wav_dirs if (d / rel).is_file()), None)
            if path is None:
                raise CorpusError(f"VoxCeleb1: audio file not found: {rel} (listed in {split_file} line {n}; looked in "
                                  f"{', '.join(str(d) for d in wav_dirs)})")
            self.items.append((path, self.speaker_index[rel.split("/")[0]]))
        if not self.items:
            raise MissingDataError(f"VoxCeleb1 ({split}): {split_file} lists no utterance with split id {_SPLIT_ID[split]}")
        self.max_timestep = max_timestep
        self.task_kwargs = {"num_classes": len(speakers)}

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][0])

    def load(self, index, rng=None):
        path, label = self.items[index]
        wav = read_audio(path, **self.audio)
        if self.split == "train" and self.max_timestep and len(wav) > self.max_timestep:
            rng = rng or np.random.default_rng(index)
            start = int(rng.integers(0, len(wav) - self.max_timestep + 1))
            wav = wav[start:start + self.max_timestep]
        peak = float(np.abs(wav).max()) if wav.size else 0.0
        if peak > 0:
            wav = wav / peak
        rel = path.relative_to(path.parents[2])
        return {"wav": wav, "label": label, "id": str(rel.with_suffix(""))}
