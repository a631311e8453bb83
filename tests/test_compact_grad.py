"""CompactGradStore against its oracle: dense autograd's gradient gathered at the child indices.

The oracle runs the same loss through an unhooked copy of the parameters, so autograd keeps
the dense ``param.grad``; the store must hold exactly ``param.grad.flatten()[idx]`` (fp32),
keep no dense gradient, and obey the bind / release / fill / zero bookkeeping.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adtuning import ChildNetwork, SparseAdamW
from adtuning.compact_grad import CompactGradStore
from tests.backends import ALL_BACKENDS, require_backend
from tests.op_cases import child_indices

# Awkward sizes: 1, primes, 2^k +- 1, a whole-tensor child, a single entry.
SHAPES = {"one": (1,), "prime": (97,), "matrix": (31, 129), "pow2p1": (4097,), "cube": (3, 5, 7)}
K = {"one": 1, "prime": 97, "matrix": 401, "pow2p1": 1, "cube": 50}


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for n, s in SHAPES.items()}


def _indices(index_dtype: torch.dtype = torch.int32) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        numel = torch.Size(shape).numel()
        out[name] = child_indices(numel, K[name], index_dtype, seed=10 + i)
    return out


def _loss(params: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """A loss whose gradient is not trivially structured (products and a nonlinearity)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for name, p in params.items():
        w = torch.randn(p.shape, generator=gen)
        total = total + (torch.tanh(p.float() * w) * w.flip(-1)).sum()
    return total


def _oracle(dtype: torch.dtype, idx: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
    """Dense autograd over the same parameters (no hooks), gathered at the child indices."""
    params = _params(dtype)
    for seed in seeds:
        _loss(params, seed).backward()
    out = {}
    for n, p in params.items():
        assert p.grad is not None
        out[n] = p.grad.reshape(-1)[idx[n].long()].float()
    return out


def _store(params: dict[str, nn.Parameter], idx: dict[str, torch.Tensor], backend: str = "reference",
           hooks: bool = True) -> CompactGradStore:
    impl = require_backend(backend)
    return CompactGradStore([(params[n], idx[n]) for n in SHAPES], gather=impl.gather, hooks=hooks)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("micro", [1, 3])
def test_hooks_hold_the_gathered_dense_gradient_and_free_it(backend, dtype, micro):
    idx = _indices(torch.int64 if backend == "reference" else torch.int32)
    params = _params(dtype)
    store = _store(params, idx, backend)
    seeds = list(range(micro))
    for seed in seeds:
        _loss(params, seed).backward()
        assert all(p.grad is None for p in params.values())  # the dense gradient died in the hook
    # Per micro-batch dense gradients, gathered and summed in fp32 in micro-batch order (for
    # fp32 that is also autograd's own running sum; bf16 autograd would round it to bf16).
    per_micro = [_oracle(dtype, idx, [seed]) for seed in seeds]
    for name, p in params.items():
        got = store.grad(p)
        assert got is not None and got.dtype == torch.float32 and got.shape == (K[name],)
        want = per_micro[0][name].clone()
        for other in per_micro[1:]:
            want += other[name]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    if dtype == torch.float32:
        dense_sum = _oracle(dtype, idx, seeds)
        assert all(torch.equal(store.grad(params[n]), dense_sum[n]) for n in SHAPES)
    assert store.grad_bytes() == 4 * sum(K.values())
    assert store.numel() == sum(K.values())


def test_target_hands_out_one_buffer_per_step_and_zero_keeps_or_forgets_it():
    params, idx = _params(), _indices()
    store = _store(params, idx, hooks=False)
    p = params["matrix"]
    buffer, accumulate = store.target(p)
    assert not accumulate and buffer.shape == (K["matrix"],) and buffer.dtype == torch.float32
    again, accumulate = store.target(p)
    assert again is buffer and accumulate and store.grad(p) is buffer
    buffer.fill_(3.0)
    store.zero(set_to_none=False)
    kept, accumulate = store.target(p)
    assert kept is buffer and accumulate and torch.equal(buffer, torch.zeros_like(buffer))
    store.zero()
    assert store.grad(p) is None and store.grads() == []
    fresh, accumulate = store.target(p)
    assert fresh is not buffer and not accumulate
    with pytest.raises(KeyError):
        store.target(nn.Parameter(torch.zeros(3)))


def test_without_hooks_autograd_keeps_dense_gradients_and_accumulate_gathers_them():
    params, idx = _params(), _indices()
    store = _store(params, idx, hooks=False)
    _loss(params, 0).backward()
    want = _oracle(torch.float32, idx, [0])
    for name, p in params.items():
        assert p.grad is not None and store.grad(p) is None
        assert torch.equal(store.accumulate(p, p.grad), want[name])
    hooked = _store(_params(), idx)
    hooked.remove_hooks()
    fresh = {n: p for n, p in zip(SHAPES, hooked.parameters())}
    _loss(fresh, 0).backward()
    assert all(p.grad is not None for p in fresh.values()) and hooked.grads() == []


@pytest.mark.parametrize("weight_first", [False, True], ids=["bind-then-backward", "backward-then-bind"])
def test_bound_storage_holds_every_gradient_at_its_offset(weight_first):
    params, idx = _params(), _indices()
    store = _store(params, idx)
    storage = torch.full((store.numel(),), float("nan"))
    if weight_first:
        _loss(params, 0).backward()
        store.bind(storage)
    else:
        store.bind(storage)
        _loss(params, 0).backward()
    _loss(params, 1).backward()  # accumulation into the views
    want = _oracle(torch.float32, idx, [0, 1])
    expected = torch.cat([want[n] for n in SHAPES])
    assert store.bound and torch.equal(storage, expected)
    for p in store.parameters():
        g = store.grad(p)
        assert g is not None and g.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    store.release()
    storage.fill_(float("nan"))  # the caller's buffer is no longer referenced
    assert not store.bound
    assert torch.equal(torch.cat([g for g in store.grads()]), expected)


def test_fill_missing_zeroes_only_the_gradients_not_written_this_step():
    params, idx = _params(), _indices()
    store = _store(params, idx)
    storage = torch.full((store.numel(),), float("nan"))
    store.bind(storage)
    partial = {n: params[n] for n in ("prime", "cube")}
    _loss(partial, 3).backward()
    assert store.grad(params["one"]) is None and store.grad(params["matrix"]) is None
    store.fill_missing()
    oracle_params = _params()
    _loss({n: oracle_params[n] for n in ("prime", "cube")}, 3).backward()
    for name, p in params.items():
        g = store.grad(p)
        assert g is not None
        ref = oracle_params[name].grad
        expected = torch.zeros(K[name]) if ref is None else ref.reshape(-1)[idx[name].long()]
        assert torch.equal(g, expected), name
    assert not torch.isnan(storage).any()
    unbound = _store(_params(), idx)
    unbound.fill_missing()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in unbound.grads()) and len(unbound.grads()) == len(SHAPES)


