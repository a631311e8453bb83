"""The heads of the seven SUPERB tasks (:func:`adtuning.speech.registry.build_task` builds one)."""
from __future__ import annotations

from adtuning.speech.tasks.base import Task
from adtuning.speech.tasks.ctc import ASRTask, PRTask, SFTask
from adtuning.speech.tasks.diarization import DiarizationTask
from adtuning.speech.tasks.utterance import IntentClassification, UtteranceClassification, build_ks, build_sid

__all__ = [
    "ASRTask",
    "DiarizationTask",
    "IntentClassification",
    "PRTask",
    "SFTask",
    "Task",
    "UtteranceClassification",
    "build_ks",
    "build_sid",
]
