"""Corpus readers for the seven SUPERB tasks, and :func:`build_dataset`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adtuning.speech.corpora.fluent import FluentCommandsDataset
from adtuning.speech.corpora.librimix import LibriMixDiarizationDataset
from adtuning.speech.corpora.librispeech import LibriSpeechDataset
from adtuning.speech.corpora.snips import SnipsDataset
from adtuning.speech.corpora.speech_commands import CLASSES as KS_CLASSES
from adtuning.speech.corpora.speech_commands import SpeechCommandsDataset
from adtuning.speech.corpora.voxceleb import VoxCeleb1Dataset
from adtuning.speech.data import SpeechDataset


def build_dataset(task_name: str, root: str | Path, split: str, **kw: Any) -> SpeechDataset:
    """The corpus reader of a task.

    Args:
        task_name: ``ks`` (Speech Commands v0.01; ``test_root=``), ``ic`` (Fluent Speech
            Commands), ``sid`` (VoxCeleb1; ``split_file=``, ``max_timestep=``), ``asr`` /
            ``pr`` (LibriSpeech; ``subsets=``, and for PR ``lexicon=`` (required)), ``sf``
            (Audio SNIPS; ``speakers=``), ``sd`` (LibriMix Kaldi folders; ``split_dirs=``,
            ``chunk_size=``, ``frame_shift=``, ``num_speakers=``).
        root: the corpus folder (see each reader for its layout).
        split: ``train``, ``dev`` or ``test``.
        **kw: reader options; every reader takes ``resample=`` and ``downmix=``, the audio
            policy of :func:`adtuning.speech.audio.read_audio` (files that are not 16 kHz mono
            are errors unless they are true).

    Raises:
        adtuning.speech.audio.CorpusError: malformed lists, unknown labels, bad options
            (:class:`~adtuning.speech.audio.MissingDataError` for missing folders/files and
            empty splits).
    """
    readers = {"ks": SpeechCommandsDataset, "ic": FluentCommandsDataset, "sid": VoxCeleb1Dataset,
               "asr": LibriSpeechDataset, "pr": LibriSpeechDataset, "sf": SnipsDataset, "sd": LibriMixDiarizationDataset}
    if task_name not in readers:
        raise ValueError(f"unknown task {task_name!r}; choose one of ks, ic, sid, asr, pr, sf, sd")
    reader = readers[task_name]
    if task_name in ("asr", "pr"):
        return reader(root, split, task=task_name, **kw)
    return reader(root, split, **kw)


__all__ = [
    "KS_CLASSES",
    "FluentCommandsDataset",
    "LibriMixDiarizationDataset",
    "LibriSpeechDataset",
    "SnipsDataset",
    "SpeechCommandsDataset",
    "VoxCeleb1Dataset",
    "build_dataset",
]