def test_bad_construction_and_bad_storage_raise_clear_errors():
    params, idx = _params(), _indices()
    with pytest.raises(ValueError, match="given twice"):
        CompactGradStore([(params["prime"], idx["prime"]), (params["prime"], idx["prime"])])
    strided = nn.Parameter(torch.randn(129, 31).t())
    with pytest.raises(ValueError, match="contiguous"):
        CompactGradStore([(strided, idx["matrix"])])
    store = _store(params, idx)
    total = sum(K.values())
    with pytest.raises(ValueError, match=f"{total} entries"):
        store.bind(torch.zeros(total + 1))
    with pytest.raises(ValueError, match="float32"):
        store.bind(torch.zeros(total, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        store.bind(torch.zeros(2 * total)[::2])
    assert not store.bound


def test_optimizer_store_is_built_from_its_sparse_groups():
    params = _params()
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(5)) for n, s in SHAPES.items()}
    scores["one"] = torch.zeros(1)  # no child entry: not in the store, autograd skips it
    child = ChildNetwork.from_scores(scores, 0.2)
    head = nn.Parameter(torch.randn(4))
    opt = SparseAdamW([{"named_params": params, "child": child}, {"params": [head]}])
    store = opt.grad_store
    assert store.parameters() == opt.sparse_parameters() and params["one"] not in store and head not in store
    _loss({n: p for n, p in params.items() if p.requires_grad}, 7).backward()
    oracle = _params()
    _loss({n: p for n, p in oracle.items() if n in child.indices}, 7).backward()
    for name, idx in child.indices.items():
        assert torch.equal(store.indices(params[name]), idx)
        assert torch.equal(store.grad(params[name]), oracle[name].grad.reshape(-1)[idx.long()])
    assert opt.memory_report()["compact_grad_bytes"] == 4 * child.k == store.grad_bytes()
    opt.zero_grad()
    assert store.grads() == []
