"""Sparse weight gradients: what is backend-specific about the SDDMM op, and the training path.

The op's values on every backend (against an fp64 oracle and dense autograd's gathered
gradient ``weight.grad.flatten()[idx]``, on awkward sizes, every input dtype, empty child sets,
no frames and a child that is the whole tensor) are cases of tests/test_ops.py (from
tests/op_cases.py); here remain the argument checks, native's opcheck and thread-count
determinism, and the Triton kernel's operand layouts. The training path is checked by the
contract of the issue: the same short run with the weight gradients dense or sparse, on the
reference, native and (interpreted) Triton backends, gives the same child values within
tolerance and leaves every other entry bit-identical, without a dense dW or dense Adam state.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adtuning import ChildNetwork, SparseAdamW, install_sparse_weight_grad
from adtuning.reference import sddmm_ref
from adtuning.search import AdaptiveSearch, SearchConfig
from adtuning.sparse_grad import DENSITY_THRESHOLDS, WEIGHT_GRAD_MODES, use_sparse_path
from tests.backends import ALL_BACKENDS, require_backend
from tests.helpers import TinyWav2Vec2Classifier, padded_wav_batches, wav_loss
from tests.op_cases import child_indices


def _bound(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_n |dy[n, i]| |x[n, j]| per child entry: the scale of its rounding error."""
    return (dy.double().abs().t() @ x.double().abs()).flatten()[idx.long()] + 1e-30


# ---------------------------------------------------------------- the op, backend-specific


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_sddmm_signature_and_bad_inputs(backend):
    impl = require_backend(backend)
    assert inspect.signature(impl.sddmm) == inspect.signature(sddmm_ref)
    dy, x = torch.randn(4, 3), torch.randn(4, 5)
    idx = torch.tensor([0, 14], dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError), match="N|rows"):
        impl.sddmm(dy, x[:3], idx)
    with pytest.raises((RuntimeError, ValueError), match="out"):
        impl.sddmm(dy, x, idx, out=torch.zeros(3))
    with pytest.raises((RuntimeError, TypeError), match="indices|int32"):
        impl.sddmm(dy, x, idx.float())


def test_native_sddmm_reports_out_of_range_indices_and_passes_opcheck():
    impl = require_backend("native")
    dy, x = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="outside"):
        impl.sddmm(dy, x, torch.tensor([0, 15]))
    op = torch.ops.adtuning.sddmm.default
    idx = child_indices(31 * 13, 50, torch.int64, seed=1)
    for accumulate in (False, True):
        torch.library.opcheck(op, (torch.randn(9, 31), torch.randn(9, 13), idx, torch.randn(50), accumulate))
    torch.library.opcheck(op, (torch.randn(9, 31).bfloat16(), torch.randn(9, 13), idx.int(), torch.randn(50), False))


