"""RELIABILITY.md promises held through the command line: rows 14, 58, 59 and 75.

Each test runs ``adtuning.train.main`` (the CLI, in process) on a tiny corpus from
``tests/speech/speech_fixtures.py`` with the tiny upstream built in code, and checks what the
row promises from what a user sees: the return code, the error, the log, ``config.json``,
``summary.json`` and the delta. Row 58's "optimizer and schedule unchanged" is checked on the
search itself against an oracle run (:func:`test_a_skipped_step_changes_neither_the_optimizer_nor_the_schedule`).

Non-finite training steps are made by wrapping :meth:`adtuning.speech.SpeechModel.loss`, the
training loss of every task (the per-sample Fisher pass and the evaluations do not call it).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from adtuning import train
from adtuning.search import AdaptiveSearch, SearchConfig
from adtuning.search_checkpoint import NonFiniteError
from adtuning.speech.model import SpeechModel
from tests.speech.speech_fixtures import (
    write_fluent,
    write_lexicon,
    write_librimix,
    write_librispeech,
    write_snips,
    write_speech_commands,
    write_voxceleb,
)
from tests.test_search import ToyProblem, children_for, config

# A run of a few steps of one candidate: seconds per task.
SMALL = ["--upstream", "tiny-hubert", "--candidates", "0.1", "--fisher-samples", "4", "--batch-size", "2",
         "--threads", "1", "--no-progress", "--no-plots", "--log-level", "INFO", "--seed", "3"]

# task: (corpus writer, extra flags: tiny heads, PR's lexicon)
TASKS = {
    "ks": (write_speech_commands, []),
    "ic": (write_fluent, []),
    "sid": (write_voxceleb, []),
    "asr": (write_librispeech, ["--task-option", "project_dim=16", "--task-option", "rnn_dim=8"]),
    "pr": (write_librispeech, ["--task-option", "project_dim=16"]),
    "sf": (write_snips, ["--task-option", "project_dim=16", "--task-option", "rnn_dim=8"]),
    "sd": (write_librimix, ["--task-option", "chunk_size=150", "--task-option", "hidden_size=8"]),
}


def run(out: Path, data: Path, *extra: str, steps: int = 4) -> int:
    return train.main([*SMALL, "--steps", str(steps), "--eval-interval", "2", "--output-dir", str(out),
                       "--data-dir", str(data), *extra])


def corpus(task: str, base: Path) -> tuple[Path, list[str]]:
    """A fresh tiny corpus of ``task`` under ``base`` and the flags it needs."""
    writer, flags = TASKS[task]
    root = writer(base)
    if task == "pr":
        flags = [*flags, "--task-option", f"lexicon={write_lexicon(base)}"]
    return root, ["--task", task, *flags]


# ---- row 14: --task-option resample/downmix reach the reader of every task -------------------

def make_narrowband_stereo(root: Path) -> list[Path]:
    """Rewrite every audio file under ``root`` at 8 kHz with two channels (same format)."""
    changed = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac")):
        data, rate = sf.read(str(path), dtype="float32")
        mono = data if data.ndim == 1 else data.mean(1)
        info = sf.info(str(path))
        sf.write(str(path), np.stack([mono[::2], mono[::2]], 1), rate // 2, subtype=info.subtype, format=info.format)
        changed.append(path)
    return changed


@pytest.mark.parametrize("task", list(TASKS))
def test_the_audio_policy_flags_reach_the_reader_of_every_task_and_not_its_head(task, tmp_path, capsys):
    root, flags = corpus(task, tmp_path / "corpus")
    changed = make_narrowband_stereo(root)
    assert changed
    # Without the policy the run stops with the reader's error naming a rewritten file.
    assert run(tmp_path / "refused", root, *flags, steps=2) == 2  # an input error
    err = capsys.readouterr().err
    assert any(f"{p.name} has 2 channels" in err or f"{p.name} has sample rate 8000 Hz" in err for p in changed), err[-2000:]
    # With it every split is read (resampled, downmixed) and the head, which takes no such
    # option, is built: the run finishes, and the run and its delta record the options (so
    # --resume and export read the audio the same way).
    policy = ["--task-option", "resample=true", "--task-option", "downmix=true"]
    out = tmp_path / "run"
    assert run(out, root, *flags, *policy, steps=2) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "test" in summary["final"], summary["final"]  # the test split was read too
    options = json.loads((out / "delta" / "delta.json").read_text())["task_options"]
    assert options["resample"] is True and options["downmix"] is True, options
    saved = (out / "config.json").read_text()
    assert "resample" in saved and "downmix" in saved


def test_a_task_option_no_reader_or_head_takes_is_one_error_naming_it(tmp_path, capsys):
    root, flags = corpus("asr", tmp_path / "corpus")
    assert run(tmp_path / "run", root, *flags, "--task-option", "rnn_dimm=8", steps=1) == 2
    err = capsys.readouterr().err
    assert "--task-option" in err and "rnn_dimm" in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run" / "config.json").exists()


# ---- row 58: --on-nonfinite skip -------------------------------------------------------------

@pytest.fixture
def poison_training_loss(monkeypatch):
    """``poison(bad)``: the training loss of the calls numbered in ``bad`` (from 1) is NaN."""
    calls = {"n": 0}

    def poison(bad):
        original = SpeechModel.loss

        def loss(self, batch, *args, **kwargs):
            calls["n"] += 1
            value = original(self, batch, *args, **kwargs)
            return value * math.nan if calls["n"] in bad else value

        monkeypatch.setattr(SpeechModel, "loss", loss)
        return calls
    return poison


@pytest.fixture(scope="module")
def ks_corpus(tmp_path_factory):
    return write_speech_commands(tmp_path_factory.mktemp("ks"))


def test_skip_through_the_cli_logs_and_counts_the_steps_in_summary_json(ks_corpus, tmp_path, poison_training_loss, caplog):
    calls = poison_training_loss({2, 5})  # one micro-batch per step: steps 2 and 4 (the 5th call) are dropped
    with caplog.at_level(logging.INFO, logger="adtuning"):
        assert run(tmp_path / "run", ks_corpus, "--on-nonfinite", "skip", steps=6) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (cand,) = summary["candidates"]
    assert cand["skipped_nonfinite_steps"] == 2
    # T finite steps still ran, each dropped step's loss was computed once (that its batches are consumed,
    # not retried, is test_a_skipped_step_changes_neither_the_optimizer_nor_the_schedule's oracle).
    assert cand["steps"] == 6 and calls["n"] == 6 + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped a non-finite step" in r.getMessage()]
    assert len(warnings) == 2 and "(1 in a row, 1 in all)" in warnings[0] and "(1 in a row, 2 in all)" in warnings[1], warnings


def test_without_skip_the_cli_stops_at_the_first_non_finite_step(ks_corpus, tmp_path, poison_training_loss, capsys):
    poison_training_loss({3})
    assert run(tmp_path / "run", ks_corpus, steps=6) == 1
    err = capsys.readouterr().err
    assert "non-finite training step, nothing applied" in err and "step 3" in err and "--on-nonfinite skip" in err, err[-2000:]


class DroppingProblem(ToyProblem):
    """ToyProblem whose training stream leaves out the batches numbered in ``drop`` (from 1, over
    the whole run): the run a skipped step must be equivalent to."""

    def __init__(self, drop):
        super().__init__()
        self.drop, self.served = set(drop), 0

    def train_batches(self, epoch, skip):
        kept = []
        for batch in super().train_batches(epoch, 0):
            self.served += 1
            if self.served not in self.drop:
                kept.append(batch)
        return iter(kept[skip:])


class NaNProblem(ToyProblem):
    """ToyProblem whose loss is NaN for the calls numbered in ``bad`` (from 1)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = set(bad), 0

    def loss(self, batch):
        self.calls += 1
        value = super().loss(batch)
        return value * math.nan if self.calls in self.bad else value


