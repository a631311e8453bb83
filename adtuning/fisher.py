"""Empirical Fisher information of model weights (paper eq. 6).

``F_i = 1/|D| * sum_j (d log p(y_j | x_j; w) / d w_i)^2`` — the mean over *samples* of the
squared *per-sample* gradient. Two algorithms compute it:

* ``backend="reference"``: one ``torch.autograd.grad`` per sample. Slow and obviously right.
* ``backend="native" | "triton" | "fused"``: one backward pass per batch over the *sum* of
  the per-sample losses. Every scored ``nn.Linear`` runs through :class:`_FisherLinear`,
  whose backward returns the input gradient (so the chain continues) and hands the saved
  input and the output gradient to the backend's ``linear_fisher_`` kernel, which
  accumulates ``sum_n (dY_n^T X_n)^2`` tile by tile without materialising a per-sample
  gradient and without computing the ordinary weight gradient. Scored LayerNorms get their
  per-sample Fisher from the normalised input. Any other scored parameter falls back to the
  exact per-sample loop, and the log says which parameters took which path.

Because samples must not interact in the forward pass (no batch norm, masked padding), the
gradient of the summed loss w.r.t. sample n's activations is sample n's own gradient.

Data parallel (``data_parallel=``): each rank scores its part of every global batch; the
per-sample sums of all scored entries and the sample count live in one flat buffer that is
all-reduced once at the end, so every rank returns the scores of the whole sample set.

``mode="batch"`` reproduces the published CHILD-TUNING / AD-TUNING code instead: the square
of each mini-batch gradient (optionally clipped per tensor), averaged over batches.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adtuning.backends import get_backend, resolve_backend_name
from adtuning.reference.layernorm_fisher import layernorm_fisher_ref_

if TYPE_CHECKING:
    from adtuning.distributed import DataParallel

log = logging.getLogger("adtuning")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
MODES = ("per-sample", "batch")


def default_scored_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters scored by default.

    A model (or its ``upstream`` attribute) may declare ``default_scored_parameters()``; the
    speech upstreams return their transformer encoder layers, as in the paper. Otherwise every
    parameter is scored.
    """
    if hasattr(model, "default_scored_parameters"):
        return list(model.default_scored_parameters())
    upstream = getattr(model, "upstream", None)
    if upstream is not None and hasattr(upstream, "default_scored_parameters"):
        prefix = next(n for n, m in model.named_children() if m is upstream)
        return [f"{prefix}.{name}" for name in upstream.default_scored_parameters()]
    return [name for name, _ in model.named_parameters()]


def _resolve_params(model: nn.Module, params: Iterable[str] | Mapping[str, torch.Tensor] | None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    names = default_scored_parameter_names(model) if params is None else list(params)
    if not names:
        raise ValueError("estimate_fisher: the set of scored parameters is empty")
    missing = [n for n in names if n not in named]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise KeyError(f"estimate_fisher: parameters not in the model: {shown}")
    return {n: named[n] for n in names}


def _check_losses(losses: torch.Tensor) -> torch.Tensor:
    if losses.dim() != 1:
        raise ValueError(
            f"loss_fn must return the per-sample negative log-likelihood of shape [B]; got shape {tuple(losses.shape)}"
        )
    return losses


# ---------------------------------------------------------------------------------------------
# Sample lengths: the upstream tells the Fisher pass how many frames of each sample are real,
# so the kernels skip padding work. Outside a pass this is a no-op.

_ACTIVE_PASS: "_InBackwardPass | None" = None


def note_sample_lengths(lengths: torch.Tensor) -> None:
    """Tell an active in-backward Fisher pass the valid frame count of each sample ([B] ints).

    Called by upstreams right after they compute frame lengths. Scored layers whose input is
    ``[B, T, features]`` with ``T >= max(lengths)`` then skip frames ``t >= lengths[n]``
    (which carry zero gradient in a correctly masked model). No-op outside a Fisher pass.
    """
    if _ACTIVE_PASS is not None:
        _ACTIVE_PASS.lengths = lengths.detach()
        # One host sync per batch here, instead of one per layer in backward.
        _ACTIVE_PASS.max_length = int(lengths.max()) if lengths.numel() else 0


# ---------------------------------------------------------------------------------------------
# Reference: one autograd.grad per sample.

def _per_sample_reference(
    losses: torch.Tensor, params: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor], count: int
) -> None:
    names = list(params)
    tensors = [params[n] for n in names]
    for j in range(count):
        grads = torch.autograd.grad(losses[j], tensors, retain_graph=j < count - 1, allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                fisher[name].add_(grad.float().square())


# ---------------------------------------------------------------------------------------------
# In-backward pass.

@dataclass
class _InBackwardPass:
    backend: Any
    anchor: torch.Tensor
    lengths: torch.Tensor | None = None
    max_length: int = 0
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    # False while the fallback loop re-walks the graph for other parameters.
    accumulate: bool = True

    def lengths_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The noted lengths if they describe dim 1 of this ``[B, T, ...]`` activation."""
        lengths = self.lengths
        if lengths is None or x.dim() != 3 or lengths.shape[0] != x.shape[0]:
            return None
        if self.max_length > x.shape[1]:
            return None
        return lengths


class _FisherLinear(torch.autograd.Function):
    """y = x W^T + b whose backward yields dx and per-sample Fisher of W and b, never dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, state: _InBackwardPass, fisher_w, fisher_b):
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.fisher_w, ctx.fisher_b = state, fisher_w, fisher_b
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        state = ctx.state
        batch = x.shape[0] if x.dim() > 1 else 1
        x3 = x.reshape(batch, -1, x.shape[-1])
        dy3 = grad_out.reshape(batch, -1, grad_out.shape[-1])
        if state.accumulate:
            lengths = state.lengths_for(x3) if x.dim() == 3 else None
            state.backend.linear_fisher_(x3, dy3, ctx.fisher_w, ctx.fisher_b, lengths)
        grad_x = grad_out.to(weight.dtype) @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


