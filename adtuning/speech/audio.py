"""Audio decoding and corpus-file checks shared by every corpus reader.

torchaudio >= 2.9 no longer decodes files without TorchCodec, so every reader decodes through
:func:`read_audio` (soundfile), which checks what it gets and turns every problem into a
:class:`CorpusError` naming the file:

* sample rate: converted with ``torchaudio.functional.resample`` only when ``resample=True``;
  otherwise a file at another rate is refused (file and rate named);
* channels: a multi-channel file is averaged to mono only when ``downmix=True``; otherwise refused;
* length: a file without samples is refused; so is a WAV whose data chunk is cut short
  (truncated download or copy);
* values: NaN or infinite samples (possible in float WAV/FLAC) are refused;
* decoding: any failure of libsndfile (garbage header, corrupt FLAC frame) names the file.

The corpus-file helpers (:func:`read_lines`, :func:`corpus_path`) give list/CSV readers the
same discipline: undecodable text and paths that leave the corpus root are errors naming the
file and line.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16000

# Resampling between rates whose reduced ratio p/q has large terms builds a (q x ~p) sinc kernel
# (7919 Hz -> 16 kHz: 127 M entries); beyond this many entries a header is more likely garbage
# than a real recording, and the conversion would take minutes and gigabytes.
MAX_RESAMPLE_KERNEL = 1 << 22
# Rates a recording can plausibly have; outside them the header is garbage (and resampling 1 Hz
# "audio" to 16 kHz would multiply its length by 16000).
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1000, 768000

AUDIO_OPTIONS = ("resample", "downmix")
"""Reader keyword arguments that set the :func:`read_audio` policy."""


class CorpusError(RuntimeError):
    """A corpus is missing, malformed, or holds a file or label that cannot be used.

    The message always names the offending folder, file or label (and line, for list files).
    """


class MissingDataError(CorpusError):
    """A folder or file a reader needs does not exist, or a split lists nothing.

    For an optional split (a test set) this means "the corpus has no such split"; every other
    :class:`CorpusError` means the split is there but broken, and is never taken for absence.
    """


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`MissingDataError` if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise MissingDataError(f"{what}: folder not found: {p}")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`MissingDataError` if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise MissingDataError(f"{what}: file not found: {p}")
    return p


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (list, split or transcript file).

    Raises:
        CorpusError: the file cannot be read or is not UTF-8 text (NUL bytes count as binary);
            the message names the file and the line of the first bad byte.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{path} line {line}: not UTF-8 text (byte {data[err.start]:#04x})") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise CorpusError(f"{path} line {line}: NUL byte (binary file?)")
    return text.splitlines()


def corpus_path(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a path read from a corpus list file, refusing paths that leave ``root``.

    ``rel`` must be relative and must not climb out of ``root`` (``..``), whatever follows:
    a list file decides which files are read, so ``../../etc/passwd`` is an error, not a file.
    Symbolic links inside the corpus are followed as usual (the check is on the listed text).

    Args:
        root: the corpus folder.
        rel: the path as written in the list file (``/`` separated).
        where: ``"<file> line <n>"``, for the message.

    Raises:
        CorpusError: ``rel`` is empty, absolute, or contains a ``..`` component.
    """
    if not rel or not rel.strip():
        raise CorpusError(f"{where}: empty audio path")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or rel[1:3] == ":\\" or rel[1:3] == ":/":
        raise CorpusError(f"{where}: audio path {rel!r} is absolute; paths must be relative to the corpus root {root}")
    if ".." in pure.parts:
        raise CorpusError(f"{where}: audio path {rel!r} leaves the corpus root {root}")
    return root.joinpath(*pure.parts)


