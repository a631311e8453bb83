"""Sparse weight gradients in training: a Linear's child entries of ``dW``, never ``dW`` itself.

A step of CHILD-TUNING needs, for a scored ``nn.Linear`` with child entries ``(i, j)``, only
``g[e] = sum_{b,t} dY[b, t, i] * X[b, t, j]`` (a sampled dense-dense matrix product, SDDMM),
not the dense weight-gradient GEMM ``dY^T X`` followed by a gather. :func:`install_sparse_weight_grad`
routes such Linears through :class:`_SparseGradLinear`, whose backward

* returns the input gradient ``dX = dY W`` densely (the chain continues as usual),
* writes the child entries of the weight gradient with the backend's ``sddmm`` op straight
  into the compact fp32 buffer of the optimizer's :class:`~adtuning.compact_grad.CompactGradStore`
  (:meth:`~adtuning.compact_grad.CompactGradStore.target`; adding onto it for micro-batch
  accumulation), so no dense ``dW`` is ever allocated and no gather runs,
* returns the bias gradient densely (``out`` entries), which the store's usual hook gathers.

Whether a tensor takes this path is decided per tensor from its child density ``k / numel``:

``"dense"``  never (autograd's dense ``dW``, then the gather hook; the behaviour before).
``"sparse"`` every Linear weight with child entries.
``"auto"``   when the density is at most the :data:`DENSITY_THRESHOLDS` entry of the backend
             and the weight's dtype, a density at which the SDDMM beat dense GEMM + gather in
             ``bench/bench_sddmm.py``.

Either way the compact gradient is the same up to the fp32 summation order (the SDDMM sums in
fp32 even for bf16/fp16 activations, where autograd rounds ``dW`` to 16 bits before the
gather), so the child entries evolve alike and every other entry stays bit-identical.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from adtuning.backend_contract import SDDMMOp

if TYPE_CHECKING:
    from adtuning.compact_grad import CompactGradStore
    from adtuning.optim import SparseAdamW

log = logging.getLogger("adtuning")

WEIGHT_GRAD_MODES = ("auto", "dense", "sparse")

#: Per backend and weight dtype, the largest child density ``k / numel`` of a Linear weight for
#: which ``"auto"`` takes the SDDMM path: a density at which ``bench/bench_sddmm.py`` measured
#: the SDDMM faster than the dense weight-gradient GEMM plus the gather on every wav2vec2-base
#: Linear shape (768x768, 3072x768, 768x3072), at N = 98 rows (2 x 1 s) and N = 1592 rows
#: (8 x 4 s), one thread, 2026-12-01 (a shared 2-core machine, load 1.5-2):
#:
#: * ``native`` fp32: 1.7-4.7x faster at P = 0.05 (crossover at P >= 0.1 in the same runs).
#: * ``native`` bf16: 1.6-3.2x faster at P = 0.01, parity at P = 0.03 (the CPU's bf16 GEMM is
#:   3-4x faster than its fp32 one, the SDDMM is not). fp16 is given bf16's threshold, untimed.
#: * ``reference``: about 2x faster at P = 0.001, slower from P = 0.003 (N = 98).
#: * ``triton``: not yet measured on a GPU (none was available); 0.01 is a placeholder below the
#:   CPU crossovers. ``bench/gpu_check.py`` reports the crossover per dtype on CUDA (section
#:   ``sparse_weight_grad``, ``suggested_threshold``); set these from its figures.
DENSITY_THRESHOLDS: dict[str, dict[torch.dtype, float]] = {
    "reference": {torch.float32: 0.001, torch.bfloat16: 0.001, torch.float16: 0.001},
    "native": {torch.float32: 0.05, torch.bfloat16: 0.01, torch.float16: 0.01},
    "triton": {torch.float32: 0.01, torch.bfloat16: 0.01, torch.float16: 0.01},
}


def use_sparse_path(
    k: int,
    numel: int,
    backend: str,
    mode: str = "auto",
    thresholds: Mapping[str, float | Mapping[torch.dtype, float]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether a Linear weight with ``k`` of ``numel`` entries in the child takes the SDDMM path.

    Args:
        k, numel: child entries and all entries of the weight.
        backend: resolved backend name (``reference`` / ``native`` / ``triton``).
        mode: ``"auto"``, ``"dense"`` or ``"sparse"`` (see the module docstring).
        thresholds: density thresholds for ``"auto"`` per backend, each a float or a
            ``{weight dtype: float}`` mapping (default :data:`DENSITY_THRESHOLDS`).
        dtype: the weight's dtype (the dense GEMM's speed depends on it).
    """
    if mode not in WEIGHT_GRAD_MODES:
        raise ValueError(f"unknown weight-gradient mode {mode!r}; choose one of {', '.join(WEIGHT_GRAD_MODES)}")
    if k == 0 or mode == "dense":
        return False
    if mode == "sparse":
        return True
    table: Mapping[str, float | Mapping[torch.dtype, float]] = DENSITY_THRESHOLDS if thresholds is None else thresholds
    threshold = table[backend]
    if isinstance(threshold, Mapping):
        threshold = threshold.get(dtype, threshold[torch.float32])
    return k / numel <= threshold


