"""bench/mini_superb.py tables runs of one commit only, unless --allow-mixed-commits (then the
tables say which rows came from which commit). Fake run folders, no training."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini_superb():
    spec = importlib.util.spec_from_file_location("mini_superb_under_test", ROOT / "bench" / "mini_superb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(acc: float) -> dict:
    return {"accuracy": acc, "nll": 1.0 - acc}


def _adtuning_summary(commit, seed: int) -> dict:
    cands = [{"p": p, "k": int(p * 1000), "steps": 300, "final_dev": _metrics(0.5 + p + seed / 100),
              "final_test": _metrics(0.6 + p)} for p in (0.001, 0.01, 0.1)]
    base = {"trainable_head": 10, "steps": 300}
    summary = {
        "primary_metric": "accuracy", "higher_is_better": True, "candidates": cands, "chosen_p": 0.1,
        "final": {"dev": _metrics(0.6 + seed / 100), "test": _metrics(0.7)}, "steps_spent_search": 420,
        "regret": 0.0, "regret_test": 0.0, "train_seconds": 150.0, "date": "2026-12-03T00:00:00+00:00",
        "wall_seconds": 200.0,
        "baselines": {"head-only": {**base, "p": 0.0, "trainable_upstream": 0, "final_dev": _metrics(0.4),
                                    "final_test": _metrics(0.45)},
                      "full": {**base, "p": 1.0, "trainable_upstream": 1000, "final_dev": _metrics(0.8),
                               "final_test": _metrics(0.9)}},
    }
    return _with_commit(summary, commit)


def _f_summary(commit) -> dict:
    summary = {"primary_metric": "accuracy", "higher_is_better": True, "candidates": [{"p": 0.1, "k": 100, "steps": 300}],
               "final": {"dev": _metrics(0.55), "test": _metrics(0.65)}, "train_seconds": 30.0,
               "date": "2026-12-03T00:00:00+00:00", "wall_seconds": 40.0}
    return _with_commit(summary, commit)


def _with_commit(summary: dict, commit) -> dict:
    """``commit``: None (no record: an old run), a (sha, dirty) pair, or a list of pairs (segments)."""
    if isinstance(commit, tuple):
        summary["commit"] = {"sha": commit[0], "dirty": commit[1]}
    elif isinstance(commit, list):
        summary["commit"] = {"sha": commit[-1][0], "dirty": commit[-1][1]}
        summary["commits"] = [{"sha": sha, "dirty": dirty} for sha, dirty in commit]
    return summary


A = ("a" * 40, False)
B = ("b" * 40, False)


def _make_runs(work: Path, commits: dict) -> None:
    """Fake finished ks runs: ``commits`` maps (seed, "adtuning"|"f") to the commit of that run."""
    for (seed, kind), commit in commits.items():
        folder = work / "full" / "ks" / f"seed{seed}" / ("adtuning" if kind == "adtuning" else "child-tuning-f")
        folder.mkdir(parents=True)
        summary = _adtuning_summary(commit, seed) if kind == "adtuning" else _f_summary(commit)
        (folder / "config.json").write_text("{}")
        (folder / "summary.json").write_text(json.dumps(summary))


def _table(mini_superb, tmp_path: Path, commits: dict, *extra: str) -> tuple[int, Path]:
    work, out = tmp_path / "work", tmp_path / "out"
    _make_runs(work, commits)
    code = mini_superb.main(["--collect-only", "--tasks", "ks", "--seeds", "0,1", "--low-resource-task", "",
                             "--methods", "ad-tuning,child-tuning-f",
                             "--work", str(work), "--out", str(out), "--corpus-cache", str(tmp_path / "corpora"), *extra])
    return code, out


def _outputs(out: Path) -> tuple[dict, str]:
    (json_path,) = out.glob("*-mini-superb.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_run_commit_labels(mini_superb):
    assert mini_superb.run_commit({}) == "unknown"
    assert mini_superb.run_commit({"commit": None}) == "unknown"
    assert mini_superb.run_commit({"commit": {"sha": "0123456789abcdef", "dirty": False}}) == "0123456789ab"
    assert mini_superb.run_commit({"commit": {"sha": "0123456789abcdef", "dirty": True}}) == "0123456789ab+dirty"
    # A resumed run: one record per segment; segments at one commit are that commit.
    same = {"commits": [{"sha": "a" * 40, "dirty": False}] * 2, "commit": {"sha": "a" * 40, "dirty": False}}
    assert mini_superb.run_commit(same) == "a" * 12
    across = {"commits": [{"sha": "a" * 40, "dirty": False}, {"sha": "b" * 40, "dirty": True}]}
    assert mini_superb.run_commit(across) == f"{'a' * 12} -> {'b' * 12}+dirty"


def test_one_commit_is_tabled(mini_superb, tmp_path):
    code, out = _table(mini_superb, tmp_path, {(0, "adtuning"): A, (0, "f"): A, (1, "adtuning"): A, (1, "f"): A})
    assert code == 0
    result, md = _outputs(out)
    assert result["commits"] == {"a" * 12: sorted(str(p) for p in (tmp_path / "work" / "full" / "ks").glob("seed*/*"))}
    assert f"Commit: {'a' * 12} (every run)." in md
    assert "Mixed commits" not in md
    assert all(r["commit"] == "a" * 12 for r in result["runs"])


@pytest.mark.parametrize("commits", [
    {(0, "adtuning"): A, (0, "f"): A, (1, "adtuning"): B, (1, "f"): A},     # two commits
    {(0, "adtuning"): A, (0, "f"): None, (1, "adtuning"): A, (1, "f"): A},  # unknown is a commit of its own
    {(0, "adtuning"): A, (0, "f"): (A[0], True), (1, "adtuning"): A, (1, "f"): A},  # a dirty tree is not the commit
    {(0, "adtuning"): [A, B], (0, "f"): [A, B], (1, "adtuning"): [A, B], (1, "f"): [A, B]},  # resumed across commits
], ids=["two-commits", "unknown", "dirty", "resumed-across"])
def test_mixed_commits_are_refused(mini_superb, tmp_path, capsys, commits):
    code, out = _table(mini_superb, tmp_path, commits)
    assert code == 2
    assert not out.exists() or not any(out.iterdir()), "nothing may be written when refusing"
    err = capsys.readouterr().err
    assert "refusing to table" in err and "--allow-mixed-commits" in err
    assert str(tmp_path / "work" / "full" / "ks" / "seed0" / "adtuning") in err


def test_all_unknown_is_one_commit(mini_superb, tmp_path):
    code, out = _table(mini_superb, tmp_path, {(0, "adtuning"): None, (0, "f"): None, (1, "adtuning"): None, (1, "f"): None})
    assert code == 0
    assert "Commit: unknown (every run)." in _outputs(out)[1]


def test_allow_mixed_commits_says_which_rows_came_from_where(mini_superb, tmp_path):
    commits = {(0, "adtuning"): A, (0, "f"): B, (1, "adtuning"): B, (1, "f"): None}
    code, out = _table(mini_superb, tmp_path, commits, "--allow-mixed-commits")
    assert code == 0
    result, md = _outputs(out)
    assert set(result["commits"]) == {"a" * 12, "b" * 12, "unknown"}
    assert result["tasks"]["ks"]["commits"] == {"0": {"adtuning": "a" * 12, "child-tuning-f": "b" * 12},
                                                "1": {"adtuning": "b" * 12, "child-tuning-f": "unknown"}}
    assert "Mixed commits" in md
    # Letters are given in sorted label order: a = aaaa..., b = bbbb..., c = unknown.
    assert f"- a = {'a' * 12}: 1 run(s)" in md and f"- b = {'b' * 12}: 2 run(s)" in md and "- c = unknown: 1 run(s)" in md
    rows = {line.split("|")[1].strip(): line.rstrip("|").rsplit("|", 1)[1].strip()
            for line in md.splitlines() if line.startswith("| ") and "upstream params" not in line and line.count("|") == 5}
    assert rows["FT"] == "a (ks 0); b (ks 1)"
    assert rows["AD-TUNING"] == "a (ks 0); b (ks 1)"
    assert rows["CHILD-TUNING_F"] == "b (ks 0); c (ks 1)"
    assert f"a {'a' * 12}: {tmp_path / 'work' / 'full' / 'ks' / 'seed0' / 'adtuning'}" in md


def test_new_runs_are_not_added_to_runs_of_another_commit(mini_superb, tmp_path, capsys, monkeypatch):
    """Before starting anything: finished runs of commit A and runs still to make at the checkout's
    commit B are refused up front (no run is started)."""
    work = tmp_path / "work"
    _make_runs(work, {(0, "adtuning"): A, (0, "f"): A})  # seed 1 still to make
    monkeypatch.setattr(mini_superb, "checkout_commit", lambda: B[0])
    started = []
    monkeypatch.setattr(mini_superb, "run", lambda *a, **k: started.append(a))
    code = mini_superb.main(["--tasks", "ks", "--seeds", "0,1", "--low-resource-task", "", "--methods", "ad-tuning,child-tuning-f",
                             "--work", str(work),
                             "--out", str(tmp_path / "out"), "--corpus-cache", str(tmp_path / "corpora")])
    assert code == 2 and not started
    err = capsys.readouterr().err
    assert "2 run(s) to make" in err and f"commit {'a' * 12}" in err


def test_method_runs_give_their_table_2_rows(mini_superb, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _make_runs(work, {(0, "adtuning"): A, (0, "f"): A})
    for method, added, acc in (("lora", 2048, 0.61), ("frozen", 0, 0.3)):
        folder = work / "full" / "ks" / "seed0" / method
        folder.mkdir(parents=True)
        summary = {"primary_metric": "accuracy", "higher_is_better": True, "method": method, "total_steps": 300,
                   "train_seconds": 12.0, "final": {"dev": _metrics(acc - 0.1), "test": _metrics(acc)},
                   "trainable": {"upstream_entries": 0, "method_params": added, "head_params": 10, "total": added + 10},
                   "date": "2026-12-03T00:00:00+00:00", "wall_seconds": 20.0}
        (folder / "config.json").write_text("{}")
        (folder / "summary.json").write_text(json.dumps(_with_commit(summary, A)))
    code = mini_superb.main(["--collect-only", "--tasks", "ks", "--seeds", "0", "--low-resource-task", "",
                             "--methods", "ad-tuning,child-tuning-f,lora,frozen,houlsby",
                             "--work", str(work), "--out", str(out), "--corpus-cache", str(tmp_path / "corpora")])
    assert code == 0
    result, md = _outputs(out)
    rows = result["tasks"]["ks"]["summary"]["rows"]
    assert rows["LoRA"]["trainable_upstream"] == 2048 and rows["LoRA"]["test"]["mean"] == 0.61
    assert rows["Baseline"]["trainable_upstream"] == 0 and rows["Baseline"]["test"]["mean"] == 0.3
    assert rows["Weighted-sum"]["test"]["mean"] == 0.45 and rows["Houlsby"]["test"]["mean"] is None
    table = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and line.count("|") == 4]
    assert table[1:10] == ["FT", "Baseline", "Houlsby", "AdapterBias", "LoRA", "Prefix", "CNN adapter", "CHAPTER", "Weighted-sum"]
    assert "| LoRA | 2,048 | 0.610 |" in md
    assert str(work / "full" / "ks" / "seed0" / "houlsby") in "\n".join(result["missing_runs"])


def test_methods_must_include_the_adtuning_run(mini_superb, tmp_path, capsys):
    with pytest.raises(SystemExit):
        mini_superb.main(["--collect-only", "--methods", "lora", "--work", str(tmp_path)])
    assert "--methods" in capsys.readouterr().err


def test_a_study_on_another_upstream_has_its_own_runs_and_results(mini_superb, tmp_path):
    """--upstream: every run gets it, the run folders and the results file are named after it, and
    the default upstream's runs are not reused for it."""
    work, out = tmp_path / "work", tmp_path / "out"
    _make_runs(work, {(0, "adtuning"): A, (0, "f"): A})  # runs of the default upstream
    assert mini_superb.upstream_slug(None) == "" and mini_superb.upstream_slug("/x/my up/") == "-my_up"
    code = mini_superb.main(["--collect-only", "--tasks", "ks", "--seeds", "0", "--low-resource-task", "",
                             "--methods", "ad-tuning,child-tuning-f", "--upstream", "adtuning-hubert-small",
                             "--work", str(work), "--out", str(out), "--corpus-cache", str(tmp_path / "corpora")])
    assert code == 0
    (json_path,) = out.glob("*-mini-superb-adtuning-hubert-small.json")
    result = json.loads(json_path.read_text())
    assert result["upstream"] == "adtuning-hubert-small" and result["tasks"] == {}
    assert str(work / "full-adtuning-hubert-small" / "ks" / "seed0" / "adtuning") in result["missing_runs"]
    (md_path,) = out.glob("*-mini-superb-adtuning-hubert-small.md")
    assert "Upstream: adtuning-hubert-small;" in md_path.read_text()  # the study's upstream, not the default
    args = type("Args", (), {"corpus_cache": tmp_path / "corpora", "threads": 1, "upstream": "adtuning-hubert-small"})()
    cmd = mini_superb.cli_command("ks", tmp_path / "run", 0, 10, [], args)
    assert cmd[-2:] == ["--upstream", "adtuning-hubert-small"]


