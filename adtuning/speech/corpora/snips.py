"""SF: Audio SNIPS as s3prl's ``ctc/snips.yaml`` recipe reads it.

Layout: ``root/all.iob.snips.txt`` (lines ``<uid> BOS w1 ... wn EOS<TAB>O t1 ... tn <intent>``,
tags being slot names or ``O``), ``root/slots.txt`` (a header line, then one slot name per
line), and ``root/{train,valid,test}/**/*.wav`` named ``<uid>.wav`` where ``uid`` starts with
the speaker name. Each split keeps the recipe's speakers (train: Ivy, Joanna, Joey, Justin,
Kendra, Kimberly, Matthew, Salli; dev: Aditi, Amy, Geraint, Nicole; test: Brian, Emma,
Raveena, Russell). Wav files without a transcript are skipped and counted, as in the recipe.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from adtuning.speech.audio import CorpusError, MissingDataError, audio_options, read_audio, read_lines, require_dir, require_file
from adtuning.speech.data import SpeechDataset
from adtuning.speech.tasks.text import SlotVocab

SPEAKERS = {
    "train": ("Ivy", "Joanna", "Joey", "Justin", "Kendra", "Kimberly", "Matthew", "Salli"),
    "dev": ("Aditi", "Amy", "Geraint", "Nicole"),
    "test": ("Brian", "Emma", "Raveena", "Russell"),
}
_FOLDER = {"train": "train", "dev": "valid", "test": "test"}


def read_slots(path: Path) -> list[str]:
    """Slot names of ``slots.txt`` (the first line is a header, as s3prl reads it)."""
    lines = [line.strip() for line in read_lines(require_file(path, "SNIPS slot list"))]
    slots: dict[str, int] = {}
    for n, slot in enumerate(lines[1:], start=2):
        if not slot:
            continue
        if slot in slots:
            raise CorpusError(f"{path} line {n}: slot {slot!r} is listed twice (first on line {slots[slot]})")
        slots[slot] = n
    if not slots:
        raise CorpusError(f"{path}: no slot names (the first line is a header)")
    return list(slots)


class SnipsDataset(SpeechDataset):
    """Audio SNIPS (SF).

    Args:
        root: the SNIPS folder.
        split: ``train``, ``dev`` or ``test``.
        speakers: speaker names of this split (default: the recipe's, :data:`SPEAKERS`).
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    Raises:
        CorpusError: naming file and line: a slot listed twice, a transcript line that is not
            ``<uid> BOS words EOS<TAB>O tags intent`` with one tag per word, an utterance id
            listed twice, a tag outside ``slots.txt``; or no transcribed file in the split.

    ``task_kwargs``: ``{"slots": [...]}``. ``unknown_characters`` counts characters mapped to
    ``<unk>`` (the recipe does the same; a warning says how many).
    """

    task = "sf"

    def __init__(self, root: str | Path, split: str, *, speakers: Sequence[str] | None = None,
                 resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        self.root = require_dir(root, "SNIPS")
        self.slots = read_slots(self.root / "slots.txt")
        self.vocab = SlotVocab(self.slots)
        iob_path = require_file(self.root / "all.iob.snips.txt", "SNIPS transcripts")
        transcripts: dict[str, tuple[int, str]] = {}
        for n, line in enumerate(read_lines(iob_path), start=1):
            if line.strip():
                uid, _, rest = line.strip().partition(" ")
                if uid in transcripts:
                    raise CorpusError(f"{iob_path} line {n}: utterance {uid} is listed twice (first on line {transcripts[uid][0]})")
                transcripts[uid] = (n, rest)
        folder = require_dir(self.root / _FOLDER[split], f"SNIPS {split}")
        speakers = tuple(speakers or SPEAKERS[split])
        self.unknown_characters = 0
        self.items: list[tuple[str, Path, list[int]]] = []
        for wav in sorted(folder.rglob("*.wav")):
            uid = wav.name.split(".wav", 1)[0]
            if uid not in transcripts:
                self.skipped["no transcript"] += 1
                continue
            if not any(uid[: len(s)] == s for s in speakers):
                continue
            n, rest = transcripts[uid]
            sent, tab, iobs = rest.partition("\t")
            words, tags = sent.split(" ")[1:-1], iobs.split(" ")[1:-1]
            if not tab or len(words) != len(tags):
                raise CorpusError(f"{iob_path} line {n} ({uid}): expected 'BOS words EOS<TAB>tags', "
                                  f"with one tag per word")
            try:
                ids, unk = self.vocab.encode(words, tags)
            except KeyError as exc:
                raise CorpusError(f"{iob_path} line {n} ({uid}): {exc.args[0]} ({self.root / 'slots.txt'})") from None
            self.unknown_characters += unk
            self.items.append((uid, wav, ids))
        if not self.items:
            raise MissingDataError(f"SNIPS ({split}): no transcribed wav of speakers {', '.join(speakers)} under {folder}")
        if self.skipped["no transcript"]:
            warnings.warn(f"SNIPS ({split}): skipped {self.skipped['no transcript']} wav file(s) without a transcript "
                          f"in {iob_path}", stacklevel=2)
        if self.unknown_characters:
            warnings.warn(f"SNIPS ({split}): {self.unknown_characters} character(s) outside the SF vocabulary were "
                          "mapped to <unk>", stacklevel=2)
        self.task_kwargs = {"slots": list(self.slots)}

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][1])

    def load(self, index, rng=None):
        uid, path, targets = self.items[index]
        return {"wav": read_audio(path, **self.audio), "targets": targets, "id": uid}
