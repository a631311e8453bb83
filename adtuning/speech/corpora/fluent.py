"""IC: Fluent Speech Commands as s3prl's ``fluent_commands`` recipe reads it.

Layout: ``root/data/{train,valid,test}_data.csv`` with columns ``path, speakerId,
transcription, action, object, location`` (plus a leading index column); ``path`` is relative
to ``root`` (``wavs/speakers/<speaker>/<file>.wav``). The values of each slot are numbered in
order of first appearance in the training CSV, for every split; a dev/test value that the
training CSV does not have is an error.
"""
from __future__ import annotations

import csv
from pathlib import Path

from adtuning.speech.audio import CorpusError, read_audio, require_dir, require_file
from adtuning.speech.data import SpeechDataset

SLOTS = ("action", "object", "location")
_CSV = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", *SLOTS) if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}")
        return list(reader)


class FluentCommandsDataset(SpeechDataset):
    """Fluent Speech Commands (IC).

    Args:
        root: the ``fluent_speech_commands_dataset`` folder.
        split: ``train``, ``dev`` or ``test``.

    ``task_kwargs``: ``{"values_per_slot": [n_action, n_object, n_location]}``;
    ``slot_values``: the value names of each slot, in label order.
    """

    task = "ic"

    def __init__(self, root: str | Path, split: str):
        super().__init__(split)
        self.root = require_dir(root, "Fluent Speech Commands")
        train_rows = _read_csv(require_file(self.root / "data" / _CSV["train"], "Fluent Speech Commands"))
        self.slot_values: list[list[str]] = []
        for slot in SLOTS:
            seen: dict[str, None] = {}
            for row in train_rows:
                seen.setdefault(row[slot], None)
            self.slot_values.append(list(seen))
        index = [{v: i for i, v in enumerate(vals)} for vals in self.slot_values]
        csv_path = self.root / "data" / _CSV[split]
        rows = train_rows if split == "train" else _read_csv(require_file(csv_path, "Fluent Speech Commands"))
        self.items: list[tuple[Path, list[int]]] = []
        for n, row in enumerate(rows, start=2):
            labels = []
            for k, slot in enumerate(SLOTS):
                if row[slot] not in index[k]:
                    raise CorpusError(f"{csv_path} line {n}: {slot} value {row[slot]!r} does not occur "
                                      "in the training set")
                labels.append(index[k][row[slot]])
            self.items.append((self.root / row["path"], labels))
        if not self.items:
            raise CorpusError(f"{csv_path}: no rows")
        self.task_kwargs = {"values_per_slot": [len(v) for v in self.slot_values]}

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][0])

    def load(self, index, rng=None):
        path, labels = self.items[index]
        return {"wav": read_audio(path), "labels": labels, "id": path.stem}
