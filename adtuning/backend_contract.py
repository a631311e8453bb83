"""The backend contract and its registry: a leaf module every backend imports.

Design note — why a registry of plain Python objects and not ``torch.library`` custom ops for
every backend. A backend here is a *bundle* of hot operations that must be chosen
together (the optimizer, the Fisher pass and the sparse weight gradient of one run use one
backend, and tests hold each bundle against the reference bundle). The native C++ ops already
are schema-declared ``torch.ops.adtuning.*`` custom ops with fake (meta) implementations, so
they trace under ``torch.compile``. The Triton launchers stay plain Python: they are called
from the Fisher pass's autograd functions, the sparse weight-gradient hooks and the optimizer
step, none of which the project compiles today. Registering them as the CUDA kernels of the
same ``torch.library`` ops would tie the choice of backend to the tensor's device and remove
the explicit ``--backend reference`` / ``native`` / ``triton`` switch that the tests and
benchmarks rely on (the reference must also run on CUDA tensors, as the oracle there).
So: one registry, in which each backend module registers a *loader* at import time; nothing
imports a backend's heavy dependencies (a compiler, Triton) until its loader runs.

Module graph (``A -> B``: A imports B)::

    backend_contract          (torch only)
    reference (package) -> reference/<op>.py, backend_contract registers "reference"
    native       -> backend_contract                          registers "native"
    triton_backend -> backend_contract (kernels/ on first use) registers "triton"
    backends     -> backend_contract, reference, native, triton_backend   (the front door)

Each operation's signature and docstring live here once, as a :class:`typing.Protocol` with
only ``__call__`` (:class:`GatherOp`, :class:`SparseAdamWOp`, :class:`SparseAdamWMultiOp`,
:class:`LinearFisherOp`, :class:`SDDMMOp`); the :class:`Backend` fields have those types, so mypy checks every backend's
functions against them where the backend builds its :class:`Backend` (the Triton launchers,
which ``triton_backend`` imports at run time, are checked in ``kernels/__init__.py``), and
``tests/test_backend_contract.py`` compares each loadable backend's ``inspect.signature``
with the Protocol's (names, kinds, defaults and annotations). Implementations say which
Protocol they implement and document only what is specific to them.

Adding a backend: a module that calls :func:`register_backend` with a loader returning a
:class:`Backend`, and one import line in :mod:`adtuning.backends`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

__all__ = [
    "Backend",
    "BackendProvider",
    "BackendUnavailableError",
    "GatherOp",
    "LinearFisherOp",
    "OPERATIONS",
    "SDDMMOp",
    "SparseAdamWMultiOp",
    "SparseAdamWOp",
    "fused_provider",
    "providers",
    "register_backend",
]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class GatherOp(Protocol):
    """Gather of a dense gradient at a compressed index set (``Backend.gather``)."""

    def __call__(
        self,
        grad: torch.Tensor,
        indices: torch.Tensor,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """Return ``float32(grad.flatten()[indices])``, written into / added onto ``out`` when given.

        Runs in the per-parameter gradient hook, right after autograd accumulates the dense
        gradient, so that the dense gradient can be freed.

        Args:
            grad: dense gradient of any shape (fp32, bf16 or fp16).
            indices: 1-D sorted unique int32/int64 flat indices into ``grad``.
            out: optional contiguous fp32 buffer of length ``len(indices)`` to write into.
            accumulate: add into ``out`` instead of overwriting it (gradient accumulation over
                micro-batches).

        Returns:
            ``out`` when given, else a new fp32 tensor of length ``len(indices)``.
        """
        ...


class SparseAdamWOp(Protocol):
    """AdamW over a compressed index set (``Backend.sparse_adamw_``)."""

    def __call__(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        indices: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        master: torch.Tensor | None,
        *,
        step: float,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        """One AdamW step on the child entries of ``param`` only, in place.

        The child entries ``w = param.flatten()[indices]`` (or the fp32 ``master`` copy of
        them, when given) evolve exactly as ``torch.optim.AdamW`` (single-tensor path) would
        evolve the vector ``w`` alone with gradient ``grad``: decoupled weight decay, the
        moment updates, the bias-corrected step; the result is rounded into ``param``'s dtype.
        Every other entry of ``param`` is left untouched.

        Args:
            param: the dense parameter (fp32, bf16 or fp16), contiguous; updated in place.
            grad: fp32 compact gradient, length k.
            indices: 1-D sorted unique int32/int64 flat indices, length k.
            exp_avg, exp_avg_sq: fp32 compact moments, length k; updated in place.
            master: fp32 compact master weights (length k) for low-precision ``param``, else None.
            step: step number after incrementing (1 on the first step); the bias corrections
                ``1 - beta**step`` are computed in Python float, like ``torch.optim.AdamW``.
            lr, beta1, beta2, eps, weight_decay: the AdamW hyper-parameters (decoupled decay).
        """
        ...


class SparseAdamWMultiOp(Protocol):
    """AdamW over the compressed index sets of a list of tensors, in one call (``Backend.sparse_adamw_multi_``)."""

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        indices: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        masters: list[torch.Tensor | None],
        steps: list[float],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        """Exactly :class:`SparseAdamWOp` applied to each position of the lists in turn, bit for bit.

        For every ``t``, the result is that of ``sparse_adamw_(params[t], grads[t], indices[t],
        exp_avgs[t], exp_avg_sqs[t], masters[t], step=steps[t], lr=lr, ...)`` of the same
        backend (so the tensors may have different dtypes, index dtypes and step counts); fast
        implementations update all tensors in one pass instead of one call per tensor. Every
        list holds one entry per tensor; empty lists are a no-op. The arguments of all tensors
        are checked before any is written, so a bad argument at any position (a list length,
        a dtype, a length, a step < 1, and where the backend checks indices, an index outside
        its parameter) raises naming that position and leaves every tensor unwritten.
        Tensors at different positions must not share memory (implementations may update
        them concurrently).

        Args:
            params: the dense parameters (fp32, bf16 or fp16), contiguous; updated in place.
            grads: fp32 compact gradients, ``len(indices[t])`` entries each.
            indices: 1-D sorted unique int32/int64 flat indices into ``params[t]``.
            exp_avgs, exp_avg_sqs: fp32 compact moments; updated in place.
            masters: fp32 compact master weights for low-precision params, else None per entry.
            steps: each tensor's step number after incrementing (1 on its first step); the bias
                corrections ``1 - beta**steps[t]`` are computed in Python float, as by
                :class:`SparseAdamWOp`.
            lr, beta1, beta2, eps, weight_decay: the AdamW hyper-parameters, shared by all tensors.
        """
        ...


class LinearFisherOp(Protocol):
    """Per-sample Fisher of a Linear layer's weight and bias (``Backend.linear_fisher_``)."""

    def __call__(
        self,
        x: torch.Tensor,
        dy: torch.Tensor,
        fisher_w: torch.Tensor,
        fisher_b: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Accumulate ``fisher_w += sum_n (dy_n^T x_n)^2`` and ``fisher_b += sum_n (sum_t dy_n,t)^2``.

        For the input ``x`` and the output gradient ``dy`` of one backward pass over a sum of
        per-sample losses, sample n's weight gradient is ``dy_n^T x_n`` and its bias gradient
        is ``sum_t dy_n,t``; the accumulators receive their squares. Fast implementations never
        materialise a per-sample gradient.

        Args:
            x: [B, T, in] layer input (fp32, bf16 or fp16; math in fp32).
            dy: [B, T, out] gradient of the summed per-sample losses w.r.t. the layer output.
            fisher_w: contiguous fp32 [out, in] accumulator, updated in place.
            fisher_b: contiguous fp32 [out] accumulator, or None.
            lengths: optional int [B]; only frames ``t < lengths[n]`` of sample n count.
        """
        ...


class SDDMMOp(Protocol):
    """Child entries of a Linear weight gradient, a sampled dense-dense product (``Backend.sddmm``)."""

    def __call__(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        indices: torch.Tensor,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """Return ``float32((dy^T @ x).flatten()[indices])``, computed in fp32 without forming ``dy^T @ x``.

        For a Linear ``y = x W^T + b`` the weight gradient is ``dW = dy^T x`` ([out, in]); the
        flat index ``e = i * in + j`` is ``sum_n dy[n, i] * x[n, j]``. Nothing of the size of
        ``dW`` is formed.

        Args:
            dy: [N, out] gradient of the loss w.r.t. the Linear output, rows = all frames of
                the batch (fp32, bf16 or fp16).
            x: [N, in] the Linear input (fp32, bf16 or fp16).
            indices: 1-D sorted unique int32/int64 flat indices into the [out, in] weight.
            out: optional contiguous fp32 buffer of length ``len(indices)`` to write into.
            accumulate: add into ``out`` instead of overwriting it (gradient accumulation over
                micro-batches, or a layer called more than once).

        Returns:
            ``out`` when given, else a new fp32 tensor of length ``len(indices)``.
        """
        ...


OPERATIONS: dict[str, type] = {
    "gather": GatherOp,
    "sparse_adamw_": SparseAdamWOp,
    "sparse_adamw_multi_": SparseAdamWMultiOp,
    "linear_fisher_": LinearFisherOp,
    "sddmm": SDDMMOp,
}
"""The :class:`Backend` operation fields and the Protocol each one implements."""


@dataclass(frozen=True)
class Backend:
    """The hot operations of one backend, each typed by the Protocol holding its contract."""

    name: str
    gather: GatherOp
    sparse_adamw_: SparseAdamWOp
    sparse_adamw_multi_: SparseAdamWMultiOp
    linear_fisher_: LinearFisherOp
    sddmm: SDDMMOp


@dataclass(frozen=True)
class BackendProvider:
    """A registered backend: its name, a loader, and the devices ``"fused"`` means it on.

    ``load()`` returns the :class:`Backend` or raises :class:`BackendUnavailableError` saying
    what is missing; it may build or import things the first time and is called on every
    :func:`adtuning.backends.get_backend` (so it must be cheap once loaded).
    """

    name: str
    load: Callable[[], Backend]
    fused_on: tuple[str, ...] = ()
    description: str = ""


_PROVIDERS: dict[str, BackendProvider] = {}


def register_backend(provider: BackendProvider) -> BackendProvider:
    """Add ``provider`` to the registry; a name or a fused device type may be claimed once."""
    if provider.name in _PROVIDERS or provider.name == "fused":
        raise ValueError(f"backend name {provider.name!r} is already taken")
    for device_type in provider.fused_on:
        owner = fused_provider(device_type)
        if owner is not None:
            raise ValueError(f"'fused' on {device_type} is already backend {owner.name!r}")
    _PROVIDERS[provider.name] = provider
    return provider


def providers() -> dict[str, BackendProvider]:
    """The registered backends by name, in registration order."""
    return dict(_PROVIDERS)


def fused_provider(device_type: str) -> BackendProvider | None:
    """The backend that ``"fused"`` means on ``device_type`` (None when no backend claims it)."""
    return next((p for p in _PROVIDERS.values() if device_type in p.fused_on), None)
