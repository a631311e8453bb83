"""bench/bench_methods.py runs on the tiny model, and its CHILD-TUNING row is the CLI's.

The row must train the way ``python -m adtuning.train`` does by default (``--weight-grad auto``,
the SDDMM where the child is sparse enough), which its first table did not: the count of Linears
that :func:`adtuning.install_sparse_weight_grad` put on each path is the oracle. Timings are not
checked.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_methods_tiny_child_row_takes_the_clis_sparse_weight_gradients(tmp_path):
    out = tmp_path / "methods.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_methods.py"), "--tiny", "--only", "child-tuning P=0.01,lora",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "lora", "child-tuning P=0.01"]
    child = rows["child-tuning P=0.01"]
    assert child["weight_grad"] == "auto"
    assert child["sparse_dw_linears"] > 0 and child["dense_dw_linears"] == 0, child
    assert rows["full"]["time_ratio_to_full"] == 1.0
    assert all(r["upstream_trainable"] > 0 for r in rows.values())