def plain_name(name: str, where: str, what: str) -> str:
    """``name`` if it is a plain file name (an id that names a file in a known folder).

    Raises:
        CorpusError: ``name`` is empty, ``.`` or ``..``, or holds a path separator or NUL: as
            part of a path it could name a file outside the corpus.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise CorpusError(f"{where}: {what} {name[:200]!r} is not a plain file name")
    return name


def audio_options(resample: object = False, downmix: object = False) -> dict[str, bool]:
    """Validated ``{"resample": bool, "downmix": bool}`` for :func:`read_audio` (reader keywords)."""
    out = {}
    for name, value in (("resample", resample), ("downmix", downmix)):
        if not isinstance(value, bool):
            raise CorpusError(f"audio option {name} must be true or false, got {value!r}")
        out[name] = value
    return out


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
    if info.samplerate <= 0:
        raise CorpusError(f"audio file {path} has an invalid sample rate {info.samplerate} Hz")
    return round(info.frames * sample_rate / info.samplerate)


def _wav_data_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE file's ``data`` chunk when it is cut short.

    libsndfile silently decodes whatever part of a truncated WAV is there; a corpus file that
    lost its tail is a broken copy, so the header's size is checked against the file's.
    Streamed WAVs (size 0 or 0xFFFFFFFF, and RF64) have no usable size and are not checked.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return None
                present = size - pos - 8
                return (chunk_size, present) if present < chunk_size else None
            pos += 8 + chunk_size + (chunk_size & 1)
    return None


def _resample_kernel_entries(native: int, target: int) -> int:
    g = math.gcd(native, target)
    p, q = native // g, target // g
    width = math.ceil(6 * p / (0.99 * min(p, q)))
    return q * (p + 2 * width)


def read_audio(
    path: str | os.PathLike,
    *,
    start: int = 0,
    stop: int | None = None,
    sample_rate: int = SAMPLE_RATE,
    resample: bool = False,
    downmix: bool = False,
) -> np.ndarray:
    """Decode a mono audio file to float32 at ``sample_rate``, checking everything on the way.

    Args:
        path: the audio file (any format libsndfile reads: wav, flac, ogg, ...).
        start, stop: sample range to return, in samples at ``sample_rate`` (``stop=None``:
            to the end). Only that range is decoded when no resampling is needed.
        sample_rate: the rate to return.
        resample: convert a file at another rate with ``torchaudio.functional.resample``
            (False: such a file is an error).
        downmix: average the channels of a multi-channel file (False: such a file is an error).

    Returns:
        A 1-D contiguous float32 array (PCM scaled to [-1, 1)).

    Raises:
        CorpusError: naming the file, when it is missing, cannot be decoded, is truncated or
            empty, has another sample rate (without ``resample``) or several channels (without
            ``downmix``), holds NaN/inf samples, or the range ``[start, stop)`` lies beyond its end.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except Exception as exc:  # LibsndfileError, RuntimeError, TypeError depending on the failure
        raise CorpusError(f"cannot decode audio file {path}: {exc}") from exc
    native, channels = int(info.samplerate), int(info.channels)
    shortfall = _wav_data_shortfall(path)
    if shortfall is not None:
        raise CorpusError(f"audio file {path} is truncated: its header declares {shortfall[0]} data bytes, "
                          f"the file holds {shortfall[1]}")
    if info.frames <= 0:
        raise CorpusError(f"audio file {path} is empty (0 samples)")
    if channels != 1 and not downmix:
        raise CorpusError(f"audio file {path} has {channels} channels; mono (1 channel) is required "
                          "(set the reader option downmix=true to average the channels)")
    if native != sample_rate:
        if not resample:
            raise CorpusError(f"audio file {path} has sample rate {native} Hz; {sample_rate} Hz is required "
                              "(set the reader option resample=true to convert)")
        if not MIN_SOURCE_RATE <= native <= MAX_SOURCE_RATE:
            raise CorpusError(f"audio file {path}: sample rate {native} Hz is outside the {MIN_SOURCE_RATE}-"
                              f"{MAX_SOURCE_RATE} Hz of real recordings (corrupt header?)")
        if _resample_kernel_entries(native, sample_rate) > MAX_RESAMPLE_KERNEL:
            raise CorpusError(f"audio file {path}: cannot resample {native} Hz to {sample_rate} Hz "
                              "(the rates have no usable common factor; convert the file first)")
    if native == sample_rate:
        s, e = start, stop
    else:
        s = int(np.floor(start * native / sample_rate))
        e = None if stop is None else int(np.ceil(stop * native / sample_rate))
    try:
        data, _ = sf.read(str(path), start=s, stop=e, dtype="float32", always_2d=True)
    except Exception as exc:
        raise CorpusError(f"cannot decode audio file {path}: {exc}") from exc
    wav = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise CorpusError(f"audio file {path} holds {bad} NaN/inf samples")
    if native != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), native, sample_rate).numpy()
        if stop is not None:
            wav = wav[: max(0, stop - start)]
    if wav.size == 0 and (stop is None or stop > start):
        raise CorpusError(f"audio file {path}: samples [{start}, {stop}) requested, but it holds "
                          f"{audio_num_samples(path, sample_rate)} at {sample_rate} Hz")
    return np.ascontiguousarray(wav, dtype=np.float32)
