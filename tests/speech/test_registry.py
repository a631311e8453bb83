"""The task registry: one entry per task, used by the CLI, export and the corpora."""
from __future__ import annotations

import pytest

from adtuning import train
from adtuning.embedded import EMBEDDED_CORPORA
from adtuning.speech import TASK_NAMES, TASK_REGISTRY, build_dataset, build_task, split_task_options, task_spec


def test_every_task_is_registered_once_and_the_cli_offers_exactly_those():
    assert TASK_NAMES == ("ks", "ic", "sid", "asr", "pr", "sf", "sd")
    assert set(EMBEDDED_CORPORA) == set(TASK_NAMES)
    task_action = next(a for a in train.build_parser()._actions if a.dest == "task")
    assert tuple(task_action.choices) == TASK_NAMES
    for name, spec in TASK_REGISTRY.items():
        assert spec.name == name and spec.recipe["lr"] > 0 and set(spec.recipe) == {
            "batch_size", "grad_accum", "lr", "total_steps", "eval_step"}


def test_task_options_split_into_reader_and_head_options():
    reader, head = split_task_options("pr", {"lexicon": "x.txt", "resample": True, "project_dim": 64})
    assert reader == {"lexicon": "x.txt", "resample": True} and head == {"project_dim": 64}
    reader, head = split_task_options("ic", {"downmix": True, "projector_dim": 8})
    assert reader == {"downmix": True} and head == {"projector_dim": 8}


def test_unknown_tasks_are_named():
    for call in (lambda: task_spec("kws"), lambda: build_dataset("kws", ".", "train"),
                 lambda: build_task("kws", upstream_dim=4, num_layers=2)):
        with pytest.raises(ValueError, match="unknown task 'kws'; choose one of ks, ic, sid, asr, pr, sf, sd"):
            call()


def test_the_registry_builds_each_head_and_reader(corpora):
    for name in TASK_NAMES:
        root = corpora["asr" if name == "pr" else name]
        extra = {"lexicon": corpora["lexicon"]} if name == "pr" else {}
        ds = build_dataset(name, root, "train", **extra)
        assert isinstance(ds, task_spec(name).reader)
        head = build_task(name, upstream_dim=8, num_layers=3, **getattr(ds, "task_kwargs", {}))
        assert head.primary_metric and head.primary_metric in head.metric_directions