def _without_dropout(problem):
    for module in problem.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # a dropped step draws dropout masks that the oracle run does not
    return problem


def test_a_skipped_step_changes_neither_the_optimizer_nor_the_schedule():
    """A run that skips step 2 (batches 3 and 4, NaN) ends bitwise where a run that never saw
    those batches ends, with the same learning rate at every step: the skipped step moved no
    weight, no AdamW moment or step count, and not the warm-up/decay schedule. One candidate,
    so that every batch is the first candidate's."""
    runs = {}
    for kind, problem in (("skipped", _without_dropout(NaNProblem(bad={3, 4}))),
                          ("oracle", _without_dropout(DroppingProblem(drop={3, 4})))):
        lrs = {}

        def watch(event, info, lrs=lrs):
            if event == "train":
                lrs[info["step"]] = info["lr"]

        search = AdaptiveSearch(problem, [children_for(problem)[1]], config(rungs=(), keep=(), on_nonfinite="skip"),
                                progress=False, on_event=watch)
        best = search.run()
        runs[kind] = (best, lrs, {n: t.detach().clone() for n, t in problem.model.state_dict().items()})
    (skipped, skipped_lrs, skipped_weights), (oracle, oracle_lrs, oracle_weights) = runs["skipped"], runs["oracle"]
    assert skipped.skipped_steps == 1 and oracle.skipped_steps == 0
    assert skipped.step == oracle.step == 20
    assert skipped_lrs == oracle_lrs and len(skipped_lrs) == 20
    for name, value in oracle_weights.items():
        assert torch.equal(skipped_weights[name], value), name
    # The oracle is not trivially met: a run that trained on the NaN-free batches 3 and 4 differs.
    plain = _without_dropout(ToyProblem())
    AdaptiveSearch(plain, [children_for(plain)[1]], config(rungs=(), keep=()), progress=False).run()
    assert any(not torch.equal(t, oracle_weights[n]) for n, t in plain.model.state_dict().items())