class _FisherLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward yields dx and per-sample Fisher of its weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, state: _InBackwardPass, shape, eps, fisher_w, fisher_b):
        ctx.save_for_backward(x, weight, bias)
        ctx.state, ctx.shape, ctx.eps, ctx.fisher_w, ctx.fisher_b = state, shape, eps, fisher_w, fisher_b
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            x_req = x.detach().requires_grad_(True)
            y = F.layer_norm(x_req, ctx.shape, weight, bias, ctx.eps)
            (grad_x,) = torch.autograd.grad(y, x_req, grad_out)
        if ctx.state.accumulate:
            x_hat = F.layer_norm(x.detach(), ctx.shape, None, None, ctx.eps)
            batch = x.shape[0] if x.dim() > 1 else 1
            x_hat3 = x_hat.reshape(batch, -1, x.shape[-1])
            dy3 = grad_out.reshape(batch, -1, x.shape[-1])
            lengths = ctx.state.lengths_for(x_hat3) if x.dim() == 3 else None
            layernorm_fisher_ref_(x_hat3, dy3, ctx.fisher_w, ctx.fisher_b, lengths)
        return (grad_x if ctx.needs_input_grad[0] else None,) + (None,) * 8


def _plan_in_backward(model: nn.Module, params: dict[str, nn.Parameter]):
    """Split scored parameters into Linear, LayerNorm and fallback paths."""
    linear, layernorm = {}, {}
    covered: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        w_name, b_name = prefix + "weight", prefix + "bias"
        if isinstance(module, nn.Linear) and w_name in params:
            linear[mod_name] = (module, w_name, b_name if module.bias is not None and b_name in params else None)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine and (w_name in params or b_name in params):
            layernorm[mod_name] = (
                module,
                w_name if w_name in params else None,
                b_name if module.bias is not None and b_name in params else None,
            )
        else:
            continue
        covered.update(n for n in (w_name, b_name) if n in params)
    fallback = [n for n in params if n not in covered]
    return linear, layernorm, fallback


