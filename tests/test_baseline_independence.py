"""A baseline's result does not depend on what ran before it in the process, nor on a resume.

Issue 26: the FT ("full") row of a study must be re-runnable. The CLI trains the same ``full``
(and ``head-only``) baseline

1. after the smallest search (one candidate, no regret, ``--baselines full``),
2. after a search of two candidates, ``--measure-regret`` (the culled candidate trained on to T,
   the chosen one swapped back in) and the ``head-only`` baseline (``--baselines head-only,full``),
3. as 2, SIGKILLed in the middle of the ``full`` baseline (at its first dev evaluation, a quarter
   of the way, after a checkpoint of it) and continued with ``--resume``,

and every run must report the same baseline: its steps, its dev curve and its final dev and test
metrics, bit for bit (the NLL is a float: any difference in the trained weights shows there).
Runs 2 and 3 must also end with the same delta and the same candidate metrics. The oracle is the
baseline trained by the shortest process (run 1): nothing of a search can leak into it.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.speech.speech_fixtures import write_speech_commands

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# A tiny upstream (built in code) on a tiny KS corpus: a run is a few seconds beyond start-up.
STEPS = 24
COMMON = ["--upstream", "tiny-hubert", "--steps", str(STEPS), "--fisher-samples", "8", "--batch-size", "2", "--lr", "5e-3",
          "--eval-interval", "6", "--checkpoint-interval", "3", "--threads", "1", "--no-progress", "--no-plots",
          "--log-level", "INFO", "--seed", "3"]
ALONE = ["--candidates", "0.1", "--r", "0.5", "--baselines", "full"]
AFTER_SEARCH = ["--candidates", "0.01,0.1", "--r", "0.5", "--measure-regret", "--baselines", "head-only,full"]
TIMEOUT = 300


def cli(out: Path, corpus: Path, flags: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "adtuning.train", *COMMON, *flags, "--data-dir", str(corpus), "--output-dir", str(out),
            *(["--resume"] if resume else [])]


def finish(cmd: list[str]) -> str:
    """Run ``cmd`` to the end; return its output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def kill_in_the_full_baseline(cmd: list[str]) -> str:
    """Start ``cmd`` and SIGKILL it at its first dev evaluation of the ``full`` baseline (a quarter of
    the way, so checkpoints of the baseline exist and it is not done); return its log up to then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "dev full step" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=TIMEOUT)
        proc.stdout.close()
    text = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed in the full baseline:\n{text[-3000:]}"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    corpus = write_speech_commands(tmp_path_factory.mktemp("ks"))
    base = tmp_path_factory.mktemp("runs")
    finish(cli(base / "alone", corpus, ALONE))
    finish(cli(base / "after-search", corpus, AFTER_SEARCH))
    killed_log = kill_in_the_full_baseline(cli(base / "resumed", corpus, AFTER_SEARCH))
    resumed_log = finish(cli(base / "resumed", corpus, AFTER_SEARCH, resume=True))
    summaries = {name: json.loads((base / name / "summary.json").read_text()) for name in ("alone", "after-search", "resumed")}
    return base, summaries, killed_log, resumed_log


def test_the_kill_landed_in_the_middle_of_the_full_baseline(runs):
    base, _, killed_log, resumed_log = runs
    assert f"baseline head-only at step {STEPS}" in killed_log  # head-only finished before full started
    assert "baseline full at step" not in killed_log
    # The resumed process continued from the checkpoint: no search, no regret training and no
    # head-only baseline again, only the rest of the full baseline.
    assert "resumed the search" in resumed_log
    assert "baseline head-only at step" not in resumed_log and "dev P=" not in resumed_log
    assert f"baseline full at step {STEPS}" in resumed_log


@pytest.mark.parametrize("other", ["after-search", "resumed"])
def test_the_full_baseline_is_the_same_alone_after_a_search_and_after_a_resume(runs, other):
    _, summaries, _, _ = runs
    alone, got = summaries["alone"]["baselines"]["full"], summaries[other]["baselines"]["full"]
    assert got["steps"] == alone["steps"] == STEPS
    assert got["trainable_upstream"] == alone["trainable_upstream"]
    assert got["curve"] == alone["curve"], f"{other}: the full baseline's dev curve differs from the baseline run alone"
    assert got["final_dev"] == alone["final_dev"], f"{other}: full baseline dev {got['final_dev']} vs alone {alone['final_dev']}"
    assert got["final_test"] == alone["final_test"], f"{other}: full baseline test {got['final_test']} vs alone {alone['final_test']}"


def test_a_resume_in_the_baseline_changes_nothing_else(runs):
    base, summaries, _, _ = runs
    ref, got = summaries["after-search"], summaries["resumed"]
    assert got["baselines"] == ref["baselines"]  # head-only too
    for key in ("chosen_p", "final", "regret", "steps_spent_search", "steps_spent_regret"):
        assert got[key] == ref[key], key
    assert [(c["p"], c["steps"], c["final_dev"], c["final_test"], c["curve"]) for c in got["candidates"]] == \
        [(c["p"], c["steps"], c["final_dev"], c["final_test"], c["curve"]) for c in ref["candidates"]]
    expected = load_file(str(base / "after-search" / "delta" / "delta.safetensors"))
    delta = load_file(str(base / "resumed" / "delta" / "delta.safetensors"))
    assert delta.keys() == expected.keys()
    for key in expected:
        assert torch.equal(delta[key], expected[key]), f"{key} differs after a resume in the full baseline"


def test_a_candidate_is_the_same_alone_and_after_a_search(runs):
    """P=0.1 is the one candidate of the short run; with --measure-regret every candidate of the
    longer run is trained to T, so its P=0.1 ends where the short run's did (same dev curve, same
    metrics at T), whatever the search picked and whatever ran in between."""
    _, summaries, _, _ = runs
    alone = summaries["alone"]
    (cand,) = [c for c in summaries["after-search"]["candidates"] if c["p"] == 0.1]
    assert alone["chosen_p"] == 0.1 and cand["steps"] == alone["candidates"][0]["steps"] == STEPS
    assert cand["curve"] == alone["candidates"][0]["curve"]
    assert cand["final_dev"] == alone["final"]["dev"] and cand["final_test"] == alone["final"]["test"]
