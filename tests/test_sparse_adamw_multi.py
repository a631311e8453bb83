"""The multi-tensor sparse AdamW (``Backend.sparse_adamw_multi_``) of every backend.

The contract (:class:`~adtuning.backend_contract.SparseAdamWMultiOp`): exactly the backend's
``sparse_adamw_`` applied to each tensor in turn, bit for bit. Checked here on lists of tensors
with awkward sizes (numel 1, primes, 2^k +- 1, a tensor without child entries, one whose child
is all of it, many small ones between big ones), mixed param dtypes with masters, mixed index
dtypes, and different step counts per tensor (tensors join the steps at different rounds, as
tensors without a gradient do in the optimizer); against the reference's single op and
``torch.optim.AdamW`` on the gathered entries with the tolerances of :mod:`tests.op_cases`;
empty lists; bad arguments (raised before anything is written); and ``SparseAdamW`` (whose step
now calls the multi op) against the per-tensor ``sparse_adamw_`` loop it replaced, through a
state_dict round trip.

Backends come from :func:`tests.backends.require_backend`: the reference always runs, native
when it builds (required when CI=true), triton on CUDA or under TRITON_INTERPRET=1 (set by
tests/conftest.py on machines without CUDA).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from adtuning import ChildNetwork, SparseAdamW, reference
from tests.backends import ALL_BACKENDS, require_backend
from tests.op_cases import ADAMW_PARAM_TOL, ADAMW_STATE_TOL, child_indices, rel_err

HYPER = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "weight_decay": 0.05}
ROUNDS = 4

F32, BF16, F16, I32, I64 = torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64


@dataclass(frozen=True)
class Spec:
    """One tensor of a list: its size, child entries, dtypes, master and first round."""

    numel: int
    k: int
    dtype: torch.dtype
    index_dtype: torch.dtype
    master: bool
    start: int  # the round of its first step: tensors reach each round at different step counts


# Awkward sizes: numel 1; primes; 2^k +- 1; no child entries (k=0); the whole tensor (k=numel);
# an fp32 tensor with a master; many small tensors (like biases) between big ones, and enough
# entries in all (~45k) for the native op to split the flat range across tasks mid-tensor.
SPECS = (
    [Spec(1, 1, F32, I32, False, 0), Spec(97, 13, BF16, I64, True, 1), Spec(257, 0, F32, I64, False, 0),
     Spec(1023, 1023, F16, I32, True, 2), Spec(4097, 2049, F32, I32, True, 0), Spec(65537, 9001, F32, I64, False, 1)]
    + [Spec(769, 8 + i % 5, (F32, BF16)[i % 2], (I32, I64)[i % 3 == 0], i % 2 == 1, i % 3) for i in range(12)]
    + [Spec(278011, 30011, F32, I32, False, 0), Spec(31, 31, BF16, I32, True, 3), Spec(2, 1, F16, I64, True, 0)]
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (so that the comparison is exact, signed zeros included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> None:
    if actual is None or expected is None:
        assert actual is None and expected is None, what
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(bits(actual), bits(expected)), what


class Tensors:
    """The operands of each spec: ``param``, ``indices``, moments, master; cloneable."""

    def __init__(self, specs: list[Spec], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.specs = specs
        self.params, self.indices, self.exp_avgs, self.exp_avg_sqs, self.masters = [], [], [], [], []
        for t, spec in enumerate(specs):
            param = torch.randn(spec.numel, generator=gen).to(spec.dtype)
            idx = child_indices(spec.numel, spec.k, spec.index_dtype, seed + 31 * t)
            self.params.append(param)
            self.indices.append(idx)
            self.exp_avgs.append(torch.zeros(spec.k))
            self.exp_avg_sqs.append(torch.zeros(spec.k))
            # An fp32 master differs from its param (the param must take the master's values).
            self.masters.append(param[idx.long()].float() + (spec.dtype == F32) if spec.master else None)

    def clone(self) -> Tensors:
        return copy.deepcopy(self)

    def mutables(self) -> list[torch.Tensor]:
        """Every tensor an op may write."""
        return [t for group in (self.params, self.exp_avgs, self.exp_avg_sqs, self.masters) for t in group if t is not None]


def rounds_of_grads(specs: list[Spec], seed: int = 5) -> list[dict[int, torch.Tensor]]:
    """Per round, the compact gradient of each tensor that steps in that round."""
    gen = torch.Generator().manual_seed(seed)
    return [{t: torch.randn(spec.k, generator=gen) for t, spec in enumerate(specs) if r >= spec.start}
            for r in range(ROUNDS)]


def run_multi(backend, tensors: Tensors, grads_per_round: list[dict[int, torch.Tensor]]) -> None:
    steps = [0] * len(tensors.specs)
    for grads in grads_per_round:
        active = sorted(grads)
        for t in active:
            steps[t] += 1
        backend.sparse_adamw_multi_(
            [tensors.params[t] for t in active], [grads[t] for t in active], [tensors.indices[t] for t in active],
            [tensors.exp_avgs[t] for t in active], [tensors.exp_avg_sqs[t] for t in active],
            [tensors.masters[t] for t in active], [float(steps[t]) for t in active], **HYPER)


def run_single(sparse_adamw_, tensors: Tensors, grads_per_round: list[dict[int, torch.Tensor]]) -> None:
    steps = [0] * len(tensors.specs)
    for grads in grads_per_round:
        for t in sorted(grads):
            steps[t] += 1
            sparse_adamw_(tensors.params[t], grads[t], tensors.indices[t], tensors.exp_avgs[t], tensors.exp_avg_sqs[t],
                          tensors.masters[t], step=float(steps[t]), **HYPER)


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_multi_is_the_single_op_on_each_tensor_bit_for_bit(backend_name):
    backend = require_backend(backend_name)
    start = Tensors(SPECS)
    grads = rounds_of_grads(SPECS)
    multi, single = start.clone(), start.clone()
    run_multi(backend, multi, grads)
    run_single(backend.sparse_adamw_, single, grads)
    for t in range(len(SPECS)):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "masters"):
            assert_bits_equal(getattr(multi, name)[t], getattr(single, name)[t], f"{backend_name} {name}[{t}] {SPECS[t]}")
    # Something happened: every tensor with child entries moved, the others did not.
    for t, spec in enumerate(SPECS):
        child = start.indices[t].long()
        assert torch.equal(multi.params[t][child], start.params[t][child]) == (spec.k == 0), t
        untouched = torch.ones(spec.numel, dtype=torch.bool)
        untouched[child] = False
        assert_bits_equal(multi.params[t][untouched], start.params[t][untouched], f"non-child entries of params[{t}]")


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_multi_follows_the_reference_and_torch_adamw(backend_name):
    """Within the tolerances of tests/op_cases.py: against the reference's single op (native and
    triton) and against torch.optim.AdamW stepping each tensor's gathered child vector."""
    backend = require_backend(backend_name)
    start = Tensors(SPECS, seed=1)
    grads = rounds_of_grads(SPECS, seed=6)
    ours, theirs = start.clone(), start.clone()
    run_multi(backend, ours, grads)
    run_single(reference.sparse_adamw_ref_, theirs, grads)
    for t, spec in enumerate(SPECS):
        child = start.indices[t].long()
        if backend_name != "reference":
            for name in ("exp_avgs", "exp_avg_sqs", "masters"):
                a, b = getattr(ours, name)[t], getattr(theirs, name)[t]
                if a is not None:
                    assert rel_err(a, b) <= ADAMW_STATE_TOL, (name, t)
            assert rel_err(ours.params[t][child].float(), theirs.params[t][child].float()) <= ADAMW_PARAM_TOL[spec.dtype], t
        # The oracle: torch's AdamW on the child vector alone, stepped in the same rounds.
        vector = nn.Parameter((start.masters[t] if spec.master else start.params[t][child]).float().clone())
        oracle = torch.optim.AdamW([vector], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                   weight_decay=HYPER["weight_decay"])
        for round_grads in grads:
            if t in round_grads:
                vector.grad = round_grads[t].clone()
                oracle.step()
        fp32_child = ours.masters[t] if spec.master else ours.params[t][child]
        assert rel_err(fp32_child, vector.detach()) <= ADAMW_STATE_TOL, t
        if spec.k:
            assert rel_err(ours.exp_avgs[t], oracle.state[vector]["exp_avg"]) <= ADAMW_STATE_TOL, t
            assert rel_err(ours.exp_avg_sqs[t], oracle.state[vector]["exp_avg_sq"]) <= ADAMW_STATE_TOL, t
        if spec.master:
            assert_bits_equal(ours.params[t][child], ours.masters[t].to(spec.dtype), f"params[{t}] holds its master rounded")


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_empty_lists_are_a_no_op(backend_name):
    backend = require_backend(backend_name)
    backend.sparse_adamw_multi_([], [], [], [], [], [], [], **HYPER)
    only_empty = Tensors([Spec(257, 0, F32, I64, False, 0)])
    before = only_empty.clone()
    backend.sparse_adamw_multi_(only_empty.params, [torch.zeros(0)], only_empty.indices, only_empty.exp_avgs,
                                only_empty.exp_avg_sqs, only_empty.masters, [1.0], **HYPER)
    assert_bits_equal(only_empty.params[0], before.params[0], "a tensor without child entries")


