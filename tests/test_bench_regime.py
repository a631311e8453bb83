"""bench/regime.py: the grid it plans and the reading it makes of finished runs.

The oracle is written out by hand: which CLI flags each cell must pass, and, for made-up run
summaries, which rate each row keeps (best dev), the winner, whether the children rise with P and
the FT - head-only gap. No run is made.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import regime  # noqa: E402


def _args(tmp_path, *flags):
    return regime.parse_args(["--work", str(tmp_path), "--corpus-cache", str(tmp_path / "corpora"), *flags])


def test_plan_passes_each_cells_method_rate_and_size(tmp_path):
    args = _args(tmp_path, "--p", "0.01", "--lr", "0.002", "--lr-scales", "0.5,2", "--hours", "full,0.05")
    jobs = regime.plan(args, "ks")
    # Per size: Weighted-sum once (head rate fixed), P=0.01 and FT at both rates.
    assert len(jobs) == 2 * (1 + 2 + 2)
    cmd, folder, steps = jobs[(0, "0.05", 1.0, 0.01, 2.0)]
    assert cmd[cmd.index("--method") + 1] == "child-tuning-d" and cmd[cmd.index("--candidates") + 1] == "0.01"
    assert cmd[cmd.index("--lr") + 1] == "0.004" and cmd[cmd.index("--head-lr") + 1] == "0.002"
    assert cmd[cmd.index("--max-train-hours") + 1] == "0.05" and folder.name == "P=0.01-lr-x2"
    cmd, _, _ = jobs[(0, "full", 1.0, 1.0, 0.5)]
    assert cmd[cmd.index("--method") + 1] == "full" and "--max-train-hours" not in cmd
    assert cmd[cmd.index("--lr") + 1] == "0.001"
    cmd, _, _ = jobs[(0, "full", 1.0, 0.0, None)]
    assert cmd[cmd.index("--method") + 1] == "weighted-sum"
    scaled = regime.plan(_args(tmp_path, "--p", "0.01", "--lr", "0.002", "--lr-scales", "0.5,2", "--scale-head-lr"), "ks")
    cmd, _, _ = scaled[(0, "full", 1.0, 0.0, 2.0)]
    assert cmd[cmd.index("--head-lr") + 1] == "0.004"


def _summary(dev, test):
    return {"primary_metric": "accuracy", "higher_is_better": True, "final": {"dev": {"accuracy": dev}, "test": {"accuracy": test}},
            "trainable": {"upstream_entries": 7, "method_params": 0}}


def test_table_keeps_each_rows_best_dev_rate_and_reads_the_setting(tmp_path):
    args = _args(tmp_path, "--p", "0.001,0.1", "--lr-scales", "1,3", "--hours", "full")
    dev_test = {(0.0, None): (0.50, 0.60), (0.001, 1.0): (0.70, 0.71), (0.001, 3.0): (0.80, 0.75),
                (0.1, 1.0): (0.78, 0.90), (0.1, 3.0): (0.60, 0.60), (1.0, 1.0): (0.65, 0.85), (1.0, 3.0): (0.40, 0.99)}
    summaries = {(0, "full", 1.0, p, s): _summary(*v) for (p, s), v in dev_test.items()}
    setting = regime.table(args, summaries)["settings"]["hours=full, steps=x1"]
    rows = setting["rows"]
    assert rows["P=0.001"]["best_rate"] == "3" and rows["P=0.001"]["test"] == 0.75
    assert rows["P=0.1"]["best_rate"] == "1" and rows["FT"]["best_rate"] == "1"
    assert setting["winner"] == "P=0.001" and setting["best_child"] == "P=0.001"
    assert setting["children_rise_with_p"] is False
    assert setting["ft_minus_head_only_test"] == pytest.approx(0.85 - 0.60)
    text = regime.markdown({"table": {"metric": "accuracy", "higher_is_better": True, "settings": {"s": setting}},
                                         "task": "ks", "upstream": None, "date": "d", "seeds": [0], "lr": 0.005,
                                         "scale_head_lr": False, "lr_scales": [1.0, 3.0], "missing_runs": [], "commits": {},
                                         "environment": {"device": "cpu", "cores": 2, "versions": {"torch": "x"}}})
    assert "P=0.001" in text and "seed(s)" not in text
    # A cell with fewer finished seeds than the study's says so.
    text = regime.markdown({"table": {"metric": "accuracy", "higher_is_better": True, "settings": {"s": setting}},
                            "task": "ks", "upstream": None, "date": "d", "seeds": [0, 1], "lr": 0.005,
                            "scale_head_lr": False, "lr_scales": [1.0, 3.0], "missing_runs": [], "commits": {},
                            "environment": {"device": "cpu", "cores": 2, "versions": {"torch": "x"}}})
    assert "0.800 / 0.750 (1 seed(s))" in text


@pytest.mark.parametrize("flags, message", [(["--p", "0.1,1"], "--p"), (["--lr-scales", "0"], "--lr-scales"),
                                            (["--hours", "full,abc"], "--hours"), (["--p", "0.1,0.1"], "duplicate")])
def test_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as err:
        _args(tmp_path, *flags)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_results_file_is_named_after_the_grid(tmp_path, monkeypatch):
    """Two grids of one day write two files: a run of part of a grid cannot overwrite another's results."""
    assert regime.grid_slug(_args(tmp_path)) == ""
    assert regime.grid_slug(_args(tmp_path, "--hours", "0.05", "--steps-scales", "1,3")) == "-hours-0.05-steps-x1_3"
    assert regime.grid_slug(_args(tmp_path, "--lr-scales", "0.3,1,3,10", "--seeds", "0,1")) == "-seeds-0_1-lr-x0.3_1_3_10"
    assert regime.grid_slug(_args(tmp_path, "--p", "0.01", "--scale-head-lr")) == "-p-0.01-head-lr-scaled"
    assert regime.grid_slug(_args(tmp_path, "--lr", "0.123")) == "-lr-0.123"
    # main() writes under that name.
    written = []
    monkeypatch.setattr(regime, "write_results", lambda stem, *a, **k: written.append(stem.name))
    assert regime.main(["--work", str(tmp_path), "--corpus-cache", str(tmp_path / "c"), "--out", str(tmp_path),
                        "--collect-only", "--hours", "0.05"]) == 0
    assert written and written[0].endswith("-regime-ks-hours-0.05")
