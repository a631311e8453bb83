"""Backend selection: one contract, three implementations that register themselves.

===========  ==========  ==========================================================
backend      device      implementation
===========  ==========  ==========================================================
reference    any         ``adtuning.reference``: plain PyTorch, the oracle
native       CPU         ``csrc/`` C++ ops registered as ``torch.ops.adtuning.*``
triton       CUDA        ``adtuning.kernels`` (the top-level ``kernels/`` folder)
===========  ==========  ==========================================================

``"fused"`` resolves to the backend that claims the device (``triton`` on CUDA, ``native`` on
CPU). Asking for a backend that
cannot run raises :class:`BackendUnavailableError` naming what is missing; there is never a
silent fallback to the reference path.

Every backend object exposes the same five operations, each typed by a Protocol of
:mod:`adtuning.backend_contract` that holds its signature and docstring:

=======================  =============================================  ============================
field                    what it does                                   Protocol
=======================  =============================================  ============================
``gather``               ``float32(grad.flatten()[indices])``           :class:`GatherOp`
``sparse_adamw_``        one AdamW step on the child entries            :class:`SparseAdamWOp`
``sparse_adamw_multi_``  ``sparse_adamw_`` on a list of tensors, in     :class:`SparseAdamWMultiOp`
                         one call (the optimizer's step of a group)
``linear_fisher_``       per-sample Fisher of a Linear layer            :class:`LinearFisherOp`
``sddmm``                child entries of a Linear weight gradient      :class:`SDDMMOp`
=======================  =============================================  ============================

The contract types and the registry live in the leaf module :mod:`adtuning.backend_contract`
(its docstring has the design note and the module graph); each backend module registers
itself there when imported, and this module imports them all and is the front door.
"""
from __future__ import annotations

import torch

# Importing a backend module registers it (cheap: nothing is built or compiled at import);
# the order of these imports is the order of BACKENDS.
# isort: off
from adtuning import reference as _reference  # noqa: F401
from adtuning import native as _native  # noqa: F401
from adtuning import triton_backend as _triton_backend  # noqa: F401
# isort: on
from adtuning.backend_contract import Backend, BackendUnavailableError, fused_provider, providers

__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "get_backend", "resolve_backend_name"]

BACKENDS = tuple(providers())
"""The registered backend names (``"fused"`` is an alias resolved per device)."""


def resolve_backend_name(name: str, device: torch.device | str | None = None) -> str:
    """Map ``"fused"`` to the backend that claims ``device``'s type; validate other names."""
    if name == "fused":
        device_type = torch.device(device).type if device is not None else "cpu"
        provider = fused_provider(device_type)
        if provider is None:
            raise BackendUnavailableError(f"no fused backend for device type {device_type!r}; choose 'reference'")
        return provider.name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS + ('fused',))}")
    return name


def get_backend(name: str = "reference", device: torch.device | str | None = None) -> Backend:
    """Return the :class:`Backend` called ``name`` (``"fused"`` resolved for ``device``).

    Raises:
        BackendUnavailableError: the backend's requirements (compiled ops, Triton, CUDA)
            are missing; the message names them.
    """
    return providers()[resolve_backend_name(name, device)].load()
