"""What is specific to the native C++ CPU ops (``backend="native"``): the build, the disable
switch, ``torch.library.opcheck`` and the C++ argument checks.

Their values against the reference twins and oracles are cases of tests/test_ops.py (from
tests/op_cases.py). The ops are compiled on first use (about a minute, once per cache key).
Tests skip only when an op is not registered, saying why; with ``CI=true`` a build failure
fails them instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from adtuning import native
from adtuning.backends import BackendUnavailableError, get_backend
from adtuning.reference import linear_fisher_ref_
from tests.op_cases import FISHER_TOL, child_indices, rel_err

ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def nb():
    """The native backend; skip (or fail on CI) with the reason when it cannot be built."""
    if native.disabled():
        pytest.skip(f"native ops disabled by {native.DISABLE_ENV}")
    try:
        return native.backend()
    except BackendUnavailableError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"native ops failed to build on CI: {exc}", pytrace=False)
        pytest.skip(f"native ops not registered: {exc}")


def _op(name: str) -> torch._ops.OpOverload:
    """``torch.ops.adtuning.<name>.default``; skip when it has no CPU kernel here."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"adtuning::{name}", "CPU"):
        pytest.skip(f"adtuning::{name} is not registered for CPU")
    return getattr(torch.ops.adtuning, name).default


def _child(numel: int, index_dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Sorted unique random indices covering about a third of ``numel`` (at least one)."""
    return child_indices(numel, max(1, numel // 3), index_dtype, seed)


# ------------------------------------------------------------------ rejection of bad input


def test_sparse_adamw_rejects_bad_arguments(nb):
    """Wrong dtypes, lengths or indices raise instead of corrupting memory."""
    k = 10
    idx = torch.arange(k, dtype=torch.int32)

    def zeros():
        return torch.zeros(k)

    with pytest.raises(RuntimeError, match="master"):
        nb.sparse_adamw_(torch.zeros(20, dtype=torch.bfloat16), zeros(), idx, zeros(), zeros(),
                         None, step=1, **ADAMW)
    with pytest.raises(RuntimeError, match="exp_avg"):
        nb.sparse_adamw_(torch.zeros(20), zeros(), idx, torch.zeros(k + 1), zeros(), None,
                         step=1, **ADAMW)
    with pytest.raises(RuntimeError, match="outside"):
        nb.sparse_adamw_(torch.zeros(5), zeros(), idx, zeros(), zeros(), None, step=1, **ADAMW)


def test_gather_rejects_bad_indices(nb):
    """Out-of-range indices and a float index tensor raise (the C++ op checks its input)."""
    grad = torch.randn(37, 53).t()
    with pytest.raises(RuntimeError, match="outside"):
        nb.gather(grad, torch.tensor([0, grad.numel()]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        nb.gather(grad, torch.tensor([0.0, 1.0]))


def test_linear_fisher_takes_a_list_of_lengths_and_rejects_bad_shapes(nb):
    """The native op also takes ``lengths`` as a Python list; mismatched shapes and a non-fp32
    accumulator raise. (Its values on strided inputs are a case of tests/test_ops.py.)"""
    x = torch.randn(4, 33, 19).transpose(0, 1)  # [33, 4, 19], non-contiguous
    dy = torch.randn(33, 4, 7)
    lengths = [4, 2] * 16 + [1]
    fisher_w, ref_w = torch.zeros(7, 19), torch.zeros(7, 19)
    nb.linear_fisher_(x, dy, fisher_w, lengths=lengths)
    linear_fisher_ref_(x, dy, ref_w, lengths=torch.tensor(lengths))
    assert rel_err(fisher_w, ref_w) <= FISHER_TOL[torch.float32]
    with pytest.raises(RuntimeError, match="fisher_w"):
        nb.linear_fisher_(x, dy, torch.zeros(19, 7))
    with pytest.raises(RuntimeError, match="fisher_w"):
        nb.linear_fisher_(x, dy, torch.zeros(7, 19, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="agree"):
        nb.linear_fisher_(x, dy[:, :3], torch.zeros(7, 19))


# ------------------------------------------------------------------------------- opcheck


def test_opcheck_sparse_adamw(nb):
    """Schema, fake implementation and dispatch of sparse_adamw_ are consistent."""
    op = _op("sparse_adamw_")
    idx = _child(4097, torch.int32, seed=11)
    k = idx.numel()
    for param, master in (
        (torch.randn(4097), None),
        (torch.randn(4097).bfloat16(), torch.randn(k)),
    ):
        args = (param, torch.randn(k), idx, torch.rand(k), torch.rand(k), master,
                1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.001)
        torch.library.opcheck(op, args)


def test_opcheck_gather(nb):
    """Schema, fake implementation and dispatch of gather are consistent."""
    op = _op("gather")
    grad = torch.randn(97, 13).bfloat16()
    idx = _child(grad.numel(), torch.int64, seed=12)
    for accumulate in (False, True):
        torch.library.opcheck(op, (grad, idx, torch.randn(idx.numel()), accumulate))


def test_opcheck_linear_fisher(nb):
    """Schema, fake implementation and dispatch of linear_fisher_ are consistent."""
    op = _op("linear_fisher_")
    x, dy = torch.randn(2, 9, 17), torch.randn(2, 9, 5)
    torch.library.opcheck(op, (x, dy, torch.rand(5, 17), torch.rand(5), torch.tensor([9, 4])))
    torch.library.opcheck(op, (x.bfloat16(), dy.bfloat16(), torch.rand(5, 17), None, None))


# -------------------------------------------------------------------- build and selection


def test_fused_on_cpu_is_native(nb):
    """``--fused`` on CPU means the native ops, never the reference path."""
    assert get_backend("fused", "cpu").name == "native"
    assert get_backend("native").name == "native"


def test_disable_env_raises_and_reference_still_works(monkeypatch):
    """ADTUNING_DISABLE_NATIVE=1 turns the backend off with a clear error."""
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    with pytest.raises(BackendUnavailableError, match=native.DISABLE_ENV):
        get_backend("native")
    assert not native.is_available()
    assert native.DISABLE_ENV in native.unavailable_reason()
    assert get_backend("reference").name == "reference"


def test_missing_sources_package_names_the_fix(monkeypatch):
    """A source tree pip did not install (no adtuning.csrc) gets an error saying to install it."""

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(native.importlib.resources, "files", missing)
    with pytest.raises(BackendUnavailableError, match=r"adtuning\.csrc.*pip install -e"):
        native.source_files()


def test_failed_build_names_compiler_output(tmp_path):
    """A compile error becomes BackendUnavailableError carrying the compiler's message."""
    source = tmp_path / "broken.cpp"
    source.write_text('#error "deliberately broken source"\n')
    with pytest.raises(BackendUnavailableError) as info:
        native.build_library([source], tmp_path / "build", name="adtuning_broken_test")
    message = str(info.value)
    log_file = tmp_path / "build" / "build-error.log"
    assert str(log_file) in message and log_file.exists()
    if shutil.which("ninja") and shutil.which(os.environ.get("CXX", "c++")):
        assert "deliberately broken source" in message  # the compiler's own words


def test_import_does_not_compile(tmp_path):
    """Importing adtuning.native (and resolving names) builds nothing."""
    env = dict(os.environ, ADTUNING_NATIVE_CACHE=str(tmp_path / "cache"))
    code = (
        "import adtuning.native as n, adtuning.backends as b; "
        "n.cache_dir(); b.resolve_backend_name('fused', 'cpu')"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / "cache").exists()