@contextlib.contextmanager
def _patched_modules(linear, layernorm, state: _InBackwardPass):
    def linear_forward(module, w_name, b_name):
        fisher_w = state.fisher[w_name]
        fisher_b = state.fisher[b_name] if b_name else None

        def forward(x):
            return _FisherLinear.apply(x, module.weight, module.bias, state.anchor, state, fisher_w, fisher_b)

        return forward

    def layernorm_forward(module, w_name, b_name):
        fisher_w = state.fisher[w_name] if w_name else None
        fisher_b = state.fisher[b_name] if b_name else None

        def forward(x):
            return _FisherLayerNorm.apply(
                x, module.weight, module.bias, state.anchor, state, module.normalized_shape, module.eps, fisher_w, fisher_b
            )

        return forward

    patched = []
    try:
        for module, w_name, b_name in linear.values():
            module.forward = linear_forward(module, w_name, b_name)
            patched.append(module)
        for module, w_name, b_name in layernorm.values():
            module.forward = layernorm_forward(module, w_name, b_name)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _grad_and_eval_state(model: nn.Module, trainable: Iterable[nn.Parameter]):
    """Eval mode (no dropout: scores must not depend on batching) and only ``trainable`` requiring grad."""
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    trainable_ids = {id(p) for p in trainable}
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(id(p) in trainable_ids)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    params: Iterable[str] | Mapping[str, torch.Tensor] | None = None,
    mode: str = "per-sample",
    backend: str = "reference",
    max_samples: int | None = None,
    clip_norm: float | None = None,
    progress: bool = True,
    algorithm: str | None = None,
    data_parallel: "DataParallel | None" = None,
) -> dict[str, torch.Tensor]:
    """Estimate the diagonal empirical Fisher information of the scored parameters.

    Args:
        model: the model (upstream + head). It is put in eval mode during the pass (dropout
            would make scores depend on batching) and restored afterwards; parameter values
            and ``requires_grad`` flags are left as they were.
        batches: iterable of batches, each passed to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, the per-sample negative
            log-likelihood. Samples must not interact (no batch statistics; padding masked).
        params: names of the parameters to score (or a mapping whose keys are used); default
            :func:`default_scored_parameter_names` (the transformer encoder layers of a speech
            upstream).
        mode: ``"per-sample"`` (eq. 6: mean over samples of squared per-sample gradients,
            independent of batching) or ``"batch"`` (the published code: mean over batches of
            the squared mini-batch-mean gradient, optionally clipped per tensor).
        backend: ``"reference"`` (per-sample autograd loop), ``"native"``, ``"triton"`` or
            ``"fused"`` (in-backward kernels). Only meaningful for ``mode="per-sample"``.
        max_samples: stop after this many samples (the last batch is truncated).
        clip_norm: per-tensor gradient norm clip of ``mode="batch"`` (``None``: no clip).
        progress: show a tqdm bar.
        algorithm: ``"loop"`` (one autograd.grad per sample) or ``"in-backward"`` (one
            backward per batch with the backend's kernels); default: ``"loop"`` for the
            reference backend, ``"in-backward"`` otherwise. ``"in-backward"`` with
            ``backend="reference"`` runs the reference kernels inside backward (for tests).
        data_parallel: a :class:`~adtuning.distributed.DataParallel`: ``batches`` are this
            rank's parts of the global batches (``None`` for an empty part; every rank must
            see the same number of global batches) and the result is the Fisher of all ranks'
            samples, the same on every rank. ``"per-sample"``: the sums and the sample count are
            all-reduced once, in one buffer. ``"batch"``: each global batch's mean gradient is
            all-reduced (densely, as the published code does under DDP) before it is squared.
            Limit the samples in the sharded loader (``max_items``), not with ``max_samples``.

    Returns:
        ``{name: fp32 tensor shaped like the parameter}`` on the parameter's device.
    """
    if mode not in MODES:
        raise ValueError(f"estimate_fisher: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"estimate_fisher: max_samples must be >= 1, got {max_samples}")
    if data_parallel is not None and max_samples is not None:
        raise ValueError("estimate_fisher: with data_parallel, cut the global sample budget in the sharded loader "
                         "(make_loader(..., max_items=)), not with max_samples")
    scored = _resolve_params(model, params)
    device = next(iter(scored.values())).device
    backend_name = resolve_backend_name(backend, device)
    if data_parallel is None:
        fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in scored.items()}
    else:
        # Views of one flat buffer (+1 entry: the sample count): one all-reduce at the end.
        flat = torch.zeros(sum(p.numel() for p in scored.values()) + 1, dtype=torch.float32, device=device)
        fisher, offset = {}, 0
        for n, p in scored.items():
            fisher[n] = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
    total = getattr(batches, "__len__", None)
    bar = tqdm(batches, total=total() if total else None, desc=f"Fisher ({mode}, {backend_name})", unit="batch", disable=not progress)

    if algorithm is None:
        algorithm = "loop" if backend_name == "reference" else "in-backward"
    if algorithm not in ("loop", "in-backward"):
        raise ValueError(f"estimate_fisher: unknown algorithm {algorithm!r}; choose 'loop' or 'in-backward'")
    if algorithm == "loop" and backend_name != "reference":
        raise ValueError(f"estimate_fisher: algorithm='loop' is the reference algorithm; backend {backend_name!r} runs in backward")
    in_backward = mode == "per-sample" and algorithm == "in-backward"
    samples = 0
    num_batches = 0
    if in_backward:
        impl = get_backend(backend_name, device)
        linear, layernorm, fallback = _plan_in_backward(model, scored)
        log.info(
            "Fisher pass on backend %s: %d Linear tensors and %d LayerNorm tensors in backward, %d by the per-sample fallback%s",
            impl.name,
            sum(1 + (b is not None) for _, _, b in linear.values()),
            sum((w is not None) + (b is not None) for _, w, b in layernorm.values()),
            len(fallback),
            (": " + ", ".join(fallback[:8]) + (" ..." if len(fallback) > 8 else "")) if fallback else "",
        )
        anchor = torch.zeros((), device=device, requires_grad=True)
        state = _InBackwardPass(backend=impl, anchor=anchor, fisher=fisher)
        fallback_params = {n: scored[n] for n in fallback}
    global _ACTIVE_PASS
    try:
        with _grad_and_eval_state(model, scored.values() if not in_backward else fallback_params.values()):
            for batch in bar:
                if max_samples is not None and samples >= max_samples:
                    break
                if batch is None:  # this rank's part of the global batch is empty
                    if data_parallel is None:
                        raise ValueError("estimate_fisher: a batch is None (only a sharded loader yields empty parts)")
                    if mode == "batch":
                        _accumulate_batch_mode(None, scored, fisher, clip_norm, data_parallel)
                    num_batches += 1
                    continue
                if in_backward:
                    _ACTIVE_PASS = state
                    state.lengths = None
                    with _patched_modules(linear, layernorm, state):
                        losses = _check_losses(loss_fn(model, batch))
                    _ACTIVE_PASS = None
                else:
                    losses = _check_losses(loss_fn(model, batch))
                count = losses.shape[0]
                if max_samples is not None:
                    count = min(count, max_samples - samples)
                if mode == "batch":
                    _accumulate_batch_mode(losses[:count], scored, fisher, clip_norm, data_parallel)
                elif in_backward:
                    used = losses[:count].sum()
                    torch.autograd.backward(used, inputs=[anchor], retain_graph=bool(fallback_params))
                    if fallback_params:
                        state.accumulate = False
                        _per_sample_reference(losses, fallback_params, fisher, count)
                        state.accumulate = True
                else:
                    _per_sample_reference(losses, scored, fisher, count)
                samples += count
                num_batches += 1
                bar.set_postfix(samples=samples)
    finally:
        _ACTIVE_PASS = None
        bar.close()
    if data_parallel is not None:
        if mode == "batch":
            # Every global batch was reduced before squaring: the sums are already global.
            samples = num_batches
        else:
            flat[-1] = samples
            data_parallel.all_reduce_sum_(flat)
            samples = int(flat[-1])
    if samples == 0:
        raise ValueError("estimate_fisher: no samples were seen (empty batches?)")
    denominator = num_batches if mode == "batch" else samples
    for value in fisher.values():
        value.div_(denominator)
    return fisher


