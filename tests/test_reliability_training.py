"""Reliability of training: torn or corrupt checkpoints fall back to the previous generation,
non-finite losses and gradients stop or are skipped, and nothing non-finite is ever written."""
from __future__ import annotations

import errno
import json
import logging
import math
import os

import pytest
import torch
from safetensors import SafetensorError

from adtuning import atomic
from adtuning.atomic import WriteError
from adtuning.search import AdaptiveSearch, SearchConfig
from adtuning.search_checkpoint import CHECKPOINT_FILES, CheckpointError, NonFiniteError
from tests.test_search import ToyProblem, children_for, config, interrupted_run, reference_weights, resume, snapshot


def newest_tensors(checkpoint_dir):
    return checkpoint_dir / json.loads((checkpoint_dir / CHECKPOINT_FILES[0]).read_text())["tensors"]


def assert_same(got, expected):
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name


# ---- two checkpoint generations with checksums ------------------------------------------------

def test_two_generations_are_kept_and_each_names_its_tensors_with_a_checksum(tmp_path):
    interrupted_run(tmp_path)
    newest, previous = (json.loads((tmp_path / name).read_text()) for name in CHECKPOINT_FILES)
    assert newest["tensors"] != previous["tensors"]
    assert sorted(p.name for p in tmp_path.glob("search-*.safetensors")) == sorted([newest["tensors"], previous["tensors"]])
    assert newest["tensors_sha256"].startswith("sha256:") and len(newest["tensors_sha256"]) == 71


