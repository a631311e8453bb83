"""KS: Speech Commands v0.01 as s3prl's ``speech_commands`` recipe reads it.

Layout: ``root`` is the unpacked ``speech_commands_v0.01`` folder (one folder per word,
``_background_noise_/``, ``validation_list.txt``, ``testing_list.txt``); the test set is the
separate ``speech_commands_test_set_v0.01`` archive (folders for the ten words,
``_unknown_`` and ``_silence_``), by default the sibling of ``root``.

Train/dev: clips listed in ``validation_list.txt`` are dev, those in ``testing_list.txt`` are
dropped, the rest is train (without the list files, the speaker-hash rule that produced them
is applied). Words outside the ten keywords are ``_unknown_``; every ``_background_noise_``
file is one ``_silence_`` item, of which a random 1 s crop is used. Training samples classes
with replacement in inverse proportion to their frequency (``sample_weights``). Audio gets
the recipe's -3 dB gain.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from adtuning.speech.audio import (
    SAMPLE_RATE,
    CorpusError,
    MissingDataError,
    audio_options,
    corpus_path,
    read_audio,
    read_lines,
    require_dir,
)
from adtuning.speech.data import SpeechDataset

CLASSES = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_")
TEST_SET_DIRNAME = "speech_commands_test_set_v0.01"
_GAIN = 10.0 ** (-3.0 / 20.0)
_MAX_PER_CLASS = 2**27 - 1


def _hash_split(name: str) -> str:
    speaker = re.sub(r"_nohash_.*$", "", name)
    h = int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16)
    pct = (h % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    return "dev" if pct < 10 else "test" if pct < 20 else "train"


def _read_list(root: Path, path: Path) -> dict[str, int]:
    """``{"<word>/<file>.wav": line}`` of ``validation_list.txt`` / ``testing_list.txt``.

    Raises:
        CorpusError: naming the file and line: an entry that is not ``<word>/<file>.wav``,
            leaves ``root``, is listed twice, or names a file that does not exist.
    """
    entries: dict[str, int] = {}
    for n, line in enumerate(read_lines(path), start=1):
        rel = line.strip()
        if not rel:
            continue
        where = f"{path} line {n}"
        audio = corpus_path(root, rel, where)
        if len(audio.relative_to(root).parts) != 2 or not rel.endswith(".wav"):
            raise CorpusError(f"{where}: expected '<word>/<file>.wav', got {rel[:200]!r}")
        if rel in entries:
            raise CorpusError(f"{where}: {rel} is listed twice (first on line {entries[rel]})")
        if not audio.is_file():
            raise CorpusError(f"{where}: listed file not found: {audio}")
        entries[rel] = n
    return entries


class SpeechCommandsDataset(SpeechDataset):
    """Speech Commands v0.01 (KS, 12 classes).

    Args:
        root: the ``speech_commands_v0.01`` folder.
        split: ``train``, ``dev`` or ``test``.
        test_root: the ``speech_commands_test_set_v0.01`` folder (default: sibling of ``root``).
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    Raises:
        CorpusError: a missing folder, an unknown class folder in the test set, a word folder
            named ``_silence_``, only one of the two list files, a bad list entry (see
            :func:`_read_list`), a clip in both lists, or an empty split.
    """

    task = "ks"

    def __init__(self, root: str | Path, split: str, *, test_root: str | Path | None = None,
                 resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        self.class_index = {c: i for i, c in enumerate(CLASSES)}
        self.items: list[tuple[int, Path]] = []
        if split == "test":
            troot = Path(test_root) if test_root is not None else Path(root).parent / TEST_SET_DIRNAME
            self.root = require_dir(troot, "Speech Commands test set")
            for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
                if d.name not in self.class_index:
                    raise CorpusError(f"Speech Commands test set: unknown class folder {d} "
                                      f"(expected {', '.join(CLASSES)})")
                self.items += [(self.class_index[d.name], f) for f in sorted(d.glob("*.wav"))]
        else:
            self.root = require_dir(root, "Speech Commands v0.01")
            val_list, test_list = self.root / "validation_list.txt", self.root / "testing_list.txt"
            lists = None
            if val_list.is_file() != test_list.is_file():
                # With one list the other split would silently come from the hash rule instead.
                present, absent = (val_list, test_list) if val_list.is_file() else (test_list, val_list)
                raise CorpusError(f"Speech Commands: {present} exists but {absent} does not; "
                                  "provide both lists or neither (then the hash rule splits the clips)")
            if val_list.is_file():
                lists = (_read_list(self.root, val_list), _read_list(self.root, test_list))
                both = sorted(set(lists[0]) & set(lists[1]))
                if both:
                    raise CorpusError(f"{test_list} line {lists[1][both[0]]}: {both[0]} is also in {val_list} "
                                      f"(line {lists[0][both[0]]}); a clip belongs to one split")
            unknown = self.class_index["_unknown_"]
            for d in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != "_background_noise_"):
                label = self.class_index.get(d.name, unknown)
                if label == self.class_index["_silence_"]:
                    raise CorpusError(f"Speech Commands: a word folder may not be named _silence_: {d}")
                for f in sorted(d.glob("*.wav")):
                    rel = f"{d.name}/{f.name}"
                    if lists is not None:
                        which = "dev" if rel in lists[0] else "test" if rel in lists[1] else "train"
                    else:
                        which = _hash_split(f.name)
                    if which == split:
                        self.items.append((label, f))
            noise = self.root / "_background_noise_"
            if noise.is_dir():
                self.items += [(self.class_index["_silence_"], f) for f in sorted(noise.glob("*.wav"))]
            counts = np.bincount([c for c, _ in self.items], minlength=len(CLASSES))
            if split == "train":
                self.sample_weights = [len(self.items) / counts[c] for c, _ in self.items]
        if not self.items:
            raise MissingDataError(f"Speech Commands ({split}): no .wav files found under {self.root}")
        self.task_kwargs = {"num_classes": len(CLASSES)}

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][1])

    def lengths(self) -> np.ndarray:
        """All clips are (at most) 1 s; ``_silence_`` items are 1 s crops."""
        return np.full(len(self.items), SAMPLE_RATE, dtype=np.int64)

    def load(self, index, rng=None):
        label, path = self.items[index]
        if label == self.class_index["_silence_"] and self.split != "test":
            wav = read_audio(path, **self.audio)
            if len(wav) > SAMPLE_RATE:
                rng = rng or np.random.default_rng(index)
                start = int(rng.integers(0, len(wav) - SAMPLE_RATE + 1))
                wav = wav[start:start + SAMPLE_RATE]
        else:
            wav = read_audio(path, **self.audio)
        return {"wav": wav * _GAIN, "label": label, "id": f"{path.parent.name}/{path.stem}"}