# ---- bad arguments ----------------------------------------------------------------------------

ERROR_SPECS = [Spec(97, 13, F32, I64, False, 0), Spec(4097, 2049, BF16, I32, True, 0), Spec(1023, 511, F32, I32, False, 0)]
LAST = len(ERROR_SPECS) - 1


def _args(tensors: Tensors) -> dict:
    gen = torch.Generator().manual_seed(9)
    return dict(params=list(tensors.params), grads=[torch.randn(s.k, generator=gen) for s in tensors.specs],
                indices=list(tensors.indices), exp_avgs=list(tensors.exp_avgs), exp_avg_sqs=list(tensors.exp_avg_sqs),
                masters=list(tensors.masters), steps=[3.0, 1.0, 2.0])


def _replace(name: str, position: int, make):
    def mutate(args: dict) -> None:
        args[name][position] = make(args[name][position])
    return mutate


def _drop_last(name: str):
    def mutate(args: dict) -> None:
        args[name].pop()
    return mutate


def _past_the_end(indices: torch.Tensor) -> torch.Tensor:
    """The last (largest) index moved to the parameter's numel: still sorted, one past the end."""
    bad = indices.clone()
    bad[-1] = ERROR_SPECS[LAST].numel
    return bad


# (what, mutation, message pattern, backends that check it). The bad argument sits at the last
# position, so that a plain loop over the single op would already have written the others.
# The Triton launchers do not check index values (a host synchronisation); the reference
# updates a bf16 param without a master in bf16.
AT_LAST = rf"(\[{LAST}\]|tensor {LAST})"
BAD_ARGUMENTS = [
    ("a list one short", _drop_last("grads"), "grads has 2 entries", ALL_BACKENDS),
    ("steps one short", _drop_last("steps"), "steps has 2 entries", ALL_BACKENDS),
    ("masters one short", _drop_last("masters"), "masters has 2 entries", ALL_BACKENDS),
    ("an fp64 gradient", _replace("grads", LAST, torch.Tensor.double), AT_LAST, ALL_BACKENDS),
    ("float indices", _replace("indices", LAST, torch.Tensor.float), AT_LAST, ALL_BACKENDS),
    ("an fp64 param", _replace("params", LAST, torch.Tensor.double), AT_LAST, ALL_BACKENDS),
    ("a moment one entry long", _replace("exp_avg_sqs", LAST, lambda t: torch.zeros(t.numel() + 1)), AT_LAST, ALL_BACKENDS),
    ("step 0", _replace("steps", LAST, lambda s: 0.0), "step", ALL_BACKENDS),
    ("an index past the end", _replace("indices", LAST, _past_the_end), "outside", ("reference", "native")),
    ("a bf16 param without master", _replace("masters", 1, lambda m: None), r"(\[1\]|tensor 1).*master", ("native", "triton")),
]


