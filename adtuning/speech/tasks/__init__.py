"""The seven SUPERB tasks of the paper and :func:`build_task`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adtuning.speech.tasks.base import Task
from adtuning.speech.tasks.ctc import ASRTask, PRTask, SFTask
from adtuning.speech.tasks.diarization import DiarizationTask
from adtuning.speech.tasks.utterance import IntentClassification, UtteranceClassification, build_ks, build_sid

TASKS: dict[str, Callable[..., Task]] = {
    "ks": build_ks,
    "ic": IntentClassification,
    "sid": build_sid,
    "asr": ASRTask,
    "pr": PRTask,
    "sf": SFTask,
    "sd": DiarizationTask,
}

RECIPES: dict[str, dict[str, Any]] = {
    "ks": {"batch_size": 32, "grad_accum": 1, "lr": 1e-4, "total_steps": 200000, "eval_step": 4000},
    "ic": {"batch_size": 32, "grad_accum": 1, "lr": 1e-4, "total_steps": 200000, "eval_step": 4000},
    "sid": {"batch_size": 8, "grad_accum": 4, "lr": 1e-4, "total_steps": 200000, "eval_step": 4000},
    "asr": {"batch_size": 32, "grad_accum": 1, "lr": 1e-4, "total_steps": 200000, "eval_step": 2000},
    "pr": {"batch_size": 16, "grad_accum": 2, "lr": 1e-2, "total_steps": 100000, "eval_step": 1000},
    "sf": {"batch_size": 32, "grad_accum": 1, "lr": 1e-4, "total_steps": 200000, "eval_step": 2000},
    "sd": {"batch_size": 8, "grad_accum": 4, "lr": 1e-4, "total_steps": 30000, "eval_step": 500},
}
"""Training settings of the s3prl SUPERB configs (Adam, gradient-norm clip 1, no schedule there;
the paper adds a linear warm-up and searches the learning rate in 1e-5..1e-3). Keys: batch
size, gradient accumulation steps, learning rate, total steps, evaluation interval."""


def build_task(task_name: str, *, upstream_dim: int, num_layers: int, **task_kwargs: Any) -> Task:
    """Build the featurizer + head of a task.

    Args:
        task_name: ``ks``, ``ic``, ``sid``, ``asr``, ``pr``, ``sf`` or ``sd``.
        upstream_dim: hidden size of the upstream.
        num_layers: number of hidden states the upstream returns.
        **task_kwargs: task options; corpus-dependent ones come from the training dataset's
            ``task_kwargs`` (``ic``: ``values_per_slot``; ``sid``: ``num_classes``; ``sf``:
            ``slots``; ``sd``: ``num_speakers``, ``frame_shift``). Others: ``normalize_features``
            (all), ``projector_dim`` (ks/ic/sid),
            ``project_dim``/``rnn_dim``/``rnn_layers``/``dropout``/``specaug`` (asr/sf;
            ``project_dim`` for pr), ``num_speakers``/``hidden_size``/``rnn_layers``/``frame_shift`` (sd).
    """
    try:
        factory = TASKS[task_name]
    except KeyError:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASKS)}") from None
    return factory(upstream_dim=upstream_dim, num_layers=num_layers, **task_kwargs)


__all__ = [
    "RECIPES",
    "TASKS",
    "ASRTask",
    "DiarizationTask",
    "IntentClassification",
    "PRTask",
    "SFTask",
    "Task",
    "UtteranceClassification",
    "build_task",
]
