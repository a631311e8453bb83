"""The backend contract and its registry: a leaf module every backend imports.

Design note — why a registry of plain Python objects and not ``torch.library`` custom ops for
every backend. A backend here is a *bundle* of four hot operations that must be chosen
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

Adding a backend: a module that calls :func:`register_backend` with a loader returning a
:class:`Backend`, and one import line in :mod:`adtuning.backends`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Backend:
    """The hot operations of one backend (see :mod:`adtuning.backends` for the contracts)."""

    name: str
    gather: Callable[..., torch.Tensor]
    sparse_adamw_: Callable[..., None]
    linear_fisher_: Callable[..., None]
    sddmm: Callable[..., torch.Tensor]


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
