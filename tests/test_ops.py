"""Every op of every backend against independent oracles (and its reference twin): op x case x backend x device.

The cases (inputs, dtypes, tolerances, checks) live in :mod:`tests.op_cases`, which
``bench/gpu_check.py`` runs on CUDA as well. Backends come from :func:`tests.backends.require_backend`:
the reference always runs, ``native`` must run when CI=true, ``triton`` runs on CUDA or under
TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA), where the largest cases
are left to the compiled kernels. The CUDA device is added when one is present (``-k cuda`` selects it).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adtuning import reference
from tests import op_cases
from tests.backends import ALL_BACKENDS, require_backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", op_cases.ALL_CASES, ids=lambda case: case.id)
def test_op_matches_reference_and_oracles(case, backend, device):
    reason = op_cases.skip_reason(case, backend, device)
    if reason is not None:
        pytest.skip(reason)
    result = op_cases.run_case(case, require_backend(backend), device)
    assert result.ok, result.describe()


def test_rel_err_is_scaled_exact_and_strict_about_nan_and_shape():
    """The one error metric: the accumulator's scale by default, per-entry scales, 0 when exact."""
    expected = torch.tensor([4.0, -2.0, 0.0])
    assert op_cases.rel_err(expected.clone(), expected) == 0.0
    assert op_cases.rel_err(expected + torch.tensor([0.0, 0.0, 0.4]), expected) == pytest.approx(0.1)
    assert op_cases.rel_err(expected + 1.0, expected, scale=torch.tensor([1.0, 2.0, 4.0])) == 1.0
    assert op_cases.rel_err(torch.zeros(0), torch.zeros(0)) == 0.0
    assert op_cases.rel_err(torch.ones(2), torch.zeros(2)) == 1.0  # zero scale falls back to 1
    assert op_cases.rel_err(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")
    assert op_cases.rel_err(torch.ones(2), torch.ones(3)) == float("inf")


def test_every_op_has_cases_in_every_tier_a_cpu_can_run():
    """Each op keeps awkward sizes that the interpreter runs, and both index dtypes where it takes indices."""
    for op in op_cases.OPS:
        cases = op_cases.CASES[op]
        assert any(c.tier == op_cases.TIER_ALL for c in cases), op
        assert len({c.id for c in cases}) == len(cases), f"duplicate case ids for {op}"
        if op != "linear_fisher":
            assert {c.params["index_dtype"] for c in cases} == set(op_cases.INDEX_DTYPES), op


# ---- the checks can fail --------------------------------------------------------------------
# Backends that break one rule each, built from the reference twins and named as the reference
# (so no twin comparison runs): each must fail an oracle comparison of op_cases on the cases given.

def _mutant(**ops):
    return SimpleNamespace(**{"name": "reference", "gather": reference.gather_ref,
                              "sparse_adamw_": reference.sparse_adamw_ref_,
                              "linear_fisher_": reference.linear_fisher_ref_, "sddmm": reference.sddmm_ref, **ops})


def _gather_storage_order(grad, indices, out=None, accumulate=False):
    """Reads a non-contiguous gradient in its storage order, not its logical one."""
    flat = grad.as_strided((grad.numel(),), (1,)) if grad.numel() else grad.reshape(-1)
    return reference.gather_ref(flat, indices, out=out, accumulate=accumulate)


def _gather_off_by_one(grad, indices, out=None, accumulate=False):
    shifted = (indices.long() + 1).clamp(max=grad.numel() - 1)
    return reference.gather_ref(grad, shifted, out=out, accumulate=accumulate)


def _gather_ignores_accumulate(grad, indices, out=None, accumulate=False):
    return reference.gather_ref(grad, indices, out=out, accumulate=False)


def _gather_through_bf16(grad, indices, out=None, accumulate=False):
    """Rounds fp32 gradients to bf16 on the way: not exact."""
    return reference.gather_ref(grad.to(torch.bfloat16), indices, out=out, accumulate=accumulate)


def _fisher_of_the_batch_gradient(x, dy, fisher_w, fisher_b=None, lengths=None):
    """Squares the gradient summed over the batch instead of each sample's."""
    mask = torch.ones(x.shape[:2], device=x.device)
    if lengths is not None:
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None].to(x.device)).float()
    xm, dym = x.float() * mask[..., None], dy.float() * mask[..., None]
    fisher_w.add_(torch.einsum("bto,bti->oi", dym, xm).square())
    if fisher_b is not None:
        fisher_b.add_(dym.sum((0, 1)).square())


