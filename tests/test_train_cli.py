"""End to end: the CLI on the embedded default (small), resume, export/merge, bad flags."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adtuning import train
from adtuning.export import load_finetuned, merge_delta
from adtuning.export import main as export_main
from adtuning.search import AdaptiveSearch

# The reference backend explicitly: the runs of this module are compared with each other bitwise.
SMALL = ["--backend", "reference", "--steps", "6", "--candidates", "0.01,0.1", "--r", "0.5", "--fisher-samples", "12", "--batch-size", "8",
         "--eval-interval", "3", "--checkpoint-interval", "2", "--no-progress", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def corpus_cache(embedded_corpus_cache):
    return embedded_corpus_cache


def run_cli(out, corpus_cache, *extra):
    return train.main([*SMALL, "--output-dir", str(out), "--corpus-cache", str(corpus_cache), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_cache):
    out = tmp_path_factory.mktemp("run")
    assert run_cli(out, corpus_cache) == 0
    return out


def test_embedded_default_runs_end_to_end(finished_run, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["task"] == "ks" and summary["chosen_p"] in (0.01, 0.1)
    assert summary["steps_exhaustive"] == 12 and summary["steps_spent"] == 3 + 3 + 3
    assert {c["p"] for c in summary["candidates"]} == {0.01, 0.1}
    assert all(c["dev_at_rungs"] for c in summary["candidates"])
    assert "accuracy" in summary["final"]["dev"] and "test" in summary["final"]
    for name in ("fisher_distribution.png", "candidate_curves.png", "layer_ratios.png", "config.json"):
        assert (finished_run / name).is_file(), name
    delta = load_file(str(finished_run / "delta" / "delta.safetensors"))
    k = sum(v.numel() for key, v in delta.items() if key.endswith(".indices"))
    assert k == summary["chosen_k"]
    assert summary["delta_bytes"] < 1_000_000


COMPARE = ("--measure-regret", "--baselines", "head-only,full")


@pytest.fixture(scope="module")
def compared_run(tmp_path_factory, corpus_cache):
    out = tmp_path_factory.mktemp("compared")
    assert run_cli(out, corpus_cache, *COMPARE) == 0
    return out


def test_regret_and_baselines_are_measured_without_changing_the_pick(finished_run, compared_run, capsys):
    out = compared_run
    summary = json.loads((out / "summary.json").read_text())
    train.print_summary(summary)
    printed = capsys.readouterr().out
    plain = json.loads((finished_run / "summary.json").read_text())
    metric = summary["primary_metric"]
    # The search is the plain run's; the comparisons ran after it: one culled candidate, 3 more steps.
    assert summary["chosen_p"] == plain["chosen_p"] and summary["steps_spent"] == summary["steps_spent_search"] == 9
    assert summary["steps_spent_regret"] == 3 and plain["steps_spent_regret"] == 0 and "regret" not in plain
    assert all(c["steps"] == 6 for c in summary["candidates"])
    assert sorted(c["status"] for c in summary["candidates"]) == ["finished", "regret"]
    finals = {c["p"]: c for c in summary["candidates"]}
    best_dev = max(c["final_dev"][metric] for c in finals.values())
    best_test = max(c["final_test"][metric] for c in finals.values())
    chosen = finals[summary["chosen_p"]]
    assert summary["regret"] == best_dev - chosen["final_dev"][metric] >= 0
    assert summary["regret_test"] == best_test - chosen["final_test"][metric] >= 0
    assert summary["regret_detail"]["chosen_dev"] == chosen["final_dev"][metric]
    # Evaluated and saved after the comparisons, the pick is exactly the plain run's.
    assert chosen["final_dev"] == summary["final"]["dev"] == plain["final"]["dev"]
    assert chosen["final_test"] == summary["final"]["test"] == plain["final"]["test"]
    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    got = load_file(str(out / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    head_only, full = summary["baselines"]["head-only"], summary["baselines"]["full"]
    assert head_only["p"] == 0 and head_only["trainable_upstream"] == 0 and head_only["trainable_params"] == head_only["trainable_head"] > 0
    assert full["p"] == 1 and full["trainable_upstream"] > max(c["k"] for c in summary["candidates"])
    assert full["trainable_head"] == head_only["trainable_head"]
    for b in (head_only, full):
        assert b["steps"] == 6 and metric in b["final_dev"] and metric in b["final_test"]
    d = summary["regret_detail"]
    assert (f"regret {summary['regret']:.4f} (dev {metric}; best at T: P={d['best_p']:g} {d['best_dev']:.4f}, "
            f"chosen P={summary['chosen_p']:g} {d['chosen_dev']:.4f})") in printed
    assert "comparison cost 3 extra steps" in printed
    assert f"baseline head-only (P=0: 0 upstream + {head_only['trainable_head']:,} head parameters trained, 6 steps)" in printed
    assert f"baseline full (P=1: {full['trainable_upstream']:,} upstream" in printed


def test_resume_during_the_full_baseline_matches_the_uninterrupted_comparison(compared_run, tmp_path, corpus_cache, monkeypatch):
    original = AdaptiveSearch._train

    def interrupted(self, cand, until):
        if cand.baseline == "full":
            original(self, cand, until - 1)
            raise KeyboardInterrupt
        return original(self, cand, until)

    monkeypatch.setattr(AdaptiveSearch, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path, corpus_cache, *COMPARE)
    monkeypatch.setattr(AdaptiveSearch, "_train", original)
    assert run_cli(tmp_path, corpus_cache, *COMPARE, "--resume") == 0
    got = json.loads((tmp_path / "summary.json").read_text())
    expected = json.loads((compared_run / "summary.json").read_text())
    for key in ("regret", "regret_test", "regret_detail", "baselines", "final", "steps_spent_search", "steps_spent_regret"):
        assert got[key] == expected[key], key
    assert [c["final_dev"] for c in got["candidates"]] == [c["final_dev"] for c in expected["candidates"]]
    delta = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    reference = load_file(str(compared_run / "delta" / "delta.safetensors"))
    assert all(torch.equal(delta[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_triton_backend_run_matches_the_reference_run(finished_run, tmp_path, corpus_cache):
    """The whole driver on the Triton kernels (interpreted on the CPU): Fisher pass, child
    selection, search and optimizer give the reference run's children and, within float
    rounding, its delta."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("compiled TF32x3 dots may flip entries at the top-k boundary; "
                    "bench/gpu_check.py compares the kernels on CUDA")
    from tests.backends import require_backend

    require_backend("triton")
    out = tmp_path / "triton-run"
    assert run_cli(out, corpus_cache, "--backend", "triton") == 0
    ours = json.loads((out / "summary.json").read_text())
    theirs = json.loads((finished_run / "summary.json").read_text())
    assert ours["backend"] == "triton" and theirs["backend"] == "reference"
    assert ours["chosen_p"] == theirs["chosen_p"] and ours["steps_spent"] == theirs["steps_spent"]
    delta = load_file(str(out / "delta" / "delta.safetensors"))
    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    assert delta.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith(".indices"):
            assert torch.equal(delta[key], value), key
        else:
            torch.testing.assert_close(delta[key], value, rtol=1e-5, atol=1e-5 * value.abs().max().item())


