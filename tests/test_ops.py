"""Every op of every backend against its reference twin and oracles: op x case x backend x device.

The cases (inputs, dtypes, tolerances, checks) live in :mod:`tests.op_cases`, which
``bench/gpu_check.py`` runs on CUDA as well. Backends come from :func:`tests.backends.require_backend`:
the reference always runs, ``native`` must run when CI=true, ``triton`` runs on CUDA or under
TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA), where the largest cases
are left to the compiled kernels. The CUDA device is added when one is present (``-k cuda`` selects it).
"""
from __future__ import annotations

import pytest
import torch

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
