"""Speech side: upstreams, featurizer, SUPERB tasks, corpora, metrics.

Typical use::

    up = build_upstream("tiny-wav2vec2")                  # or a local dir / cached hub id
    train = build_dataset("ks", root, "train")
    task = build_task("ks", upstream_dim=up.hidden_size, num_layers=up.num_layers, **train.task_kwargs)
    model = SpeechModel(up, task)
    for batch in make_loader(train, 32, shuffle=True, seed=0, epoch=0):
        model.loss(batch).backward()
"""
from adtuning.speech.audio import CorpusError, MissingDataError, read_audio
from adtuning.speech.data import BatchStream, SpeechDataset, SpeechLoader, collate, make_loader, subset_hours
from adtuning.speech.featurizer import Featurizer
from adtuning.speech.model import SpeechModel
from adtuning.speech.registry import TASK_NAMES, TASK_REGISTRY, TaskSpec, build_dataset, build_task, split_task_options, task_spec
from adtuning.speech.tasks import Task
from adtuning.speech.upstream import (
    DEFAULT_UPSTREAM,
    EMBEDDED_UPSTREAMS,
    TINY_UPSTREAMS,
    Upstream,
    UpstreamLoadError,
    build_upstream,
)

__all__ = [
    "DEFAULT_UPSTREAM",
    "EMBEDDED_UPSTREAMS",
    "TASK_NAMES",
    "TASK_REGISTRY",
    "TaskSpec",
    "TINY_UPSTREAMS",
    "BatchStream",
    "CorpusError",
    "Featurizer",
    "SpeechDataset",
    "SpeechLoader",
    "SpeechModel",
    "Task",
    "Upstream",
    "UpstreamLoadError",
    "build_dataset",
    "build_task",
    "build_upstream",
    "split_task_options",
    "task_spec",
    "collate",
    "make_loader",
    "MissingDataError",
    "read_audio",
    "subset_hours",
]
