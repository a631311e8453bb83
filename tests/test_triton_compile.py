"""The Triton kernels compile for Hopper (sm_90) without a GPU, and the shipped tilings do not spill.

The interpreted kernel tests never run Triton's compiler. This compiles every specialisation
the launchers make (``python -m adtuning.triton_compile --quick``) through the real pipeline
to a cubin with the ptxas bundled with Triton, in a subprocess without TRITON_INTERPRET.
A spill failure names the variant: retune that default for the installed Triton version.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_compiler_available() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return False
    if "nvidia" not in backends:
        return False
    try:
        return Path(get_ptxas(90).path).exists()
    except Exception:  # no bundled ptxas and none on PATH
        return False


requires_nvidia_compiler = pytest.mark.skipif(
    not _nvidia_compiler_available(), reason="Triton's NVIDIA backend or its ptxas is not installed")


@requires_nvidia_compiler
def test_every_kernel_variant_compiles_for_sm90_without_spills(tmp_path):
    from adtuning.triton_compile import specialisations

    report_path = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "adtuning.triton_compile", "--target", "cuda:90", "--quick",
         "--jobs", "2", "--json", str(report_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["failed"] == 0
    assert report["compiled"] == len(specialisations(quick=True, capability=90))
    kernels = {row["kernel"] for row in report["kernels"]}
    assert kernels == {"_gather_kernel", "_sparse_adamw_kernel", "_linear_fisher_kernel"}
    spilling = [row["variant"] for row in report["kernels"]
                if row["spill_store_bytes"] + row["spill_load_bytes"] > 0]
    assert spilling == [], f"default tilings spill registers on sm_90: {spilling}"
    assert all(0 < row["registers"] <= 255 for row in report["kernels"])


def test_compile_check_refuses_the_interpreter_and_bad_targets(monkeypatch, capsys):
    from adtuning import triton_compile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        triton_compile.compile_all("cuda:90", quick=True)
    with pytest.raises(SystemExit) as exit_info:
        triton_compile.main(["--target", "sm90"])
    assert exit_info.value.code == 2
    assert "--target must look like cuda:90" in capsys.readouterr().err


def test_launcher_config_follows_the_device_capability():
    """Pre-Hopper GPUs get 16-frame fp32 tiles (32 spill there); 16-bit tiles keep 32 frames."""
    from adtuning.kernels.linear_fisher import kernel_config

    hopper = kernel_config(torch.float32, torch.float32, 768, 768, 199, capability=90)
    ampere = kernel_config(torch.float32, torch.float32, 768, 768, 199, capability=80)
    ampere_bf16 = kernel_config(torch.bfloat16, torch.bfloat16, 768, 768, 199, capability=80)
    assert (hopper["BLOCK_M"], hopper["BLOCK_N"], hopper["BLOCK_K"], hopper["num_warps"]) == (64, 64, 32, 8)
    assert ampere["BLOCK_K"] == 16 and ampere_bf16["BLOCK_K"] == 32
    assert hopper["INPUT_PRECISION"] == "tf32x3" and ampere_bf16["INPUT_PRECISION"] == "tf32"
    tiny = kernel_config(torch.float32, torch.float32, 1, 1, 1)
    assert (tiny["BLOCK_M"], tiny["BLOCK_N"], tiny["BLOCK_K"], tiny["num_warps"]) == (16, 16, 16, 4)
    # Under the interpreter 16-bit tiles are upcast (its dot cannot multiply them); not on a GPU.
    assert kernel_config(torch.bfloat16, torch.bfloat16, 8, 8, 8, interpreted=True)["UPCAST"]
    assert not kernel_config(torch.bfloat16, torch.bfloat16, 8, 8, 8)["UPCAST"]