@dataclass(frozen=True)
class _Route:
    """Where the compact weight gradient of one Linear goes."""

    store: "CompactGradStore"
    weight: torch.Tensor
    indices: torch.Tensor
    sddmm: SDDMMOp

    def write(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        buffer, accumulate = self.store.target(self.weight)
        self.sddmm(dy, x, self.indices, out=buffer, accumulate=accumulate)


class _SparseGradLinear(torch.autograd.Function):
    """y = x W^T + b whose backward yields dx and db densely and only the child entries of dW,
    written into the optimizer's compact buffer (the weight's autograd gradient stays None)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: _Route) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.route = route
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.to(weight.dtype) @ weight
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            ctx.route.write(dy, x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0)
        return grad_x, None, grad_bias, None


@dataclass
class SparseWeightGrad:
    """The Linears of a model routed through the sparse weight-gradient path, and the rest.

    Returned by :func:`install_sparse_weight_grad`; :meth:`remove` (or leaving a ``with``
    block) restores the modules' own ``forward``.

    Attributes:
        mode: the weight-gradient mode it was installed with.
        backend: the optimizer's backend, whose ``sddmm`` the sparse path runs.
        sparse: ``{module name: child density}`` of the Linears on the SDDMM path.
        dense: ``{module name: child density}`` of trained Linears left on dense GEMM + gather.
    """

    mode: str
    backend: str
    sparse: dict[str, float] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)
    _patched: list[nn.Module] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Give every patched Linear its own ``forward`` back (idempotent)."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    def summary(self) -> str:
        """One line for the log: how many Linears take which path."""
        return (
            f"weight gradients ({self.mode}, backend {self.backend}): {len(self.sparse)} Linear weights by SDDMM "
            f"into the compact buffers, {len(self.dense)} by dense GEMM + gather"
        )

    def __enter__(self) -> "SparseWeightGrad":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _sparse_forward(module: nn.Linear, route: _Route) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Outside autograd (evaluation) there is no gradient to route: plain F.linear.
        if not torch.is_grad_enabled() or not module.weight.requires_grad:
            return F.linear(x, module.weight, module.bias)
        out: torch.Tensor = _SparseGradLinear.apply(x, module.weight, module.bias, route)
        return out

    return forward


def install_sparse_weight_grad(
    model: nn.Module,
    optimizer: "SparseAdamW",
    mode: str = "auto",
    *,
    thresholds: Mapping[str, float | Mapping[torch.dtype, float]] | None = None,
) -> SparseWeightGrad:
    """Route the trained ``nn.Linear`` weights of ``model`` through the sparse gradient path.

    Every ``nn.Linear`` (exactly that class's ``forward``; subclasses with their own are left
    alone) whose weight is a sparse parameter of ``optimizer`` with child entries is considered;
    :func:`use_sparse_path` decides per weight. A chosen module's ``forward`` is replaced by
    one that writes the child entries of its weight gradient into the optimizer's compact
    buffer in backward (``optimizer.grad_store``, see the module docstring). Nothing else changes: the bias, other
    parameters and dense groups keep their ordinary gradients and hooks.

    Args:
        model: the module holding the Linears (e.g. the whole model, upstream and head).
        optimizer: the :class:`~adtuning.optim.SparseAdamW` training the child network.
        mode: ``"auto"``, ``"dense"`` or ``"sparse"``.
        thresholds: density thresholds for ``"auto"`` per backend, each a float or a
            ``{weight dtype: float}`` mapping (default :data:`DENSITY_THRESHOLDS`).

    Returns:
        a :class:`SparseWeightGrad`; call :meth:`SparseWeightGrad.remove` before the optimizer
        is discarded (e.g. when a search swaps the candidate out).

    Raises:
        ValueError: unknown ``mode``.
        RuntimeError: a Linear to be routed already has a patched ``forward`` (another
            installation, or a Fisher pass in progress).
    """
    if mode not in WEIGHT_GRAD_MODES:
        raise ValueError(f"unknown weight-gradient mode {mode!r}; choose one of {', '.join(WEIGHT_GRAD_MODES)}")
    handle = SparseWeightGrad(mode=mode, backend=optimizer.backend_name)
    store = optimizer.grad_store
    trained = {id(p) for p in store.parameters()}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            continue
        weight = module.weight
        if id(weight) not in trained:
            continue
        indices = store.indices(weight)
        density = indices.numel() / weight.numel()
        if not use_sparse_path(indices.numel(), weight.numel(), handle.backend, mode, thresholds, weight.dtype):
            handle.dense[name] = density
            continue
        if "forward" in module.__dict__:
            handle.remove()
            raise RuntimeError(f"install_sparse_weight_grad: {name!r} already has a patched forward")
        route = _Route(store=store, weight=weight, indices=indices, sddmm=optimizer.backend.sddmm)
        module.forward = _sparse_forward(module, route)  # type: ignore[method-assign,assignment]
        handle._patched.append(module)
        handle.sparse[name] = density
    log.info("%s", handle.summary())
    return handle
