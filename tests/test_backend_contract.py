"""Every backend's operations have exactly the signatures of the contract's Protocols.

:mod:`adtuning.backend_contract` holds one ``typing.Protocol`` per operation (its ``__call__``
is the signature and the docstring). mypy checks each backend against them statically
(``.ci/run``); this test checks the objects each loadable backend really returns at run time:
parameter names, kinds (positional / keyword-only), defaults and resolved annotations, and the
return annotation. :func:`signature_mismatches` is the comparison; the second half of the file
shows that it rejects a parameter added, renamed, dropped, re-defaulted, re-kinded or re-typed
in one implementation only.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import pytest
import torch

from adtuning import reference
from adtuning.backend_contract import OPERATIONS, Backend, GatherOp, SparseAdamWMultiOp, SparseAdamWOp
from adtuning.backends import BACKENDS
from tests.backends import require_backend


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature`` with string annotations (``from __future__ import annotations``) evaluated."""
    return inspect.signature(func, eval_str=True)


def protocol_signature(protocol: type) -> inspect.Signature:
    """The signature a callable implementing ``protocol`` must have: its ``__call__`` without ``self``."""
    signature = _signature(protocol.__call__)
    parameters = list(signature.parameters.values())
    assert parameters and parameters[0].name == "self", protocol
    return signature.replace(parameters=parameters[1:])


def signature_mismatches(func: Callable[..., Any], protocol: type) -> list[str]:
    """What differs between ``func``'s signature and ``protocol``'s (empty when they are the same).

    Compares, parameter by parameter in order: the name, the kind, the default and the
    annotation; then the parameter count and the return annotation.
    """
    expected, actual = protocol_signature(protocol), _signature(func)
    want, got = list(expected.parameters.values()), list(actual.parameters.values())
    problems = []
    for position, (w, g) in enumerate(zip(want, got)):
        for what in ("name", "kind", "default", "annotation"):
            if getattr(w, what) != getattr(g, what):
                problems.append(f"parameter {position} ({w.name}): {what} {getattr(g, what)!r}, contract {getattr(w, what)!r}")
    for extra in got[len(want):]:
        problems.append(f"parameter {extra.name!r} is not in the contract")
    for missing in want[len(got):]:
        problems.append(f"contract parameter {missing.name!r} is missing")
    if expected.return_annotation != actual.return_annotation:
        problems.append(f"returns {actual.return_annotation!r}, contract {expected.return_annotation!r}")
    return problems


# ---- the contract itself ---------------------------------------------------------------------

def test_backend_fields_are_the_operations_typed_by_their_protocols():
    assert [f.name for f in dataclasses.fields(Backend)] == ["name", *OPERATIONS]
    hints = typing.get_type_hints(Backend)
    for op, protocol in OPERATIONS.items():
        assert hints[op] is protocol, op
        assert getattr(protocol, "_is_protocol", False), protocol
        assert protocol.__call__.__doc__, f"{protocol.__name__}.__call__ has no docstring"


# ---- every loadable backend ------------------------------------------------------------------

@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_operation_has_the_protocol_signature(name, op):
    """reference and native here (native must build on CI), triton on CUDA or under TRITON_INTERPRET=1."""
    func = getattr(require_backend(name), op)
    protocol = OPERATIONS[op]
    assert signature_mismatches(func, protocol) == [], f"{name}.{op}"
    # Implementations point to the contract rather than copy it.
    assert protocol.__name__ in (func.__doc__ or ""), f"{name}.{op}'s docstring does not name {protocol.__name__}"


def test_the_reference_twins_are_the_reference_backend():
    backend = require_backend("reference")
    assert (backend.gather, backend.sparse_adamw_, backend.sparse_adamw_multi_, backend.linear_fisher_, backend.sddmm) == (
        reference.gather_ref, reference.sparse_adamw_ref_, reference.sparse_adamw_multi_ref_, reference.linear_fisher_ref_,
        reference.sddmm_ref)