@pytest.mark.parametrize("damage", ["truncated tensors", "flipped byte", "tensors missing", "json torn", "json missing",
                                    "json without a key", "json with a wrong type"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, damage, caplog):
    expected = reference_weights()
    interrupted_run(tmp_path)
    tensors = newest_tensors(tmp_path)
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "flipped byte":
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF  # inside the last tensor's values: only the checksum can tell
        tensors.write_bytes(bytes(data))
    elif damage == "tensors missing":
        tensors.unlink()
    elif damage == "json torn":
        text = (tmp_path / CHECKPOINT_FILES[0]).read_text()
        (tmp_path / CHECKPOINT_FILES[0]).write_text(text[: len(text) // 3])
    elif damage in ("json without a key", "json with a wrong type"):
        meta = json.loads((tmp_path / CHECKPOINT_FILES[0]).read_text())
        if damage == "json without a key":
            del meta["candidates"]
        else:
            meta["candidates"][0]["step"] = "12"
        (tmp_path / CHECKPOINT_FILES[0]).write_text(json.dumps(meta))
    else:  # killed between renaming the newest aside and writing its successor
        (tmp_path / CHECKPOINT_FILES[0]).unlink()
    with caplog.at_level(logging.WARNING, logger="adtuning"):
        got = resume(tmp_path)
    assert_same(got, expected)  # resuming from an older checkpoint is just as exact
    assert f"resuming from the previous checkpoint {tmp_path / CHECKPOINT_FILES[1]}" in caplog.text


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    interrupted_run(tmp_path)
    for name in CHECKPOINT_FILES:
        tensors = tmp_path / json.loads((tmp_path / name).read_text())["tensors"]
        tensors.write_bytes(b"\0" * 100)
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError) as err:
        search.load_checkpoint()
    message = str(err.value)
    assert all(str(tmp_path / name) in message for name in CHECKPOINT_FILES) and "checksum" in message and "--overwrite" in message


# ---- non-finite losses and gradients ------------------------------------------------------------

class PoisonedProblem(ToyProblem):
    """ToyProblem whose loss (or only its gradient) is NaN/inf for the batches numbered in ``bad``
    (counted over the whole run, from 1)."""

    def __init__(self, bad, where="loss", value=math.nan):
        super().__init__()
        self.bad, self.where, self.value, self.calls = set(bad), where, value, 0

    def loss(self, batch):
        self.calls += 1
        loss = super().loss(batch)
        if self.calls in self.bad:
            if self.where == "loss":
                return loss * self.value
            out = loss * 1.0
            out.register_hook(lambda g: g * self.value)  # the loss stays finite, its gradient does not
            return out
        return loss


@pytest.mark.parametrize("where, value", [("loss", math.nan), ("loss", math.inf), ("gradient", math.nan)])
def test_stop_names_the_candidate_step_and_batch_and_applies_nothing(tmp_path, where, value):
    problem = PoisonedProblem(bad={7}, where=where, value=value)  # grad_accum 2: the 2nd micro-batch of step 4
    cfg = config(checkpoint_interval=1)
    seen = {}

    def watch(kind, info):
        if kind == "train":
            seen[info["step"]] = snapshot(problem)

    search = AdaptiveSearch(problem, children_for(problem), cfg, checkpoint_dir=tmp_path, progress=False, on_event=watch)
    with pytest.raises(NonFiniteError) as err:
        search.run()
    message = str(err.value)
    # 6 batches per epoch, 2 per step: step 4 is epoch 1's batches 0 and 1.
    assert "P=0.01, step 4:" in message and "epoch 1 batch 0; epoch 1 batch 1" in message and "--on-nonfinite skip" in message
    assert_same(snapshot(problem), seen[3])  # the poisoned step changed nothing
    # The last checkpoint is the finite state after step 3, and it resumes.
    meta = json.loads((tmp_path / CHECKPOINT_FILES[0]).read_text())
    assert meta["candidates"][0]["step"] == 3


def test_skip_drops_the_steps_counts_them_and_still_trains_T_steps(caplog):
    problem = PoisonedProblem(bad={3, 4, 9})  # batches 3 and 4 form step 2; batch 9 poisons step 5 (1-based, 2 per step)
    search = AdaptiveSearch(problem, children_for(problem), config(on_nonfinite="skip"), progress=False)
    with caplog.at_level(logging.WARNING, logger="adtuning"):
        best = search.run()
    first = search.candidates[0]
    assert first.skipped_steps == 2 and first.nonfinite_streak == 0
    assert all(c.step == 20 or c.status == "stopped" for c in search.candidates) and best.step == 20
    assert caplog.text.count("skipped a non-finite step") == 2
    assert all(bool(torch.isfinite(t).all()) for t in snapshot(problem).values())
    losses = [loss for _, loss in first.train_losses]
    assert all(math.isfinite(loss) for loss in losses) and len(losses) == first.step


def test_skip_stops_after_too_many_in_a_row():
    problem = PoisonedProblem(bad=range(5, 1000))
    search = AdaptiveSearch(problem, children_for(problem), config(on_nonfinite="skip", max_nonfinite_skips=3), progress=False)
    with pytest.raises(NonFiniteError, match="3 non-finite training steps in a row"):
        search.run()
    assert search.candidates[0].skipped_steps == 3 and search.candidates[0].step == 2


def test_skip_counters_survive_a_resume(tmp_path):
    problem = PoisonedProblem(bad={3})
    search = AdaptiveSearch(problem, children_for(problem), config(on_nonfinite="skip", checkpoint_interval=1),
                            checkpoint_dir=tmp_path, progress=False)
    search.run()
    again = ToyProblem()
    resumed = AdaptiveSearch(again, children_for(again), config(on_nonfinite="skip"), checkpoint_dir=tmp_path, progress=False)
    assert resumed.load_checkpoint()
    assert resumed.candidates[0].skipped_steps == 1


def test_a_non_finite_value_is_never_written_to_a_checkpoint(tmp_path):
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(total_steps=10), checkpoint_dir=tmp_path, progress=False)
    search.run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        problem.head.weight[0, 0] = math.nan  # the chosen candidate is swapped in; its head is saved
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
        search.save_checkpoint()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_bad_policies_are_rejected():
    with pytest.raises(ValueError, match="on_nonfinite"):
        SearchConfig(total_steps=10, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_nonfinite_skips"):
        SearchConfig(total_steps=10, max_nonfinite_skips=0)


# ---- disk full while checkpointing --------------------------------------------------------------

def files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_disk_full_while_writing_checkpoint_tensors_keeps_both_generations(tmp_path, monkeypatch):
    expected = reference_weights()
    interrupted_run(tmp_path)
    before = files(tmp_path)
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=2), checkpoint_dir=tmp_path, progress=False)
    assert search.load_checkpoint()

    def full_disk(tensors, path, *args, **kwargs):
        # What safetensors raises on a full disk (seen on a 1 MB tmpfs, safetensors 0.8).
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(atomic, "save_file", full_disk)
    with pytest.raises(WriteError, match=r"search-\d+\.safetensors failed: No space left on device"):
        search.save_checkpoint()
    assert files(tmp_path) == before  # no temporary left, both generations untouched
    monkeypatch.undo()
    assert_same(resume(tmp_path), expected)


def test_disk_full_while_writing_the_checkpoint_json_resumes_from_the_previous(tmp_path, monkeypatch, caplog):
    expected = reference_weights()
    interrupted_run(tmp_path)
    problem = ToyProblem()
    search = AdaptiveSearch(problem, children_for(problem), config(checkpoint_interval=2), checkpoint_dir=tmp_path, progress=False)
    assert search.load_checkpoint()
    real_write = atomic.os.write

    def write(fd, data):  # the JSON is the only file written with os.write here
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "write", write)
    with pytest.raises(WriteError, match=r"search\.json failed: No space left on device"):
        search.save_checkpoint()
    monkeypatch.setattr(atomic.os, "write", real_write)
    assert not (tmp_path / CHECKPOINT_FILES[0]).exists() and (tmp_path / CHECKPOINT_FILES[1]).is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    with caplog.at_level(logging.WARNING, logger="adtuning"):
        assert_same(resume(tmp_path), expected)
    assert "search.json was not written" in caplog.text
