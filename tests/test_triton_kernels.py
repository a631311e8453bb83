"""Triton backend: every kernel against its reference twin, plus the availability contract.

Without CUDA the kernels run in Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before anything imports them); with CUDA they run compiled. Sizes are
awkward on purpose (1, primes, powers of two plus or minus one) and kept small because the
interpreter executes every program in Python.
"""
from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

from adtuning import reference
from adtuning.backends import BackendUnavailableError, get_backend

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


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the scale of an accumulator, not per entry)."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def _sorted_indices(numel: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(dtype).to(DEVICE)


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


@needs_triton
def test_signatures_match_the_reference_twins(tb):
    assert tb.name == "triton"
    pairs = [
        (tb.gather, reference.gather_ref),
        (tb.sparse_adamw_, reference.sparse_adamw_ref_),
        (tb.linear_fisher_, reference.linear_fisher_ref_),
    ]
    for ours, ref in pairs:
        assert inspect.signature(ours) == inspect.signature(ref), ref.__name__


# ---- gather -----------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape,k", [((1,), 1), ((7, 13), 1), ((31, 33), 97), ((4097,), 1025), ((1023,), 1023)])
def test_gather_equals_reference(tb, dtype, index_dtype, shape, k):
    torch.manual_seed(0)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    idx = _sorted_indices(grad.numel(), k, index_dtype, seed=k)
    # A gather is exact: bit-identical in every dtype.
    assert torch.equal(tb.gather(grad, idx), reference.gather_ref(grad, idx))
    out = torch.full((k,), 3.0, device=DEVICE)
    expected = out.clone()
    returned = tb.gather(grad, idx, out=out)
    assert returned is out
    assert torch.equal(out, reference.gather_ref(grad, idx, out=expected))
    tb.gather(grad, idx, out=out, accumulate=True)
    reference.gather_ref(grad, idx, out=expected, accumulate=True)
    assert torch.equal(out, expected)


@needs_triton
def test_gather_non_contiguous_grad_and_empty_indices(tb):
    grad = torch.randn(17, 5, device=DEVICE).t()
    idx = torch.tensor([0, 4, 84], dtype=torch.int32, device=DEVICE)
    assert torch.equal(tb.gather(grad, idx), reference.gather_ref(grad, idx))
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert tb.gather(grad, empty).shape == (0,)


@needs_triton
def test_gather_rejects_bad_inputs(tb):
    grad = torch.randn(10, device=DEVICE)
    with pytest.raises(TypeError, match="int32 or int64"):
        tb.gather(grad, torch.zeros(2, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="fp32 buffer"):
        tb.gather(grad, torch.zeros(2, dtype=torch.int32, device=DEVICE), out=torch.zeros(3, device=DEVICE))


# ---- sparse AdamW -----------------------------------------------------------------------

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}

# (param dtype, tolerance on the fp32 state). The kernel uses the fused multiply-adds of
# ATen's CPU AdamW; the interpreter rounds a*b+c twice, so allow a few ulp.
ADAMW_CASES = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.bfloat16, 2e-6, id="bf16+master"),
    pytest.param(torch.float16, 2e-6, id="fp16+master"),
]


@needs_triton
@pytest.mark.parametrize("dtype,tol", ADAMW_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("numel,k", [(1, 1), (2, 1), (97, 13), (1025, 1023), (4097, 2049)])
def test_sparse_adamw_equals_reference(tb, dtype, tol, index_dtype, numel, k):
    torch.manual_seed(numel)
    param = torch.randn(numel, device=DEVICE).to(dtype)
    idx = _sorted_indices(numel, k, index_dtype, seed=numel)
    exp_avg = torch.zeros(k, device=DEVICE)
    exp_avg_sq = torch.zeros(k, device=DEVICE)
    master = param[idx.long()].float() if dtype != torch.float32 else None
    ours = [t.clone() if t is not None else None for t in (param, exp_avg, exp_avg_sq, master)]
    theirs = [t.clone() if t is not None else None for t in (param, exp_avg, exp_avg_sq, master)]
    untouched = torch.ones(numel, dtype=torch.bool, device=DEVICE)
    untouched[idx.long()] = False
    for step in range(1, 6):
        grad = torch.randn(k, device=DEVICE)
        tb.sparse_adamw_(ours[0], grad, idx, *ours[1:], step=step, **HYPER)
        reference.sparse_adamw_ref_(theirs[0], grad, idx, *theirs[1:], step=step, **HYPER)
    for name, a, b in zip(("exp_avg", "exp_avg_sq", "master"), ours[1:], theirs[1:]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    child = idx.long()
    if dtype == torch.float32:
        torch.testing.assert_close(ours[0][child], theirs[0][child], rtol=tol, atol=tol * 1e-2)
    else:
        # param holds the round-to-nearest-even of the master, bit for bit as torch rounds it,
        # and so is at most one rounding step from the reference where the masters differ by ulps.
        assert torch.equal(ours[0][child], ours[3].to(dtype))
        torch.testing.assert_close(ours[0][child].float(), theirs[0][child].float(), rtol=1e-2, atol=1e-5)
    assert torch.equal(ours[0][untouched], param[untouched]), "non-child entries must stay bit-identical"


@needs_triton
@pytest.mark.parametrize("beta1,weight_decay", [(0.9, 0.0), (0.3, 0.1)])
def test_sparse_adamw_equals_torch_adamw_on_the_child_vector(tb, beta1, weight_decay):
    """Other hyper-parameters too (no decay; beta1 < 0.5 takes lerp's other branch)."""
    torch.manual_seed(1)
    numel, k = 257, 61
    param = torch.randn(numel, device=DEVICE)
    idx = _sorted_indices(numel, k, torch.int64, seed=3)
    vector = torch.nn.Parameter(param[idx].clone())
    oracle = torch.optim.AdamW([vector], lr=3e-3, betas=(beta1, 0.98), eps=1e-6, weight_decay=weight_decay)
    exp_avg, exp_avg_sq = torch.zeros(k, device=DEVICE), torch.zeros(k, device=DEVICE)
    before = param.clone()
    for step in range(1, 8):
        grad = torch.randn(k, device=DEVICE)
        vector.grad = grad.clone()
        oracle.step()
        tb.sparse_adamw_(param, grad, idx, exp_avg, exp_avg_sq, None, step=step,
                         lr=3e-3, beta1=beta1, beta2=0.98, eps=1e-6, weight_decay=weight_decay)
    state = oracle.state[vector]
    # A few ulp of each tensor's scale: the operations match, fused multiply-adds may not.
    for ours, oracle_value in ((param[idx], vector.detach()), (exp_avg, state["exp_avg"]),
                               (exp_avg_sq, state["exp_avg_sq"])):
        torch.testing.assert_close(ours, oracle_value, rtol=2e-6, atol=2e-6 * oracle_value.abs().max().item())
    others = torch.ones(numel, dtype=torch.bool, device=DEVICE)
    others[idx] = False
    assert torch.equal(param[others], before[others])


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

# (input dtype, tolerance relative to the largest Fisher entry).
FISHER_CASES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-4, id="bf16"),
    pytest.param(torch.float16, 1e-4, id="fp16"),
]

