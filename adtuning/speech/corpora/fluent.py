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

SLOTS = ("action", "object", "location")
_COLUMNS = ("path", *SLOTS)
_CSV = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}


def _read_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``[(line number, row)]`` of a split CSV, every row complete (blank lines skipped).

    Raises:
        CorpusError: naming the file and line: not UTF-8, malformed CSV, a missing or repeated
            column, a row with another number of fields than the header, an empty path or slot.
    """
    reader = csv.reader(read_lines(path))
    try:
        header = next(reader, None)
        if header is None:
            raise CorpusError(f"{path}: empty file (no header line)")
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise CorpusError(f"{path} line 1: missing column(s) {missing} (header: {header})")
        repeated = [c for c in _COLUMNS if header.count(c) > 1]
        if repeated:
            raise CorpusError(f"{path} line 1: column(s) {repeated} appear more than once")
        rows = []
        for fields in reader:
            n = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                raise CorpusError(f"{path} line {n}: {len(fields)} fields, but the header has {len(header)}")
            row = dict(zip(header, fields))
            empty = [c for c in _COLUMNS if not row[c].strip()]
            if empty:
                raise CorpusError(f"{path} line {n}: empty {', '.join(empty)}")
            rows.append((n, row))
    except csv.Error as err:  # e.g. an unterminated quote or a field over csv's size limit
        raise CorpusError(f"{path} line {reader.line_num}: malformed CSV: {err}") from None
    return rows


class FluentCommandsDataset(SpeechDataset):
    """Fluent Speech Commands (IC).

    Args:
        root: the ``fluent_speech_commands_dataset`` folder.
        split: ``train``, ``dev`` or ``test``.
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    ``task_kwargs``: ``{"values_per_slot": [n_action, n_object, n_location]}``;
    ``slot_values``: the value names of each slot, in label order.

    Raises:
        CorpusError: naming file and line: a malformed CSV (see :func:`_read_csv`), an empty
            split, a path outside ``root`` or whose audio file is missing, a file listed twice
            or also listed in the training CSV, a dev/test slot value the training CSV lacks.
    """

    task = "ic"

    def __init__(self, root: str | Path, split: str, *, resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        self.root = require_dir(root, "Fluent Speech Commands")
        train_csv = require_file(self.root / "data" / _CSV["train"], "Fluent Speech Commands")
        train_rows = _read_csv(train_csv)
        if not train_rows:
            raise CorpusError(f"{train_csv}: no rows (the training split is empty)")
        self.slot_values: list[list[str]] = []
        for slot in SLOTS:
            seen: dict[str, None] = {}
            for _, row in train_rows:
                seen.setdefault(row[slot], None)
            self.slot_values.append(list(seen))
        index = [{v: i for i, v in enumerate(vals)} for vals in self.slot_values]
        csv_path = self.root / "data" / _CSV[split]
        rows = train_rows if split == "train" else _read_csv(require_file(csv_path, "Fluent Speech Commands"))
        # Dev/test files that are also training files would make the scores meaningless.
        in_train = {} if split == "train" else {
            corpus_path(self.root, row["path"], f"{train_csv} line {n}"): n for n, row in train_rows}
        first_line: dict[Path, int] = {}
        self.items: list[tuple[Path, list[int]]] = []
        for n, row in rows:
            where = f"{csv_path} line {n}"
            path = corpus_path(self.root, row["path"], where)
            if path in first_line:
                raise CorpusError(f"{where}: {row['path']!r} is listed twice (first on line {first_line[path]})")
            if path in in_train:
                raise CorpusError(f"{where}: {row['path']!r} is also in the training set ({train_csv} line {in_train[path]})")
            first_line[path] = n
            labels = []
            for k, slot in enumerate(SLOTS):
                if row[slot] not in index[k]:
                    raise CorpusError(f"{where}: {slot} value {row[slot]!r} does not occur in the training set")
                labels.append(index[k][row[slot]])
            if not path.is_file():
                raise CorpusError(f"{where}: audio file not found: {path}")
            self.items.append((path, labels))
        if not self.items:
            raise MissingDataError(f"{csv_path}: no rows (the {split} split is empty)")
        self.task_kwargs = {"values_per_slot": [len(v) for v in self.slot_values]}

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][0])

    def load(self, index, rng=None):
        path, labels = self.items[index]
        return {"wav": read_audio(path, **self.audio), "labels": labels, "id": path.stem}
