"""Kill anywhere: SIGKILL the CLI at random moments of a short run, resume, get the same delta.

A reference run of the CLI is timed; then runs are started in fresh output folders and killed
(SIGKILL: no handler runs) after a random fraction of the reference's wall time, resumed with
``--resume`` and killed again, until a resumed run finishes. Every chain must end with a delta
bitwise equal to the reference's, whichever phase the kills hit (start-up, Fisher pass,
training, evaluation, checkpoint write, final save): checkpoints are written atomically, two
generations are kept, and each names its tensors with a checksum.
"""
from __future__ import annotations

import json
import random
import signal
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
# Checkpoints after every step and dev evaluations every 2 steps: a random moment often falls
# inside a checkpoint write or an evaluation, not only inside a training step.
# A tiny upstream (built in code) on a tiny KS corpus keeps a run to a few seconds beyond start-up.
FLAGS = ["--upstream", "tiny-hubert", "--steps", "40", "--candidates", "0.01,0.1", "--r", "0.5", "--fisher-samples", "12",
         "--batch-size", "2", "--lr", "5e-3", "--eval-interval", "10", "--checkpoint-interval", "1", "--threads", "1",
         "--no-progress", "--no-plots", "--log-level", "INFO", "--seed", "3"]
# The phase a log line shows the process in (the last matching line before the kill).
PHASES = (("final test", "final evaluation / save"), ("final dev", "final evaluation / save"),
          ("chose P=", "final evaluation"), ("dev P=", "training / evaluation"), ("trainable params", "training"),
          ("resumed the search", "training"), ("Fisher pass", "Fisher pass"), ("data:", "start-up"))


def cli(out: Path, corpus: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "adtuning.train", *FLAGS, "--output-dir", str(out), "--data-dir", str(corpus),
            *(["--resume"] if resume else [])]


def phase_of(log_text: str) -> str:
    for line in reversed(log_text.splitlines()):
        for needle, phase in PHASES:
            if needle in line:
                return phase
    return "start-up"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_speech_commands(tmp_path_factory.mktemp("ks"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run: its folder, its wall time, and when its work began (the first log
    line after the imports), so that kills land in the work and not all in Python's start-up."""
    out = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    proc = subprocess.Popen(cli(out, corpus, False), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, work_start = [], None
    for line in proc.stdout:
        lines.append(line)
        if work_start is None and "INFO" in line:
            work_start = time.perf_counter() - start
    assert proc.wait() == 0, "".join(lines)[-3000:]
    wall = time.perf_counter() - start
    return out, wall, work_start or 0.0


def test_sigkill_at_random_moments_then_resume_gives_the_same_delta(reference, corpus, tmp_path):
    ref_dir, wall, work_start = reference
    expected = load_file(str(ref_dir / "delta" / "delta.safetensors"))
    rng = random.Random(20261202)
    # Kill moments spread evenly over the reference's work (one random point in each tenth of it,
    # in random order), so that the Fisher pass, training, checkpoint writes, evaluations and the
    # final save all get some; a resumed run has the same start-up and less work left.
    moments = [work_start + (wall - work_start) * (i + rng.random()) / KILLS for i in range(KILLS)]
    rng.shuffle(moments)
    kills: list[str] = []
    chains = 0
    while len(kills) < KILLS:
        chains += 1
        assert chains <= 3 * KILLS, f"only {len(kills)} kills landed in {chains} chains"
        out = tmp_path / f"chain{chains}"
        for attempt in range(2 * KILLS):
            resume = (out / "config.json").is_file()
            log_path = out.parent / f"{out.name}-{attempt}.log"
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(cli(out, corpus, resume), stdout=log_file, stderr=subprocess.STDOUT)
                try:
                    # Once every kill has landed, the chain's last run is let finish.
                    proc.wait(timeout=moments[len(kills)] if len(kills) < KILLS else None)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append(phase_of(log_path.read_text()))
                    continue
            assert proc.returncode == 0, log_path.read_text()[-3000:]
            break
        else:
            pytest.fail(f"{out}: the run never finished after {2 * KILLS} attempts")
        got = load_file(str(out / "delta" / "delta.safetensors"))
        assert got.keys() == expected.keys(), out
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{out}: {key} differs from the uninterrupted run"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["chosen_p"] == json.loads((ref_dir / "summary.json").read_text())["chosen_p"]
        # Nothing half-written is left behind, and at most two checkpoint generations exist.
        leftovers = [p for p in out.rglob("*.tmp")]
        assert not leftovers, leftovers
        assert len(list((out / "checkpoint").glob("search-*.safetensors"))) <= 2
    counts = {phase: kills.count(phase) for phase in dict.fromkeys(kills)}
    print(f"\nkill anywhere: {len(kills)} SIGKILLs in {chains} chains, every chain's delta bitwise equal to the "
          f"uninterrupted run (reference wall {wall:.1f} s, work from {work_start:.1f} s); phases hit: {counts}")
