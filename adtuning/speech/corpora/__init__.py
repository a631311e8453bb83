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

    Raises:
        adtuning.speech.audio.CorpusError: missing folders/files, malformed lists, unknown labels.
    """
    if task_name == "ks":
        return SpeechCommandsDataset(root, split, **kw)
    if task_name == "ic":
        return FluentCommandsDataset(root, split, **kw)
    if task_name == "sid":
        return VoxCeleb1Dataset(root, split, **kw)
    if task_name in ("asr", "pr"):
        return LibriSpeechDataset(root, split, task=task_name, **kw)
    if task_name == "sf":
        return SnipsDataset(root, split, **kw)
    if task_name == "sd":
        return LibriMixDiarizationDataset(root, split, **kw)
    raise ValueError(f"unknown task {task_name!r}; choose one of ks, ic, sid, asr, pr, sf, sd")


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
