"""The task registry: one entry per SUPERB task, used by the CLI, export and the corpora.

Each :class:`TaskSpec` holds what the rest of the code needs to know about a task: the corpus
reader (the dataset factory), the reader options a ``--task-option`` may set (every other
option goes to the head), the head (which owns the loss, the per-sample NLL of the Fisher pass,
the metrics and the primary metric), and the s3prl recipe's training settings. The embedded
generated corpora are registered per task in :mod:`adtuning.embedded`, under the same names
(a test checks that both registries name the same tasks).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adtuning.speech.audio import AUDIO_OPTIONS
from adtuning.speech.corpora import (
    FluentCommandsDataset,
    LibriMixDiarizationDataset,
    LibriSpeechDataset,
    SnipsDataset,
    SpeechCommandsDataset,
    VoxCeleb1Dataset,
)
from adtuning.speech.data import SpeechDataset
from adtuning.speech.tasks import (
    ASRTask,
    DiarizationTask,
    IntentClassification,
    PRTask,
    SFTask,
    Task,
    build_ks,
    build_sid,
)


@dataclass(frozen=True)
class TaskSpec:
    """One SUPERB task.

    Attributes:
        name: the CLI's ``--task`` value.
        what: what the task is, in words.
        reader: the corpus reader class (called ``reader(root, split, **reader_kwargs, **options)``).
        reader_options: ``--task-option`` keys that configure the reader; the audio policy
            (``resample``, ``downmix``) is added for every task.
        head: builds the task head: ``head(upstream_dim=, num_layers=, **options)``.
        recipe: the s3prl SUPERB config's training settings (Adam, gradient-norm clip 1, no
            schedule there; the paper adds a linear warm-up and searches the learning rate in
            1e-5..1e-3): ``batch_size``, ``grad_accum``, ``lr``, ``total_steps``, ``eval_step``.
        reader_kwargs: fixed reader arguments (ASR and PR share the LibriSpeech reader).
    """

    name: str
    what: str
    reader: type[SpeechDataset]
    reader_options: tuple[str, ...]
    head: Callable[..., Task]
    recipe: Mapping[str, Any]
    reader_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reader_option_keys(self) -> tuple[str, ...]:
        """Every ``--task-option`` key the reader takes (its own and the audio policy)."""
        return self.reader_options + AUDIO_OPTIONS


def _recipe(batch_size: int, grad_accum: int, lr: float, total_steps: int, eval_step: int) -> dict[str, Any]:
    return {"batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "total_steps": total_steps, "eval_step": eval_step}


TASK_REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("ks", "keyword spotting (Speech Commands v0.01)", SpeechCommandsDataset, ("test_root",), build_ks,
             _recipe(32, 1, 1e-4, 200000, 4000)),
    TaskSpec("ic", "intent classification (Fluent Speech Commands)", FluentCommandsDataset, (), IntentClassification,
             _recipe(32, 1, 1e-4, 200000, 4000)),
    TaskSpec("sid", "speaker identification (VoxCeleb1)", VoxCeleb1Dataset, ("split_file", "max_timestep"), build_sid,
             _recipe(8, 4, 1e-4, 200000, 4000)),
    TaskSpec("asr", "speech recognition (LibriSpeech, characters)", LibriSpeechDataset, ("subsets",), ASRTask,
             _recipe(32, 1, 1e-4, 200000, 2000), reader_kwargs={"task": "asr"}),
    TaskSpec("pr", "phoneme recognition (LibriSpeech + lexicon)", LibriSpeechDataset, ("lexicon", "subsets"), PRTask,
             _recipe(16, 2, 1e-2, 100000, 1000), reader_kwargs={"task": "pr"}),
    TaskSpec("sf", "slot filling (Audio SNIPS)", SnipsDataset, ("speakers",), SFTask,
             _recipe(32, 1, 1e-4, 200000, 2000)),
    TaskSpec("sd", "speaker diarization (LibriMix, Kaldi folders)", LibriMixDiarizationDataset,
             ("split_dirs", "chunk_size", "frame_shift", "num_speakers"), DiarizationTask,
             _recipe(8, 4, 1e-4, 30000, 500)),
)}

#: The task names, in the paper's order.
TASK_NAMES: tuple[str, ...] = tuple(TASK_REGISTRY)


def task_spec(task_name: str) -> TaskSpec:
    """The registry entry of ``task_name``.

    Raises:
        ValueError: an unknown task (the message lists the known ones).
    """
    try:
        return TASK_REGISTRY[task_name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASK_NAMES)}") from None


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
    spec = task_spec(task_name)
    return spec.reader(root, split, **spec.reader_kwargs, **kw)


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
    return task_spec(task_name).head(upstream_dim=upstream_dim, num_layers=num_layers, **task_kwargs)


def split_task_options(task_name: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``--task-option`` values into (corpus-reader options, task-head options)."""
    keys = task_spec(task_name).reader_option_keys
    return {k: v for k, v in options.items() if k in keys}, {k: v for k, v in options.items() if k not in keys}
