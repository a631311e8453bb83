"""What is specific to the Triton backend: the availability contract (missing triton, no CUDA,
kernels imported before the interpreter was enabled), the launchers' argument
checks, bf16 round-to-nearest-even, forced small tiles, and a short training run on it.

Every kernel's values against its reference twin and oracles are cases of tests/test_ops.py
(from tests/op_cases.py). Without CUDA the kernels run in Triton's CPU interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports them); with CUDA
they run compiled.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from adtuning import reference
from adtuning.backends import BackendUnavailableError, get_backend
from tests.op_cases import FISHER_TOL, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not _triton_usable(), reason="triton not importable or not usable here")


@pytest.fixture(scope="module")
def tb():
    if not _triton_usable():
        pytest.skip("triton not importable or not usable here")
    return get_backend("triton")


# ---- availability -----------------------------------------------------------------------

def test_missing_triton_is_a_clear_error(monkeypatch):
    from adtuning import triton_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(BackendUnavailableError, match="triton"):
        triton_backend.backend()


def test_no_cuda_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA.*TRITON_INTERPRET=1"):
        get_backend("triton")


@needs_triton
def test_kernels_imported_before_the_interpreter_was_enabled_is_a_clear_error(monkeypatch):
    from adtuning import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels, "compiled_for_interpreter", lambda: False)
    with pytest.raises(BackendUnavailableError, match="imported before TRITON_INTERPRET=1"):
        get_backend("triton")


# The launchers' signatures against the contract's Protocols: tests/test_backend_contract.py.


# ---- gather -----------------------------------------------------------------------------

@needs_triton
def test_gather_rejects_bad_inputs(tb):
    grad = torch.randn(10, device=DEVICE)
    with pytest.raises(TypeError, match="int32 or int64"):
        tb.gather(grad, torch.zeros(2, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="fp32 buffer"):
        tb.gather(grad, torch.zeros(2, dtype=torch.int32, device=DEVICE), out=torch.zeros(3, device=DEVICE))


# ---- sparse AdamW -----------------------------------------------------------------------

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


@needs_triton
def test_sparse_adamw_rejects_bad_inputs(tb):
    param = torch.randn(10, device=DEVICE)
    idx = torch.tensor([1, 2], device=DEVICE)
    z = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="exp_avg"):
        tb.sparse_adamw_(param, z, idx, torch.zeros(3, device=DEVICE), z.clone(), None, step=1, **HYPER)
    with pytest.raises(ValueError, match="step"):
        tb.sparse_adamw_(param, z, idx, z.clone(), z.clone(), None, step=0, **HYPER)
    with pytest.raises(ValueError, match="master"):
        tb.sparse_adamw_(param.bfloat16(), z, idx, z.clone(), z.clone(), None, step=1, **HYPER)


@needs_triton
def test_sparse_adamw_bf16_rounding_is_round_to_nearest_even(tb):
    """Masters at bf16 ties, near overflow and subnormal round exactly as torch rounds them."""
    values = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.3895e38, 3.4e38, 1e-39, -2.5e-40, 0.0],
                          device=DEVICE)
    k = values.numel()
    param = torch.zeros(k + 3, dtype=torch.bfloat16, device=DEVICE)
    idx = torch.arange(k, device=DEVICE)
    master = values.clone()
    # lr=0 and no decay: the update leaves the master as it is and only rounds it into param.
    tb.sparse_adamw_(param, torch.ones(k, device=DEVICE), idx, torch.zeros(k, device=DEVICE),
                     torch.zeros(k, device=DEVICE), master, step=1, lr=0.0, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0)
    assert torch.equal(param[:k].view(torch.int16), values.bfloat16().view(torch.int16))
    assert torch.equal(param[k:], torch.zeros(3, dtype=torch.bfloat16, device=DEVICE))


# ---- Linear per-sample Fisher ----------------------------------------------------------

def _fisher_pair(x, dy, with_bias):
    out_f, in_f = dy.shape[2], x.shape[2]
    fw = torch.rand(out_f, in_f, device=DEVICE)  # non-zero start: the ops accumulate
    fb = torch.rand(out_f, device=DEVICE) if with_bias else None
    return (fw, fb), (fw.clone(), fb.clone() if fb is not None else None)


@needs_triton
def test_linear_fisher_small_tiles_cover_every_tile(tb):
    """Force 16-wide tiles so that several tiles per axis and the frame loop are exercised."""
    from adtuning.kernels import linear_fisher

    torch.manual_seed(4)
    x = torch.randn(2, 41, 47, device=DEVICE)
    dy = torch.randn(2, 41, 33, device=DEVICE)
    (fw, fb), (rw, rb) = _fisher_pair(x, dy, with_bias=True)
    linear_fisher(x, dy, fw, fb, torch.tensor([41, 23], device=DEVICE), block_m=16, block_n=16, block_k=16)
    reference.linear_fisher_ref_(x, dy, rw, rb, torch.tensor([41, 23]))
    assert rel_err(fw, rw) <= FISHER_TOL[torch.float32] and rel_err(fb, rb) <= FISHER_TOL[torch.float32]


@needs_triton
def test_linear_fisher_rejects_bad_inputs(tb):
    x = torch.randn(2, 3, 4, device=DEVICE)
    dy = torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="fisher_w"):
        tb.linear_fisher_(x, dy, torch.zeros(4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="share B and T"):
        tb.linear_fisher_(x, dy[:1], torch.zeros(5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="lengths"):
        tb.linear_fisher_(x, dy, torch.zeros(5, 4, device=DEVICE), None, torch.ones(3, dtype=torch.int64))
    # One sample spanning 2^31 elements would overflow the kernel's 32-bit in-sample offsets
    # (meta tensors: shapes only, nothing allocated or launched).
    from adtuning.kernels import linear_fisher

    frames = 2**21 + 1
    huge_x = torch.empty(1, frames, 1024, device="meta")
    with pytest.raises(ValueError, match="one sample of x"):
        linear_fisher(huge_x, torch.empty(1, frames, 8, device="meta"), torch.empty(8, 1024, device="meta"))


# ---- convergence: the same short run with the reference and the Triton backend -----------

@needs_triton
def test_sparse_adamw_convergence_reference_vs_triton():
    """20 steps of a small MLP with SparseAdamW: same losses and final weights on both backends."""
    from adtuning.child import ChildNetwork
    from adtuning.optim import SparseAdamW

    def run(backend: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5)
        ).to(DEVICE)
        data = torch.randn(64, 13, device=DEVICE)
        target = torch.randint(0, 5, (64,), device=DEVICE)
        scores = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
        child = ChildNetwork.from_scores(scores, p=0.1)
        opt = SparseAdamW(
            [{"named_params": model.named_parameters(), "child": child}],
            lr=1e-2, weight_decay=0.01, backend=backend,
        )
        losses = []
        for step in range(20):
            batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
            loss = torch.nn.functional.cross_entropy(model(data[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    ref_losses, ref_weights = run("reference")
    tri_losses, tri_weights = run("triton")
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for name in ref_weights:
        torch.testing.assert_close(tri_weights[name], ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ref_losses[-1] < ref_losses[0]
