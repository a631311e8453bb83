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
from adtuning.speech.corpora import build_dataset
from adtuning.speech.data import BatchStream, SpeechDataset, SpeechLoader, collate, make_loader, subset_hours
from adtuning.speech.featurizer import Featurizer
from adtuning.speech.model import SpeechModel
from adtuning.speech.tasks import RECIPES, TASKS, Task, build_task
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
    "RECIPES",
    "TASKS",
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
    "collate",
    "make_loader",
    "MissingDataError",
    "read_audio",
    "subset_hours",
]