def test_native_sddmm_is_deterministic_across_thread_counts():
    impl = require_backend("native")
    gen = torch.Generator().manual_seed(11)
    dy, x = torch.randn(300, 257, generator=gen), torch.randn(300, 3073, generator=gen)
    idx = child_indices(257 * 3073, 20011, torch.int32, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = impl.sddmm(dy, x, idx)
        torch.set_num_threads(2)
        two = impl.sddmm(dy, x, idx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ------------------------------------------------------------------------ path selection


def test_use_sparse_path_follows_mode_and_threshold():
    assert WEIGHT_GRAD_MODES == ("auto", "dense", "sparse")
    for backend, per_dtype in DENSITY_THRESHOLDS.items():
        assert set(per_dtype) == {torch.float32, torch.bfloat16, torch.float16}
        assert all(0 < threshold < 1 for threshold in per_dtype.values())
        assert use_sparse_path(1, 10**6, backend, "auto")
        assert not use_sparse_path(10**6, 10**6, backend, "auto")
        assert use_sparse_path(10**6, 10**6, backend, "sparse")
        assert not use_sparse_path(1, 10**6, backend, "dense")
        assert not use_sparse_path(0, 10**6, backend, "sparse")
    assert use_sparse_path(5, 10, "native", "auto", thresholds={"native": 0.5})
    assert not use_sparse_path(6, 10, "native", "auto", thresholds={"native": 0.5})
    per_dtype = {"native": {torch.float32: 0.5, torch.bfloat16: 0.1}}
    assert use_sparse_path(3, 10, "native", "auto", thresholds=per_dtype, dtype=torch.float32)
    assert not use_sparse_path(3, 10, "native", "auto", thresholds=per_dtype, dtype=torch.bfloat16)
    assert use_sparse_path(3, 10, "native", "auto", thresholds=per_dtype, dtype=torch.float16)  # fp32's
    native = DENSITY_THRESHOLDS["native"]
    assert native[torch.bfloat16] < native[torch.float32]  # the CPU's bf16 GEMM is the faster one
    with pytest.raises(ValueError, match="weight-gradient mode"):
        use_sparse_path(1, 2, "native", "fast")


# ------------------------------------------------------------------------ training path


class FrameMLP(nn.Module):
    """Linear -> tanh -> Linear -> tanh -> Linear over [B, T, features]; the middle layer is
    called twice (its weight gradient accumulates within one backward)."""

    def __init__(self, d_in=13, d_hidden=31, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.mid = nn.Linear(d_hidden, d_hidden, bias=False)
        self.out = nn.Linear(d_hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.mid(h)) + torch.tanh(self.mid(h * 0.5))
        return self.out(h)


def _frame_batches(steps, micro=1, seed=0, batch=3, frames=7, d_in=13, classes=5):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(batch, frames, d_in, generator=gen), torch.randint(0, classes, (batch, frames), generator=gen))
             for _ in range(micro)] for _ in range(steps)]


def _train_frame_mlp(backend, mode, dtype=torch.float32, steps=6, micro=1, p=0.05, whole=False,
                     zero_to_none=True):
    torch.manual_seed(0)
    model = FrameMLP().to(dtype)
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(t.shape, generator=gen) for n, t in model.named_parameters()}
    if whole:  # one tensor's child is all of it (155 of the 311 entries of P = 0.2)
        scores["out.weight"] = scores["out.weight"] + 10.0
        p = 0.2
    child = ChildNetwork.from_scores(scores, p)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    opt = SparseAdamW([{"named_params": model.named_parameters(), "child": child}], lr=3e-3,
                      weight_decay=0.01, backend=backend)
    handle = install_sparse_weight_grad(model, opt, mode)
    losses = []
    for micro_batches in _frame_batches(steps, micro):
        for x, y in micro_batches:
            loss = F.cross_entropy(model(x.to(dtype)).float().reshape(-1, 5), y.reshape(-1)) / micro
            loss.backward()
            losses.append(float(loss.detach()))
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=zero_to_none)
    handle.remove()
    after = {n: t.detach().clone() for n, t in model.named_parameters()}
    return child, before, after, opt, handle, losses


def _assert_contract(child, before, after, expected, rtol, atol):
    for name, tensor in after.items():
        keep = torch.ones(tensor.numel(), dtype=torch.bool)
        idx = child.indices.get(name)
        if idx is not None:
            keep[idx.long()] = False
            got = tensor.reshape(-1)[idx.long()].float()
            want = expected[name].reshape(-1)[idx.long()].float()
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)
        assert torch.equal(tensor.reshape(-1)[keep], before[name].reshape(-1)[keep]), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("whole", [False, True], ids=["random-child", "whole-tensor-child"])
def test_sparse_training_matches_dense_training(backend, whole):
    """The contract: same child values as the dense path (and as the reference backend's dense
    run), every non-child entry bit-identical, on every backend."""
    require_backend(backend)
    child, before, oracle, *_ = _train_frame_mlp("reference", "dense", whole=whole)
    for mode in ("dense", "sparse"):
        child_b, before_b, after, opt, handle, _ = _train_frame_mlp(backend, mode, whole=whole)
        assert all(torch.equal(child_b.indices[n], idx) for n, idx in child.indices.items())
        if whole:
            assert child.indices["out.weight"].numel() == 155
        if mode == "sparse":
            assert set(handle.sparse) == {"fc1", "mid", "out"} and not handle.dense
        _assert_contract(child, before, after, oracle, rtol=1e-5, atol=2e-6)
        (group,) = opt.param_groups
        assert group["child_names"] == list(child.indices)
        for name, param in zip(group["child_names"], group["params"]):  # compact state only
            state = opt.state[param]
            k = child.indices[name].numel()
            assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == opt.grad_store.indices(param).numel() == k
            # the whole-tensor child's state is as long as the tensor; every other is shorter
            assert k == param.numel() if whole and name == "out.weight" else k < param.numel(), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("whole", [False, True], ids=["random-child", "whole-tensor-child"])
