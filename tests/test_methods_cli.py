"""Every method of the paper's Table 2 through the CLI: the same artifacts for each (summary.json
with the method and its trainable counts, a delta of only what it trained, export --evaluate giving
the run's own test metrics, --merge where the method can be merged, resume after an interruption),
as rows of one run (--baselines) and as the run's method (--method); bad input is one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adtuning import train
from adtuning.export import load_finetuned, merge_delta
from adtuning.export import main as export_main
from adtuning.methods import MethodNotMergeableError
from adtuning.recipe.methods import METHODS
from adtuning.search import AdaptiveSearch
from tests.speech.speech_fixtures import write_speech_commands

MODULE_METHODS = [m for m, spec in METHODS.items() if spec.kind == "module"]
TINY = ["--upstream", "tiny-hubert", "--steps", "4", "--batch-size", "2", "--fisher-samples", "6", "--eval-interval", "2",
        "--checkpoint-interval", "1", "--threads", "1", "--no-progress", "--no-plots", "--log-level", "WARNING", "--backend",
        "reference"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_speech_commands(tmp_path_factory.mktemp("methods-corpus") / "ks")


def run(out, corpus, *flags):
    return train.main([*TINY, "--data-dir", str(corpus), "--output-dir", str(out), *flags])


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, corpus):
    """One run per method (the run's own method)."""
    base = tmp_path_factory.mktemp("method-runs")
    outs = {}
    for method in METHODS:
        flags = ["--method", method]
        if method in ("child-tuning-d", "child-tuning-f"):
            flags += ["--candidates", "0.1"]
        out = base / method
        assert run(out, corpus, *flags) == 0, method
        outs[method] = out
    return outs


def test_every_method_writes_the_same_artifacts(method_runs):
    from adtuning.speech import build_upstream

    upstream_total = sum(p.numel() for p in build_upstream("tiny-hubert").parameters())
    for method, out in method_runs.items():
        summary = json.loads((out / "summary.json").read_text())
        trainable = summary["trainable"]
        assert summary["method"] == method and summary["total_steps"] == 4, method
        assert trainable["upstream_total"] == upstream_total
        assert trainable["total"] == trainable["upstream_entries"] + trainable["method_params"] + trainable["head_params"]
        delta = load_file(str(out / "delta" / "delta.safetensors"))
        meta = json.loads((out / "delta" / "delta.json").read_text())
        assert meta["method"] == method and meta["base_fingerprint"] == summary["base_fingerprint"]
        added = sum(v.numel() for k, v in delta.items() if k.startswith("head.method."))
        indices = sum(v.numel() for k, v in delta.items() if k.endswith(".indices"))
        assert added == trainable["method_params"], method
        assert indices == trainable["upstream_entries"], method
        kind = METHODS[method].kind
        if kind == "module":
            assert trainable["upstream_entries"] == 0 and trainable["method_params"] > 0, method
        elif kind == "head":
            assert trainable["upstream_entries"] == 0 and trainable["method_params"] == 0, method
        elif kind == "dense":
            up = build_upstream("tiny-hubert")
            params = dict(up.named_parameters())
            assert trainable["upstream_entries"] == sum(params[n].numel() for n in up.default_scored_parameters())
        else:
            assert 0 < trainable["upstream_entries"] < upstream_total, method
        assert summary["commit"]["sha"] is None or len(summary["commit"]["sha"]) == 40


def test_frozen_has_no_layer_weights_and_weighted_sum_has_them(method_runs):
    frozen = load_file(str(method_runs["frozen"] / "delta" / "delta.safetensors"))
    weighted = load_file(str(method_runs["weighted-sum"] / "delta" / "delta.safetensors"))
    assert not any("featurizer" in k for k in frozen)
    assert any("featurizer.weights" in k for k in weighted)
    assert len(weighted) == len(frozen) + 1


@pytest.mark.parametrize("method", ["frozen", "lora", "houlsby", "prefix", "chapter", "child-tuning-f"])
def test_export_evaluate_gives_the_runs_test_metrics(method_runs, method, capsys):
    out = method_runs[method]
    summary = json.loads((out / "summary.json").read_text())
    assert export_main([str(out / "delta"), "--evaluate", "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy={summary['final']['test']['accuracy']:.4f}" in printed
    assert f"nll={summary['final']['test']['nll']:.4f}" in printed


def test_lora_merges_into_a_plain_transformers_model_with_the_same_outputs(method_runs, tmp_path):
    from adtuning.speech import build_upstream

    delta = method_runs["lora"] / "delta"
    model = load_finetuned(delta)
    merged = build_upstream(str(merge_delta(delta, tmp_path / "merged"))).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([8000, 6001])
    with torch.no_grad():
        expected, _ = model.upstream(wav, lengths)
        got, _ = merged(wav, lengths)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in MODULE_METHODS if m != "lora"])
def test_module_methods_other_than_lora_refuse_to_merge(method_runs, method, tmp_path, capsys):
    assert export_main([str(method_runs[method] / "delta"), "--merge", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"method {method!r} adds modules" in err and "cannot be merged" in err
    assert not (tmp_path / "merged").exists()
    assert issubclass(MethodNotMergeableError, RuntimeError)


def test_method_rows_run_beside_the_search_and_leave_the_upstream_as_it_was(tmp_path, corpus, method_runs):
    out = tmp_path / "rows"
    flags = ["--candidates", "0.01,0.1", "--r", "0.5", "--baselines", "frozen,lora,houlsby,full"]
    assert run(out, corpus, *flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["baselines"]) == ["frozen", "lora", "houlsby", "full"]
    # A row trains like the run of that method (same schedule, seed, data order, initial head).
    for method in ("frozen", "lora", "houlsby"):
        row = summary["baselines"][method]
        alone = json.loads((method_runs[method] / "summary.json").read_text())
        assert row["final_test"] == alone["final"]["test"] and row["final_dev"] == alone["final"]["dev"], method
        assert row["trainable_method"] == alone["trainable"]["method_params"], method
    # The chosen candidate is unaffected by the rows: the same delta as the search alone.
    plain = tmp_path / "plain"
    assert run(plain, corpus, "--candidates", "0.01,0.1", "--r", "0.5") == 0
    a = load_file(str(out / "delta" / "delta.safetensors"))
    b = load_file(str(plain / "delta" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_a_method_run_resumes_to_the_same_delta(method_runs, tmp_path, corpus, monkeypatch, method):
    original = AdaptiveSearch._train

    def interrupted(self, cand, until):
        original(self, cand, until - 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(AdaptiveSearch, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, corpus, "--method", method)
    monkeypatch.setattr(AdaptiveSearch, "_train", original)
    assert run(tmp_path, corpus, "--method", method, "--resume") == 0
    expected = load_file(str(method_runs[method] / "delta" / "delta.safetensors"))
    got = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("flags, message", [
    (["--method", "houlsby", "--lora-rank", "4"], "--lora-rank: applies to --method lora, and this run trains houlsby"),
    (["--method", "lora", "--baselines", "prefix"], "--baselines: prefix add modules to the upstream"),
    (["--baselines", "ad-tuning"], "--baselines: unknown baseline 'ad-tuning'"),
    (["--method", "full", "--candidates", "0.1"], "--candidates: does not apply to --method full"),
])
def test_bad_method_flags_are_one_line_and_write_nothing(tmp_path, corpus, capsys, flags, message):
    out = tmp_path / "out"
    assert run(out, corpus, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_an_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--method", "bitfit"])
    assert exc.value.code == 2
    assert "argument --method" in capsys.readouterr().err