def _fisher_per_frame(x, dy, fisher_w, fisher_b=None, lengths=None):
    """Sums squared per-frame gradients (the empirical Fisher of frames, not of samples)."""
    for n in range(x.shape[0]):
        valid = x.shape[1] if lengths is None else int(lengths[n])
        for t in range(min(valid, x.shape[1])):
            fisher_w.add_(torch.outer(dy[n, t].float(), x[n, t].float()).square())
            if fisher_b is not None:
                fisher_b.add_(dy[n, t].float().square())


def _fisher_ignores_lengths(x, dy, fisher_w, fisher_b=None, lengths=None):
    reference.linear_fisher_ref_(x, dy, fisher_w, fisher_b, None)


def _fisher_drops_bias(x, dy, fisher_w, fisher_b=None, lengths=None):
    reference.linear_fisher_ref_(x, dy, fisher_w, None, lengths)


def _adamw_no_bias_correction(param, grad, indices, exp_avg, exp_avg_sq, master=None, *, step, **hyper):
    reference.sparse_adamw_ref_(param, grad, indices, exp_avg, exp_avg_sq, master, step=10**6, **hyper)


def _sddmm_transposed(dy, x, indices, out=None, accumulate=False):
    """Maps a flat index as (column, row) of the weight."""
    idx = indices.long()
    cols, rows = idx // dy.shape[1], idx % dy.shape[1]
    swapped = (rows * x.shape[1] + cols).clamp(max=dy.shape[1] * x.shape[1] - 1)
    return reference.sddmm_ref(dy, x, swapped, out=out, accumulate=accumulate)


MUTANTS = [
    ("gather", "storage order", _gather_storage_order, ["transposed-17x5-k3-fp32-i32", "transposed-37x53-k653-fp32-i64"]),
    ("gather", "off by one", _gather_off_by_one, ["31x33-k97-fp32-i64", "1023-k1023-bf16-i32"]),
    ("gather", "ignores accumulate", _gather_ignores_accumulate, ["97-k32-fp16-i64"]),
    ("gather", "rounds through bf16", _gather_through_bf16, ["4097-k1025-fp32-i32"]),
    ("linear_fisher", "batch gradient squared", _fisher_of_the_batch_gradient,
     ["2x17x31x13-fp32-bias", "3x17x97x33-bf16-lengths", "5x37x33x31-fp16-bias-edge-lengths-i32"]),
    ("linear_fisher", "per-frame squares", _fisher_per_frame, ["2x17x31x13-fp32", "4x7x129x3-fp32-bias-lengths"]),
    ("linear_fisher", "ignores lengths", _fisher_ignores_lengths,
     ["33x4x19x7-fp32-time-major-x-lengths", "5x37x33x31-fp32-bias-edge-lengths-i64"]),
    ("linear_fisher", "drops the bias", _fisher_drops_bias, ["3x33x65x127-fp32-bias"]),
    ("sparse_adamw", "no bias correction", _adamw_no_bias_correction, ["97-k32-fp32-i64-default", "1-k1-bf16+master-i32-default"]),
    ("sddmm", "transposed indices", _sddmm_transposed, ["5x7x13-third-fp32-i64", "33x31x65-all-bf16-i32"]),
]
_OP_ATTR = {"gather": "gather", "linear_fisher": "linear_fisher_", "sparse_adamw": "sparse_adamw_", "sddmm": "sddmm"}


@pytest.mark.parametrize("op,what,wrong,names", MUTANTS, ids=[f"{m[0]}-{m[1].replace(' ', '-')}" for m in MUTANTS])
def test_the_oracles_catch_a_wrong_op(op, what, wrong, names):
    """A backend that breaks one rule of ``op`` fails its cases, the reference's twin comparison
    aside: the oracles alone tell it from a right one (so a case cannot pass by construction)."""
    cases = {case.name: case for case in op_cases.CASES[op]}
    backend = _mutant(**{_OP_ATTR[op]: wrong})
    for name in names:
        result = op_cases.run_case(cases[name], backend, "cpu")
        assert not any("vs reference" in c.name for c in result.comparisons), result.describe()
        assert not result.ok, f"{op} {name}: a backend that {what} passed: {result.describe()}"


def test_the_reference_backend_meets_every_oracle_it_is_run_against():
    """The reference twin is never compared with itself: each of its comparisons is an oracle's."""
    for op in op_cases.OPS:
        case = next(c for c in op_cases.CASES[op] if c.tier == op_cases.TIER_ALL and c.params.get("k", 1) > 0)
        result = op_cases.run_case(case, reference.REFERENCE, "cpu")
        assert result.ok, result.describe()
        assert result.comparisons and not any("vs reference" in c.name for c in result.comparisons), result.describe()
