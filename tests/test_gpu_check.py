"""bench/gpu_check.py runs end to end on the CPU (--dry-run), so the one GPU run is not wasted.

The dry run drives every section of the script (kernel correctness, the Fisher pass check,
every benchmark) with tiny sizes on the Triton interpreter and wall-clock timings; only the
CUDA timing and memory calls are left for the GPU. Its figures are not checked: they mean
nothing on the CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import op_cases

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("kernel_correctness", "fisher_pass_correctness", "rng_streams", "fisher_pass", "bandwidth",
            "sparse_adamw", "sparse_adamw_model", "fisher_kernel")


@pytest.mark.slow
def test_gpu_check_dry_run_completes_every_section(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the dry run needs triton, a dependency on Linux only (pyproject.toml)")
    import triton  # noqa: F401  (a dependency on Linux: a missing one fails, never skips)
    # The script sets TRITON_INTERPRET itself for --dry-run.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--results-dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (report_path,) = tmp_path.glob("gpu_check_*_dry-run-cpu.json")
    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True and report["correctness_ok"] is True
    for section in SECTIONS:
        value = report[section]
        assert not (isinstance(value, dict) and ("error" in value and "traceback" in value
                                                 or "skipped" in value)), (section, value)
    assert all(case["ok"] for case in report["kernel_correctness"])
    assert {case["op"] for case in report["kernel_correctness"]} == {"gather", "sparse_adamw", "linear_fisher"}
    # The script runs the cases of tests/op_cases.py, the ones tests/test_ops.py runs.
    sddmm = [case for case in report["sparse_weight_grad_correctness"] if case["op"] == "sddmm"]
    assert sddmm and all(case["ok"] for case in sddmm)
    known = {(case.op, case.name) for case in op_cases.ALL_CASES}
    assert all((case["op"], case["case"]) in known for case in report["kernel_correctness"] + sddmm)
    assert all("error" not in row for row in report["fisher_kernel"]), report["fisher_kernel"]
    assert report["fisher_pass"]["memory_ratio"] > 0  # so the summary's memory line was formatted
    assert "Fisher pass:" in result.stdout and "all correctness checks passed" in result.stdout
