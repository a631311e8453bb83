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
of each mini-batch gradient (optionally clipped per tensor), averaged over batches. The
objective is the mean per-sample loss, or the recipe's training loss when ``loss_fn`` returns
a scalar; ``train_mode=True`` keeps dropout and SpecAugment on, as that code does.

The algorithms are three functions behind :func:`estimate_fisher`: ``_per_sample_loop``,
``_per_sample_in_backward`` and ``_batch_gradients``. The loss function meets the pass only
through the :class:`FisherPass` it is handed (frame lengths); model code never calls the engine.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adtuning.backends import get_backend, resolve_backend_name
from adtuning.fisher_batch import accumulate_batch_mode as _accumulate_batch_mode
from adtuning.reference.layernorm_fisher import layernorm_fisher_ref_

if TYPE_CHECKING:
    from adtuning.distributed import DataParallel

log = logging.getLogger("adtuning")

# loss_fn(model, batch) or loss_fn(model, batch, fisher_pass) -> Tensor[B] (or a scalar in batch mode)
LossFn = Callable[..., torch.Tensor]
MODES = ("per-sample", "batch")


def default_scored_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters scored by default.

    A model (or its ``upstream`` attribute) may declare ``default_scored_parameters()``; the
    speech upstreams return their transformer encoder layers, as in the paper. Otherwise every
    parameter is scored.
    """
    declared = getattr(model, "default_scored_parameters", None)
    if callable(declared):
        return list(declared())
    upstream = getattr(model, "upstream", None)
    if upstream is not None and hasattr(upstream, "default_scored_parameters"):
        prefix = next(n for n, m in model.named_children() if m is upstream)
        return [f"{prefix}.{name}" for name in upstream.default_scored_parameters()]
    return [name for name, _ in model.named_parameters()]


SCORED_SETS = ("default", "published", "encoder-layers")
# The published AD-TUNING code scores names containing "encoder.layers" or "layer_norm" of a fairseq
# model. In the transformers naming that is the encoder layers plus the two layer norms fairseq calls
# "layer_norm" and "encoder.layer_norm"; the CNN's layer norms are not among them (fairseq names
# them "feature_extractor.conv_layers.<i>.2.1"), so a plain substring test would over-select here.
_PUBLISHED_SCORED = re.compile(r"(^|\.)encoder\.layers\.|(^|\.)(feature_projection|encoder)\.layer_norm\.[^.]+$")
_ENCODER_LAYERS = re.compile(r"(^|\.)encoder\.layers\.")


def check_scored_choice(choice: str) -> str:
    """Validate a scored-set choice (``--scored``): one of :data:`SCORED_SETS` or a regular
    expression. Returns it unchanged; raises ``ValueError`` naming the bad expression."""
    if choice in SCORED_SETS:
        return choice
    if not choice:
        raise ValueError(f"an empty pattern; choose one of {', '.join(SCORED_SETS)} or a regular expression")
    try:
        re.compile(choice)
    except re.error as err:
        raise ValueError(f"{choice!r} is neither one of {', '.join(SCORED_SETS)} nor a valid regular expression ({err})") from None
    return choice


def choose_scored_names(choice: str, names: Iterable[str], default: Iterable[str]) -> list[str]:
    """The parameters a Fisher pass scores, in model order.

    Args:
        choice: ``"default"`` (``default``: the model's own default set, e.g. the speech
            upstreams' transformer encoder layers), ``"published"`` (the published AD-TUNING
            code: the encoder layers plus the feature-projection and encoder layer norms),
            ``"encoder-layers"`` (every name with an ``encoder.layers.`` component) or a regular
            expression matched anywhere in the name (``re.search``; e.g. ``layer`` is AliceMind
            ChildTuningD's set).
        names: every parameter name of the model (in order).
        default: the model's default scored names.

    Raises ``ValueError`` for a bad expression or a choice that matches no parameter.
    """
    choice = check_scored_choice(choice)
    names = list(names)
    if choice == "default":
        chosen = list(default)
    elif choice == "published":
        chosen = [n for n in names if _PUBLISHED_SCORED.search(n)]
    elif choice == "encoder-layers":
        chosen = [n for n in names if _ENCODER_LAYERS.search(n)]
    else:
        pattern = re.compile(choice)
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ValueError(f"{choice!r} matches no parameter of the model")
    return chosen


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
# The pass as the loss function sees it: the task/model adapter hands it each batch's valid frame
# counts, so the in-backward kernels skip padding work. Model code never talks to the engine.

class FisherPass:
    """One running Fisher pass, as a loss function sees it.

    A ``loss_fn`` that takes a third positional argument is called
    ``loss_fn(model, batch, fisher_pass)`` with this object; it may report the batch's valid
    frame counts with :meth:`note_sample_lengths` (the speech upstreams return them). Reporting
    is optional and never changes the scores: the in-backward kernels then skip frames
    ``t >= lengths[n]``, which carry zero gradient in a correctly masked model.
    """

    def __init__(self) -> None:
        self.lengths: torch.Tensor | None = None
        self.max_length = 0

    def note_sample_lengths(self, lengths: torch.Tensor) -> None:
        """The valid frame count of each sample of the current batch (``[B]`` ints)."""
        self.lengths = lengths.detach()
        # One host sync per batch here, instead of one per layer in backward.
        self.max_length = int(lengths.max()) if lengths.numel() else 0

    def start_batch(self) -> None:
        """Forget the previous batch's lengths (called by the engine before each batch)."""
        self.lengths, self.max_length = None, 0


def _accepts_fisher_pass(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn`` can be called with a third positional argument (the pass)."""
    try:
        inspect.signature(loss_fn).bind(None, None, None)
    except (TypeError, ValueError):  # ValueError: no signature (some builtins)
        return False
    return True


class _Loss:
    """``loss_fn`` with the calling convention settled once: ``(model, batch)`` or
    ``(model, batch, fisher_pass)``. An adapter taking the pass is also called for an empty
    data-parallel part (``batch=None``; it returns ``None``) so that it can join the collectives
    its normaliser needs; a two-argument ``loss_fn`` never sees ``None``."""

    def __init__(self, loss_fn: LossFn, fisher_pass: FisherPass):
        self.loss_fn, self.fisher_pass = loss_fn, fisher_pass
        self.takes_pass = _accepts_fisher_pass(loss_fn)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.fisher_pass.start_batch()
        if self.takes_pass:
            return self.loss_fn(model, batch, self.fisher_pass)
        return self.loss_fn(model, batch)

    def empty_part(self, model: nn.Module, data_parallel: DataParallel | None) -> None:
        if data_parallel is None:
            raise ValueError("estimate_fisher: a batch is None (only a sharded loader yields empty parts)")
        if self.takes_pass:
            out = self.loss_fn(model, None, self.fisher_pass)
            if out is not None:
                raise ValueError("estimate_fisher: loss_fn must return None for an empty data-parallel part (batch None)")


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

class _InBackwardPass(FisherPass):
    """The pass of the in-backward algorithm: the noted lengths plus the kernels' state."""

    def __init__(self, backend: Any, anchor: torch.Tensor, fisher: dict[str, torch.Tensor]):
        super().__init__()
        self.backend, self.anchor, self.fisher = backend, anchor, fisher
        # False while the fallback loop re-walks the graph for other parameters.
        self.accumulate = True

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
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, anchor: torch.Tensor,
                state: _InBackwardPass, fisher_w: torch.Tensor | None, fisher_b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.fisher_w, ctx.fisher_b = state, fisher_w, fisher_b
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        state = ctx.state
        batch = x.shape[0] if x.dim() > 1 else 1
        x3 = x.reshape(batch, -1, x.shape[-1])
        dy3 = grad_out.reshape(batch, -1, grad_out.shape[-1])
        if state.accumulate and ctx.fisher_w is not None:  # None: patched for another group's pass
            lengths = state.lengths_for(x3) if x.dim() == 3 else None
            state.backend.linear_fisher_(x3, dy3, ctx.fisher_w, ctx.fisher_b, lengths)
        grad_x = grad_out.to(weight.dtype) @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


class _FisherLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward yields dx and per-sample Fisher of its weight and bias."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, anchor: torch.Tensor,
                state: _InBackwardPass, shape: tuple[int, ...], eps: float, fisher_w: torch.Tensor | None,
                fisher_b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.state, ctx.shape, ctx.eps, ctx.fisher_w, ctx.fisher_b = state, shape, eps, fisher_w, fisher_b
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            x_req = x.detach().requires_grad_(True)
            y = F.layer_norm(x_req, ctx.shape, weight, bias, ctx.eps)
            (grad_x,) = torch.autograd.grad(y, x_req, grad_out)
        if ctx.state.accumulate and (ctx.fisher_w is not None or ctx.fisher_b is not None):
            x_hat = F.layer_norm(x.detach(), ctx.shape, None, None, ctx.eps)
            batch = x.shape[0] if x.dim() > 1 else 1
            x_hat3 = x_hat.reshape(batch, -1, x.shape[-1])
            dy3 = grad_out.reshape(batch, -1, x.shape[-1])
            lengths = ctx.state.lengths_for(x_hat3) if x.dim() == 3 else None
            layernorm_fisher_ref_(x_hat3, dy3, ctx.fisher_w, ctx.fisher_b, lengths)
        return (grad_x if ctx.needs_input_grad[0] else None,) + (None,) * 8


_Planned = dict[str, tuple[nn.Module, str | None, str | None]]  # module name -> (module, weight name, bias name)


def _plan_in_backward(model: nn.Module, params: Mapping[str, nn.Parameter]) -> tuple[_Planned, _Planned, list[str]]:
    """Split scored parameters into Linear, LayerNorm and fallback paths."""
    linear: _Planned = {}
    layernorm: _Planned = {}
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
def _patched_modules(linear: _Planned, layernorm: _Planned, state: _InBackwardPass) -> Iterator[None]:
    def linear_forward(module: nn.Module, w_name: str | None, b_name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        fisher_w = state.fisher.get(w_name) if w_name else None
        fisher_b = state.fisher.get(b_name) if b_name else None

        def forward(x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = _FisherLinear.apply(x, module.weight, module.bias, state.anchor, state, fisher_w, fisher_b)
            return y

        return forward

    def layernorm_forward(module: nn.Module, w_name: str | None, b_name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        fisher_w = state.fisher.get(w_name) if w_name else None
        fisher_b = state.fisher.get(b_name) if b_name else None

        def forward(x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = _FisherLayerNorm.apply(x, module.weight, module.bias, state.anchor, state, module.normalized_shape,
                                                     module.eps, fisher_w, fisher_b)
            return y

        return forward

    patched: list[nn.Module] = []
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
def _pass_state(model: nn.Module, trainable: Iterable[nn.Parameter], train_mode: bool) -> Iterator[None]:
    """Eval mode (default: no dropout, so scores do not depend on batching) or train mode, and
    only ``trainable`` requiring grad; both restored afterwards."""
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    trainable_ids = {id(p) for p in trainable}
    try:
        model.train(train_mode)
        for p, _ in saved:
            p.requires_grad_(id(p) in trainable_ids)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


def _score_buffers(scored: dict[str, nn.Parameter], device: torch.device | str | None,
                   flat: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Zero fp32 score tensors; with ``flat``, views of one buffer with one extra entry (the
    sample count) so that data parallel needs a single all-reduce. Returns (scores, buffer)."""
    if not flat:
        return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in scored.items()}, None
    buffer = torch.zeros(sum(p.numel() for p in scored.values()) + 1, dtype=torch.float32, device=device)
    fisher: dict[str, torch.Tensor] = {}
    offset = 0
    for n, p in scored.items():
        fisher[n] = buffer[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return fisher, buffer


def _usable(losses: torch.Tensor, samples: int, max_samples: int | None) -> int:
    """How many samples of this batch count (``max_samples`` truncates the last batch)."""
    count = losses.shape[0]
    return count if max_samples is None else min(count, max_samples - samples)


def _per_sample_loop(model: nn.Module, bar: Any, loss: _Loss, scored: dict[str, nn.Parameter],
                     fisher: dict[str, torch.Tensor], *, max_samples: int | None, data_parallel: DataParallel | None) -> int:
    """Eq. 6 by one ``autograd.grad`` per sample (the reference). Returns the samples seen."""
    samples = 0
    for batch in bar:
        if max_samples is not None and samples >= max_samples:
            break
        if batch is None:
            loss.empty_part(model, data_parallel)
            continue
        losses = _check_losses(loss(model, batch))
        count = _usable(losses, samples, max_samples)
        _per_sample_reference(losses, scored, fisher, count)
        samples += count
        bar.set_postfix(samples=samples)
    return samples


def _per_sample_in_backward(model: nn.Module, bar: Any, loss: _Loss, scored: dict[str, nn.Parameter],
                            fisher: dict[str, torch.Tensor], state: _InBackwardPass, *, max_samples: int | None,
                            data_parallel: DataParallel | None, patched: Mapping[str, nn.Parameter] | None = None) -> int:
    """Eq. 6 by one backward per batch: scored Linear/LayerNorm layers accumulate per-sample
    Fisher in their backward (backend kernels); other scored parameters take the exact
    per-sample loop on the same graph. Returns the samples seen."""
    # ``patched`` (a superset of ``scored``): every module of it runs the in-backward path, so that
    # a grouped pass differentiates exactly as the one-group pass; only ``scored`` accumulate.
    linear, layernorm, fallback = _plan_in_backward(model, scored if patched is None else patched)
    fallback = [n for n in fallback if n in scored]
    log.info(
        "Fisher pass on backend %s: %d Linear tensors and %d LayerNorm tensors in backward, %d by the per-sample fallback%s",
        state.backend.name,
        sum(1 + (b is not None) for _, _, b in linear.values()),
        sum((w is not None) + (b is not None) for _, w, b in layernorm.values()),
        len(fallback),
        (": " + ", ".join(fallback[:8]) + (" ..." if len(fallback) > 8 else "")) if fallback else "",
    )
    fallback_params = {n: scored[n] for n in fallback}
    samples = 0
    # Only the fallback parameters need weight gradients; the kernels differentiate through the anchor.
    with _pass_state(model, fallback_params.values(), train_mode=False):
        for batch in bar:
            if max_samples is not None and samples >= max_samples:
                break
            if batch is None:
                loss.empty_part(model, data_parallel)
                continue
            with _patched_modules(linear, layernorm, state):
                losses = _check_losses(loss(model, batch))
            count = _usable(losses, samples, max_samples)
            torch.autograd.backward(losses[:count].sum(), inputs=[state.anchor], retain_graph=bool(fallback_params))
            if fallback_params:
                state.accumulate = False
                _per_sample_reference(losses, fallback_params, fisher, count)
                state.accumulate = True
            samples += count
            bar.set_postfix(samples=samples)
    return samples


def _batch_gradients(model: nn.Module, bar: Any, loss: _Loss, scored: dict[str, nn.Parameter],
                     fisher: dict[str, torch.Tensor], *, max_samples: int | None, clip_norm: float | None,
                     data_parallel: DataParallel | None) -> int:
    """The published code's scores: per batch, the gradient of the batch objective, clipped per
    tensor, squared and summed. The objective is the mean of a ``[B]`` per-sample loss, or a
    scalar the loss function returns as is (the recipe's training loss, already divided by the
    gradient-accumulation steps). Returns the number of batches."""
    samples = num_batches = 0
    for batch in bar:
        if max_samples is not None and samples >= max_samples:
            break
        if batch is None:
            loss.empty_part(model, data_parallel)
            _accumulate_batch_mode(None, scored, fisher, clip_norm, data_parallel)
            num_batches += 1
            continue
        out = loss(model, batch)
        if out.dim() == 0:
            if max_samples is not None:
                raise ValueError("estimate_fisher: a scalar batch loss cannot be cut to max_samples; "
                                 "limit the batches instead")
            count = 0
        else:
            out = _check_losses(out)
            count = _usable(out, samples, max_samples)
            out = out[:count]
        _accumulate_batch_mode(out, scored, fisher, clip_norm, data_parallel)
        samples += count
        num_batches += 1
        bar.set_postfix(batches=num_batches)
    return num_batches


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    loss_fn: LossFn,
    *,
    groups: int = 1,
    params: Iterable[str] | Mapping[str, torch.Tensor] | None = None,
    mode: str = "per-sample",
    backend: str = "reference",
    max_samples: int | None = None,
    clip_norm: float | None = None,
    progress: bool = True,
    algorithm: str | None = None,
    data_parallel: "DataParallel | None" = None,
    train_mode: bool = False,
    in_backward_set: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate the diagonal empirical Fisher information of the scored parameters.

    Args:
        model: the model (upstream + head). It is put in eval mode during the pass (dropout
            would make scores depend on batching; see ``train_mode``) and restored afterwards;
            parameter values and ``requires_grad`` flags are left as they were.
        batches: iterable of batches, each passed to ``loss_fn``, or a callable returning one.
            With ``groups > 1`` it is read once per group and must give the same batches in the
            same order each time: a callable returning a fresh iterable (``problem.fisher_batches``)
            or a re-iterable (a list, an unshuffled DataLoader), not an iterator.
        groups: score the tensors in this many passes, 1/G of them (contiguous in scored order,
            balanced by entries: :func:`adtuning.fisher_groups.split_groups`) per pass. The scores
            are those of ``groups=1`` bit for bit. The returned dict still holds every score: to
            hold one group's only, use :func:`adtuning.fisher_groups.fisher_children`.
        loss_fn: ``loss_fn(model, batch)`` or ``loss_fn(model, batch, fisher_pass)`` (a
            :class:`FisherPass`, to which the task/model adapter may report the batch's frame
            lengths). It returns the per-sample negative log-likelihood ``Tensor[B]``; samples
            must not interact (no batch statistics; padding masked). In ``mode="batch"`` it
            may instead return a scalar: the recipe's training loss of the batch, differentiated
            as it is (divide it by the gradient-accumulation steps there). Under
            ``data_parallel`` a three-argument ``loss_fn`` is also called for an empty part
            (``batch=None``) and must return ``None``; a scalar it returns is this rank's share
            of the global batch's loss (the shares are summed over ranks).
        params: names of the parameters to score (or a mapping whose keys are used); default
            :func:`default_scored_parameter_names` (the transformer encoder layers of a speech
            upstream).
        mode: ``"per-sample"`` (eq. 6: mean over samples of squared per-sample gradients,
            independent of batching) or ``"batch"`` (the published code: mean over batches of
            the squared mini-batch gradient, optionally clipped per tensor).
        backend: ``"reference"`` (per-sample autograd loop), ``"native"``, ``"triton"`` or
            ``"fused"`` (in-backward kernels). Only meaningful for ``mode="per-sample"``.
        max_samples: stop after this many samples (the last batch is truncated; not with a
            scalar batch loss).
        clip_norm: per-tensor gradient norm clip of ``mode="batch"`` (``None``: no clip), as
            ``torch.nn.utils.clip_grad_norm_(param, clip_norm)`` on each tensor.
        progress: show a tqdm bar.
        algorithm: ``"loop"`` (one autograd.grad per sample) or ``"in-backward"`` (one
            backward per batch with the backend's kernels); default: ``"loop"`` for the
            reference backend, ``"in-backward"`` otherwise. ``"in-backward"`` with
            ``backend="reference"`` runs the reference kernels inside backward (for tests).
        data_parallel: a :class:`~adtuning.distributed.DataParallel`: ``batches`` are this
            rank's parts of the global batches (``None`` for an empty part; every rank must
            see the same number of global batches) and the result is the Fisher of all ranks'
            samples, the same on every rank. ``"per-sample"``: the sums and the sample count are
            all-reduced once, in one buffer. ``"batch"``: each global batch's gradient is
            all-reduced (densely, as the published code does under DDP) before it is squared.
            Limit the samples in the sharded loader (``max_items``), not with ``max_samples``.
        train_mode: run the pass with the model in train mode (dropout, SpecAugment), as the
            published code does; only with ``mode="batch"``.
        in_backward_set: parameter names whose Linear/LayerNorm modules run the in-backward path
            although only ``params`` are scored (default: ``params``). A grouped pass hands every
            group the whole scored set, so that each pass differentiates exactly as one pass does.

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
    if train_mode and mode != "batch":
        raise ValueError("estimate_fisher: train_mode=True is only for mode='batch' (per-sample scores must not "
                         "depend on dropout or batching)")
    if groups != 1:
        from adtuning.fisher_groups import fisher_group_passes

        merged: dict[str, torch.Tensor] = {}
        for part in fisher_group_passes(model, batches, loss_fn, groups=groups, params=params, mode=mode, backend=backend,
                                        max_samples=max_samples, clip_norm=clip_norm, progress=progress, algorithm=algorithm,
                                        data_parallel=data_parallel, train_mode=train_mode,
                                        in_backward_set=in_backward_set):
            merged.update(part)
        return merged
    if callable(batches) and not hasattr(batches, "__iter__"):
        batches = batches()
    scored = _resolve_params(model, params)
    device = next(iter(scored.values())).device
    backend_name = resolve_backend_name(backend, device)
    if algorithm is None:
        algorithm = "loop" if backend_name == "reference" else "in-backward"
    if algorithm not in ("loop", "in-backward"):
        raise ValueError(f"estimate_fisher: unknown algorithm {algorithm!r}; choose 'loop' or 'in-backward'")
    if algorithm == "loop" and backend_name != "reference":
        raise ValueError(f"estimate_fisher: algorithm='loop' is the reference algorithm; backend {backend_name!r} runs in backward")

    # Per-sample sums under data parallel live in one flat buffer (+ the sample count).
    flat = data_parallel is not None and mode == "per-sample"
    fisher, buffer = _score_buffers(scored, device, flat)
    total = getattr(batches, "__len__", None)
    bar = tqdm(batches, total=total() if total else None, desc=f"Fisher ({mode}, {backend_name})", unit="batch",
               disable=not progress)
    common: dict[str, Any] = dict(max_samples=max_samples, data_parallel=data_parallel)
    try:
        if mode == "batch":
            with _pass_state(model, scored.values(), train_mode):
                denominator = _batch_gradients(model, bar, _Loss(loss_fn, FisherPass()), scored, fisher,
                                               clip_norm=clip_norm, **common)
            # Under data parallel every global batch was reduced before squaring: the sums are global.
        else:
            if algorithm == "loop":
                with _pass_state(model, scored.values(), train_mode=False):
                    samples = _per_sample_loop(model, bar, _Loss(loss_fn, FisherPass()), scored, fisher, **common)
            else:
                anchor = torch.zeros((), device=device, requires_grad=True)
                state = _InBackwardPass(get_backend(backend_name, device), anchor, fisher)
                samples = _per_sample_in_backward(model, bar, _Loss(loss_fn, state), scored, fisher, state, **common,
                                                  patched=None if in_backward_set is None else
                                                  {**_resolve_params(model, in_backward_set), **scored})
            if buffer is not None:
                assert data_parallel is not None  # the flat buffer exists only under data parallel
                buffer[-1] = samples
                data_parallel.all_reduce_sum_(buffer)
                samples = int(buffer[-1])
            denominator = samples
    finally:
        bar.close()
    if denominator == 0:
        raise ValueError("estimate_fisher: no samples were seen (empty batches?)")
    for value in fisher.values():
        value.div_(denominator)
    return fisher


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
