"""The native C++ CPU ops (``backend="native"``) against their reference twins and oracles.

The ops are compiled on first use (about a minute, once per cache key). Tests skip only when
an op is not registered, saying why; with ``CI=true`` a build failure fails them instead.
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
from adtuning.reference import gather_ref, linear_fisher_ref_, sparse_adamw_ref_

SIZES = [1, 97, 4097, 278011]
INDEX_DTYPES = [torch.int32, torch.int64]
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
    gen = torch.Generator().manual_seed(seed)
    k = max(1, numel // 3)
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(index_dtype)


# --------------------------------------------------------------------------- sparse AdamW


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize(
    "hyper",
    [ADAMW, {"lr": 3e-3, "beta1": 0.3, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0}],
    ids=["default", "large-lerp-weight-no-decay"],
)
def test_sparse_adamw_fp32_matches_oracles(nb, numel, index_dtype, hyper):
    """Child entries evolve like torch.optim.AdamW on the gathered vector; the rest is untouched.

    The kernel rounds like the vectorised body of the fused CPU AdamW; that optimizer's scalar
    tail, and the single-tensor AdamW and the reference (whose sqrt is not correctly rounded),
    differ from it by an ulp on a few entries, which stays within a few ulp over the steps.
    """
    _op("sparse_adamw_")
    gen = torch.Generator().manual_seed(numel)
    param = torch.randn(numel, generator=gen)
    before = param.clone()
    idx = _child(numel, index_dtype, seed=numel + 1)
    k = idx.numel()
    ref_param = param.clone()
    moments = [torch.zeros(k), torch.zeros(k)]
    ref_moments = [torch.zeros(k), torch.zeros(k)]
    oracles = []
    for fused in (True, False):
        w = torch.nn.Parameter(param[idx.long()].clone())
        opt = torch.optim.AdamW(
            [w], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
            weight_decay=hyper["weight_decay"], fused=fused,
        )
        oracles.append((w, opt))
    for step in range(1, 5):
        grad = torch.randn(k, generator=gen)
        nb.sparse_adamw_(param, grad, idx, *moments, None, step=step, **hyper)
        sparse_adamw_ref_(ref_param, grad, idx, *ref_moments, None, step=step, **hyper)
        for w, opt in oracles:
            w.grad = grad.clone()
            opt.step()

    child = param[idx.long()]
    for w, opt in oracles:
        state = opt.state[w]
        torch.testing.assert_close(child, w.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(moments[0], state["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(moments[1], state["exp_avg_sq"], rtol=1e-6, atol=0)
    torch.testing.assert_close(param, ref_param, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moments[0], ref_moments[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(moments[1], ref_moments[1], rtol=1e-6, atol=0)

    untouched = torch.ones(numel, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(param[untouched], before[untouched])


@pytest.mark.parametrize("numel", [1, 4097, 278011])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sparse_adamw_low_precision_with_master(nb, numel, dtype, index_dtype):
    """bf16/fp16 params: the fp32 master follows AdamW; the param holds it rounded."""
    _op("sparse_adamw_")
    gen = torch.Generator().manual_seed(7 * numel)
    param = torch.randn(numel, generator=gen).to(dtype)
    before = param.clone()
    idx = _child(numel, index_dtype, seed=numel + 2)
    k = idx.numel()
    master = param[idx.long()].float()
    ref_param, ref_master = param.clone(), master.clone()
    moments = [torch.zeros(k), torch.zeros(k)]
    ref_moments = [torch.zeros(k), torch.zeros(k)]
    w = torch.nn.Parameter(master.clone())
    opt = torch.optim.AdamW(
        [w], lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
        weight_decay=ADAMW["weight_decay"], fused=True,
    )
    for step in range(1, 4):
        grad = torch.randn(k, generator=gen)
        nb.sparse_adamw_(param, grad, idx, *moments, master, step=step, **ADAMW)
        sparse_adamw_ref_(ref_param, grad, idx, *ref_moments, ref_master, step=step, **ADAMW)
        w.grad = grad.clone()
        opt.step()

    torch.testing.assert_close(master, w.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(param[idx.long()], master.to(dtype))
    torch.testing.assert_close(master, ref_master, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(numel, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(param[untouched], before[untouched])


def test_sparse_adamw_fp32_param_with_master(nb):
    """An fp32 param with a master copy takes the master's values, like the reference."""
    param = torch.randn(1000)
    idx = _child(1000, torch.int32, seed=3)
    k = idx.numel()
    master = param[idx.long()] + 1.0
    ref_param, ref_master = param.clone(), master.clone()
    grad = torch.randn(k)
    moments, ref_moments = [torch.zeros(k), torch.zeros(k)], [torch.zeros(k), torch.zeros(k)]
    nb.sparse_adamw_(param, grad, idx, *moments, master, step=1, **ADAMW)
    sparse_adamw_ref_(ref_param, grad, idx, *ref_moments, ref_master, step=1, **ADAMW)
    torch.testing.assert_close(master, ref_master, rtol=1e-6, atol=1e-7)
    assert torch.equal(param[idx.long()], master)


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