# ---- row 59: the default of --max-nonfinite-skips is 10 ---------------------------------------

def test_by_default_skip_stops_after_exactly_ten_non_finite_steps_in_a_row(ks_corpus, tmp_path, poison_training_loss, capsys,
                                                                           caplog):
    calls = poison_training_loss(set(range(3, 1000)))  # every step from the 3rd on
    with caplog.at_level(logging.WARNING, logger="adtuning"):
        assert run(tmp_path / "run", ks_corpus, "--on-nonfinite", "skip", steps=40) == 1
    err = capsys.readouterr().err
    assert "10 non-finite training steps in a row (the limit, max_nonfinite_skips=10)" in err, err[-2000:]
    skipped = [r.getMessage() for r in caplog.records if "skipped a non-finite step" in r.getMessage()]
    assert len(skipped) == 10 and "(10 in a row, 10 in all)" in skipped[-1], skipped
    assert calls["n"] == 2 + 10  # two finite steps, then ten dropped: not one more


def test_the_search_default_is_ten_as_well():
    problem = NaNProblem(bad=range(5, 1000))  # grad_accum 2: steps 1 and 2 are finite
    search = AdaptiveSearch(problem, children_for(problem), config(on_nonfinite="skip"), progress=False)
    assert SearchConfig(total_steps=1).max_nonfinite_skips == 10
    with pytest.raises(NonFiniteError, match="10 non-finite training steps in a row"):
        search.run()
    assert search.candidates[0].skipped_steps == 10 and search.candidates[0].step == 2


# ---- row 75: an absent test split is logged and skipped; a broken one stops the run -----------

def test_an_absent_test_split_is_logged_and_the_run_goes_on_without_it(tmp_path, caplog):
    root = write_speech_commands(tmp_path / "ks")
    shutil.rmtree(root.parent / "speech_commands_test_set_v0.01")
    with caplog.at_level(logging.INFO, logger="adtuning"):
        assert run(tmp_path / "run", root, steps=2) == 0
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.getMessage().startswith("no test split")]
    assert len(logged) == 1 and "speech_commands_test_set_v0.01" in logged[0], logged
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "test" not in summary["final"] and "dev" in summary["final"], summary["final"]


def test_a_broken_test_split_stops_the_run_naming_the_file(tmp_path, capsys):
    root, flags = corpus("sf", tmp_path / "sf")
    iob = root / "all.iob.snips.txt"
    text = iob.read_text()
    assert "Emma-snips-test-0 BOS PLAY JAZZ MUSIC EOS\t" in text
    iob.write_text(text.replace("Emma-snips-test-0 BOS PLAY JAZZ MUSIC EOS\t", "Emma-snips-test-0 BOS PLAY JAZZ EOS\t"))
    assert run(tmp_path / "run", root, *flags, steps=2) == 2  # an input error (exit 2), like a bad flag
    err = capsys.readouterr().err
    assert "all.iob.snips.txt line" in err and "(Emma-snips-test-0)" in err, err[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()