def run_interrupted(monkeypatch, out, corpus_cache, *extra):
    """Run the CLI and stop it (KeyboardInterrupt) in the middle of the second segment of the plan."""
    original = AdaptiveSearch._train
    calls = {"n": 0}

    def interrupted(self, cand, until):
        calls["n"] += 1
        if calls["n"] == 3:
            original(self, cand, until - 1)
            raise KeyboardInterrupt
        return original(self, cand, until)

    monkeypatch.setattr(AdaptiveSearch, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(out, corpus_cache, *extra)
    monkeypatch.setattr(AdaptiveSearch, "_train", original)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, corpus_cache, finished_run, monkeypatch):
    run_interrupted(monkeypatch, tmp_path, corpus_cache)
    assert not (tmp_path / "summary.json").exists()
    assert run_cli(tmp_path, corpus_cache, "--resume") == 0
    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    got = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_augmented_run_resumes_bit_for_bit_and_differs_from_the_clean_run(tmp_path, corpus_cache, finished_run, monkeypatch):
    """``--augment``: the degradations are drawn per item from the loader's seeded generator, so an
    interrupted augmented run resumes to the delta of an uninterrupted one; and they change training
    (the delta is not the clean run's)."""
    whole = tmp_path / "whole"
    assert run_cli(whole, corpus_cache, "--augment", "1") == 0
    run_interrupted(monkeypatch, tmp_path / "cut", corpus_cache, "--augment", "1")
    assert run_cli(tmp_path / "cut", corpus_cache, "--augment", "1", "--resume") == 0
    expected = load_file(str(whole / "delta" / "delta.safetensors"))
    got = load_file(str(tmp_path / "cut" / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    clean = load_file(str(finished_run / "delta" / "delta.safetensors"))
    assert any(not torch.equal(clean[k], expected[k]) for k in clean if k in expected)
    # Resuming without the flag is refused by name.
    assert run_cli(whole, corpus_cache, "--resume") == 2


def test_export_merge_gives_the_same_outputs_as_base_plus_delta(finished_run, tmp_path):
    from adtuning.speech import build_upstream

    delta_dir = finished_run / "delta"
    model = load_finetuned(delta_dir)
    merged_dir = merge_delta(delta_dir, tmp_path / "merged")
    merged = build_upstream(str(merged_dir)).eval()
    wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([16000, 12001])
    with torch.no_grad():
        expected, _ = model.upstream(wav, lengths)
        got, _ = merged(wav, lengths)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    head = load_file(str(merged_dir / "adtuning_head.safetensors"))
    assert all(torch.equal(head[n], p) for n, p in model.task.named_parameters())


def test_export_refuses_another_base_model(finished_run, capsys):
    assert export_main([str(finished_run / "delta"), "--evaluate", "--base", "tiny-hubert"]) == 2
    assert "different base model" in capsys.readouterr().err


def test_export_evaluates_with_the_run_data(finished_run, capsys):
    assert export_main([str(finished_run / "delta"), "--evaluate", "--split", "test"]) == 0
    summary = json.loads((finished_run / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert f"accuracy={summary['final']['test']['accuracy']:.4f}" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--candidates", "0,0.1"], "--candidates"),
        (["--candidates", "0.1,0.1"], "duplicate"),
        (["--r", "1.5"], "--r"),
        (["--c", "3", "--candidates", "0.1,0.01"], "--c"),
        (["--task", "asr", "--data-dir", "/nonexistent/LibriSpeech"], "--data-dir"),  # every task has an embedded corpus
        (["--data-dir", "/nonexistent/corpus"], "/nonexistent/corpus"),
        (["--rungs", "0.2"], "--rungs/--keep"),
        (["--fused", "--backend", "native"], "--fused"),
        (["--baselines", "foo"], "--baselines: unknown baseline 'foo' (choose from full, frozen, weighted-sum, lora"),
        (["--baselines", "full,head-only,full"], "--baselines: duplicate"),
        (["--max-nonfinite-skips", "0"], "--max-nonfinite-skips: must be >= 1, got 0"),
        (["--augment", "1.5"], "--augment: must be in [0, 1], got 1.5"),
    ],
)
def test_bad_flags_give_clear_errors(tmp_path, capsys, flags, message):
    assert train.main([*flags, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(finished_run, capsys, corpus_cache):
    assert run_cli(finished_run, corpus_cache) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_changed_flags(finished_run, capsys, corpus_cache):
    assert run_cli(finished_run, corpus_cache, "--resume", "--lr", "0.5") == 2
    assert "lr" in capsys.readouterr().err


def test_unparseable_flag_values_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--candidates", "a,b"])
    assert info.value.code == 2
    assert "--candidates" in capsys.readouterr().err


def test_the_default_backend_is_the_fused_one_when_it_loads(monkeypatch):
    from adtuning.backend_contract import BackendUnavailableError
    from adtuning.recipe import run

    cpu = torch.device("cpu")
    name, why = run.choose_backend(None, cpu)
    assert name == "native" and "default" in why
    assert run.choose_backend("reference", cpu) == ("reference", "asked for with --backend")

    def unavailable(name, device=None):
        raise BackendUnavailableError("no compiler")

    monkeypatch.setattr(run, "get_backend", unavailable)
    assert run.choose_backend(None, cpu) == ("reference", "the fused backend is not available")
    with pytest.raises(train.UsageError, match="--fused: backend 'native' is not available: no compiler"):
        run.choose_backend("fused", cpu)


def test_config_json_reruns_the_run_bit_for_bit(finished_run, tmp_path):
    out = tmp_path / "rerun"
    assert train.main(["--config", str(finished_run / "config.json"), "--output-dir", str(out)]) == 0
    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    got = load_file(str(out / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    rerun = json.loads((out / "config.json").read_text())["args"]
    original = json.loads((finished_run / "config.json").read_text())["args"]
    assert {k: v for k, v in rerun.items() if k != "output_dir"} == {k: v for k, v in original.items() if k != "output_dir"}


def test_resume_where_nothing_was_saved_starts_the_run_and_says_so(tmp_path, corpus_cache, finished_run, caplog):
    import logging

    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "absent"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="adtuning"):
            assert run_cli(out, corpus_cache, "--resume", "--log-level", "INFO") == 0
        assert [r for r in caplog.records if "nothing was saved" in r.getMessage() and "from the beginning" in r.getMessage()]
        got = load_file(str(out / "delta" / "delta.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_summary_records_the_commit_of_every_segment(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert set(summary["commit"]) == {"sha", "dirty"}
    assert [s["resumed"] for s in summary["commits"]] == [False]
    assert summary["commits"][0]["sha"] == summary["commit"]["sha"]


def test_fisher_groups_give_the_same_run(finished_run, tmp_path, corpus_cache):
    out = tmp_path / "groups"
    assert run_cli(out, corpus_cache, "--fisher-groups", "5") == 0
    expected = load_file(str(finished_run / "delta" / "delta.safetensors"))
    got = load_file(str(out / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ours, theirs = (json.loads((d / "summary.json").read_text())["fisher"] for d in (out, finished_run))
    assert ours["groups"] == 5 and len(ours["group_entries"]) == 5 and sum(ours["group_entries"]) == ours["summary"]["entries"]
    assert ours["summary"] == theirs["summary"]
    phases = json.loads((out / "summary.json").read_text())["peak_memory"]["phases"]
    assert {"load", "fisher", "search", "compare", "evaluate", "write"} <= set(phases)  # selection is folded into fisher


@pytest.mark.parametrize("progress", [True, False])
def test_evaluate_delta_passes_progress_to_the_upstream_load(finished_run, monkeypatch, progress):
    # build_upstream's own test holds that progress=False silences transformers' "Loading weights" bar;
    # here: evaluate_delta hands its progress switch to that load.
    import adtuning.speech as speech
    from adtuning.export import evaluate_delta

    seen = []
    real = speech.build_upstream

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(speech, "build_upstream", spy)
    data_dir = json.loads((finished_run / "config.json").read_text())["data_dir"]
    evaluate_delta(finished_run / "delta", data_dir, "test", progress=progress)
    assert seen == [progress]