# (B, T, in, out): tiny (below tl.dot's 16), primes, 2^k +- 1, several tiles per axis.
FISHER_SHAPES = [(1, 1, 1, 1), (2, 17, 31, 13), (3, 33, 65, 127), (1, 64, 16, 17), (4, 7, 129, 3)]


def _fisher_pair(x, dy, with_bias):
    out_f, in_f = dy.shape[2], x.shape[2]
    fw = torch.rand(out_f, in_f, device=DEVICE)  # non-zero start: the ops accumulate
    fb = torch.rand(out_f, device=DEVICE) if with_bias else None
    return (fw, fb), (fw.clone(), fb.clone() if fb is not None else None)


@needs_triton
@pytest.mark.parametrize("dtype,tol", FISHER_CASES)
@pytest.mark.parametrize("shape", FISHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_fisher_equals_reference(tb, dtype, tol, shape):
    batch, frames, in_f, out_f = shape
    torch.manual_seed(sum(shape))
    x = torch.randn(batch, frames, in_f, device=DEVICE).to(dtype)
    dy = torch.randn(batch, frames, out_f, device=DEVICE).to(dtype)
    (fw, fb), (rw, rb) = _fisher_pair(x, dy, with_bias=True)
    tb.linear_fisher_(x, dy, fw, fb)
    reference.linear_fisher_ref_(x, dy, rw, rb)
    assert _rel_err(fw, rw) <= tol
    assert _rel_err(fb, rb) <= tol


@needs_triton
@pytest.mark.parametrize("dtype,tol", FISHER_CASES)
@pytest.mark.parametrize("length_dtype", [torch.int32, torch.int64])
def test_linear_fisher_respects_lengths(tb, dtype, tol, length_dtype):
    torch.manual_seed(2)
    batch, frames, in_f, out_f = 5, 37, 33, 31
    x = torch.randn(batch, frames, in_f, device=DEVICE).to(dtype)
    dy = torch.randn(batch, frames, out_f, device=DEVICE).to(dtype)
    # Zero, one, a prime, 2^5 + 1 and the full length; padding holds garbage that must not count.
    lengths = torch.tensor([0, 1, 17, 33, frames], dtype=length_dtype, device=DEVICE)
    (fw, fb), (rw, rb) = _fisher_pair(x, dy, with_bias=True)
    tb.linear_fisher_(x, dy, fw, fb, lengths)
    reference.linear_fisher_ref_(x, dy, rw, rb, lengths)
    assert _rel_err(fw, rw) <= tol
    assert _rel_err(fb, rb) <= tol


@needs_triton
def test_linear_fisher_without_bias_strided_inputs_and_mixed_dtypes(tb):
    torch.manual_seed(3)
    # x as a transposed view ([B, in, T] storage), dy sliced along features.
    x = torch.randn(3, 31, 19, device=DEVICE).transpose(1, 2)
    dy_full = torch.randn(3, 19, 40, device=DEVICE)
    dy = dy_full[:, :, 3:36]
    (fw, _), (rw, _) = _fisher_pair(x, dy, with_bias=False)
    tb.linear_fisher_(x, dy, fw)
    reference.linear_fisher_ref_(x, dy, rw)
    assert _rel_err(fw, rw) <= 1e-5
    # fp32 activations with bf16 output gradients (as under autocast).
    dy16 = dy.to(torch.bfloat16)
    (fw, fb), (rw, rb) = _fisher_pair(x, dy16, with_bias=True)
    tb.linear_fisher_(x, dy16, fw, fb)
    reference.linear_fisher_ref_(x, dy16, rw, rb)
    assert _rel_err(fw, rw) <= 1e-5 and _rel_err(fb, rb) <= 1e-5


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
    assert _rel_err(fw, rw) <= 1e-5 and _rel_err(fb, rb) <= 1e-5


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
