"""SparseAdamW against its oracle, torch.optim.AdamW on the gathered child entries."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adtuning import ChildNetwork, SparseAdamW, get_linear_schedule_with_warmup, linear_warmup_decay
from tests.backends import ALL_BACKENDS, require_backend

# Awkward sizes: 1, primes, 2^k +- 1.
SHAPES = {"a": (1,), "b": (97,), "c": (31, 129), "d": (4097,), "e": (3, 5, 7)}
HYPER = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

# (dtype, rtol, atol) of the child entries after all steps, per backend kind. The reference
# backend replays torch's fp32 op order exactly; the fused kernels may contract into FMAs.
TOLERANCES = {
    ("reference", torch.float32): (0.0, 0.0),
    ("native", torch.float32): (1e-5, 1e-6),
    ("triton", torch.float32): (1e-5, 1e-6),
}


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for n, s in SHAPES.items()}


def random_child(p, seed=1, drop=("a",)):
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(s, generator=gen) for n, s in SHAPES.items()}
    for name in drop:  # one tensor ends up with no child entries
        scores[name] = torch.zeros(SHAPES[name])
    return ChildNetwork.from_scores(scores, p)


def gather_vector(params, child):
    return torch.cat([params[n].detach().reshape(-1)[idx.long()].float() for n, idx in child.indices.items()])


def grads_for(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}


def run_sparse(params, child, head, steps, backend, start=0, opt=None):
    if opt is None:
        opt = SparseAdamW([{"named_params": params, "child": child}, {"params": [head], "lr": 1e-2}], **HYPER, backend=backend)
    for step in range(start, start + steps):
        grads = grads_for(step, next(iter(params.values())).dtype)
        loss = sum((p * grads[n]).sum() for n, p in params.items() if p.requires_grad)
        loss = loss + (head * grads_for(step + 1000)["b"][: head.numel()]).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def run_oracle(vector, head, child, steps):
    vec = nn.Parameter(vector.clone())
    head = nn.Parameter(head.detach().clone())
    opt = torch.optim.AdamW([{"params": [vec]}, {"params": [head], "lr": 1e-2}], **HYPER)
    for step in range(steps):
        grads = grads_for(step)
        vec.grad = torch.cat([grads[n].reshape(-1)[idx.long()] for n, idx in child.indices.items()])
        head.grad = grads_for(step + 1000)["b"][: head.numel()].clone()
        opt.step()
    return vec, head, opt


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [0.001, 0.05, 0.5, 1.0])
def test_child_entries_follow_torch_adamw(backend, p):
    require_backend(backend)
    params, head = make_params(), nn.Parameter(torch.randn(11))
    child = random_child(p, drop=() if p == 1.0 else ("a",))
    before = {n: t.detach().clone() for n, t in params.items()}
    start_vec, head_start = gather_vector(params, child), head.detach().clone()
    opt = run_sparse(params, child, head, steps=6, backend=backend)
    vec, head_oracle, oracle = run_oracle(start_vec, head_start, child, steps=6)
    rtol, atol = TOLERANCES[(backend, torch.float32)]
    torch.testing.assert_close(gather_vector(params, child), vec.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(head.detach(), head_oracle.detach(), rtol=0, atol=0)
    # Moments, compared through the same concatenation order.
    ostate = oracle.state[vec]
    exp_avg = torch.cat([opt.state[params[n]]["exp_avg"] for n in child.indices])
    exp_avg_sq = torch.cat([opt.state[params[n]]["exp_avg_sq"] for n in child.indices])
    torch.testing.assert_close(exp_avg, ostate["exp_avg"], rtol=rtol, atol=atol)
    torch.testing.assert_close(exp_avg_sq, ostate["exp_avg_sq"], rtol=rtol, atol=atol)
    # Every non-child entry is bit-identical.
    for name, tensor in params.items():
        keep = torch.ones(tensor.numel(), dtype=torch.bool)
        if name in child.indices:
            keep[child.indices[name].long()] = False
        assert torch.equal(tensor.detach().reshape(-1)[keep], before[name].reshape(-1)[keep])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bf16_weights_use_fp32_master(backend):
    require_backend(backend)
    params, head = make_params(torch.bfloat16), nn.Parameter(torch.randn(3))
    child = random_child(0.3)
    before = {n: t.detach().clone() for n, t in params.items()}
    start_vec = gather_vector(params, child)
    opt = run_sparse(params, child, head, steps=5, backend=backend)
    # Oracle: fp32 AdamW on the fp32 image of the bf16 child entries, with bf16-rounded grads.
    vec = nn.Parameter(start_vec.clone())
    oracle = torch.optim.AdamW([vec], **HYPER)
    for step in range(5):
        grads = grads_for(step, torch.bfloat16)
        vec.grad = torch.cat([grads[n].reshape(-1)[idx.long()].float() for n, idx in child.indices.items()])
        oracle.step()
    master = torch.cat([opt.state[params[n]]["master"] for n in child.indices])
    rtol, atol = (0.0, 0.0) if backend == "reference" else (1e-5, 1e-6)
    torch.testing.assert_close(master, vec.detach(), rtol=rtol, atol=atol)
    # The bf16 weights hold the rounded master; everything else is untouched.
    torch.testing.assert_close(gather_vector(params, child), master.to(torch.bfloat16).float(), rtol=0, atol=0 if backend == "reference" else 1e-2)
    for name, tensor in params.items():
        keep = torch.ones(tensor.numel(), dtype=torch.bool)
        if name in child.indices:
            keep[child.indices[name].long()] = False
        assert torch.equal(tensor.detach().reshape(-1)[keep], before[name].reshape(-1)[keep])
    assert all(opt.state[params[n]]["exp_avg"].dtype == torch.float32 for n in child.indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_state_dict_round_trip_resumes_exactly(backend):
    require_backend(backend)
    child = random_child(0.2)
    head_start = torch.randn(5, generator=torch.Generator().manual_seed(7))

    params_ref, head_ref = make_params(), nn.Parameter(head_start.clone())
    opt_ref = run_sparse(params_ref, child, head_ref, steps=8, backend=backend)

    params_b, head_b = make_params(), nn.Parameter(head_start.clone())
    opt_b = run_sparse(params_b, child, head_b, steps=3, backend=backend)
    saved = copy.deepcopy(opt_b.state_dict())
    # A fresh model copy and a fresh optimizer continue from the saved state.
    params_c, head_c = make_params(), nn.Parameter(head_b.detach().clone())
    with torch.no_grad():
        for n, t in params_c.items():
            t.copy_(params_b[n])
    opt_c = SparseAdamW([{"named_params": params_c, "child": child}, {"params": [head_c], "lr": 1e-2}], **HYPER, backend=backend)
    opt_c.load_state_dict(saved)
    run_sparse(params_c, child, head_c, steps=5, backend=backend, start=3, opt=opt_c)

    for name in SHAPES:
        assert torch.equal(params_c[name].detach(), params_ref[name].detach()), name
    assert torch.equal(head_c.detach(), head_ref.detach())
    for name in child.indices:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_c.state[params_c[name]][key], opt_ref.state[params_ref[name]][key]), (name, key)


def test_load_state_dict_rejects_other_child():
    params, head = make_params(), nn.Parameter(torch.randn(3))
    opt = run_sparse(params, random_child(0.2), head, steps=1, backend="reference")
    other_params = make_params()
    other = SparseAdamW([{"named_params": other_params, "child": random_child(0.3)}, {"params": [nn.Parameter(torch.randn(3))]}], **HYPER)
    with pytest.raises(ValueError, match="entries|child tensors"):
        other.load_state_dict(opt.state_dict())


def test_hook_gathers_and_frees_dense_grad_and_freezes_empty_tensors():
    params, head = make_params(), nn.Parameter(torch.randn(3))
    child = random_child(0.1)
    opt = SparseAdamW([{"named_params": params, "child": child}, {"params": [head]}], **HYPER)
    assert not params["a"].requires_grad  # no child entries -> autograd skips it
    grads = grads_for(0)
    sum((p * grads[n]).sum() for n, p in params.items() if p.requires_grad).backward()
    for name in child.indices:
        assert params[name].grad is None
        expected = grads[name].reshape(-1)[child.indices[name].long()]
        assert torch.equal(opt.grad_store.grad(params[name]), expected)
    report = opt.memory_report()
    assert report["compact_grad_bytes"] == child.k * 4
    assert report["sparse_entries"] == child.k


def test_gradient_accumulation_over_micro_batches():
    child = random_child(0.3)
    params_a, params_b = make_params(), make_params()
    opt_a = SparseAdamW([{"named_params": params_a, "child": child}], **HYPER)
    opt_b = SparseAdamW([{"named_params": params_b, "child": child}], **HYPER)
    g1, g2 = grads_for(1), grads_for(2)
    for g in (g1, g2):
        sum((p * g[n]).sum() for n, p in params_a.items() if p.requires_grad).backward()
    sum((p * (g1[n] + g2[n])).sum() for n, p in params_b.items() if p.requires_grad).backward()
    for name in child.indices:
        torch.testing.assert_close(opt_a.grad_store.grad(params_a[name]), opt_b.grad_store.grad(params_b[name]))
    opt_a.step(), opt_b.step()
    for name in SHAPES:
        torch.testing.assert_close(params_a[name], params_b[name])


def test_clip_grad_norm_matches_torch_on_child_and_dense_grads():
    child = random_child(0.3)
    params, head = make_params(), nn.Parameter(torch.randn(4))
    opt = SparseAdamW([{"named_params": params, "child": child}, {"params": [head]}], **HYPER)
    g = grads_for(3)
    (sum((p * g[n] * 10).sum() for n, p in params.items() if p.requires_grad) + (head * 7).sum()).backward()
    vec = nn.Parameter(torch.zeros(child.k + 4))
    vec.grad = torch.cat([opt.grad_store.grad(params[n]) for n in child.indices] + [head.grad])
    expected_norm = torch.nn.utils.clip_grad_norm_([vec], 1.5)
    norm = opt.clip_grad_norm_(1.5)
    torch.testing.assert_close(norm, expected_norm)
    clipped = torch.cat([opt.grad_store.grad(params[n]) for n in child.indices] + [head.grad])
    torch.testing.assert_close(clipped, vec.grad)


def test_memory_report_counts_only_child_state():
    params = make_params(torch.bfloat16)
    child = random_child(0.1)
    opt = run_sparse(params, child, nn.Parameter(torch.randn(2)), steps=1, backend="reference")
    report = opt.memory_report()
    dense_head_state = 2 * 2 * 4 + 4
    steps = 4 * len(child.indices)
    assert report["state_bytes"] == child.k * (4 + 4 + 4) + steps + dense_head_state
    assert report["index_bytes"] == child.k * 4


def test_linear_schedule_with_warmup():
    mult = linear_warmup_decay(4, 10)
    assert [round(mult(s), 6) for s in (0, 2, 4, 7, 10, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    params = make_params()
    opt = SparseAdamW([{"named_params": params, "child": random_child(0.2)}], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 4, 10)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6])
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_decay(11, 10)


def test_bad_groups_raise_clear_errors():
    params = make_params()
    with pytest.raises(ValueError, match="needs a 'child'"):
        SparseAdamW([{"named_params": params}])
    wrong = ChildNetwork.from_scores({"zz": torch.rand(3)}, 0.5)
    with pytest.raises(KeyError, match="zz"):
        SparseAdamW([{"named_params": params, "child": wrong}])
    bad_shape = ChildNetwork.from_scores({"b": torch.rand(98)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        SparseAdamW([{"named_params": params, "child": bad_shape}])
    with pytest.raises(ValueError, match="unknown backend"):
        SparseAdamW([{"named_params": params, "child": random_child(0.1)}], backend="cuda-magic")


@pytest.mark.parametrize("adopt", [False, True])
def test_bf16_state_survives_a_round_trip_in_fp32(adopt):
    child = random_child(0.3)
    params = make_params(torch.bfloat16)
    opt = run_sparse(params, child, nn.Parameter(torch.randn(3)), steps=2, backend="reference")
    saved = copy.deepcopy(opt.state_dict())
    fresh = SparseAdamW([{"named_params": params, "child": child}, {"params": [nn.Parameter(torch.randn(3))], "lr": 1e-2}], **HYPER)
    fresh.load_state_dict(saved, adopt=adopt)
    for name in child.indices:
        state = fresh.state[params[name]]
        assert state["master"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
        assert torch.equal(state["master"], opt.state[params[name]]["master"])
        original = saved["state"][list(child.indices).index(name)]["master"]
        assert (state["master"].data_ptr() == original.data_ptr()) == adopt
