"""The Triton kernels compile for Hopper (sm_90) without a GPU, and the shipped tilings do not spill.

The interpreted kernel tests never run Triton's compiler. This compiles every specialisation
the launchers make (``python -m tools.triton_compile --quick``) through the real pipeline
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
    from tools.triton_compile import specialisations

    report_path = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.triton_compile", "--target", "cuda:90", "--quick",
         "--jobs", "2", "--json", str(report_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["failed"] == 0
    assert report["compiled"] == len(specialisations(quick=True, capability=90))
    kernels = {row["kernel"] for row in report["kernels"]}
    assert kernels == {"_gather_kernel", "_sparse_adamw_kernel", "_linear_fisher_kernel", "_sddmm_kernel"}
    spilling = [row["variant"] for row in report["kernels"]
                if row["spill_store_bytes"] + row["spill_load_bytes"] > 0]
    assert spilling == [], f"default tilings spill registers on sm_90: {spilling}"
    assert all(0 < row["registers"] <= 255 for row in report["kernels"])


def test_compile_check_refuses_the_interpreter_and_bad_targets(monkeypatch, capsys):
    from tools import triton_compile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        triton_compile.compile_all("cuda:90", quick=True)
    with pytest.raises(SystemExit) as exit_info:
        triton_compile.main(["--target", "sm90"])
    assert exit_info.value.code == 2
    assert "--target must look like cuda:90" in capsys.readouterr().err


def test_launcher_default_tilings():
    """64x64 tiles on 4 warps; 16 frames per dot when an operand is fp32 (three TF32 products), else 32."""
    from adtuning.kernels.linear_fisher import kernel_config

    fp32 = kernel_config(torch.float32, torch.float32, 3072, 768, 199)
    bf16 = kernel_config(torch.bfloat16, torch.bfloat16, 3072, 768, 199)
    mixed = kernel_config(torch.bfloat16, torch.float32, 3072, 768, 199)
    assert (fp32["BLOCK_M"], fp32["BLOCK_N"], fp32["BLOCK_K"], fp32["num_warps"]) == (64, 64, 16, 4)
    assert (bf16["BLOCK_K"], bf16["INPUT_PRECISION"], bf16["UPCAST"]) == (32, "tf32", False)
    assert (mixed["BLOCK_K"], mixed["INPUT_PRECISION"], mixed["UPCAST"]) == (16, "tf32x3", True)
    assert fp32["INPUT_PRECISION"] == "tf32x3"
    tiny = kernel_config(torch.float32, torch.float32, 1, 1, 1)
    assert (tiny["BLOCK_M"], tiny["BLOCK_N"], tiny["BLOCK_K"]) == (16, 16, 16)
    # Under the interpreter 16-bit tiles are upcast (its dot cannot multiply them); not on a GPU.
    assert kernel_config(torch.bfloat16, torch.bfloat16, 8, 8, 8, interpreted=True)["UPCAST"]
    overridden = kernel_config(torch.float32, torch.float32, 8, 8, 8, block_m=128, num_warps=8, num_stages=2)
    assert (overridden["BLOCK_M"], overridden["num_warps"], overridden["num_stages"]) == (128, 8, 2)


def test_variants_come_from_the_launchers_own_calls():
    """The compile set is what the public launchers pass to their kernels (recorded, not
    launched), specialised by Triton's own rules: ints equal to 1 become constants, aligned
    pointers and multiples of 16 get hints; duplicates are compiled once."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import importlib

    from adtuning.kernels._common import block_for_sm_count
    from tools.triton_compile import _load_kernel, _specialise, _variant_key, specialisations

    fisher_module = importlib.import_module("adtuning.kernels.linear_fisher")
    kernel_before = fisher_module._linear_fisher_kernel
    specs = specialisations(quick=True, capability=90)
    assert fisher_module._linear_fisher_kernel is kernel_before  # the recorder is gone again
    keys = [_variant_key(_load_kernel(s.kernel), s) for s in specs]
    assert len(set(keys)) == len(keys)

    blocks = {dict(s.args)["k"]: dict(s.constexprs)["BLOCK_SIZE"] for s in specs if "gather" in s.kernel}
    assert blocks == {1: 128, 1 << 20: 1024}
    assert [block_for_sm_count(k, 132) for k in (768, 94_371, 200_003, 400_000)] == [128, 128, 256, 512]
    assert [dict(s.constexprs)["BLOCK_SIZE"] for s in specialisations(quick=True, capability=80)
            if "gather" in s.kernel][-1] == 1024

    fisher = [s for s in specs if "linear_fisher" in s.kernel]
    # Bias and lengths in all four combinations; without lengths the launcher passes fisher_w.
    assert {(dict(s.constexprs)["HAS_BIAS"], dict(s.constexprs)["HAS_LENGTHS"]) for s in fisher} == {
        (True, True), (True, False), (False, True), (False, False)}
    no_lengths = next(s for s in fisher if not dict(s.constexprs)["HAS_LENGTHS"])
    assert dict(no_lengths.args)["lengths_ptr"].dtype == torch.float32

    usual = next(s for s in fisher if "x=fp32 dy=fp32" in s.label and dict(s.constexprs)["HAS_LENGTHS"])
    kernel = _load_kernel(usual.kernel)
    signature, constexprs, attrs = _specialise(kernel, usual)
    assert signature["stride_xi"] == signature["stride_do"] == "constexpr"
    assert constexprs["stride_xi"] == 1
    assert signature["x_ptr"] == "*fp32" and signature["lengths_ptr"] == "*i64"
    assert signature["frames"] == "i32"
    position = {name: i for i, name in enumerate(kernel.arg_names)}
    assert attrs[(position["x_ptr"],)] == [["tt.divisibility", 16]]
    assert attrs[(position["in_features"],)] == [["tt.divisibility", 16]]  # 768
    assert (position["frames"],) not in attrs  # 199


def test_unknown_target_needs_an_sm_count(capsys):
    from tools import triton_compile

    with pytest.raises(SystemExit):
        triton_compile.main(["--target", "cuda:89"])
    assert "--sm-count is needed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no SM count"):
        triton_compile.specialisations(quick=True, capability=89)