# Only the (backend, case) pairs the backend checks: a skip would read as "cannot run here".
BAD_ARGUMENT_CASES = [
    pytest.param(backend_name, what, mutate, pattern, id=f"{what}-{backend_name}")
    for what, mutate, pattern, backends in BAD_ARGUMENTS
    for backend_name in ALL_BACKENDS
    if backend_name in backends
]


@pytest.mark.parametrize("backend_name,what,mutate,pattern", BAD_ARGUMENT_CASES)
def test_bad_arguments_raise_and_leave_every_tensor_unwritten(backend_name, what, mutate, pattern):
    backend = require_backend(backend_name)
    tensors = Tensors(ERROR_SPECS)
    before = tensors.clone()
    args = _args(tensors)
    mutate(args)
    passed = copy.deepcopy(args)  # the arguments as passed, replaced tensors included
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        backend.sparse_adamw_multi_(*args.values(), **HYPER)
    for a, b in zip(tensors.mutables(), before.mutables()):
        assert_bits_equal(a, b, f"{what}: a tensor was written")
    for name, values in args.items():
        if name != "steps":
            for a, b in zip(values, passed[name]):
                assert_bits_equal(a, b, f"{what}: {name} was written")


def test_native_rejects_one_param_twice_and_reports_an_unsorted_bad_index():
    """Native only: tensors are updated concurrently, so a param at two positions would race;
    an out-of-range index inside an unsorted set is found while running and named."""
    backend = require_backend("native")
    tensors = Tensors(ERROR_SPECS)
    before = tensors.clone()
    args = _args(tensors)
    args["params"][LAST] = args["params"][0]
    args["indices"][LAST] = args["indices"][0]
    for name in ("grads", "exp_avgs", "exp_avg_sqs"):
        args[name][LAST] = torch.zeros(ERROR_SPECS[0].k)
    with pytest.raises(RuntimeError, match=rf"params\[0\] and params\[{LAST}\] are the same tensor"):
        backend.sparse_adamw_multi_(*args.values(), **HYPER)
    for a, b in zip(tensors.mutables(), before.mutables()):
        assert_bits_equal(a, b, "a tensor was written")

    args = _args(tensors)
    unsorted = args["indices"][LAST].flip(0).contiguous()
    unsorted[unsorted.numel() // 2] = -1  # first and last are in range: found only while running
    args["indices"][LAST] = unsorted
    with pytest.raises(RuntimeError, match=rf"indices\[{LAST}\] is outside .*params\[{LAST}\] was left unwritten"):
        backend.sparse_adamw_multi_(*args.values(), **HYPER)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_native_split_across_threads_is_bit_identical(threads):
    """However the flat range of all entries is split into tasks (tasks start mid-tensor, span
    tensors), every entry is updated once: the same bits as the single op."""
    backend = require_backend("native")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = Tensors(SPECS, seed=2)
        grads = rounds_of_grads(SPECS, seed=7)
        multi, single = start.clone(), start.clone()
        run_multi(backend, multi, grads)
    finally:
        torch.set_num_threads(previous)
    run_single(backend.sparse_adamw_, single, grads)
    for a, b in zip(multi.mutables(), single.mutables()):
        assert_bits_equal(a, b, f"{threads} threads")


@pytest.mark.parametrize("with_masters", [(False, True, False), (True, True, True), (False, False, False)],
                         ids=["some", "all", "none"])
def test_opcheck_native_sparse_adamw_multi(with_masters):
    """Schema, fake implementation and dispatch of adtuning::sparse_adamw_multi_ are consistent
    (torch.compile's auto-functionalization included), with some, all and no master copies."""
    require_backend("native")
    op = torch.ops.adtuning.sparse_adamw_multi_.default
    specs = [Spec(97, 13, F32, I64, with_masters[0], 0), Spec(4097, 2049, BF16 if with_masters[1] else F32, I32, with_masters[1], 0),
             Spec(257, 0, F32, I64, with_masters[2], 0)]
    tensors = Tensors(specs, seed=3)
    present = [m for m in tensors.masters if m is not None]
    master_index = [-1 if m is None else sum(o is not None for o in tensors.masters[:t]) for t, m in enumerate(tensors.masters)]
    args = (tensors.params, [torch.randn(s.k) for s in specs], tensors.indices, [torch.rand(s.k) for s in specs],
            [torch.rand(s.k) for s in specs], present, master_index, 1e-3, 0.9, 0.999, 1e-8, 0.01,
            [0.1, 0.19, 0.271], [0.001, 0.002, 0.003])
    torch.library.opcheck(op, args)


def test_native_op_checks_its_master_positions():
    """The C++ op itself (below the wrapper) refuses a master position out of range, one master
    shared by two tensors and a master that belongs to no tensor."""
    require_backend("native")
    op = torch.ops.adtuning.sparse_adamw_multi_.default
    tensors = Tensors([Spec(97, 13, F32, I64, True, 0), Spec(31, 13, F32, I32, True, 0)])
    before = tensors.clone()
    grads = [torch.randn(13), torch.randn(13)]
    for master_index, pattern in (([0, 2], r"master_index\[1\] is 2"), ([0, 0], r"masters\[0\] is the master of tensors 0 and 1"),
                                  ([0, -1], r"masters\[1\] is no tensor's master")):
        with pytest.raises(RuntimeError, match=pattern):
            op(tensors.params, grads, tensors.indices, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.masters[:2],
               master_index, 1e-3, 0.9, 0.999, 1e-8, 0.01, [0.1, 0.1], [0.001, 0.001])
        for a, b in zip(tensors.mutables(), before.mutables()):
            assert_bits_equal(a, b, f"master_index {master_index}: a tensor was written")


# ---- SparseAdamW ------------------------------------------------------------------------------

# Awkward sizes and mixed dtypes in one sparse group (16-bit tensors get fp32 masters); "late"
# first gets a gradient at step 2, so the group's tensors step at different counts.
OPT_SHAPES = {"a": ((1,), F32), "b": ((97,), BF16), "c": ((31, 129), F32), "d": ((4097,), F16), "late": ((3, 5, 7), F32),
              "e": ((257,), F32)}
OPT_HYPER = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
OPT_STEPS = 6


def _opt_params() -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return {n: nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for n, (shape, dtype) in OPT_SHAPES.items()}


def _opt_child() -> ChildNetwork:
    gen = torch.Generator().manual_seed(1)
    return ChildNetwork.from_scores({n: torch.rand(shape, generator=gen) for n, (shape, _) in OPT_SHAPES.items()}, 0.3)


def _dense_grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = {n: torch.randn(shape, generator=gen).to(dtype) for n, (shape, dtype) in OPT_SHAPES.items()}
    return {n: g for n, g in grads.items() if n != "late" or step >= 2}


def _optimizer(params: dict[str, nn.Parameter], child: ChildNetwork, head: nn.Parameter, backend: str) -> SparseAdamW:
    return SparseAdamW([{"named_params": params, "child": child}, {"params": [head], "lr": 1e-2}], **OPT_HYPER, backend=backend)


def _train(opt: SparseAdamW, params: dict[str, nn.Parameter], head: nn.Parameter, steps: range) -> None:
    for step in steps:
        grads = _dense_grads(step)
        loss = sum((params[n] * g).sum() for n, g in grads.items()) + (head * grads["e"][: head.numel()]).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _per_tensor_loop(backend, params: dict[str, nn.Parameter], child: ChildNetwork) -> dict[str, dict]:
    """The sparse step as it was before the multi op: the backend's sparse_adamw_, tensor by tensor."""
    state: dict[str, dict] = {}
    with torch.no_grad():
        for step in range(OPT_STEPS):
            for name, dense in _dense_grads(step).items():
                idx = child.indices.get(name)
                if idx is None:
                    continue
                p = params[name]
                if name not in state:
                    state[name] = {"step": 0, "exp_avg": torch.zeros(idx.numel()), "exp_avg_sq": torch.zeros(idx.numel()),
                                   "master": p.reshape(-1)[idx.long()].float() if p.dtype != F32 else None}
                s = state[name]
                s["step"] += 1
                backend.sparse_adamw_(p.data, dense.reshape(-1)[idx.long()].float(), idx, s["exp_avg"], s["exp_avg_sq"],
                                      s["master"], step=float(s["step"]), lr=OPT_HYPER["lr"], beta1=OPT_HYPER["betas"][0],
                                      beta2=OPT_HYPER["betas"][1], eps=OPT_HYPER["eps"], weight_decay=OPT_HYPER["weight_decay"])
    return state


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_sparse_adamw_steps_and_state_dict_round_trip_match_the_per_tensor_loop(backend_name):
    backend = require_backend(backend_name)
    child = _opt_child()
    assert set(child.indices) == set(OPT_SHAPES)
    expected_params = _opt_params()
    expected_state = _per_tensor_loop(backend, expected_params, child)

    head_start = torch.randn(5, generator=torch.Generator().manual_seed(7))
    params_b, head_b = _opt_params(), nn.Parameter(head_start.clone())
    opt_b = _optimizer(params_b, child, head_b, backend_name)
    _train(opt_b, params_b, head_b, range(3))
    saved = copy.deepcopy(opt_b.state_dict())
    # A fresh model copy and a fresh optimizer continue from the saved state.
    params_c, head_c = _opt_params(), nn.Parameter(head_b.detach().clone())
    with torch.no_grad():
        for name, tensor in params_c.items():
            tensor.copy_(params_b[name])
    opt_c = _optimizer(params_c, child, head_c, backend_name)
    opt_c.load_state_dict(saved)
    _train(opt_c, params_c, head_c, range(3, OPT_STEPS))

    for name in OPT_SHAPES:
        assert_bits_equal(params_c[name].detach(), expected_params[name].detach(), f"{backend_name} {name}")
        state = opt_c.state[params_c[name]]
        assert float(state["step"]) == expected_state[name]["step"] == (OPT_STEPS - 2 if name == "late" else OPT_STEPS)
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert_bits_equal(state.get(key), expected_state[name][key], f"{backend_name} {name} {key}")