@pytest.mark.parametrize("micro", [1, 2])
def test_compact_gradient_is_dense_autograds_gradient_at_the_child(backend, whole, micro):
    """The oracle independent of the optimizer: plain autograd on an unpatched copy of the model
    (dense dW), gathered at the child indices, against what the sparse path (SDDMM) and the
    dense path (gather hook) leave in the compact buffers after ``micro`` backward passes."""
    require_backend(backend)
    torch.manual_seed(0)
    plain = FrameMLP()
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(t.shape, generator=gen) for n, t in plain.named_parameters()}
    if whole:
        scores["out.weight"] = scores["out.weight"] + 10.0
    child = ChildNetwork.from_scores(scores, 0.2 if whole else 0.05)
    batches = _frame_batches(1, micro)[0]
    for x, y in batches:
        F.cross_entropy(plain(x).reshape(-1, 5), y.reshape(-1)).backward()
    dense = {n: t.grad.reshape(-1)[child.indices[n].long()] for n, t in plain.named_parameters() if n in child.indices}
    for mode in ("dense", "sparse"):
        model = FrameMLP()
        model.load_state_dict(plain.state_dict())
        opt = SparseAdamW([{"named_params": model.named_parameters(), "child": child}], backend=backend)
        with install_sparse_weight_grad(model, opt, mode) as handle:
            for x, y in batches:
                F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
        assert (set(handle.sparse) == {"fc1", "mid", "out"}) == (mode == "sparse")
        named = dict(model.named_parameters())
        for name, want in dense.items():
            got = opt.grad_store.grad(named[name])
            assert got is not None and named[name].grad is None, name
            # fp32 sums of the same products in another order: within a few ulps of the largest term
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) + 1e-7, msg=f"{mode} {name}")
        if whole:
            assert dense["out.weight"].numel() == named["out.weight"].numel()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bf16_weights_sparse_matches_dense_within_16_bit_rounding(backend):
    """bf16 weights: the SDDMM sums the child entries in fp32 where autograd rounds dW to bf16
    first; Adam's normalised step keeps the masters close, non-child entries never move."""
    require_backend(backend)
    child, before, dense, dense_opt, *_ = _train_frame_mlp(backend, "dense", dtype=torch.bfloat16, steps=4)
    _, _, sparse, sparse_opt, *_ = _train_frame_mlp(backend, "sparse", dtype=torch.bfloat16, steps=4)
    # Each step moves an entry by up to lr = 3e-3; the masters agree to 1e-4 (measured: 2e-5),
    # and the bf16 weights, their rounding, to one bf16 ulp.
    _assert_contract(child, before, sparse, dense, rtol=2**-7, atol=1e-6)
    for p_dense, p_sparse in zip(dense_opt.sparse_parameters(), sparse_opt.sparse_parameters()):
        torch.testing.assert_close(sparse_opt.state[p_sparse]["master"], dense_opt.state[p_dense]["master"],
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("zero_to_none", [True, False])
def test_micro_batch_accumulation_and_kept_buffers(backend, zero_to_none):
    require_backend(backend)
    child, before, dense, *_ = _train_frame_mlp(backend, "dense", micro=3, steps=3, zero_to_none=zero_to_none)
    _, _, sparse, *_ = _train_frame_mlp(backend, "sparse", micro=3, steps=3, zero_to_none=zero_to_none)
    _assert_contract(child, before, sparse, dense, rtol=1e-5, atol=2e-6)


class _AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in (result if isinstance(result, (tuple, list)) else [result]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return result


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_no_dense_weight_gradient_on_the_sparse_path(backend, mode):
    require_backend(backend)
    torch.manual_seed(0)
    model = FrameMLP()
    scores = {n: torch.rand(t.shape) for n, t in model.named_parameters()}
    opt = SparseAdamW([{"named_params": model.named_parameters(), "child": ChildNetwork.from_scores(scores, 0.05)}],
                      backend=backend)
    handle = install_sparse_weight_grad(model, opt, mode)
    (x, y), = _frame_batches(1)[0]
    loss = F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1))
    recorder = _AllocationRecorder()
    with recorder:
        loss.backward()
    weight_shapes = {tuple(m.weight.shape) for m in (model.fc1, model.mid, model.out)}
    produced = weight_shapes & set(recorder.shapes)
    if mode == "sparse":
        assert not produced, produced  # no [out, in] tensor was ever made in backward
        assert all(p.grad is None for p in opt.sparse_parameters())
        assert all(opt.grad_store.grad(m.weight) is not None for m in (model.fc1, model.mid, model.out))
    else:
        assert produced == weight_shapes  # the dense path does compute dW (then gathers it)
    handle.remove()