def test_finished_runs_are_kept_and_restored_on_another_machine(mini_superb, tmp_path):
    """--keep: a finished run's summary is kept once (compact JSON, equal content); a study with
    fresh run folders (another machine) restores it and tables the same figures as the original."""
    keep, out1, out2 = tmp_path / "keep", tmp_path / "out1", tmp_path / "out2"
    _make_runs(tmp_path / "work", {(0, "adtuning"): A, (0, "f"): A})
    common = ["--collect-only", "--tasks", "ks", "--seeds", "0", "--low-resource-task", "", "--methods", "ad-tuning,child-tuning-f",
              "--corpus-cache", str(tmp_path / "corpora"), "--keep", str(keep)]
    assert mini_superb.main([*common, "--work", str(tmp_path / "work"), "--out", str(out1)]) == 0
    kept = keep / "full" / "ks" / "seed0" / "adtuning" / "summary.json"
    assert json.loads(kept.read_text()) == json.loads((tmp_path / "work" / "full" / "ks" / "seed0" / "adtuning" / "summary.json").read_text())
    assert (keep / "full" / "ks" / "seed0" / "child-tuning-f" / "summary.json").is_file()
    assert mini_superb.main([*common, "--work", str(tmp_path / "fresh"), "--out", str(out2)]) == 0
    (first,), (second,) = out1.glob("*.json"), out2.glob("*.json")
    assert json.loads(first.read_text())["tasks"] == json.loads(second.read_text())["tasks"] != {}
    assert (tmp_path / "fresh" / "full" / "ks" / "seed0" / "adtuning" / "summary.json").is_file()
