"""Kill anywhere: SIGKILL the CLI in every phase of a short run, resume, get the same delta.

A reference run of the CLI is timed phase by phase (from its log lines: start-up, Fisher pass,
training with its dev evaluations and checkpoint writes, final evaluation and save). Then runs
are started in fresh output folders and killed (SIGKILL: no handler runs) at a random moment of
a chosen phase (once the log shows the phase has begun, after a random fraction of the
reference's time in it), resumed with ``--resume`` and killed again in the same or a later
phase, until a resumed run finishes. Every chain must end with a delta bitwise equal to the
reference's: checkpoints are written atomically, two generations are kept, and each names its
tensors with a checksum.

Which phase each kill hit is read afterwards from the killed run's log (its last line that marks
a phase) and the test asserts that the kills hit every phase. Kills that interrupted a write
(a temporary file left beside its target) are counted and printed, not required: a write is too
short to aim at.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.speech.speech_fixtures import write_speech_commands

pytestmark = pytest.mark.slow

KILLS = 10
# Checkpoints after every step and dev evaluations every 10 steps: a kill in training often falls
# inside a checkpoint write or an evaluation, not only inside a training step.
# A tiny upstream (built in code) on a tiny KS corpus keeps a run to a few seconds beyond start-up.
FLAGS = ["--upstream", "tiny-hubert", "--steps", "40", "--candidates", "0.01,0.1", "--r", "0.5", "--fisher-samples", "12",
         "--batch-size", "2", "--lr", "5e-3", "--eval-interval", "10", "--checkpoint-interval", "1", "--threads", "1",
         "--no-progress", "--no-plots", "--log-level", "INFO", "--seed", "3"]

STARTUP, FISHER, TRAINING, FINAL = "start-up", "Fisher pass", "training", "final evaluation / save"
PHASE_ORDER = (STARTUP, FISHER, TRAINING, FINAL)
# The log lines that show a phase has begun (the first INFO line: the imports are done; a resumed
# run that loads its child networks logs no Fisher pass and goes on training).
BEGINS = {STARTUP: (" INFO ",), FISHER: ("Fisher pass",),
          TRAINING: ("trainable params", "resume: loaded", "resumed the search"), FINAL: ("chose P=",)}
# The phase a killed process was in: that of the last line of its log that marks one.
MARKS = (("final test", FINAL), ("final dev", FINAL), ("chose P=", FINAL), ("dev P=", TRAINING), ("rung ", TRAINING),
         ("weight gradients", TRAINING), ("resumed the search", TRAINING), ("resume: loaded", TRAINING),
         ("trainable params", TRAINING), ("Fisher pass", FISHER))
# The kills: every phase twice, and training (the longest, with evaluations and checkpoint writes) four times.
TARGETS = (STARTUP, STARTUP, FISHER, FISHER, TRAINING, TRAINING, TRAINING, TRAINING, FINAL, FINAL)
CHAINS = 3


def cli(out: Path, corpus: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "adtuning.train", *FLAGS, "--output-dir", str(out), "--data-dir", str(corpus),
            *(["--resume"] if resume else [])]


def phase_of(log_text: str) -> str:
    for line in reversed(log_text.splitlines()):
        for needle, phase in MARKS:
            if needle in line:
                return phase
    return STARTUP


def began(phase: str, log_text: str) -> bool:
    return any(needle in log_text for needle in BEGINS[phase])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_speech_commands(tmp_path_factory.mktemp("ks"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run: its folder and how long it spent in each phase (from the moment
    its log showed the phase begun to the moment it showed the next)."""
    out = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    proc = subprocess.Popen(cli(out, corpus, False), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, begins = [], {}
    for line in proc.stdout:
        lines.append(line)
        for phase in PHASE_ORDER:
            if phase not in begins and began(phase, line):
                begins[phase] = time.perf_counter() - start
    assert proc.wait() == 0, "".join(lines)[-3000:]
    end = time.perf_counter() - start
    assert set(begins) == set(PHASE_ORDER), ("the log does not show every phase", begins, "".join(lines)[-3000:])
    times = [begins[p] for p in PHASE_ORDER] + [end]
    durations = {phase: max(0.0, times[i + 1] - times[i]) for i, phase in enumerate(PHASE_ORDER)}
    return out, durations


def run_and_kill(cmd: list[str], log_path: Path, phase: str | None, delay: float) -> bool:
    """Run ``cmd`` (log to ``log_path``); once its log shows ``phase`` begun, SIGKILL it after
    ``delay`` seconds. True when it was killed; False when it finished first (it must succeed)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    seen_at = None
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        now = time.monotonic()
        assert now < deadline, f"{cmd} still running after 600 s"
        if phase is not None and seen_at is None and began(phase, log_path.read_text()):
            seen_at = now
        if seen_at is not None and now - seen_at >= delay:
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.005)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    return False


def run_chain(out: Path, corpus: Path, targets: list[tuple[str, float]], durations: dict[str, float],
              kills: list[tuple[str, str, bool]]) -> None:
    """Fresh run, then resumes: one kill per target (phases in run order), then a run let finish.
    A target whose phase a resumed run no longer reaches ends the chain (the run finishes)."""
    for attempt, (target, fraction) in enumerate([*targets, (None, 0.0)]):
        resume = (out / "config.json").is_file()
        log_path = out.parent / f"{out.name}-{attempt}.log"
        delay = fraction * durations.get(target, 0.0)
        if not run_and_kill(cli(out, corpus, resume), log_path, target, delay):
            return
        # What the log shows, and whether a write was cut (its temporary is still there).
        kills.append((target, phase_of(log_path.read_text()), bool(list(out.rglob("*.tmp")))))
    pytest.fail(f"{out}: the last run was killed")


def check_chain(out: Path, ref_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out / "delta" / "delta.safetensors"))
    assert got.keys() == expected.keys(), out
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{out}: {key} differs from the uninterrupted run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen_p"] == json.loads((ref_dir / "summary.json").read_text())["chosen_p"]
    # Nothing half-written is left behind, and at most two checkpoint generations exist.
    leftovers = list(out.rglob("*.tmp"))
    assert not leftovers, leftovers
    assert len(list((out / "checkpoint").glob("search-*.safetensors"))) <= 2


def test_sigkill_in_every_phase_then_resume_gives_the_same_delta(reference, corpus, tmp_path):
    ref_dir, durations = reference
    expected = load_file(str(ref_dir / "delta" / "delta.safetensors"))
    rng = random.Random(20261202)
    # A random moment in the first 60% of the phase (runs differ a little in speed), in phase
    # order, dealt to the chains in turn: each chain kills in one phase after another.
    planned = sorted(((phase, rng.uniform(0.0, 0.6)) for phase in TARGETS), key=lambda t: (PHASE_ORDER.index(t[0]), t[1]))
    kills: list[tuple[str, str, bool]] = []
    chains = 0
    for c in range(CHAINS):
        chains += 1
        out = tmp_path / f"chain{chains}"
        run_chain(out, corpus, planned[c::CHAINS], durations, kills)
        check_chain(out, ref_dir, expected)
    # A phase no kill hit (a run faster than the reference's timing) gets one more chain, killed
    # as soon as its log shows the phase begun.
    for phase in PHASE_ORDER:
        for _ in range(2):
            if phase in {hit for _, hit, _ in kills}:
                break
            chains += 1
            out = tmp_path / f"chain{chains}"
            run_chain(out, corpus, [(phase, 0.0)], durations, kills)
            check_chain(out, ref_dir, expected)
    # A planned kill can miss too (under load a phase ends before its delay has passed): top the
    # count up with chains killed as soon as training, the longest phase, has begun. Bounded, so a
    # run that can no longer be killed fails the count below instead of looping.
    for _ in range(KILLS):
        if len(kills) >= KILLS:
            break
        chains += 1
        out = tmp_path / f"chain{chains}"
        run_chain(out, corpus, [(TRAINING, 0.0)], durations, kills)
        check_chain(out, ref_dir, expected)
    hits = [hit for _, hit, _ in kills]
    counts = {phase: hits.count(phase) for phase in PHASE_ORDER}
    writes = sum(cut for _, _, cut in kills)
    print(f"\nkill anywhere: {len(kills)} SIGKILLs in {chains} chains, every chain's delta bitwise equal to the "
          f"uninterrupted run (reference phases: {', '.join(f'{p} {d:.2f} s' for p, d in durations.items())}); "
          f"phases hit: {counts}; kills that cut a write: {writes}")
    assert len(kills) >= KILLS, kills
    assert all(counts[phase] > 0 for phase in PHASE_ORDER), (counts, kills)


def test_phase_of_reads_the_last_line_that_marks_a_phase():
    log = "\n".join(["W1203 No CUDA runtime", "09:00:00 INFO backend: native", "09:00:00 INFO data: 8 train / 5 dev",
                     "09:00:01 INFO Fisher pass on backend native: 24 Linear tensors",
                     "09:00:01 INFO P=0.1  trainable params: 1,709 || all upstream params: 35,312",
                     "09:00:02 INFO dev P=0.1 step 10: nll=1.6, accuracy=0.4",
                     "09:00:03 INFO chose P=0.1 after 60 steps", "09:00:03 INFO final dev (P=0.1): nll=0.9"])
    lines = log.splitlines()
    assert [phase_of("\n".join(lines[:n])) for n in (1, 3, 4, 5, 6, 7, 8)] == [
        STARTUP, STARTUP, FISHER, TRAINING, TRAINING, FINAL, FINAL]
    assert phase_of("09:00:00 INFO resume: loaded 2 child networks from x") == TRAINING
    assert not began(FISHER, "\n".join(lines[:3])) and began(FISHER, "\n".join(lines[:4]))