def test_install_remove_eval_and_double_install():
    torch.manual_seed(0)
    model = FrameMLP()
    scores = {n: torch.rand(t.shape) for n, t in model.named_parameters()}
    scores["mid.weight"] = torch.zeros_like(scores["mid.weight"])  # no child entries there
    opt = SparseAdamW([{"named_params": model.named_parameters(), "child": ChildNetwork.from_scores(scores, 0.05)}])
    with install_sparse_weight_grad(model, opt, "auto", thresholds={"reference": 0.5}) as handle:
        assert set(handle.sparse) == {"fc1", "out"} and not handle.dense
        assert "forward" in model.fc1.__dict__ and "forward" not in model.mid.__dict__
        x = torch.randn(2, 3, 13)
        with torch.no_grad():  # evaluation: plain F.linear, no autograd Function
            torch.testing.assert_close(model(x), nn.Module.__call__(model, x))
        with pytest.raises(RuntimeError, match="already has a patched forward"):
            install_sparse_weight_grad(model, opt, "sparse")
        assert "forward" in model.fc1.__dict__  # the failed install undid only its own patches
    assert "forward" not in model.fc1.__dict__ and "forward" not in model.out.__dict__
    low = install_sparse_weight_grad(model, opt, "auto", thresholds={"reference": 1e-6})
    assert not low.sparse and set(low.dense) == {"fc1", "out"}
    with pytest.raises(ValueError, match="weight-gradient mode"):
        install_sparse_weight_grad(model, opt, "fast")


# ------------------------------------------------------ an upstream, and the search driver


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tiny_wav2vec2_training_sparse_vs_dense(backend):
    """transformers' own Linears (attention, feed-forward): three steps, dense against sparse."""
    require_backend(backend)

    def run(mode):
        torch.manual_seed(0)
        model = TinyWav2Vec2Classifier(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                       feat_proj_dropout=0.0)
        scored = model.default_scored_parameters()
        named = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(4)
        child = ChildNetwork.from_scores({n: torch.rand(named[n].shape, generator=gen) for n in scored}, 0.02)
        before = {n: named[n].detach().clone() for n in scored}
        opt = SparseAdamW([{"named_params": {n: named[n] for n in scored}, "child": child},
                           {"params": list(model.head.parameters()), "lr": 1e-2}], lr=1e-3, backend=backend)
        handle = install_sparse_weight_grad(model, opt, mode)
        for batch in padded_wav_batches([800, 1200, 1000], batch_size=3) * 3:
            wav_loss(model, batch).mean().backward()
            opt.step()
            opt.zero_grad()
        handle.remove()
        return child, before, {n: named[n].detach().clone() for n in scored}, handle

    child, before, dense, _ = run("dense")
    _, _, sparse, handle = run("sparse")
    assert len(handle.sparse) == 12  # 2 layers x (q, k, v, out, intermediate, output)
    _assert_contract(child, before, sparse, dense, rtol=1e-5, atol=2e-6)


