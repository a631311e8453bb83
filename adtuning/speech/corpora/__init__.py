"""Corpus readers for the seven SUPERB tasks (:func:`adtuning.speech.registry.build_dataset` picks one)."""
from __future__ import annotations

from adtuning.speech.corpora.fluent import FluentCommandsDataset
from adtuning.speech.corpora.librimix import LibriMixDiarizationDataset
from adtuning.speech.corpora.librispeech import LibriSpeechDataset
from adtuning.speech.corpora.snips import SnipsDataset
from adtuning.speech.corpora.speech_commands import CLASSES as KS_CLASSES
from adtuning.speech.corpora.speech_commands import SpeechCommandsDataset
from adtuning.speech.corpora.voxceleb import VoxCeleb1Dataset

__all__ = [
    "KS_CLASSES",
    "FluentCommandsDataset",
    "LibriMixDiarizationDataset",
    "LibriSpeechDataset",
    "SnipsDataset",
    "SpeechCommandsDataset",
    "VoxCeleb1Dataset",
]