def _accumulate_batch_mode(losses, scored, fisher, clip_norm, data_parallel=None):
    names = list(scored)
    if data_parallel is None:
        grads = torch.autograd.grad(losses.mean(), [scored[n] for n in names], allow_unused=True)
    else:
        grads = _global_batch_gradient(losses, scored, names, data_parallel)
    for name, grad in zip(names, grads):
        if grad is None:
            continue
        grad = grad.float()
        if clip_norm is not None:
            norm = torch.linalg.vector_norm(grad)
            grad = grad * torch.clamp(clip_norm / (norm + 1e-6), max=1.0)
        fisher[name].add_(grad.square())


def _global_batch_gradient(losses, scored, names, data_parallel):
    """The gradient of the *global* batch's mean loss on every rank: this rank's summed-loss
    gradient and sample count (zero for an empty part) in one dense buffer, all-reduced."""
    device = next(iter(scored.values())).device
    flat = torch.zeros(sum(scored[n].numel() for n in names) + 1, dtype=torch.float32, device=device)
    if losses is not None and losses.numel():
        grads = torch.autograd.grad(losses.sum(), [scored[n] for n in names], allow_unused=True)
        offset = 0
        for name, grad in zip(names, grads):
            numel = scored[name].numel()
            if grad is not None:
                flat[offset:offset + numel] = grad.reshape(-1).float()
            offset += numel
        flat[-1] = losses.numel()
    data_parallel.all_reduce_sum_(flat)
    count = flat[-1].item()
    if count == 0:
        raise ValueError("estimate_fisher: a global batch without samples")
    flat.div_(count)
    out, offset = [], 0
    for name in names:
        numel = scored[name].numel()
        out.append(flat[offset:offset + numel].view(scored[name].shape))
        offset += numel
    return out


def fisher_summary(fisher: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Small summary of a score set: entries, tensors, min/max/mean score, fraction of zeros."""
    n = sum(v.numel() for v in fisher.values())
    zeros = sum(int((v == 0).sum()) for v in fisher.values())
    return {
        "tensors": len(fisher),
        "entries": n,
        "min": min(float(v.min()) for v in fisher.values()),
        "max": max(float(v.max()) for v in fisher.values()),
        "mean": math.fsum(float(v.double().sum()) for v in fisher.values()) / n,
        "zero_fraction": zeros / n,
    }
