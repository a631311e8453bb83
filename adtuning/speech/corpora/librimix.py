"""SD: LibriMix two-speaker mixtures in Kaldi data folders, as s3prl's ``diarization`` recipe
reads them (``downstream/diarization/data/{train,dev,test}``).

Each split folder holds ``wav.scp`` (``<recording> <path>``), ``segments`` (``<utt> <recording>
<start s> <end s>``) and ``utt2spk`` (``<utt> <speaker>``), optionally ``reco2dur``
(``<recording> <seconds>``; read from the audio header when absent). Without ``segments`` /
``utt2spk`` the speaker turns are read from ``rttm`` (``SPEAKER <rec> 1 <start> <dur> <NA> <NA>
<speaker> ...``). Recordings are cut into chunks of ``chunk_size`` label frames of
``frame_shift`` samples (the last, shorter chunk kept); labels are per-frame speaker
activities, speakers ordered by sorted id within the recording.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adtuning.speech.audio import (
    SAMPLE_RATE,
    CorpusError,
    MissingDataError,
    audio_num_samples,
    audio_options,
    read_audio,
    read_lines,
    require_dir,
    require_file,
)
from adtuning.speech.data import SpeechDataset


def _table(path: Path, min_fields: int, unique: bool = False) -> list[tuple[int, list[str]]]:
    """The rows of a Kaldi table (``(line, fields)``, blank lines skipped); with ``unique`` the
    first field (the key) may appear only once."""
    rows = []
    first: dict[str, int] = {}
    for n, line in enumerate(read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < min_fields:
            raise CorpusError(f"{path} line {n}: expected at least {min_fields} fields, got {line[:200]!r}")
        if unique:
            if parts[0] in first:
                raise CorpusError(f"{path} line {n}: {parts[0]} is listed twice (first on line {first[parts[0]]})")
            first[parts[0]] = n
        rows.append((n, parts))
    return rows


def _seconds(value: str, path: Path, n: int, what: str) -> float:
    """A time in seconds from a Kaldi table: finite and not negative."""
    try:
        seconds = float(value)
    except ValueError:
        raise CorpusError(f"{path} line {n}: {what} {value[:40]!r} is not a number") from None
    if not (seconds >= 0 and seconds != float("inf")):
        raise CorpusError(f"{path} line {n}: {what} {value[:40]!r} must be a finite time >= 0 s")
    return seconds


class LibriMixDiarizationDataset(SpeechDataset):
    """LibriMix speaker diarization (SD).

    Args:
        root: folder with one Kaldi data folder per split.
        split: ``train``, ``dev`` or ``test``.
        split_dirs: folder names per split (default ``train``/``dev``/``test``).
        chunk_size: label frames per chunk (2000 = 20 s).
        frame_shift: samples per label frame (160).
        num_speakers: speakers per recording (2); a recording with more is an error.
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    ``wav.scp`` paths may be absolute (Kaldi's convention); relative ones are read from the
    split folder and must stay inside ``root``.

    Raises:
        CorpusError: naming file and line: a short row, a key listed twice, a time that is not a
            number >= 0 (or a turn that ends before it starts), a relative path leaving
            ``root``, a piped entry, a missing audio file, a turn of an unknown recording or
            utterance, too many speakers; or a split without audio.

    ``task_kwargs``: ``{"num_speakers", "frame_shift"}`` (the head must use the same).
    """

    task = "sd"

    def __init__(self, root: str | Path, split: str, *, split_dirs: dict[str, str] | None = None,
                 chunk_size: int = 2000, frame_shift: int = 160, num_speakers: int = 2,
                 resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        root = require_dir(root, "LibriMix")
        self.dir = require_dir(root / (split_dirs or {}).get(split, split), f"LibriMix {split} data folder")
        inside = os.path.normpath(os.path.abspath(root))
        self.chunk_size, self.frame_shift, self.num_speakers = chunk_size, frame_shift, num_speakers
        scp = require_file(self.dir / "wav.scp", "LibriMix")
        self.wavs: dict[str, Path] = {}
        for n, (rec, *rest) in _table(scp, 2, unique=True):
            target = " ".join(rest)
            if target.endswith("|") or target == "-":
                raise CorpusError(f"{scp} line {n}: piped/stdin wav.scp entries are not supported ({target[:200]!r})")
            path = Path(target)
            if not path.is_absolute():
                path = self.dir / path
                if os.path.commonpath([inside, os.path.normpath(os.path.abspath(path))]) != inside:
                    raise CorpusError(f"{scp} line {n}: audio path {target[:200]!r} leaves the corpus root {root}")
            if not path.is_file():
                raise CorpusError(f"LibriMix: audio file not found: {path} ({scp} line {n})")
            self.wavs[rec] = path
        self.turns = self._read_turns()
        durations = {}
        if (self.dir / "reco2dur").is_file():
            reco2dur = self.dir / "reco2dur"
            durations = {r: _seconds(v, reco2dur, n, "duration") for n, (r, v, *_) in _table(reco2dur, 2, unique=True)}
        self.chunks: list[tuple[str, int, int]] = []
        for rec in sorted(self.wavs):
            speakers = sorted({spk for spk, _, _ in self.turns.get(rec, [])})
            if len(speakers) > num_speakers:
                raise CorpusError(f"LibriMix recording {rec} has {len(speakers)} speakers ({speakers}); "
                                  f"num_speakers is {num_speakers}")
            seconds = durations.get(rec)
            # round, not truncate: reco2dur holds rounded decimals (2.01 s * 16000 = 32159.999...)
            n_samples = round(seconds * SAMPLE_RATE) if seconds is not None else audio_num_samples(self.wavs[rec])
            n_frames = n_samples // frame_shift
            for st in range(0, n_frames, chunk_size):
                self.chunks.append((rec, st, min(n_frames, st + chunk_size)))
        if not self.chunks:
            raise MissingDataError(f"LibriMix ({split}): no audio in {scp}")
        self.task_kwargs = {"num_speakers": num_speakers, "frame_shift": frame_shift}

    def _read_turns(self) -> dict[str, list[tuple[str, float, float]]]:
        turns: dict[str, list[tuple[str, float, float]]] = {}
        seg, u2s, rttm = self.dir / "segments", self.dir / "utt2spk", self.dir / "rttm"
        if seg.is_file() and u2s.is_file():
            utt2spk = {u: s for _, (u, s, *_) in _table(u2s, 2, unique=True)}
            for n, (utt, rec, st, et, *_) in _table(seg, 4, unique=True):
                if utt not in utt2spk:
                    raise CorpusError(f"{seg} line {n}: utterance {utt} is not in {u2s}")
                if rec not in self.wavs:
                    raise CorpusError(f"{seg} line {n}: recording {rec} is not in wav.scp")
                start, end = _seconds(st, seg, n, "start"), _seconds(et, seg, n, "end")
                if end < start:
                    raise CorpusError(f"{seg} line {n}: the turn ends ({et}) before it starts ({st})")
                turns.setdefault(rec, []).append((utt2spk[utt], start, end))
        elif rttm.is_file():
            for n, parts in _table(rttm, 8):
                if parts[0] != "SPEAKER":
                    continue
                rec, st, dur, spk = parts[1], _seconds(parts[3], rttm, n, "start"), _seconds(parts[4], rttm, n, "duration"), parts[7]
                if rec not in self.wavs:
                    raise CorpusError(f"{rttm} line {n}: recording {rec} is not in wav.scp")
                turns.setdefault(rec, []).append((spk, st, st + dur))
        else:
            raise CorpusError(f"LibriMix data folder {self.dir}: needs segments + utt2spk, or rttm")
        return turns

    def __len__(self) -> int:
        return len(self.chunks)

    def lengths(self) -> np.ndarray:
        return np.asarray([(ed - st) * self.frame_shift for _, st, ed in self.chunks], dtype=np.int64)

    def activity(self, rec: str, start: int, end: int) -> np.ndarray:
        """``[end - start, num_speakers]`` 0/1 activities of label frames ``start:end`` of ``rec``."""
        turns = self.turns.get(rec, [])
        speakers = sorted({spk for spk, _, _ in turns})
        act = np.zeros((end - start, self.num_speakers), dtype=np.float32)
        for spk, st, et in turns:
            s = int(np.rint(st * SAMPLE_RATE / self.frame_shift))
            e = int(np.rint(et * SAMPLE_RATE / self.frame_shift))
            s, e = max(s, start), min(e, end)
            if s < e:
                act[s - start:e - start, speakers.index(spk)] = 1.0
        return act

    def load(self, index, rng=None):
        rec, st, ed = self.chunks[index]
        wav = read_audio(self.wavs[rec], start=st * self.frame_shift, stop=ed * self.frame_shift, **self.audio)
        return {"wav": wav, "activity": self.activity(rec, st, ed), "id": f"{rec}_{st}_{ed}"}