# ---- the comparison rejects a slip in one backend -------------------------------------------

def _with_signature(signature: inspect.Signature) -> Callable[..., Any]:
    """A function whose ``inspect.signature`` is ``signature``."""
    def impostor(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("never called")
    impostor.__signature__ = signature
    return impostor


def _mutations(signature: inspect.Signature) -> dict[str, inspect.Signature]:
    """One-parameter slips of ``signature``: each must be rejected."""
    params = list(signature.parameters.values())
    first, last = params[0], params[-1]
    optional = next((p for p in params if p.default is not inspect.Parameter.empty), None)
    keyword_only = inspect.Parameter("tile", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=int | None)
    positional = inspect.Parameter("scale", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1.0, annotation=float)
    if last.kind is inspect.Parameter.KEYWORD_ONLY:
        appended_positional = params[:[p.kind for p in params].index(last.kind)] + [positional] + [
            p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        rekinded = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params]
    else:
        appended_positional = params + [positional]
        rekinded = params[:-1] + [last.replace(kind=inspect.Parameter.KEYWORD_ONLY)]
    return {
        "renamed": signature.replace(parameters=[first.replace(name=first.name + "_")] + params[1:]),
        "added keyword-only": signature.replace(parameters=params + [keyword_only]),
        "added positional": signature.replace(parameters=appended_positional),
        "dropped": signature.replace(parameters=params[:-1]),
        # a default changed, or (when no parameter has one) given to the last parameter
        "re-defaulted": signature.replace(parameters=[
            p.replace(default=object()) if p is (optional or last) else p for p in params]),
        "re-kinded": signature.replace(parameters=rekinded),
        "re-typed": signature.replace(parameters=[first.replace(annotation=torch.Tensor | None)] + params[1:]),
        "returns differently": signature.replace(return_annotation=typing.Any),
    }


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_the_comparison_rejects_every_one_parameter_slip(op):
    protocol = OPERATIONS[op]
    exact = protocol_signature(protocol)
    assert signature_mismatches(_with_signature(exact), protocol) == []
    for slip, signature in _mutations(exact).items():
        assert signature_mismatches(_with_signature(signature), protocol), f"{op}: {slip} was not caught"


def test_a_parameter_added_to_one_backend_only_is_rejected():
    """The slip the contract exists to catch: an implementation grows a parameter the others lack."""
    def gather_with_scale(
        grad: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
        scale: float = 1.0,
    ) -> torch.Tensor:
        return reference.gather_ref(grad, indices, out, accumulate) * scale

    def sparse_adamw_renamed_(
        param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor, master: torch.Tensor | None, *, step: float, lr: float, beta1: float,
        beta2: float, epsilon: float, weight_decay: float,
    ) -> None:
        raise AssertionError("never called")

    assert signature_mismatches(reference.gather_ref, GatherOp) == []
    assert signature_mismatches(gather_with_scale, GatherOp) == ["parameter 'scale' is not in the contract"]
    assert signature_mismatches(sparse_adamw_renamed_, SparseAdamWOp) == [
        "parameter 10 (eps): name 'epsilon', contract 'eps'"]


def test_a_multi_op_taking_one_step_for_all_tensors_is_rejected():
    """The multi-tensor op takes one step per tensor (a list), not the single op's one step."""
    def sparse_adamw_multi_one_step_(
        params: list[torch.Tensor], grads: list[torch.Tensor], indices: list[torch.Tensor],
        exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor | None],
        *, step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> None:
        raise AssertionError("never called")

    assert signature_mismatches(reference.sparse_adamw_multi_ref_, SparseAdamWMultiOp) == []
    problems = signature_mismatches(sparse_adamw_multi_one_step_, SparseAdamWMultiOp)
    assert "parameter 6 (steps): name 'step', contract 'steps'" in problems
    assert any("kind" in problem for problem in problems)
