"""Audio decoding for the corpus readers: soundfile only, resampled to 16 kHz when needed.

torchaudio >= 2.9 no longer decodes files without TorchCodec, so every reader goes through
:func:`read_audio`, which turns every failure into a :class:`CorpusError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16000


class CorpusError(RuntimeError):
    """A corpus is missing, malformed, or holds a file or label that cannot be used.

    The message always names the offending folder, file or label.
    """


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`CorpusError` if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise CorpusError(f"{what}: folder not found: {p}")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`CorpusError` if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"{what}: file not found: {p}")
    return p


def audio_num_samples(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> int:
    """Length of an audio file in samples at ``sample_rate``, read from its header."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/TypeError
        if not Path(path).is_file():
            raise CorpusError(f"audio file not found: {path}") from None
        raise CorpusError(f"cannot read audio header of {path}: {exc}") from exc
    if info.samplerate == sample_rate:
        return int(info.frames)
    return round(info.frames * sample_rate / info.samplerate)


def read_audio(
    path: str | os.PathLike,
    *,
    start: int = 0,
    stop: int | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Decode a mono audio file to float32 in [-1, 1] at ``sample_rate``.

    Args:
        path: the audio file (any format libsndfile reads: wav, flac, ogg, ...).
        start, stop: sample range to return, in samples at ``sample_rate`` (``stop=None``:
            to the end). Only that range is decoded when no resampling is needed.
        sample_rate: the rate to return; other rates are converted with
            ``torchaudio.functional.resample``.

    Raises:
        CorpusError: the file is missing, cannot be decoded, is empty, or is not mono.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
        native = info.samplerate
        if native == sample_rate:
            data, _ = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
        else:
            s = int(np.floor(start * native / sample_rate))
            e = None if stop is None else int(np.ceil(stop * native / sample_rate))
            data, _ = sf.read(str(path), start=s, stop=e, dtype="float32", always_2d=True)
    except Exception as exc:
        raise CorpusError(f"cannot decode audio file {path}: {exc}") from exc
    if data.shape[1] != 1:
        raise CorpusError(f"audio file {path} has {data.shape[1]} channels; mono (1 channel) is required")
    wav = data[:, 0]
    if native != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), native, sample_rate).numpy()
        if stop is not None:
            wav = wav[: max(0, stop - start)]
    if wav.size == 0 and (stop is None or stop > start):
        raise CorpusError(f"audio file {path} is empty")
    return np.ascontiguousarray(wav, dtype=np.float32)