class _FrameProblem:
    """A TrainingProblem for the search driver: FrameMLP upstream, linear head."""

    primary_metric, higher_is_better = "loss", False

    def __init__(self):
        torch.manual_seed(0)
        self.upstream = FrameMLP(classes=11)
        self.head = nn.Linear(11, 5)
        self.model = nn.Sequential(self.upstream, self.head)
        self.upstream_params = dict(self.upstream.named_parameters())
        self.head_params = dict(self.head.named_parameters())
        self.data = [batch for (batch,) in _frame_batches(6)]

    def train_batches(self, epoch, skip):
        yield from self.data[skip:]

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x).reshape(-1, 5), y.reshape(-1))

    def evaluate(self, split):
        with torch.no_grad():
            return {"loss": float(sum(self.loss(b) for b in self.data))}

    def has_split(self, split):
        return split == "dev"


def test_search_installs_and_removes_the_sparse_path():
    results = {}
    for mode in ("dense", "sparse"):
        problem = _FrameProblem()
        gen = torch.Generator().manual_seed(9)
        scores = {n: torch.rand(p.shape, generator=gen) for n, p in problem.upstream_params.items()}
        children = ChildNetwork.nested(scores, (0.02, 0.2))
        cfg = SearchConfig(total_steps=8, rungs=(0.5,), keep=(1,), lr=3e-3, grad_accum=2, weight_grad=mode)
        search = AdaptiveSearch(problem, children, cfg, progress=False)
        search._activate(search.candidates[0])
        patched = {name for name, m in problem.model.named_modules() if "forward" in m.__dict__}
        assert patched == ({"0.fc1", "0.mid", "0.out"} if mode == "sparse" else set())
        best = search.run()
        search.apply(best)
        search._deactivate()
        assert not any("forward" in m.__dict__ for m in problem.model.modules())
        results[mode] = [(c.p, c.status, [loss for _, loss in c.train_losses]) for c in search.candidates]
    for (p_d, status_d, losses_d), (p_s, status_s, losses_s) in zip(results["dense"], results["sparse"]):
        assert (p_d, status_d) == (p_s, status_s)
        torch.testing.assert_close(torch.tensor(losses_s), torch.tensor(losses_d), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_grad"):
        SearchConfig(total_steps=8, weight_grad="fast")


def test_compact_grad_target_hands_out_one_buffer_per_step():
    model = FrameMLP()
    scores = {n: torch.rand(t.shape) for n, t in model.named_parameters()}
    opt = SparseAdamW([{"named_params": model.named_parameters(), "child": ChildNetwork.from_scores(scores, 0.05)}])
    weight = model.fc1.weight
    buffer, accumulate = opt.grad_store.target(weight)
    assert not accumulate and buffer.dtype == torch.float32 and buffer.numel() == opt.grad_store.indices(weight).numel()
    again, accumulate = opt.grad_store.target(weight)
    assert again is buffer and accumulate and opt.grad_store.grad(weight) is buffer
    opt.zero_grad(set_to_none=False)
    kept, accumulate = opt.grad_store.target(weight)
    assert kept is buffer and accumulate and torch.equal(buffer, torch.zeros_like(buffer))
    opt.zero_grad()
    fresh, accumulate = opt.grad_store.target(weight)
    assert fresh is not buffer and not accumulate
    with pytest.raises(KeyError):
        opt.grad_store.target(torch.nn.Parameter(torch.zeros(3)))


def test_triton_sddmm_with_transposed_operands_gives_the_same_values():
    require_backend("triton")
    from adtuning.kernels import sddmm

    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        dy, x = torch.randn(33, 31, generator=gen).to(dtype), torch.randn(33, 65, generator=gen).to(dtype)
        idx = child_indices(31 * 65, 301, torch.int64, seed=4)
        plain = sddmm(dy, x, idx, transpose_operands=False)
        transposed = sddmm(dy, x, idx, transpose_operands=True)
        torch.testing.assert_close(transposed, plain, rtol=1e-6, atol=1e-6 * _bound(dy, x, idx).max().item())
        torch.testing.assert_close(transposed, sddmm_ref(dy, x, idx), rtol=1e-5, atol=1e-5 * _bound(dy, x, idx).max().item())


def test_cli_flag_parses_with_auto_default():
    from adtuning.train import build_parser

    assert build_parser().parse_args([]).weight_grad == "auto"
    assert build_parser().parse_args(["--weight-grad", "sparse"]).weight_grad == "sparse"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--weight-grad", "fast"])
    assert SearchConfig(total_steps=1).weight_grad == "auto"