# --------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_gather_matches_reference(nb, numel, dtype, index_dtype):
    """Gather is exact: a cast to fp32 and, when accumulating, one fp32 add."""
    _op("gather")
    gen = torch.Generator().manual_seed(numel)
    grad = torch.randn(numel, generator=gen).to(dtype)
    idx = _child(numel, index_dtype, seed=numel + 3)
    assert torch.equal(nb.gather(grad, idx), gather_ref(grad, idx))

    out = torch.full((idx.numel(),), 5.0)
    returned = nb.gather(grad, idx, out=out)
    assert returned is out
    assert torch.equal(out, gather_ref(grad, idx))

    acc = torch.randn(idx.numel(), generator=gen)
    expected = gather_ref(grad, idx, out=acc.clone(), accumulate=True)
    assert torch.equal(nb.gather(grad, idx, out=acc, accumulate=True), expected)


def test_gather_non_contiguous_grad_and_bad_index(nb):
    """A transposed gradient is read in its logical (flattened) order; bad indices raise."""
    grad = torch.randn(37, 53).t()
    idx = _child(grad.numel(), torch.int64, seed=5)
    assert torch.equal(nb.gather(grad, idx), gather_ref(grad, idx))
    with pytest.raises(RuntimeError, match="outside"):
        nb.gather(grad, torch.tensor([0, grad.numel()]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        nb.gather(grad, torch.tensor([0.0, 1.0]))


# -------------------------------------------------------------------------- linear Fisher

FISHER_SHAPES = [(1, 1, 1, 1), (3, 17, 97, 33), (2, 41, 257, 131), (1, 5, 4097, 3)]


@pytest.mark.parametrize("shape", FISHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_fisher_matches_reference(nb, shape, dtype, rtol, with_lengths, with_bias):
    """Per-sample Fisher equals the reference's materialised per-sample gradients squared.

    Both compute in fp32 (bf16 inputs are widened exactly); only the summation order over
    frames differs, hence a relative tolerance of a few dozen ulp and an absolute one scaled
    to the accumulator.
    """
    _op("linear_fisher_")
    batch, frames, n_in, n_out = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, frames, n_in, generator=gen).to(dtype)
    dy = torch.randn(batch, frames, n_out, generator=gen).to(dtype)
    fisher_w = torch.rand(n_out, n_in, generator=gen)
    fisher_b = torch.rand(n_out, generator=gen) if with_bias else None
    lengths = None
    if with_lengths:
        # A full sample, an empty one, one past the end (clamped) and a partial one.
        choices = [frames, 0, frames + 3, max(1, frames // 2)]
        lengths = torch.tensor([choices[n % len(choices)] for n in range(batch)])
    ref_w = fisher_w.clone()
    ref_b = fisher_b.clone() if with_bias else None
    nb.linear_fisher_(x, dy, fisher_w, fisher_b, lengths)
    linear_fisher_ref_(x, dy, ref_w, ref_b, lengths)
    torch.testing.assert_close(fisher_w, ref_w, rtol=rtol, atol=1e-6 * ref_w.abs().max().item())
    if with_bias:
        torch.testing.assert_close(
            fisher_b, ref_b, rtol=rtol, atol=1e-6 * ref_b.abs().max().item()
        )


def test_linear_fisher_non_contiguous_inputs_and_bad_shapes(nb):
    """Strided inputs are accepted; mismatched shapes and a non-fp32 accumulator raise."""
    x = torch.randn(4, 33, 19).transpose(0, 1)  # [33, 4, 19], non-contiguous
    dy = torch.randn(33, 4, 7)
    fisher_w, ref_w = torch.zeros(7, 19), torch.zeros(7, 19)
    nb.linear_fisher_(x, dy, fisher_w, lengths=[4, 2] * 16 + [1])
    linear_fisher_ref_(x, dy, ref_w, lengths=[4, 2] * 16 + [1])
    torch.testing.assert_close(fisher_w, ref_w, rtol=2e-5, atol=1e-6 * ref_w.max().item())
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
