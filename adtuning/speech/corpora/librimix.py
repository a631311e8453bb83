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

from pathlib import Path

import numpy as np

from adtuning.speech.audio import SAMPLE_RATE, CorpusError, audio_num_samples, read_audio, require_dir, require_file
from adtuning.speech.data import SpeechDataset


def _table(path: Path, min_fields: int) -> list[tuple[int, list[str]]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < min_fields:
            raise CorpusError(f"{path} line {n}: expected at least {min_fields} fields, got {line!r}")
        rows.append((n, parts))
    return rows


class LibriMixDiarizationDataset(SpeechDataset):
    """LibriMix speaker diarization (SD).

    Args:
        root: folder with one Kaldi data folder per split.
        split: ``train``, ``dev`` or ``test``.
        split_dirs: folder names per split (default ``train``/``dev``/``test``).
        chunk_size: label frames per chunk (2000 = 20 s).
        frame_shift: samples per label frame (160).
        num_speakers: speakers per recording (2); a recording with more is an error.

    ``task_kwargs``: ``{"num_speakers", "frame_shift"}`` (the head must use the same).
    """

    task = "sd"

    def __init__(self, root: str | Path, split: str, *, split_dirs: dict[str, str] | None = None,
                 chunk_size: int = 2000, frame_shift: int = 160, num_speakers: int = 2):
        super().__init__(split)
        self.dir = require_dir(Path(root) / (split_dirs or {}).get(split, split), f"LibriMix {split} data folder")
        self.chunk_size, self.frame_shift, self.num_speakers = chunk_size, frame_shift, num_speakers
        scp = require_file(self.dir / "wav.scp", "LibriMix")
        self.wavs: dict[str, Path] = {}
        for n, (rec, *rest) in _table(scp, 2):
            target = " ".join(rest)
            if target.endswith("|") or target == "-":
                raise CorpusError(f"{scp} line {n}: piped/stdin wav.scp entries are not supported ({target!r})")
            path = Path(target)
            if not path.is_absolute():
                path = self.dir / path
            if not path.is_file():
                raise CorpusError(f"LibriMix: audio file not found: {path} ({scp} line {n})")
            self.wavs[rec] = path
        self.turns = self._read_turns()
        durations = {}
        if (self.dir / "reco2dur").is_file():
            durations = {r: float(v) for _, (r, v, *_) in _table(self.dir / "reco2dur", 2)}
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
            raise CorpusError(f"LibriMix ({split}): no audio in {scp}")
        self.task_kwargs = {"num_speakers": num_speakers, "frame_shift": frame_shift}

    def _read_turns(self) -> dict[str, list[tuple[str, float, float]]]:
        turns: dict[str, list[tuple[str, float, float]]] = {}
        seg, u2s, rttm = self.dir / "segments", self.dir / "utt2spk", self.dir / "rttm"
        if seg.is_file() and u2s.is_file():
            utt2spk = {u: s for _, (u, s, *_) in _table(u2s, 2)}
            for n, (utt, rec, st, et, *_) in _table(seg, 4):
                if utt not in utt2spk:
                    raise CorpusError(f"{seg} line {n}: utterance {utt} is not in {u2s}")
                if rec not in self.wavs:
                    raise CorpusError(f"{seg} line {n}: recording {rec} is not in wav.scp")
                turns.setdefault(rec, []).append((utt2spk[utt], float(st), float(et)))
        elif rttm.is_file():
            for n, parts in _table(rttm, 8):
                if parts[0] != "SPEAKER":
                    continue
                rec, st, dur, spk = parts[1], float(parts[3]), float(parts[4]), parts[7]
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
        wav = read_audio(self.wavs[rec], start=st * self.frame_shift, stop=ed * self.frame_shift)
        return {"wav": wav, "activity": self.activity(rec, st, ed), "id": f"{rec}_{st}_{ed}"}
