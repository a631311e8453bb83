"""Backend selection: one contract, three implementations.

===========  ==========  ==========================================================
backend      device      implementation
===========  ==========  ==========================================================
reference    any         ``adtuning.reference``: plain PyTorch, the oracle
native       CPU         ``csrc/`` C++ ops registered as ``torch.ops.adtuning.*``
triton       CUDA        ``adtuning.kernels`` (the top-level ``kernels/`` folder)
===========  ==========  ==========================================================

``"fused"`` resolves to ``triton`` on CUDA and ``native`` on CPU. Asking for a backend that
cannot run raises :class:`BackendUnavailableError` naming what is missing; there is never a
silent fallback to the reference path.

Every backend object exposes the same four operations:

``gather(grad, indices, out=None, accumulate=False) -> Tensor``
    ``float32(grad.flatten()[indices])``, written into / added onto ``out`` when given.
``sparse_adamw_(param, grad, indices, exp_avg, exp_avg_sq, master, *, step, lr, beta1, beta2, eps, weight_decay)``
    one AdamW step on the child entries of ``param`` (see :func:`adtuning.reference.sparse_adamw_ref_`).
``linear_fisher_(x, dy, fisher_w, fisher_b=None, lengths=None)``
    per-sample Fisher accumulation of a Linear layer (see :func:`adtuning.reference.linear_fisher_ref_`).
``sddmm(dy, x, indices, out=None, accumulate=False) -> Tensor``
    the child entries of a Linear weight gradient, ``float32((dy^T @ x).flatten()[indices])``,
    without the dense ``dy^T @ x`` (see :func:`adtuning.reference.sddmm_ref`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from adtuning import reference

log = logging.getLogger("adtuning")

BACKENDS = ("reference", "native", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Backend:
    """The hot operations of one backend (see the module docstring for the contracts)."""

    name: str
    gather: Callable[..., torch.Tensor]
    sparse_adamw_: Callable[..., None]
    linear_fisher_: Callable[..., None]
    sddmm: Callable[..., torch.Tensor]


REFERENCE = Backend(
    name="reference",
    gather=reference.gather_ref,
    sparse_adamw_=reference.sparse_adamw_ref_,
    linear_fisher_=reference.linear_fisher_ref_,
    sddmm=reference.sddmm_ref,
)


def resolve_backend_name(name: str, device: torch.device | str | None = None) -> str:
    """Map ``"fused"`` to ``"triton"`` (CUDA) or ``"native"`` (CPU); validate other names."""
    if name == "fused":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return "triton" if dev.type == "cuda" else "native"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS + ('fused',))}"
        )
    return name


def get_backend(name: str = "reference", device: torch.device | str | None = None) -> Backend:
    """Return the :class:`Backend` called ``name`` (``"fused"`` resolved for ``device``).

    Raises:
        BackendUnavailableError: the backend's requirements (compiled ops, Triton, CUDA)
            are missing; the message names them.
    """
    resolved = resolve_backend_name(name, device)
    if resolved == "reference":
        return REFERENCE
    if resolved == "native":
        from adtuning import native

        return native.backend()
    from adtuning import triton_backend

    return triton_backend.backend()
